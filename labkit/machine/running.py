"""What a running guest is, seen from this process: its QEMU (our child, or
only a PID after an attach), its record (``vm.json``), what its boot
announced, the accelerator it runs under, and the channels to it.

A ``Running`` is built whole by a strategy — a cold boot or a warm start
(``boot.Launch.running``), an attach (``start.attach``), or a restart done by
another process (``Running.successor``) — and the ``VM`` facade swaps it in
whole. Nothing else sets these fields; the strategies never see the facade.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

from labkit.image import Image
from labkit.machine import process
from labkit.machine.accel import AccelChoice
from labkit.machine.channels.console import BootInfo
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.state import VMState
from labkit.machine.statedir import StateDir, VMInfo

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Running:
    """One running guest and this process's channels to it."""

    sd: StateDir
    info: VMInfo
    boot: BootInfo
    accel: AccelChoice
    ssh: SSHChannel                          # connected by a start; connected on first use after an attach
    proc: subprocess.Popen[bytes] | None = None   # our child; None when another process started it
    image: Image | None = None               # the image it booted (unknown after an attach)
    qmp: QMPChannel | None = None            # the main monitor, opened on first use (``open_qmp``)

    @classmethod
    def from_record(cls, sd: StateDir, info: VMInfo) -> Running:
        """The guest another process started, as its record describes it; SSH
        is not connected yet."""
        host_key = (info.host_key[0], info.host_key[1])
        return cls(sd, info, BootInfo(info.kernel_release, info.guest_uptime_s, host_key),
                   AccelChoice(info.accel, info.accel_reason), SSHChannel(info.ssh_port, sd.key, host_key))

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def pid(self) -> int:
        return self.info.pid or self.sd.read_pid()

    def alive(self) -> bool:
        """True if this guest's QEMU runs (identity checked, not just a PID)."""
        return qemu_alive(self.sd, self.info, self.proc)

    def exit_code(self, wait: float = 2.0) -> int | None:
        """QEMU's exit status when it was our child (it may have just become a
        zombie: collect it), else None."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode

    def wait_gone(self, timeout: float) -> bool:
        """True if this guest's QEMU is (or becomes) gone within ``timeout``."""
        pid = self.sd.read_pid() or self.info.pid
        return not process.is_qemu_of(pid, self.sd.pidfile) or process.wait_gone(pid, timeout)

    def successor(self) -> Running | None:
        """The guest that replaced this one if another process restarted the VM
        (e.g. `labkit vm reset` in a terminal), else None."""
        info = self.sd.load_info()
        if info is None or info.lifecycle is not VMState.RUNNING or info.pid == self.info.pid:
            return None
        log.debug("%s was restarted by another process (QEMU %d -> %d)", self.name, self.info.pid, info.pid)
        return Running.from_record(self.sd, info)

    def open_qmp(self) -> QMPChannel:
        if self.qmp is None:
            self.qmp = QMPChannel(self.sd.qmp_socket).connect()
        return self.qmp

    def take_qmp(self) -> QMPChannel:
        """The main monitor's channel for a last command (``quit``): the one
        held, or a new unconnected one; this guest no longer holds it."""
        qmp, self.qmp = self.qmp or QMPChannel(self.sd.qmp_socket), None
        return qmp

    def close(self) -> None:
        """Drop this process's channels to the guest (the guest keeps running)."""
        for ch in (self.ssh, self.qmp):
            if ch is not None:
                ch.close()
        self.qmp = None

    def kill(self) -> bool:
        """Hard stop of this guest's QEMU; True if one was killed."""
        killed = kill_qemu(self.sd, self.proc)
        self.proc = None
        return killed


def qemu_alive(sd: StateDir, info: VMInfo | None, proc: subprocess.Popen[bytes] | None) -> bool:
    """True if the VM of ``sd`` has its QEMU running: our own unreaped child
    ``proc``, or the process its pidfile (or record) names, identity checked."""
    running_child = proc is not None and proc.poll() is None   # poll() also reaps a zombie
    info = info or sd.load_info()
    pid = sd.read_pid() or (info.pid if info else 0)
    if running_child and proc is not None and proc.pid == pid:
        return True            # our own unreaped child: its PID cannot have been reused
    started = info.qemu_started if info and info.pid == pid else 0.0
    return process.is_qemu_of(pid, sd.pidfile, started)


def kill_qemu(sd: StateDir, proc: subprocess.Popen[bytes] | None) -> bool:
    """Hard stop of whatever QEMU is this VM's (its pidfile's, our child
    ``proc``); True if one was killed. Our child is reaped."""
    pids = [sd.read_pid()] + ([proc.pid] if proc is not None else [])
    killed = process.terminate(pids, lambda pid: process.is_qemu_of(pid, sd.pidfile))
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return killed
