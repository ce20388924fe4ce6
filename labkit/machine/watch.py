"""Watching a running guest while commands run: gather the evidence (QEMU
alive? QMP run state? does sshd answer?) and let ``health.diagnose`` say what
it means, so a dead, paused or starved guest ends a wait early with the
reason instead of a timeout."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from labkit.errors import ChannelError, GuestDied, GuestHung, GuestTimeout, LabError
from labkit.machine.channels.console import BootInfo
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.health import PROBE_AFTER, Evidence, diagnose, died
from labkit.machine.state import VMState

if TYPE_CHECKING:
    from labkit.machine.vm import VM

log = logging.getLogger(__name__)


class Watch:
    """Fault detection for one VM object."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self._silent_since: float | None = None
        self._last_probe = 0.0

    def evidence(self, alive: bool, qmp_status: str | None = None, seconds: float = 0.0) -> Evidence:
        vm = self.vm
        proc = vm.proc
        return Evidence(name=vm.name, qemu_alive=alive, pid=(vm.info.pid if vm.info else 0) or vm.sd.read_pid(),
                        exit_code=proc.returncode if proc is not None else None, qmp_status=qmp_status,
                        sshd_silent_for=(time.monotonic() - self._silent_since) if self._silent_since else 0.0,
                        console_text=vm.sd.console_tail(20000), qemu_log=vm.sd.qemu_log_tail(),
                        state_dir=str(vm.sd.path), seconds=seconds)

    def death(self) -> GuestDied:
        """The VM's QEMU is gone: mark it dead, close its channels, say why."""
        if self.vm.proc is not None:
            try:   # our own child: collect its exit status (it may have just become a zombie)
                self.vm.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        self.vm.mark_dead()
        return died(self.evidence(alive=False))

    def qmp_status(self, timeout: float = 2.0) -> str | None:
        """QEMU's run state, or None if QMP does not answer. Asked on the
        watchdog's own monitor (``watch.sock``): a monitor serves one client at a
        time, and the main one may be held by ``vm.qmp``. The connection is
        short-lived so that another process watching the same VM gets its turn.
        A QEMU started before the watchdog had its own monitor has only ``qmp.sock``."""
        sd = self.vm.sd
        socket = sd.watch_socket if sd.watch_socket.exists() else sd.qmp_socket
        try:
            with QMPChannel(socket).connect(timeout=timeout) as q:
                return q.status()
        except LabError:
            return None

    @contextmanager
    def command(self) -> Iterator[None]:
        """Around a guest command: check the guest first; turn a channel error
        or timeout into what really happened (QEMU gone, panic, paused, starved)."""
        if self.vm.state is VMState.RUNNING:
            self.begin_command()
        t0 = time.monotonic()
        try:
            yield
        except GuestHung:
            raise
        except (ChannelError, GuestTimeout) as exc:
            self.explain(exc, waited=time.monotonic() - t0)
            raise

    def begin_command(self) -> None:
        """Before a command: GuestDied if QEMU is gone; follow a restart done
        by another process (e.g. `labkit vm reset` in a terminal)."""
        vm = self.vm
        self._silent_since = None
        if not vm.qemu_alive():
            raise self.death()
        info = vm.sd.load_info()
        if vm.info and info and info.state == "running" and info.pid != vm.info.pid:
            log.debug("%s was restarted by another process (QEMU %d -> %d)", vm.name, vm.info.pid, info.pid)
            if vm.ssh_channel is not None:
                vm.ssh_channel.close()
            vm.info = info
            vm.boot = BootInfo(info.kernel_release, info.guest_uptime_s, (info.host_key[0], info.host_key[1]))
            vm.ssh_channel = SSHChannel(info.ssh_port, vm.sd.key, (info.host_key[0], info.host_key[1]))

    def on_quiet(self, quiet: float) -> None:
        """Called while a command is silent: raise when QEMU died, the CPUs are
        paused, or sshd stopped answering although the CPUs run."""
        vm = self.vm
        if not vm.qemu_alive():
            raise self.death()
        status = self.qmp_status()
        now = time.monotonic()
        if status == "running" and quiet >= PROBE_AFTER and vm.ssh_channel is not None \
                and now - self._last_probe >= 3.0:
            self._last_probe = now
            if vm.ssh_channel.responsive(timeout=5.0):
                self._silent_since = None
            elif self._silent_since is None:
                self._silent_since = now
        problem = diagnose(self.evidence(alive=True, qmp_status=status, seconds=quiet))
        if problem is not None:
            raise problem

    def explain(self, exc: LabError, waited: float = 0.0) -> None:
        """After a channel error or timeout: raise what really happened to the
        guest (QEMU gone, kernel panic, CPUs paused, sshd starved), if anything.
        ``waited``: how long the caller waited (a channel error does not say)."""
        vm = self.vm
        if not vm.qemu_alive():
            raise self.death() from exc
        status = self.qmp_status()
        if status is None:
            # QMP silent and the connection gone: QEMU may be exiting right now
            # (its sockets close before the process is reaped), e.g. after a panic.
            if not vm.wait_qemu_gone(3.0):
                return
            raise self.death() from exc
        seconds = getattr(exc, "seconds", 0.0) or waited
        problem = diagnose(self.evidence(alive=True, qmp_status=status, seconds=seconds))
        if problem is not None:
            raise problem from exc
        if status == "running" and isinstance(exc, ChannelError) and vm.ssh_channel is not None \
                and vm.ssh_channel.is_open and not vm.ssh_channel.responsive(timeout=5.0):
            raise GuestHung("QEMU reports the CPUs running, but the guest's sshd does not answer: something "
                            "in the guest starves it", 5.0, "running") from exc
