"""The dashboards' plain models: state and actions, no widgets.

``Model`` (traitlets ``HasTraits`` with one action at a time on a worker) is
the base of ``BootProgressModel``, ``VMPanelModel``, ``KernelLogModel``,
``PinModel`` and ``MatrixModel``; ``DashboardModel`` wires four of them
together. Tests drive them without a browser.
"""

from labkit.course.dashboard.models.base import Model, Periodic, message
from labkit.course.dashboard.models.boot import BOOT_MILESTONES, BootProgressModel
from labkit.course.dashboard.models.dashboard import DashboardModel
from labkit.course.dashboard.models.followers import (
    FollowedDmesg,
    GuestFollower,
    RefusalTrace,
    trace_script,
)
from labkit.course.dashboard.models.kernel_log import KernelLogModel
from labkit.course.dashboard.models.matrix import Cell, MatrixModel
from labkit.course.dashboard.models.pins import PinModel
from labkit.course.dashboard.models.vm_panel import VMPanelModel

__all__ = ["BOOT_MILESTONES", "trace_script", "BootProgressModel", "Cell", "DashboardModel", "FollowedDmesg",
           "GuestFollower", "KernelLogModel", "MatrixModel", "Model", "Periodic", "PinModel", "RefusalTrace",
           "VMPanelModel", "message"]
