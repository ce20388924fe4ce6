"""One exception root for the lab, with a small tree of errors that carry data.

Every message is written for the learner: what went wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence


class LabError(Exception):
    """Root of every error labkit raises on purpose."""

    hint: str = ""

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class HostSetupError(LabError):
    """The host lacks something the lab needs (a program, a package source)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class ImageBuildError(LabError):
    """Building the guest image failed."""

    def __init__(self, message: str, log_tail: str = "", hint: str = "") -> None:
        super().__init__(message + (f"\n--- last lines of the build log ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail
        self.hint = hint


class ImageMissing(LabError):
    """The image for a kernel variant is not built, or does not match its manifest."""

    def __init__(self, kernel: str, reason: str) -> None:
        super().__init__(f"guest image for kernel {kernel}: {reason}")
        self.kernel = kernel
        self.reason = reason
        self.hint = f"run `labkit image build --kernel {kernel}` (add --force to rebuild)"


class ConfigError(LabError, ValueError):
    """A configuration or argument value is not acceptable."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class LaunchError(LabError):
    """QEMU did not start, or the guest died while booting."""

    def __init__(self, message: str, command: Sequence[str] = (), exitcode: int | None = None,
                 output: str = "") -> None:
        parts = [message]
        if exitcode is not None:
            parts.append(f"QEMU exit code: {exitcode}")
        if command:
            parts.append("command: " + " ".join(command))
        if output.strip():
            parts.append("--- output ---\n" + output.strip()[-4000:])
        super().__init__("\n".join(parts))
        self.command = list(command)
        self.exitcode = exitcode
        self.output = output


class GuestTimeout(LabError):
    """A wait on the guest ran out of time."""

    def __init__(self, what: str, seconds: float, output: str = "") -> None:
        msg = f"timed out after {seconds:.1f} s waiting for {what}"
        if output.strip():
            msg += "\n--- last console output ---\n" + output.strip()[-2000:]
        super().__init__(msg)
        self.what = what
        self.seconds = seconds
        self.output = output


class GuestPanic(LabError):
    """The guest kernel panicked; the console log around it is kept."""

    def __init__(self, console_tail: str) -> None:
        super().__init__("the guest kernel panicked\n--- console ---\n" + console_tail.strip()[-3000:])
        self.console_tail = console_tail
        self.hint = "restart the VM (`labkit vm stop` then `labkit vm start`)"


class CommandFailed(LabError):
    """A guest command exited non-zero where success was required."""

    def __init__(self, cmd: str, rc: int, stdout: str, stderr: str) -> None:
        detail = (stderr or stdout).strip()[-2000:]
        super().__init__(f"guest command failed (exit {rc}): {cmd}" + (f"\n{detail}" if detail else ""))
        self.cmd = cmd
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


class ChannelError(LabError):
    """The SSH, console or QMP channel to the guest broke or could not be opened."""


class HostKeyMismatch(ChannelError):
    """The guest presented a different SSH host key than the one pinned at first boot."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"guest SSH host key changed: pinned {expected}, got {got}")
        self.expected = expected
        self.got = got
        self.hint = "if you rebuilt or reset this VM on purpose, delete it and start it again"


class StateError(LabError):
    """An operation needs the VM in another lifecycle state."""

    def __init__(self, state: object, required: object, name: str = "") -> None:
        who = f"VM {name!r}" if name else "the VM"
        super().__init__(f"{who} is {state}, but this needs it {required}")
        self.state = state
        self.required = required


class VMInUse(LabError):
    """Another process holds the VM's lock."""

    def __init__(self, name: str, pid: int) -> None:
        super().__init__(f"VM {name!r} is in use by PID {pid}")
        self.name = name
        self.pid = pid
        self.hint = "stop that process or use another --name"
