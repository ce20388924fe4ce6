"""The lifecycle states of a VM, and the pure rule that reads the state from
what is recorded (``vm.json``) and what is true (is its QEMU alive, is a
start in progress somewhere)."""

from __future__ import annotations

import enum
from typing import Any

from labkit.machine.statedir import VMInfo


class VMState(enum.Enum):
    """Lifecycle of a VM as seen from the host."""

    STOPPED = "stopped"        # no QEMU; state dir may hold a disk and pmem files
    STARTING = "starting"      # a start is in progress (in this or another process)
    RUNNING = "running"
    STOPPING = "stopping"
    DEAD = "dead"              # QEMU went away without being stopped (crash, kill, panic)
    INCOMPLETE = "incomplete"  # QEMU runs, but the start that launched it was interrupted

    def __str__(self) -> str:
        return self.value


def recorded_state(info: VMInfo | None, qemu_alive: bool, start_in_progress: bool) -> VMState:
    """The VM's state from its record and the facts. A record that says
    *starting* with nobody starting it is an interrupted start."""
    recorded = info.state if info is not None else "stopped"
    if recorded == "starting":
        if start_in_progress:
            return VMState.STARTING
        return VMState.INCOMPLETE if qemu_alive else VMState.DEAD
    if recorded == "running":
        return VMState.RUNNING if qemu_alive else VMState.DEAD
    return VMState.RUNNING if qemu_alive else VMState.STOPPED


def describe(name: str, state: VMState, state_dir: str, info: VMInfo | None) -> dict[str, Any]:
    """What ``labkit vm status --json`` prints."""
    d: dict[str, Any] = {"name": name, "state": str(state), "state_dir": state_dir}
    if info:
        d.update(kernel=info.kernel, kernel_release=info.kernel_release, accel=info.accel,
                 accel_reason=info.accel_reason, ssh_port=info.ssh_port, pid=info.pid,
                 boot_seconds=info.boot_seconds, nvdimm_mb=info.nvdimm_mb, start_kind=info.start_kind,
                 snapshot=info.snapshot, warm_error=info.warm_error, phases=info.phases)
    return d
