"""A persistent VM as the command line and ``labkit lab`` use it: start it
unless it runs, reopen it for a reset (with the kernel its record names), and
say how a start went. The ``VM`` facade does the work; this is the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from labkit.image import DEFAULT_KERNEL
from labkit.machine.state import VMState
from labkit.machine.vm import VM
from labkit.settings import Settings


@dataclass
class Started:
    """The outcome of ``start``: the VM, and whether this call started it
    (False: it was running already and was left alone)."""

    vm: VM
    started: bool


def start(name: str, kernel: str, settings: Settings, *, warm: bool = True,
          on_console_line: Callable[[str], None] | None = None,
          before_boot: Callable[[], None] | None = None) -> Started:
    """The persistent VM ``name``, started now (on ``kernel``) unless it runs.
    ``before_boot`` runs only when it is started (the command line builds a
    missing image there, with progress lines of its own)."""
    vm = VM(name, kernel=kernel, persistent=True, warm=warm, on_console_line=on_console_line, settings=settings)
    if vm.status() is VMState.RUNNING:
        return Started(vm, False)
    if before_boot is not None:
        before_boot()
    vm.start()
    return Started(vm, True)


def start_words(vm: VM) -> str:
    """How the started VM came up: a warm start, or a cold boot (and why)."""
    if vm.record.start_kind == "warm":
        return "warm start from the snapshot"
    return "cold boot" + (f"; warm start failed: {vm.record.warm_error}" if vm.record.warm_error else "")


def start_report(vm: VM) -> str:
    """One line about a VM this process started: kernel, accelerator, time to SSH-ready and how."""
    return (f"kernel {vm.release}, accelerator {vm.accel}, SSH-ready in {vm.record.boot_seconds:.1f} s "
            f"({start_words(vm)})")


@dataclass
class ForReset:
    """The VM to reset, and a note for the learner ("" when there is none)."""

    vm: VM
    note: str = ""


def for_reset(name: str, settings: Settings) -> ForReset | None:
    """The persistent VM ``name`` ready for ``reset``: attached when it runs,
    else opened with the kernel its record names. A record that was unreadable
    (set aside by ``load_info``) means the default kernel, said in the note.
    None when the VM does not exist (it was never started)."""
    vm = VM(name, persistent=True, settings=settings)
    recorded = vm.info_path.exists()     # before status(), which sets an unreadable record aside
    if vm.status() is VMState.RUNNING:
        return ForReset(VM.attach(name, settings=settings))
    if not recorded:
        return None
    info = vm.sd.load_info()
    note = "" if info is not None else (
        f"the record of VM {name!r} ({vm.info_path}) was unreadable and has been set aside; "
        f"resetting it with the default kernel {DEFAULT_KERNEL}")
    return ForReset(VM(name, kernel=info.kernel if info else DEFAULT_KERNEL, persistent=True, settings=settings),
                    note)
