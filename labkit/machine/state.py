"""The lifecycle states of a VM, and the pure rule that reads the state from
what is recorded (``vm.json``) and what is true (is its QEMU alive, is a
start in progress somewhere).

This is the one place a VM's state is spelled: ``VM.state`` (this process's
view), the record's ``state`` (``VMInfo.lifecycle``, shared between
processes) and ``VM.status()`` (the rule below) are all ``VMState``.
"""

from __future__ import annotations

import enum


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


# What a record (vm.json) may say; the other states are read from the facts.
RECORDED = (VMState.STOPPED, VMState.STARTING, VMState.RUNNING)


def from_record(text: str) -> VMState:
    """The state a record's ``state`` text names (an unknown word is *stopped*:
    the facts decide, see ``recorded_state``)."""
    for state in RECORDED:
        if state.value == text:
            return state
    return VMState.STOPPED


def recorded_state(recorded: VMState | None, qemu_alive: bool, start_in_progress: bool) -> VMState:
    """The VM's state from its record (None: no record) and the facts. A
    record that says *starting* with nobody starting it is an interrupted start."""
    if recorded is VMState.STARTING:
        if start_in_progress:
            return VMState.STARTING
        return VMState.INCOMPLETE if qemu_alive else VMState.DEAD
    if recorded is VMState.RUNNING:
        return VMState.RUNNING if qemu_alive else VMState.DEAD
    return VMState.RUNNING if qemu_alive else VMState.STOPPED
