"""The models of the whole dashboard, wired together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from labkit.course.dashboard.models.kernel_log import KernelLogModel
from labkit.course.dashboard.models.matrix import MatrixModel
from labkit.course.dashboard.models.pins import PinModel
from labkit.course.dashboard.models.vm_panel import VMPanelModel

log = logging.getLogger(__name__)


@dataclass
class DashboardModel:
    """The models of the whole dashboard, wired so a stop/reset from the VM
    panel closes the observers' channels first and reopens them after."""

    vm_panel: VMPanelModel
    log: KernelLogModel
    pins: PinModel
    matrix: MatrixModel

    def __post_init__(self) -> None:
        self.vm_panel.before_stop.append(self._before_stop)
        self.vm_panel.after_start.append(self._after_start)

    def _before_stop(self) -> None:
        log.debug("dashboard: closing the observers' channels before a stop")
        self.pins.stop()
        self.log.stop()

    def _after_start(self) -> None:
        log.debug("dashboard: reopening the observers' channels after a boot")
        self.log.start()
        self.pins.restart()

    def close(self) -> None:
        """Close every model (their threads and SSH channels)."""
        for m in (self.pins, self.log, self.matrix, self.vm_panel):
            m.close()
