"""A guest command as every layer sees it: how an argument list becomes one
command line (``quote_command``) and what the command did (``CommandResult``).

These cross from the machine layer (which runs commands over SSH) up to the
lab, the course and the test doubles, so they live below all of them and
import no channel library: the lab handles a ``CommandResult`` without
loading paramiko.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from labkit.errors import CommandFailed


@dataclass(frozen=True)
class CommandResult:
    """What a guest command did."""

    command: str
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> CommandResult:
        if self.rc != 0:
            raise CommandFailed(self.command, self.rc, self.stdout, self.stderr)
        return self


def quote_command(cmd: str | Sequence[str]) -> str:
    """A list is quoted word by word (nothing in it is interpreted by the
    guest's shell); a string is passed as a shell command on purpose."""
    if isinstance(cmd, str):
        return cmd
    return " ".join(shlex.quote(str(c)) for c in cmd)
