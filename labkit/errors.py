"""One exception root for the lab, with a small tree of errors that carry data.

Every message is written for the learner: what went wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence


class LabError(Exception):
    """Root of every error labkit raises on purpose."""

    hint: str = ""

    def with_hint(self, hint: str) -> LabError:
        """This error with ``hint`` (what the learner can do about it)."""
        self.hint = hint
        return self

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


class GuestDied(LabError):
    """QEMU went away under the lab (killed, crashed, or the guest kernel panicked)."""

    def __init__(self, message: str, pid: int = 0, console_tail: str = "") -> None:
        super().__init__(message)
        self.pid = pid
        self.console_tail = console_tail
        self.hint = ("start it again: `labkit vm start` (or vm.start() / vm.reset() from Python); "
                     "its disk and persistent memory are kept")


class GuestPanic(GuestDied):
    """The guest kernel panicked; the console log around it is kept."""

    def __init__(self, console_tail: str, pid: int = 0) -> None:
        super().__init__("the guest kernel panicked\n--- console ---\n" + console_tail.strip()[-3000:], pid,
                         console_tail)


class StateDirError(LabError):
    """The VM's state directory cannot be written (read-only, full, no permission)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"the VM state directory {path} {problem}")
        self.path = path
        self.problem = problem
        self.hint = ("free some space there, or point LABKIT_STATE_DIR to a writable directory "
                     "with room for the VM's disk and persistent memory")


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


class QMPCommandError(ChannelError):
    """QEMU refused a QMP command; its error class and description are kept."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class SSHDropped(ChannelError):
    """The SSH connection closed under a running command (sshd restarted, guest
    network reset); the guest itself is alive and the next command reconnects."""

    def __init__(self, command: str) -> None:
        super().__init__(f"the SSH connection to the guest dropped while running {command!r} "
                         "(sshd in the guest was killed or restarted); the command's outcome is unknown")
        self.command = command
        self.hint = "run the command again: the next command reconnects"


class GuestHung(GuestTimeout):
    """The guest stopped answering while QEMU still runs: its CPUs are paused
    (QMP ``stop``, an I/O error) or something in the guest starves sshd."""

    def __init__(self, reason: str, seconds: float, qmp_status: str = "") -> None:
        LabError.__init__(self, f"the guest stopped responding ({seconds:.1f} s without an answer): {reason}")
        self.what = reason
        self.seconds = seconds
        self.output = ""
        self.reason = reason
        self.qmp_status = qmp_status
        if qmp_status == "paused":
            self.hint = "resume it with vm.qmp.command('cont'), or restart it with vm.reset() / `labkit vm stop`"
        elif qmp_status == "io-error":
            self.hint = ("free space on the disk that holds the VM's state directory, then restart the VM "
                         "(`labkit vm stop`, `labkit vm start`)")
        else:
            self.hint = "restart the VM: vm.reset() or `labkit vm stop` then `labkit vm start`"


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
    """Another process holds the VM's lifecycle lock (it is starting, stopping
    or resetting the VM)."""

    def __init__(self, name: str, pid: int, waited: float = 0.0) -> None:
        super().__init__(f"VM {name!r} is in use by PID {pid}, which is starting, stopping or resetting it "
                         f"(waited {waited:.0f} s for it to finish)")
        self.name = name
        self.pid = pid
        self.waited = waited
        self.hint = "wait for that process, stop it, or use another --name"


class StartQueueTimeout(LabError):
    """A start waited longer than the host's start queue allows for its turn
    (``labkit.machine.pace``): the host is busy starting other guests."""

    def __init__(self, waited: float, place: int, starting: int, slots: int) -> None:
        super().__init__(f"waited {waited:.0f} s for a turn to start this guest: {starting} guests are starting "
                         f"on this host, {slots} at a time, and yours was still number {place} in line")
        self.waited, self.place, self.starting, self.slots = waited, place, starting, slots
        self.hint = ("start it again in a minute (nothing of this start was left behind); an instructor can "
                     "raise LABKIT_START_SLOTS or LABKIT_START_QUEUE_TIMEOUT")
