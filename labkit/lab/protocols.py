"""What the lab layer needs from a machine, as ``typing.Protocol``s.

The real ``labkit.machine.vm.VM`` and the test double
``labkit.testing.fakes.FakeVM`` both implement these; mypy checks both against
the same contract (see the end of this module and of ``fakes.py``), so a fake
cannot drift from the real API unnoticed. No paramiko type appears here: a
``Stream`` is the few calls the lab makes on a running guest command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from labkit.command import CommandResult
from labkit.machine.accel import AccelChoice

if TYPE_CHECKING:
    from labkit.machine.vm import VMState


class Stream(Protocol):
    """A guest command running on its own channel (``GuestProcess``): output as
    it arrives, a descriptor to wait on, its exit status, its stdin."""

    def read_available(self) -> tuple[bytes, bytes]: ...

    def wait_readable(self, timeout: float) -> bool: ...

    @property
    def finished(self) -> bool: ...

    def exit_status(self, timeout: float) -> int | None: ...

    def close_stdin(self) -> None: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


class Shell(Protocol):
    """The command channel beside ``run``: streams and file uploads."""

    def start(self, cmd: str | Sequence[str], timeout: float = 10.0) -> Stream: ...

    def upload(self, data: bytes, remote: str, mode: int = 0o644) -> None: ...


@runtime_checkable
class Machine(Protocol):
    """A running guest the lab can measure."""

    @property
    def name(self) -> str: ...

    @property
    def kernel(self) -> str: ...

    @property
    def accel(self) -> AccelChoice | None: ...

    @property
    def ssh(self) -> Shell: ...

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None) -> CommandResult: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class ControlledMachine(Machine, Protocol):
    """A machine whose lifecycle a view can drive (the dashboard's VM panel)."""

    @property
    def state(self) -> VMState: ...

    def status(self) -> VMState: ...

    def start(self) -> Any: ...

    def stop(self, timeout: float = 15.0) -> Any: ...

    def reset(self, pmem: bool = False, timeout: float = 30.0) -> Any: ...


if TYPE_CHECKING:
    from labkit.machine.vm import VM

    def _the_real_vm_is_a_machine(vm: VM) -> ControlledMachine:
        return vm
