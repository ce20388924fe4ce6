"""Test doubles shipped with the package: they implement the same small
interfaces as the real channels and VM (``labkit.lab.protocols``) so unit
tests swap a seam instead of patching subprocess. mypy checks them against
those protocols (end of this module). Integration tests use the real thing."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.command import CommandResult, quote_command
from labkit.machine.accel import AccelChoice
from labkit.machine.vm import VMState

if TYPE_CHECKING:
    from labkit.lab.protocols import ControlledMachine, Shell, Stream

log = logging.getLogger(__name__)

Responder = Callable[[str], CommandResult | None]


class FakeStream:
    """A finished guest command: ``stdout`` to read, then exit status ``rc``."""

    def __init__(self, stdout: bytes = b"", rc: int = 0, stderr: bytes = b"") -> None:
        self._out, self._err, self.rc = stdout, stderr, rc
        self.closed = False
        self.stdin_closed = False

    def read_available(self) -> tuple[bytes, bytes]:
        out, err = self._out, self._err
        self._out = self._err = b""
        return out, err

    def wait_readable(self, timeout: float) -> bool:
        return True

    @property
    def finished(self) -> bool:
        return not self._out and not self._err

    def exit_status(self, timeout: float) -> int | None:
        return self.rc if self.finished else None

    def close_stdin(self) -> None:
        self.stdin_closed = True

    def interrupt(self) -> None:
        self.interrupted = True
        self.close()

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeSSH:
    """Records commands and answers from a list of (regex, stdout, rc) rules."""

    rules: list[tuple[str, str, int]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None, **_: object) -> CommandResult:
        command = quote_command(cmd)
        self.commands.append(command)
        log.debug("fake run: %s", command)
        for pattern, out, rc in self.rules:
            if re.search(pattern, command):
                result = CommandResult(command, rc, out, "", 0.0)
                return result.check() if check else result
        return CommandResult(command, 0, "", "", 0.0)

    def start(self, cmd: str | Sequence[str], timeout: float = 10.0) -> FakeStream:
        """A stream with the output of the first matching rule."""
        result = self.run(cmd)
        return FakeStream(result.stdout.encode(), result.rc)

    def upload(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        self.uploads[remote] = data

    @property
    def is_open(self) -> bool:
        return True


class FakeVM:
    """A ``labkit.lab.protocols.ControlledMachine``: commands answered by
    ``FakeSSH`` rules, and a lifecycle (start/stop/reset) that only records
    itself, with the same signatures and ``VMState`` values as the real VM."""

    def __init__(self, rules: list[tuple[str, str, int]] | None = None, kernel: str = "6.1") -> None:
        # `uname -r` answers like the kernel the fake stands for, after any rule of the test's own
        # (the lab reads it once, to choose the functions it traces)
        self.ssh = FakeSSH([*(rules or []), (r"^uname -r$", f"{kernel}.0-fake-amd64\n", 0)])
        self.accel: AccelChoice | None = AccelChoice("tcg", "fake")
        self.name = "fake"
        self.kernel = kernel
        self.state = VMState.RUNNING
        self.calls: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kernel": self.kernel, "state": str(self.status())}

    def status(self) -> VMState:
        """What the host says; the fake's host agrees with the fake."""
        return self.state

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None) -> CommandResult:
        return self.ssh.run(cmd, timeout=timeout, check=check, stdin=stdin)

    def start(self) -> FakeVM:
        self.calls.append("start")
        self.state = VMState.RUNNING
        return self

    def stop(self, timeout: float = 15.0) -> bool:
        """Stopped; False: the polite path worked (nothing had to be killed)."""
        self.calls.append("stop")
        self.state = VMState.STOPPED
        return False

    def reset(self, pmem: bool = False, timeout: float = 30.0) -> FakeVM:
        """Back to a fresh start (``pmem=True`` would erase the persistent memory)."""
        self.calls.append("reset(pmem)" if pmem else "reset")
        return self.start()


if TYPE_CHECKING:      # mypy: the fakes keep to the contracts the real classes keep
    def _fake_vm_is_a_machine(vm: FakeVM) -> ControlledMachine:
        return vm

    def _fake_ssh_is_a_shell(ssh: FakeSSH) -> Shell:
        return ssh

    def _fake_stream_is_a_stream(stream: FakeStream) -> Stream:
        return stream
