"""Test doubles shipped with the package: they implement the same small
interfaces as the real channels so unit tests swap a seam instead of patching
subprocess. Integration tests use the real thing."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from labkit.machine.accel import AccelChoice
from labkit.machine.channels.ssh import CommandResult, quote_command

Responder = Callable[[str], CommandResult | None]


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
        for pattern, out, rc in self.rules:
            if re.search(pattern, command):
                return CommandResult(command, rc, out, "", 0.0).check() if check else \
                    CommandResult(command, rc, out, "", 0.0)
        return CommandResult(command, 0, "", "", 0.0)

    def upload(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        self.uploads[remote] = data

    @property
    def is_open(self) -> bool:
        return True


class FakeVM:
    """Enough of ``labkit.VM`` for the lab layer: ``run``, ``ssh``, ``accel``, ``describe``."""

    def __init__(self, rules: list[tuple[str, str, int]] | None = None, kernel: str = "6.1") -> None:
        self.ssh = FakeSSH(rules or [])
        self.accel = AccelChoice("tcg", "fake")
        self.name = "fake"
        self.kernel = kernel

    def describe(self) -> dict:
        return {"name": self.name, "kernel": self.kernel, "state": "running"}

    def run(self, cmd, timeout: float = 60.0, check: bool = False, stdin=None) -> CommandResult:
        return self.ssh.run(cmd, timeout=timeout, check=check, stdin=stdin)
