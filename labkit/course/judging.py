"""The judging side of ``labkit course grade``: what the checks run against.

The student's notebook is root in the guest it ran against: it can bind-mount
a script over ``uname``, load the image's own ``labkit_no_longterm_check``
module, make any command sleep. So the checks are judged on a *fresh* guest
(another warm restore of the snapshot, started after the notebook's guest is
gone) that the student's notebook never reached; the values the checks need
are measured there (:mod:`labkit.course.summative`).

Three things here keep that judging honest and bounded:

* :class:`Bounded`: the judging guest as a ``Machine`` whose every command
  and stream ends at the notebook's deadline (``--timeout`` covers the checks
  too) and whose output is capped (``OUTPUT_CAP`` per command: a learner's
  code run by a code exercise can print without end, and it used to be
  buffered whole by the grader);
* :class:`Integrity`: the kernel's taint and the labkit modules loaded, read
  before judging and after every check that ran the learner's code there;
  a guest tainted by foreign code or with a labkit module loaded, or a
  change while the learner's code ran, refuses the judgment (said in the
  feedback, never scored);
* :func:`kill_at`: a timer that stops the judging guest at the deadline, so
  no wait in a check can outlive ``--timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from labkit.errors import GuestTimeout, LabError
from labkit.lab.counterfactual.switch import MODULES, decode_taint
from labkit.machine.channels.ssh import CommandResult
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

OUTPUT_CAP = 16 * 2**20          # bytes of stdout + stderr one guest command may send to the grader
# Taint bits (Documentation/admin-guide/tainted-kernels.rst) that refuse a judging guest whatever its
# snapshot had: P proprietary module (0), F forced load (1), R forced unload (3), D kernel died (7),
# O out-of-tree module (12), E unsigned module (13), K live patch (15). labkit's own modules set O and
# E, and keep them after an rmmod: a guest that ever loaded one stays refused.
FOREIGN_TAINT = sum(1 << bit for bit in (0, 1, 3, 7, 12, 13, 15))


class OutputTooLarge(LabError):
    """A guest command sent more output than the grader reads."""

    def __init__(self, command: str, cap: int) -> None:
        super().__init__(f"the guest sent more than {cap // 2**20} MiB of output for {command[:80]!r}; "
                         "the grader stopped reading it")
        self.command, self.cap = command, cap


class TimeUp(GuestTimeout):
    """The notebook's time limit (``--timeout``, checks included) ran out."""

    def __init__(self, seconds: float) -> None:
        LabError.__init__(self, f"the notebook's time limit (--timeout {seconds:.0f} s, checks included) ran out")
        self.what, self.seconds, self.output = "the checks", seconds, ""


class _Meter:
    """Counts one command's output and raises past the cap."""

    def __init__(self, command: str, cap: int) -> None:
        self.command, self.cap, self.seen = command, cap, 0

    def __call__(self, data: bytes | str) -> None:
        self.seen += len(data)
        if self.seen > self.cap:
            raise OutputTooLarge(self.command, self.cap)


class _BoundedStream:
    """A guest command's stream whose output is capped and whose waits end at the deadline."""

    def __init__(self, stream: Any, meter: _Meter, deadline: Deadline) -> None:
        self._s, self._meter, self._deadline = stream, meter, deadline

    def read_available(self) -> tuple[bytes, bytes]:
        out, err = self._s.read_available()
        self._meter(out + err)
        return out, err

    def wait_readable(self, timeout: float) -> bool:
        if self._deadline.expired:
            raise TimeUp(self._deadline.seconds)
        return bool(self._s.wait_readable(min(timeout, self._deadline.remaining)))

    def __getattr__(self, name: str) -> Any:      # finished, exit_status, close_stdin, interrupt, close
        return getattr(self._s, name)


