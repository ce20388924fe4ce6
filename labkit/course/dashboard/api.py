"""What the notebooks call: each function builds a model and its view and
returns the displayable widget, whose ``.model`` is the model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from labkit.course.dashboard.models import (
    BootProgressModel,
    DashboardModel,
    KernelLogModel,
    MatrixModel,
    PinModel,
    VMPanelModel,
)
from labkit.course.dashboard.protocols import (
    DashboardLab,
    DashboardVM,
    GuestMachine,
    MatrixLab,
    PinLab,
)
from labkit.course.dashboard.widgets import (
    BootProgress,
    Dashboard,
    LogPane,
    MatrixTable,
    PinPanel,
    VMPanel,
)

log = logging.getLogger(__name__)


def boot_progress(expected_seconds: float = 10.0) -> BootProgress:
    """A boot progress bar, its clock started; pass ``.model.on_console_line``
    to ``labkit.connect`` and call ``.model.finish(vm)`` when it returns (it
    says "attached" if no console line came: the VM was already running)."""
    model = BootProgressModel(expected_seconds)
    model.begin()
    return BootProgress(model)


def vm_panel(vm: DashboardVM, poll_interval: float | None = 2.0) -> VMPanel:
    """State, kernel, release, accelerator (and why), boot progress, Start/Stop/Reset."""
    return VMPanel(VMPanelModel(vm, poll_interval=poll_interval))


def log_pane(vm: GuestMachine, lab: object = None, since_now: bool = False) -> LogPane:
    """The live kernel log with EXPERIMENTAL warnings, pin refusals and
    check_vma_flags refusals highlighted."""
    return LogPane(KernelLogModel(vm, lab).start(since_now=since_now))


def pin_panel(vm: GuestMachine, lab: PinLab, interval: float = 1.0) -> PinPanel:
    """VmPin of the holder and nr_foll_pin_acquired/released over time, with
    Register / Release of a held RDMA registration on a chosen memory kind."""
    return PinPanel(PinModel(vm, lab, interval=interval).start())


def matrix_table(results: Mapping[str, Any] | None = None, lab: MatrixLab | None = None) -> MatrixTable:
    """``Lab.matrix()`` output (or ``{label: matrix}`` side by side) as a coloured table."""
    return MatrixTable(MatrixModel(results, lab=lab))


def dashboard(vm: DashboardVM, lab: DashboardLab | None = None) -> Dashboard:
    """The VM panel above tabs with the kernel log, the pin counters and the pin matrix."""
    if lab is None:
        from labkit.lab import Lab
        lab = Lab(vm)
    log.debug("dashboard for VM %s", vm.name)
    panel, log_view, pins, matrix = vm_panel(vm), log_pane(vm, lab), pin_panel(vm, lab), matrix_table(None, lab)
    model = DashboardModel(panel.model, log_view.model, pins.model, matrix.model)
    return Dashboard(model, panel, log_view, pins, matrix)


def prediction_table(prediction: Any, observed: Any) -> Any:
    """The learner's recorded prediction beside what the kernel did, one row
    per observed case (``observed``: pin results or case -> answer); e.g.
    ``prediction_table(grading.recorded("ex3.0"), results)``. Not graded."""
    from labkit.course.predictions import show
    return show(prediction, observed)
