"""The learner's process for the code exercises' judges (3.8, 6.5), in the
guest: the learner's code never runs in the judge's own process.

:class:`LearnerProcess` forks a child that gives up root (``setgroups``,
``setresgid``, ``setresuid`` to a uid of its own that no other process has,
from ``SANDBOX_UIDS``; a judge that is not root keeps its own), starts its own session, has
``/dev/null`` as stdin, stdout and stderr, and talks to the judge over two
pipes: commands from the judge ("go on", "exit") and short JSON messages to
it. Those messages only sequence the run and describe the learner's own
failures (an exception, a returned value of the wrong type): a message can
make an answer fail, never pass. Whether it passes is read by the judge from
outside the child, in the kernel's own files (``/proc/<pid>/status``,
``/proc/<pid>/maps``, ``/proc/vmstat``, the truncating process's
``/proc/<pid>/stack``, the RDMA resources). Whatever the learner's code writes
to file descriptor 1 or 2 goes nowhere.

Every wait here has a timeout, and :meth:`LearnerProcess.finish` kills every
process of the learner's uid (what the learner's code forked included)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import select
import signal
import time
from collections.abc import Callable
from typing import Any

LEARNER_USER = "sandbox"           # a uid of its own for each run, that no other process has
SANDBOX_UIDS = range(61000, 62000)  # Debian's dynamic range ends at 59999 (adduser.conf); no account has these
MESSAGE_MAX = 4096
PF_EXITING = 0x4                  # include/linux/sched.h: the flags field of /proc/<pid>/stat


def learner_ids(user: str | None = LEARNER_USER) -> tuple[int, int] | None:
    """(uid, gid) the learner's code runs as: for "sandbox", a uid no process
    has (so that killing every process of it at the end kills the learner's
    and nothing else, even beside another judge); else the named account's.
    None keeps the judge's own (a judge that is not root cannot change it)."""
    if user is None or os.geteuid() != 0:
        return None
    if user == LEARNER_USER:
        taken = _uids_in_use()
        # at random among the free ones: two judges starting at once hardly ever pick the same
        uid = random.SystemRandom().choice([u for u in SANDBOX_UIDS if u not in taken])
        return uid, uid
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def _uids_in_use() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, StopIteration):
                found.add(_real_uid(entry))
    return found


def _real_uid(pid: str) -> int:
    # the real uid from status: /proc/<pid> itself is root's once a process gave up root (not dumpable)
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))


class Channel:
    """The child's end: read the judge's commands, send it messages."""

    def __init__(self, cmd_fd: int, msg_fd: int) -> None:
        self.cmd_fd, self.msg_fd = cmd_fd, msg_fd

    def send(self, **message: Any) -> None:
        data = (json.dumps(message, default=str)[:MESSAGE_MAX - 1] + "\n").encode()
        with contextlib.suppress(OSError):
            os.write(self.msg_fd, data)

    def wait(self, timeout: float) -> str:
        """The judge's next command ("" when none came within ``timeout``)."""
        ready, _, _ = select.select([self.cmd_fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        return os.read(self.cmd_fd, 64).decode(errors="replace").strip()


class LearnerProcess:
    """One run of the learner's code in a child process (see the module's docstring)."""

    def __init__(self, body: Callable[[Channel], None], ids: tuple[int, int] | None,
                 before_drop: Callable[[], Any] | None = None) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._msg_r, msg_w = os.pipe()
        self.uid = ids[0] if ids and ids[0] != 0 else None      # never "every process of root"
        self.status: int | None = None
        self._buf = b""
        pid = os.fork()
        if pid == 0:                                    # the child: never returns
            os.close(self._cmd_w)
            os.close(self._msg_r)
            _child(Channel(cmd_r, msg_w), body, ids, before_drop)
        self.pid = pid
        os.close(cmd_r)
        os.close(msg_w)

    def alive(self) -> bool:
        """Whether the child still runs (reaps it when it has ended)."""
        if self.status is None:
            with contextlib.suppress(ChildProcessError):
                p, st = os.waitpid(self.pid, os.WNOHANG)
                if p == self.pid:
                    self.status = st
        return self.status is None

    def running(self) -> bool:
        """Alive and not on its way out: a process that exits drops its files
        (and the page references they hold) after the kernel marks it
        PF_EXITING and before its parent can reap it, so ``alive`` alone
        would take a dying process for a living one."""
        if not self.alive():
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return fields[0] not in ("Z", "X", "x") and not int(fields[6]) & PF_EXITING

    def tell(self, command: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._cmd_w, (command + "\n").encode())

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The child's next message, or None when it ended (or ``timeout``
        passed) without one."""
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._msg_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._msg_r, MESSAGE_MAX)
            if not chunk:
                return None
            self._buf = (self._buf + chunk)[-4 * MESSAGE_MAX:]
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            return {"garbled": True}
        return message if isinstance(message, dict) else {"garbled": True}

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the child to end on its own."""
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            time.sleep(0.02)
        return not self.alive()

    def finish(self, timeout: float = 5.0) -> None:
        """Tell the child to exit, then kill it and every process of the
        learner's uid; close the pipes."""
        self.tell("exit")
        if not self.wait_exit(timeout):
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait_exit(timeout)
        if self.uid is not None:
            kill_uid(self.uid)
        with contextlib.suppress(OSError):
            os.kill(-self.pid, signal.SIGKILL)           # the child's session (what it forked, as the tests run)
        for fd in (self._cmd_w, self._msg_r):
            with contextlib.suppress(OSError):
                os.close(fd)


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (the learner's code
    and anything it forked, even into a session of its own)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, StopIteration):
            if _real_uid(entry) == uid:
                os.kill(int(entry), signal.SIGKILL)


def _child(channel: Channel, body: Callable[[Channel], None], ids: tuple[int, int] | None,
           before_drop: Callable[[], Any] | None) -> None:
    code = 0
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        if before_drop is not None:
            before_drop()
        if ids is not None:
            os.setgroups([])
            os.setresgid(ids[1], ids[1], ids[1])
            os.setresuid(ids[0], ids[0], ids[0])
        body(channel)
    except BaseException as exc:  # noqa: BLE001 - the child reports and ends; nothing propagates into the judge's code
        channel.send(stage="judge", exception=f"{type(exc).__name__}: {exc}"[:300])
        code = 3
    os._exit(code)
