"""Watching a running guest while commands run: gather the evidence (QEMU
alive? QMP run state? does sshd answer?) and let ``health.diagnose`` say what
it means, so a dead, paused or starved guest ends a wait early with the
reason instead of a timeout.

The watch reads one ``Running`` and changes nothing of it but closing its
channels once it is dead: a dead guest is reported as ``GuestDied`` (the
caller marks itself dead), a restart by another process as the ``Running``
that replaced it (the caller swaps it in). It never sees the ``VM`` facade.
"""

from __future__ import annotations

import logging
import time

from labkit.errors import ChannelError, GuestDied, GuestHung, LabError
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.health import PROBE_AFTER, Evidence, diagnose, died
from labkit.machine.running import Running

log = logging.getLogger(__name__)


class Watch:
    """Fault detection for one VM's guests, one command at a time."""

    def __init__(self) -> None:
        self._silent_since: float | None = None
        self._last_probe = 0.0

    def evidence(self, guest: Running, alive: bool, qmp_status: str | None = None,
                 seconds: float = 0.0) -> Evidence:
        sd, proc = guest.sd, guest.proc
        return Evidence(name=guest.name, qemu_alive=alive, pid=guest.pid,
                        exit_code=proc.returncode if proc is not None else None, qmp_status=qmp_status,
                        sshd_silent_for=(time.monotonic() - self._silent_since) if self._silent_since else 0.0,
                        console_text=sd.console_tail(20000), qemu_log=sd.qemu_log_tail(),
                        state_dir=str(sd.path), seconds=seconds)

    def death(self, guest: Running) -> GuestDied:
        """The guest's QEMU is gone: close its channels, say why."""
        guest.exit_code()      # our own child: collect its exit status (it may have just become a zombie)
        try:
            guest.close()
        except Exception:   # noqa: BLE001 - closing sockets of a dead QEMU must not hide why it died
            pass
        return died(self.evidence(guest, alive=False))

    def qmp_status(self, guest: Running, timeout: float = 2.0) -> str | None:
        """QEMU's run state, or None if QMP does not answer. Asked on the
        watchdog's own monitor (``watch.sock``): a monitor serves one client at a
        time, and the main one may be held by ``vm.qmp``. The connection is
        short-lived so that another process watching the same VM gets its turn.
        A QEMU started before the watchdog had its own monitor has only ``qmp.sock``."""
        sd = guest.sd
        socket = sd.watch_socket if sd.watch_socket.exists() else sd.qmp_socket
        try:
            with QMPChannel(socket).connect(timeout=timeout) as q:
                return q.status()
        except LabError:
            return None

    def begin_command(self, guest: Running) -> Running:
        """Before a command: GuestDied if QEMU is gone. Returns the guest to
        run it on: ``guest``, or the one that replaced it when another process
        restarted the VM (e.g. `labkit vm reset` in a terminal)."""
        self._silent_since = None
        if not guest.alive():
            raise self.death(guest)
        return guest.successor() or guest

    def on_quiet(self, guest: Running, quiet: float) -> None:
        """Called while a command is silent: raise when QEMU died, the CPUs are
        paused, or sshd stopped answering although the CPUs run."""
        if not guest.alive():
            raise self.death(guest)
        status = self.qmp_status(guest)
        now = time.monotonic()
        if status == "running" and quiet >= PROBE_AFTER and now - self._last_probe >= 3.0:
            self._last_probe = now
            if guest.ssh.responsive(timeout=5.0):
                self._silent_since = None
            elif self._silent_since is None:
                self._silent_since = now
        problem = diagnose(self.evidence(guest, alive=True, qmp_status=status, seconds=quiet))
        if problem is not None:
            raise problem

    def explain(self, guest: Running, exc: LabError, waited: float = 0.0) -> None:
        """After a channel error or timeout: raise what really happened to the
        guest (QEMU gone, kernel panic, CPUs paused, sshd starved), if anything.
        ``waited``: how long the caller waited (a channel error does not say)."""
        if not guest.alive():
            raise self.death(guest) from exc
        status = self.qmp_status(guest)
        if status is None:
            # QMP silent and the connection gone: QEMU may be exiting right now
            # (its sockets close before the process is reaped), e.g. after a panic.
            if not guest.wait_gone(3.0):
                return
            raise self.death(guest) from exc
        seconds = getattr(exc, "seconds", 0.0) or waited
        problem = diagnose(self.evidence(guest, alive=True, qmp_status=status, seconds=seconds))
        if problem is not None:
            raise problem from exc
        if status == "running" and isinstance(exc, ChannelError) and guest.ssh.is_open \
                and not guest.ssh.responsive(timeout=5.0):
            raise GuestHung("QEMU reports the CPUs running, but the guest's sshd does not answer: something "
                            "in the guest starves it", 5.0, "running") from exc
