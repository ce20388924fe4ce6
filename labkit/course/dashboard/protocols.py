"""What the dashboards need from a VM and from a Lab, as ``typing.Protocol``s.

The models are written against these contracts, not against ``labkit.VM`` or
``labkit.lab.Lab``, so the fakes in the tests and the real classes are checked
by mypy against the same interface (see ``_conformance`` at the end). No
library type (paramiko's channels) appears here: the log readers and the pin
sampler in ``labkit.lab.observe`` open their own channels on the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from labkit.lab.protocols import ControlledMachine, Machine

ConsoleCallback = Callable[[str], None]


class CommandOutput(Protocol):
    """The result of a guest command, as far as the dashboards read it."""

    @property
    def stdout(self) -> str: ...


class AccelInfo(Protocol):
    """The accelerator a VM runs under and why it was chosen."""

    @property
    def accel(self) -> str: ...

    @property
    def reason(self) -> str: ...


# The kernel log and the pin counters need a machine as the lab layer defines it.
GuestMachine = Machine


class DashboardVM(ControlledMachine, Protocol):
    """What the VM panel reads and drives: the lab layer's controllable machine
    (identity, ``status()``, ``describe()``, start/stop/reset), plus
    ``on_console_line``, called with each serial console line during a boot."""

    on_console_line: ConsoleCallback | None


class HeldPinHandle(Protocol):
    """A pin kept open in the guest until ``release()`` (``labkit.lab.observe.HeldPin``)."""

    @property
    def info(self) -> Mapping[str, Any]: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def ok(self) -> bool: ...

    def release(self) -> int | None: ...


class PinLab(Protocol):
    """What the pin panel needs from a Lab: set-up steps and a held registration."""

    def setup_rdma(self) -> object: ...

    def prepare_mounts(self) -> object: ...

    def prepare_pmem(self) -> object: ...

    def hold_pin(self, mechanism: str, memory: str, *, size: int = ...) -> HeldPinHandle: ...


class MatrixLab(Protocol):
    """What the matrix table needs from a Lab: ``matrix()`` with progress messages."""

    def matrix(self, progress: Callable[[str], None] | None = None) -> Mapping[str, Any]: ...


class DashboardLab(PinLab, MatrixLab, Protocol):
    """Everything the whole dashboard needs from a Lab."""


if TYPE_CHECKING:   # mypy checks that the real classes keep these contracts
    from labkit.lab import Lab
    from labkit.machine import VM

    def _conformance(vm: VM, lab: Lab) -> tuple[DashboardVM, DashboardLab]:
        return vm, lab
