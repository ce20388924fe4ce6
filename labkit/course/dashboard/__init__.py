"""Live dashboards for the course notebooks: ipywidgets views over plain models.

Every panel is a thin view (STYLE.md item 10). The state and the actions live
in plain models (traitlets ``HasTraits``) that know nothing about widgets and
can be driven and tested without a browser:

* ``VMPanelModel``   state, kernel, release, accelerator (and why), boot
                     progress; start / stop / reset actions
* ``KernelLogModel`` the guest's kernel log (``labkit.lab.observe.KernelLog``) plus
                     the ``check_vma_flags`` refusals traced by a kretprobe,
                     with the lines that matter classified
* ``PinModel``       VmPin of a holder process and the FOLL_PIN counters over
                     time (``labkit.lab.observe.PinCounters``); register/release a
                     long-term pin on a chosen memory kind
* ``MatrixModel``    ``Lab.matrix()`` results (one kernel or several)

The package's layers: ``protocols`` (what a dashboard needs from a VM and a
Lab), ``models/`` (state and actions), ``render`` (pure HTML/SVG), ``widgets``
(the views) and ``api`` (the functions below).

The public functions ``vm_panel``, ``log_pane``, ``pin_panel``,
``matrix_table``, ``boot_progress`` and ``dashboard`` return displayable
widgets whose ``.model`` attribute is the model. Every value shown comes from
the live guest. Background threads (log readers, the pin sampler, actions
started by buttons) never block the notebook's kernel, every wait is bounded,
and ``close()`` on a widget or model stops its threads and closes its SSH
channels.
"""

from labkit.course.dashboard.api import (
    boot_progress,
    dashboard,
    log_pane,
    matrix_table,
    pin_panel,
    prediction_table,
    vm_panel,
)
from labkit.course.dashboard.models import (
    BOOT_MILESTONES,
    BootProgressModel,
    Cell,
    DashboardModel,
    FollowedDmesg,
    KernelLogModel,
    MatrixModel,
    Model,
    PinModel,
    RefusalTrace,
    VMPanelModel,
    trace_script,
)
from labkit.course.dashboard.render import (
    HIGHLIGHT_LABELS,
    LOG_COLOURS,
    MISSING_BG,
    OK_BG,
    REFUSED_BG,
    log_html,
    matrix_html,
    sparkline_svg,
)
from labkit.course.dashboard.widgets import (
    BootProgress,
    Dashboard,
    LogPane,
    MatrixTable,
    PinPanel,
    VMPanel,
)

__all__ = [
    "BootProgressModel",
    "DashboardModel",
    "KernelLogModel",
    "MatrixModel",
    "PinModel",
    "VMPanelModel",
    "boot_progress",
    "dashboard",
    "log_html",
    "log_pane",
    "matrix_html",
    "matrix_table",
    "pin_panel",
    "prediction_table",
    "sparkline_svg",
    "vm_panel",
]

# Also reachable as attributes (not exported by ``import *``), as before the split.
_internal = (BOOT_MILESTONES, trace_script, Cell, FollowedDmesg, Model, RefusalTrace, HIGHLIGHT_LABELS,
             LOG_COLOURS, MISSING_BG, OK_BG, REFUSED_BG, BootProgress, Dashboard, LogPane, MatrixTable, PinPanel,
             VMPanel)
