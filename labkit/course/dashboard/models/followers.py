"""Guest line streams the kernel log model follows: ``dmesg --follow`` and the
``check_vma_flags`` refusals traced by a kretprobe in an ftrace instance of
its own. Each prints its guest PID first, so ``stop()`` can end it."""

from __future__ import annotations

import logging
import shlex
import uuid

from labkit.course.dashboard.protocols import GuestMachine
from labkit.errors import LabError, StateError
from labkit.lab.observe import KernelLog, LogLine

log = logging.getLogger(__name__)


class GuestFollower(KernelLog):
    """A line stream from a guest command that first prints its own PID, so
    ``stop`` can end it: a reader blocked in ``dmesg --follow`` or in a
    trace_pipe would otherwise linger in the guest until its next line."""

    PID_PREFIX = "labkit-follow-pid "

    def __init__(self, vm: GuestMachine, maxlen: int = 1000) -> None:
        super().__init__(vm, maxlen)
        self.guest_pid: int | None = None

    def script(self, since_now: bool) -> str:
        """The shell script whose output lines are followed."""
        raise NotImplementedError

    def command(self, since_now: bool = True) -> str:
        return f"sh -c {shlex.quote(f'echo {self.PID_PREFIX}$$; ' + self.script(since_now))}"

    def is_pid_line(self, line: LogLine) -> bool:
        """True (and the PID remembered) for the line the follower prints first."""
        if line.text.startswith(self.PID_PREFIX):
            self.guest_pid = int(line.text.split()[1])
            log.debug("%s: guest PID %d", type(self).__name__, self.guest_pid)
            return True
        return False

    def cleanup_script(self) -> str:
        """Shell run in the guest after the reader is killed ('' for nothing)."""
        return ""

    def stop(self) -> None:
        super().stop()
        kill = f"kill {self.guest_pid} 2>/dev/null; " if self.guest_pid else ""
        try:
            if kill or self.cleanup_script():
                self.vm.run(["sh", "-c", f"{kill}{self.cleanup_script()} true"], timeout=10)
        except (LabError, StateError):
            pass    # the guest is gone: so is the reader
        log.debug("%s: stopped", type(self).__name__)


class FollowedDmesg(GuestFollower):
    """The kernel log, from the start of the ring buffer or from now on."""

    def script(self, since_now: bool) -> str:
        return "exec dmesg --follow-new" if since_now else "exec dmesg --follow"


# A second ftrace instance follows the lab's kretprobe on check_vma_flags, with
# a filter for failures only. It has its own buffer, so reading its trace_pipe
# never takes events away from Lab.observe (which reads the global trace).
TRACE_SCRIPT = (
    "cd /sys/kernel/tracing || exit 1; "
    "grep -q 'labkit_cvf' kprobe_events || echo 'r:labkit_cvf check_vma_flags ret=$retval:s32' >> kprobe_events; "
    "mkdir -p instances/{inst} && echo 'ret != 0' > instances/{inst}/events/kprobes/labkit_cvf/filter && "
    "echo 1 > instances/{inst}/events/kprobes/labkit_cvf/enable || exit 1; "
    "exec cat instances/{inst}/trace_pipe")


class RefusalTrace(GuestFollower):
    """``check_vma_flags`` calls that returned an error, as they happen (kretprobe,
    own ftrace instance). Lines look like ``... <- check_vma_flags) ret=-95``."""

    def __init__(self, vm: GuestMachine, maxlen: int = 500) -> None:
        super().__init__(vm, maxlen)
        self.instance = f"labkit-log-{uuid.uuid4().hex[:8]}"

    def script(self, since_now: bool) -> str:
        return TRACE_SCRIPT.format(inst=self.instance)

    def cleanup_script(self) -> str:
        return f"sleep 0.1; rmdir /sys/kernel/tracing/instances/{self.instance} 2>/dev/null;"
