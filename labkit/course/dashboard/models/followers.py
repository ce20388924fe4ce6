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
from labkit.lab.tracing import probe_names, refusing_functions

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


# A second ftrace instance follows the lab's kretprobes (labkit.lab.tracing: check_vma_flags since
# v5.11, the older functions before), with a filter for failures only. It has its own buffer, so
# reading its trace_pipe never takes events away from Lab.observe (which reads the global trace).
# The names come from the lab's own table (REFUSAL_SITES) and a uuid, never from a learner.
def trace_script(instance: str, functions: tuple[str, ...]) -> str:
    """The guest script: a kretprobe per refusing function (shared with Lab's tracer, same
    names), each enabled in ``instance`` with a filter for errors, then its trace_pipe."""
    parts = ["cd /sys/kernel/tracing || exit 1"]
    for name, fn in zip(probe_names(len(functions)), functions):
        ev = f"instances/{instance}/events/kprobes/{name}"
        parts.append(f"{{ grep -q 'kprobes/{name} ' kprobe_events || "
                     f"echo 'r:{name} {fn} ret=$retval:s32' >> kprobe_events; }}")
        parts.append(f"mkdir -p instances/{instance} && echo 'ret < 0' > {ev}/filter && "
                     f"echo 1 > {ev}/enable || exit 1")
    parts.append(f"exec cat instances/{instance}/trace_pipe")
    return "; ".join(parts)


class RefusalTrace(GuestFollower):
    """The refusing functions' calls that returned an error, as they happen (kretprobes,
    own ftrace instance). Lines look like ``... <- check_vma_flags) ret=-95``."""

    def __init__(self, vm: GuestMachine, maxlen: int = 500) -> None:
        super().__init__(vm, maxlen)
        self.instance = f"labkit-log-{uuid.uuid4().hex[:8]}"
        self._functions: tuple[str, ...] = ()

    def functions(self) -> tuple[str, ...]:
        """What the guest's kernel refuses in (by its ``uname -r``; asked once)."""
        if not self._functions:
            self._functions = refusing_functions(self.vm.run(["uname", "-r"], timeout=10).stdout)
        return self._functions

    def script(self, since_now: bool) -> str:
        return trace_script(self.instance, self.functions())

    def cleanup_script(self) -> str:
        return f"sleep 0.1; rmdir /sys/kernel/tracing/instances/{self.instance} 2>/dev/null;"