class _BoundedShell:
    def __init__(self, shell: Any, cap: int, deadline: Deadline) -> None:
        self._shell, self._cap, self._deadline = shell, cap, deadline

    def start(self, cmd: str | Sequence[str], timeout: float = 10.0) -> _BoundedStream:
        if self._deadline.expired:
            raise TimeUp(self._deadline.seconds)
        stream = self._shell.start(cmd, timeout=min(timeout, max(0.5, self._deadline.remaining)))
        return _BoundedStream(stream, _Meter(str(cmd), self._cap), self._deadline)

    def upload(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        if self._deadline.expired:
            raise TimeUp(self._deadline.seconds)
        self._shell.upload(data, remote, mode=mode)


class Bounded:
    """A running VM seen through the notebook's deadline and the output cap
    (the lab's ``Machine`` protocol; everything else is the VM's)."""

    def __init__(self, vm: Any, deadline: Deadline, cap: int = OUTPUT_CAP) -> None:
        self.vm, self.deadline, self.cap = vm, deadline, cap

    @property
    def name(self) -> str:
        return str(self.vm.name)

    @property
    def kernel(self) -> str:
        return str(self.vm.kernel)

    @property
    def accel(self) -> Any:
        return self.vm.accel

    @property
    def ssh(self) -> _BoundedShell:
        return _BoundedShell(self.vm.ssh, self.cap, self.deadline)

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None) -> CommandResult:
        if self.deadline.expired:
            raise TimeUp(self.deadline.seconds)
        meter = _Meter(str(cmd), self.cap)
        return self.vm.run(cmd, timeout=min(timeout, self.deadline.remaining), check=check, stdin=stdin,
                           on_stdout=meter, on_stderr=meter)

    def describe(self) -> dict[str, Any]:
        return dict(self.vm.describe())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.vm, name)


# -- is the guest what it was? -------------------------------------------------------------

@dataclass(frozen=True)
class Integrity:
    """What the guest's kernel says about foreign code: its taint bits and the
    labkit modules (``labkit.lab.counterfactual``) it has loaded."""

    taint: int
    modules: tuple[str, ...]

    def problem_since(self, before: Integrity | None = None) -> str:
        """Why this guest's answers cannot be believed ("" when they can): a
        labkit module loaded, or taint bits that were not there ``before``
        (None: any taint bit)."""
        why = []
        new = self.taint & ~(before.taint if before else 0)
        if new:
            why.append(f"its kernel became tainted ({decode_taint(new)})")
        if self.modules:
            why.append("a labkit module is loaded (" + ", ".join(self.modules) + ")")
        return " and ".join(why)

    def foreign(self) -> str:
        """Why this guest cannot judge even when it came so from the snapshot
        ("" when it can): taint bits that say code the image does not ship
        ran in its kernel (a module of its own, forced, out of tree, unsigned,
        proprietary, a live patch) or that the kernel died, or a labkit
        module loaded. A warning (W) alone does not refuse it."""
        why = []
        if self.taint & FOREIGN_TAINT:
            why.append(f"its kernel is tainted ({decode_taint(self.taint & FOREIGN_TAINT)})")
        if self.modules:
            why.append("a labkit module is loaded (" + ", ".join(self.modules) + ")")
        return " and ".join(why)


def read_integrity(machine: Any, timeout: float = 20.0) -> Integrity:
    """The taint and the labkit modules of ``machine``'s kernel, in one round trip."""
    r = machine.run(["sh", "-c", "cat /proc/sys/kernel/tainted; echo @@; cat /proc/modules"], timeout=timeout,
                    check=True)
    taint_text, _, modules_text = r.stdout.partition("@@")
    loaded = {ln.split()[0] for ln in modules_text.splitlines() if ln.strip()}
    try:
        taint = int(taint_text.strip())
    except ValueError:
        raise LabError(f"the guest's /proc/sys/kernel/tainted is unreadable: {taint_text.strip()[:80]!r}") from None
    return Integrity(taint, tuple(sorted(m for m in MODULES.values() if m in loaded)))


@contextlib.contextmanager
def kill_at(deadline: Deadline, kill: Callable[[], Any], what: str) -> Iterator[threading.Event]:
    """Call ``kill`` when ``deadline`` passes inside the block (the backstop
    behind every bounded wait); the event tells whether it fired."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        log.info("time limit: stopping %s", what)
        with contextlib.suppress(Exception):
            kill()
    timer = threading.Timer(deadline.remaining, fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
