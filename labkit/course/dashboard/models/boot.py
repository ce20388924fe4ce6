"""Boot progress fed by the guest's serial console lines."""

from __future__ import annotations

import logging
import re
import time

from traitlets import Bool, Float, Int, Unicode

from labkit.course.dashboard.models.base import Model, Periodic, message
from labkit.course.dashboard.protocols import DashboardVM

log = logging.getLogger(__name__)

# Console milestones of a labkit guest boot, in order, and how far along each is.
BOOT_MILESTONES: tuple[tuple[str, float, str], ...] = (
    (r"Linux version \S+", 0.10, "the kernel is starting"),
    (r"Run /init as init process|Freeing unused kernel", 0.35, "the initramfs is mounting the root disk"),
    (r"EXT4-fs \(vda\): mounted", 0.50, "root disk mounted; the labkit init is starting"),
    (r"labkit: hostkey", 0.80, "sshd is starting"),
    (r"labkit: ready", 0.95, "the guest is ready; connecting over SSH"),
)


class BootProgressModel(Model):
    """Boot progress fed by the guest's serial console lines.

    ``on_console_line`` is what ``VM(on_console_line=...)`` or
    ``labkit.connect(on_console_line=...)`` calls for each console line.
    The fraction only moves forward: the larger of the last milestone seen
    and the elapsed time over the expected boot time.
    """

    expected_seconds = Float(10.0)
    fraction = Float(0.0)
    stage = Unicode("not started")
    last_line = Unicode("")
    lines = Int(0, help="console lines seen in this boot")
    started = Float(None, allow_none=True, help="time.monotonic() when the boot began")
    elapsed = Float(0.0)
    done = Bool(False)
    summary = Unicode("")

    def __init__(self, expected_seconds: float = 10.0) -> None:
        super().__init__(expected_seconds=expected_seconds)
        self._ticker: Periodic | None = None

    def begin(self, expected_seconds: float | None = None, tick: float | None = 0.5) -> None:
        """Start the clock. With ``tick``, a thread advances the bar by elapsed
        time between console lines (the guest kernel logs little to the console)."""
        if expected_seconds:
            self.expected_seconds = expected_seconds
        self._stop_tick()
        self.fraction, self.stage, self.last_line, self.lines = 0.0, "starting QEMU", "", 0
        self.started, self.elapsed, self.done, self.summary, self.error = time.monotonic(), 0.0, False, "", ""
        log.debug("boot progress: begun (expecting %.1f s)", self.expected_seconds)
        if tick:
            self._ticker = Periodic("labkit-boot-progress", tick, self._advance).start()

    def _stop_tick(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.stop(timeout=2)

    def _advance(self, line: str = "") -> None:
        if self.started is None or self.done:
            return
        self.elapsed = time.monotonic() - self.started
        for rx, frac, stage in BOOT_MILESTONES:
            if line and frac > self.fraction and re.search(rx, line):
                self.fraction, self.stage = frac, stage
        by_time = 0.9 * min(1.0, self.elapsed / max(1.0, self.expected_seconds))
        self.fraction = max(self.fraction, by_time)
        if self.stage == "starting QEMU" and self.elapsed > 1.0:
            self.stage = "booting (the guest kernel writes little to the console)"

    def on_console_line(self, line: str) -> None:
        """One serial console line (starts the clock if it is not running)."""
        if self.started is None:
            self.begin()
        self.lines += 1
        self.last_line = line.strip()[:160]
        self._advance(line)

    def finish(self, vm: DashboardVM | None = None, attached: bool | None = None) -> None:
        """Mark the boot done; with ``vm``, summarise what the live guest reported."""
        self._stop_tick()
        if self.started is not None:
            self.elapsed = time.monotonic() - self.started
        if vm is not None:
            self.summary = self._summarise(vm, attached)
        self.done, self.fraction = True, 1.0
        self.stage = "done"
        log.debug("boot progress: done (%s)", self.summary)

    def _summarise(self, vm: DashboardVM, attached: bool | None) -> str:
        d = vm.describe()
        accel = vm.accel or d.get("accel")
        if attached or (attached is None and not self.lines):
            how = "attached to the running guest"
        else:
            how = f"booted in {self.elapsed:.1f} s"
        return f"{how}: kernel {d.get('kernel_release') or '?'}, accelerator {accel}"

    def fail(self, exc: BaseException) -> None:
        """Mark the boot failed with a learner-facing message."""
        self._stop_tick()
        self.error = message(exc)
        self.stage = "failed"
        log.debug("boot progress: failed (%s)", self.error)

    def close(self) -> None:
        self._stop_tick()
        super().close()
