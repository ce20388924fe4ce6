"""The VM's lifecycle as the learner sees it: state, kernel, release,
accelerator and why, boot progress; Start / Stop / Reset actions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from traitlets import Float, Unicode

from labkit.course.dashboard.models.base import Model, Periodic, message
from labkit.course.dashboard.models.boot import BootProgressModel
from labkit.course.dashboard.protocols import DashboardVM
from labkit.errors import LabError

log = logging.getLogger(__name__)

Hook = Callable[[], None]


class VMPanelModel(Model):
    """The VM's lifecycle as the learner sees it; values read from the live VM.

    ``before_stop`` / ``after_start`` hooks let other models drop and reopen
    their SSH channels around a stop, start or reset. With ``poll_interval``,
    a poller notices a stop or crash that happened outside the dashboard.
    """

    name = Unicode("?")
    state = Unicode("unknown")
    kernel = Unicode("")
    kernel_release = Unicode("")
    accel = Unicode("")
    accel_reason = Unicode("")
    boot_seconds = Float(None, allow_none=True)
    message = Unicode("")

    def __init__(self, vm: DashboardVM, poll_interval: float | None = 2.0) -> None:
        super().__init__(name=vm.name)
        self.vm = vm
        self.progress = BootProgressModel()
        self.before_stop: list[Hook] = []
        self.after_start: list[Hook] = []
        self.refresh()
        self._poller: Periodic | None = None
        if poll_interval:
            self._poller = Periodic("labkit-vm-panel", poll_interval, self._poll_once).start()

    def refresh(self) -> None:
        """Read state, kernel, release and accelerator from the VM (release via ``uname -r``)."""
        d = self.vm.describe()
        self.state = str(d.get("state", "unknown"))
        self.kernel = str(d.get("kernel") or self.vm.kernel or "")
        choice = self.vm.accel
        self.accel = (choice.accel if choice else d.get("accel")) or ""
        self.accel_reason = (choice.reason if choice else d.get("accel_reason")) or ""
        self.boot_seconds = d.get("boot_seconds")
        self.kernel_release = self._ask_release(d) if self.state == "running" else ""

    def _ask_release(self, described: Mapping[str, Any]) -> str:
        if str(self.vm.state) != "running":
            return ""
        try:   # what the guest itself says, not what was recorded at boot
            return self.vm.run(["uname", "-r"], timeout=15).stdout.strip()
        except LabError as exc:
            self.message = f"could not ask the guest for its kernel release: {exc}"
            return str(described.get("kernel_release") or "")

    def _poll_once(self) -> None:
        # Only the host-side status (vm.json and /proc): a stop from a terminal
        # (`labkit vm stop`) or a crash shows up without touching the guest.
        if self.busy:
            return
        try:
            st = str(self.vm.status())
        except Exception:
            log.debug("VM status unreadable", exc_info=True)
            return
        if st == self.state:
            return
        log.debug("VM %s: %s -> %s (noticed by the poller)", self.name, self.state, st)
        try:
            if self.state == "running":   # stopped or crashed elsewhere: the observers' channels are gone
                self._run_hooks(self.before_stop)
                self.message = f"the VM is {st} (stopped from outside this dashboard?)"
            self.refresh()
        except Exception as exc:
            log.debug("VM %s: refresh after an outside change failed", self.name, exc_info=True)
            self.message = message(exc)

    # actions (synchronous; the view runs them through ``submit``)
    def start(self) -> None:
        """Boot the VM (after clearing a VM object that missed an outside stop)."""
        if str(self.vm.status()) != "running" and str(self.vm.state) in ("running", "starting", "stopping"):
            self.vm.stop()    # stopped or crashed behind our back: clear this VM object's stale channels first
        self._boot(self.vm.start, "started")

    def reset(self) -> None:
        """``vm.reset()``: the guest back to a fresh start, persistent memory kept."""
        self._run_hooks(self.before_stop)
        self._boot(self.vm.reset, "reset")

    def stop(self) -> None:
        """Shut the guest down (persistent memory kept)."""
        self._run_hooks(self.before_stop)
        self.state = "stopping"
        log.debug("VM %s: stopping", self.name)
        self.vm.stop()
        self.message = "stopped (persistent memory kept; Start boots it again)"
        self.refresh()

    def _boot(self, action: Callable[[], object], verb: str) -> None:
        info = self.vm.describe()
        self.progress.begin(expected_seconds=info.get("boot_seconds") or 10.0)
        self.state = "starting"
        self.message = ""
        log.debug("VM %s: %s", self.name, "starting" if verb == "started" else "resetting")
        old = self.vm.on_console_line
        feed = self.progress.on_console_line

        def both(line: str) -> None:
            feed(line)
            if old is not None:
                old(line)
        self.vm.on_console_line = both
        try:
            action()
        except BaseException as exc:
            self.progress.fail(exc)
            self.refresh()
            raise
        finally:
            self.vm.on_console_line = old
        self.progress.finish(self.vm, attached=False)
        self.message = f"{verb}: {self.progress.summary}"
        self.refresh()
        self._run_hooks(self.after_start)
        log.debug("VM %s: %s", self.name, self.message)

    def _run_hooks(self, hooks: Iterable[Hook]) -> None:
        for fn in list(hooks):
            try:
                fn()
            except Exception as exc:   # a broken hook must not stop the lifecycle action
                log.debug("VM %s: hook %r failed", self.name, fn, exc_info=True)
                self.message = f"{self.message} ({message(exc)})".strip()

    def submit_action(self, name: str) -> bool:
        """``start``, ``stop`` or ``reset`` on the worker (what the buttons do)."""
        fn = {"start": self.start, "stop": self.stop, "reset": self.reset}[name]
        return self.submit(name, fn)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop(timeout=5)
        self.progress.close()
        super().close()
