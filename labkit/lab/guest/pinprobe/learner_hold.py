"""Exercise 6.5's judge, in the guest: a learner's ``def hold(m)`` (Python
source on stdin, never shell text) receives ``m``, a writable MAP_SHARED mmap
of an fs-dax file whose pages are all present, and must take references on
its pages that a truncate of the file has to wait for; it returns a function
that drops them. The learner's code runs in a process of its own as
an unprivileged uid of its own (:mod:`.learner_proc`; the mapping is made before it gives up
root), which can signal, trace or write nothing of the judge's. The judge
truncates the file itself (``truncate -s 0``, all descriptors closed),
watches from outside where that process sleeps (a break-layouts frame in
/proc/<pid>/stack; stopped or traced in /proc/<pid>/status), tells the
learner's process to call its release function, and reports whether the
truncate waited for the pages while the references were held and finished
once they were dropped, with the learner's process still alive (a process
that ends drops its references with it).

The learner's namespace has two tools besides the standard library:
``vmsplice(fd, buf, length)`` (the pipe behind ``fd`` takes page references
on ``buf``, see vmsplice(2)) and ``register_mr(buf, length)`` (an RDMA
registration, a long-term pin; raises OSError with the kernel's errno when
refused). Which one holds a reference truncate must wait for is the exercise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import re
import subprocess
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from .args import byte_size, dax_target_args
from .common import DEFAULT_SIZE, PAGE, base_result, iovec, libc
from .learner_buffer import learner_user_arg, run_learner, source_and_file
from .learner_proc import LEARNER_USER, Channel, LearnerProcess, learner_ids
from .registry import Command
from .truncate import SPLICE_F_NONBLOCK, Child  # truncate also declares libc.vmsplice's signature


def vmsplice(fd: int, buf: Any, length: int) -> int:
    """Splice ``length`` bytes of ``buf`` (an mmap or other writable buffer)
    into the pipe whose write end is ``fd``: the pipe references those pages
    until it is read or closed. Returns the bytes spliced; OSError on failure."""
    holder = ctypes.c_char.from_buffer(buf)
    try:
        n = libc.vmsplice(fd, ctypes.byref(iovec(ctypes.addressof(holder), length)), 1, SPLICE_F_NONBLOCK)
    finally:
        del holder
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(n)


class _Registration:
    """An RDMA memory registration the learner holds; ``close()`` deregisters."""

    def __init__(self, mr: Any, pd: Any, ctx: Any) -> None:
        self._parts = [mr, pd, ctx]

    def close(self) -> None:
        for part in self._parts:
            part.close()
        self._parts = []


def register_mr(buf: Any, length: int) -> _Registration:
    """Register ``length`` bytes of ``buf`` for RDMA on the guest's first
    device (a long-term pin of its pages). OSError with the kernel's errno
    when the kernel refuses."""
    from .rdma import _open_device, _register
    holder = ctypes.c_char.from_buffer(buf)
    _, ctx, pd = _open_device(None)
    r: dict[str, Any] = {}
    try:
        mr = _register(pd, SimpleNamespace(addr=ctypes.addressof(holder), size=length), r)  # type: ignore[arg-type]
    finally:
        del holder
    if mr is None:
        pd.close()
        ctx.close()
        err = r.get("errno") or 0
        raise OSError(err, f"ibv_reg_mr: {os.strerror(err) if err else r.get('message', 'refused')}")
    return _Registration(mr, pd, ctx)


TOOLS = {"vmsplice": vmsplice, "register_mr": register_mr}


# The functions a truncate of an fs-dax file sleeps in while pages of it are
# still referenced: the filesystem's break-layouts step and the DAX wait under
# it (XFS: xfs_break_layouts -> xfs_break_dax_layouts, with xfs_wait_dax_page
# on 6.1/6.12 and dax_break_layout_inode/wait_page_idle from v6.15; ext4:
# ext4_break_layouts; dax_layout_busy_page finds the busy page). A truncate
# asleep anywhere else (stopped, traced, waiting for a lease or a lock) was
# not waiting for the references.
LAYOUT_WAIT = re.compile(r"break_(dax_)?layout|wait_dax_page|dax_layout_busy_page|dax_break_layout")


def layout_wait(stack: list[str]) -> bool:
    """Whether a kernel stack is the truncate waiting for the file's pages."""
    return any(LAYOUT_WAIT.search(fn) for fn in stack)


class Truncate:
    """The judge's own truncate of the file (root, a process of its own that
    inherits none of our descriptors), watched from outside: its kernel stack,
    its state and tracer (/proc/<pid>/stack, /proc/<pid>/status)."""

    def __init__(self, path: str) -> None:
        self.p = subprocess.Popen(["truncate", "-s", "0", path], close_fds=True, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.child = Child(self.p.pid, -1)
        self.states: list[str] = []
        self.traced = False

    def poll(self) -> int | None:
        return self.p.poll()

    def sample(self) -> None:
        self.child.sample()
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1] not in self.states:
                        self.states.append(line.split()[1])
                    elif line.startswith("TracerPid:") and line.split()[1] != "0":
                        self.traced = True
        except (OSError, IndexError):
            pass

    @property
    def stacks(self) -> list[list[str]]:
        return self.child.stacks

    def error(self) -> str:
        return (self.p.stderr.read() if self.p.stderr else b"").decode(errors="replace")[-300:]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()                  # the DAX layout wait sleeps interruptibly
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(timeout=10)


def _watch(t: Truncate, seconds: float, child: LearnerProcess | None = None) -> bool:
    """Sample the truncate for up to ``seconds``; True if it finished (or, with
    ``child``, the learner's process ended first: then False)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if t.poll() is not None:
            return True
        if child is not None and not child.running():
            return False
        t.sample()
        time.sleep(0.05)
    return t.poll() is not None


def _child_body(source: str, timeout: float) -> Callable[[Channel], None]:
    def body(ch: Channel) -> None:
        release, failure = run_learner(source, "hold", (MAPPING[0],), timeout, TOOLS)
        if failure is not None:
            ch.send(**failure)
            return
        if not callable(release):
            ch.send(problem="not_callable", returned=type(release).__name__)
            return
        ch.send(stage="held")
        if ch.wait(timeout + 60) != "release":
            return
        _, failure = run_learner(None, release, (), timeout)
        if failure is not None:
            failure["stage"] = "release"
            ch.send(**failure)
        else:
            ch.send(stage="released")
        ch.wait(timeout + 60)             # alive until the judge has seen the truncate finish
    return body


MAPPING: list[Any] = []                   # the child's mapping of the file, made before it gives up root


def _map(path: str, size: int) -> Callable[[], None]:
    def make() -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        for off in range(0, size, PAGE):
            m[off] = m[off]                 # every page present in the mapping, written through to the file
        MAPPING[:] = [m]
    return make


def judge(source: str, path: str, size: int, timeout: float, hold_s: float = 2.0,
          after_s: float = 10.0, user: str | None = LEARNER_USER,
          truncate: Callable[[str], Truncate] = Truncate) -> dict[str, Any]:
    """Run the learner's ``hold`` in a process of its own (as ``user``) on a
    shared mapping of the prepared file, truncate the file from the judge,
    let the learner release after ``hold_s``, and report what the truncate
    did, read from outside: whether it waited, in which kernel functions (a
    break-layouts wait or something else), whether it was stopped or traced,
    and whether it finished after the release while the learner's process
    still ran. Nothing the learner's process prints is read."""
    r = base_result("truncate-wait", None, memory="learner", path=path, size=size, stage="done",
                    exception=None, line=None, blocked=False, layout_wait=False, stopped=False, traced=False,
                    completed=False, release_called=False, seconds_after_release=None, where=[],
                    truncate_error=None, learner_exited=False)
    child = LearnerProcess(_child_body(source, timeout), learner_ids(user), before_drop=_map(path, size))
    t: Truncate | None = None
    try:
        said = child.receive(timeout + 30) or {}
        if said.get("stage") != "held":
            r.update({k: said[k] for k in ("stage", "exception", "line", "problem", "returned") if k in said})
            if not said or said.get("garbled") or said.get("stage") == "judge":
                r.update(problem="no_answer", learner_exited=not child.alive())
            return r
        t = truncate(path)
        _hold_phase(r, t, child, hold_s)
        if r["learner_exited"]:
            return r
        child.tell("release")
        t_release = time.monotonic()
        said = child.receive(timeout + 5) or {}
        r["release_called"] = said.get("stage") == "released"
        if said.get("stage") == "release":
            r.update({k: said[k] for k in ("stage", "exception", "line") if k in said})
        finished = _watch(t, after_s, child)
        if finished:
            r["completed"] = t.poll() == 0 and child.running()
            r["seconds_after_release"] = round(time.monotonic() - t_release, 3)
            if t.poll():
                r["truncate_error"] = t.error()
        if not child.running():
            r.update(learner_exited=True, completed=False)
        elif not finished:
            r["message"] = f"truncate still waited {after_s:.0f} s after the release; killed"
    finally:
        if t is not None:
            t.stop()
        child.finish()
        r["learner_status"] = child.status         # how the learner's process ended (waitpid status)
    return r


def _hold_phase(r: dict[str, Any], t: Truncate, child: LearnerProcess, hold_s: float) -> None:
    """Watch the truncate while the learner holds its references."""
    finished = _watch(t, hold_s, child)
    r["learner_exited"] = not child.running()
    r["blocked"] = not finished and not r["learner_exited"]
    # where it slept: its latest distinct kernel stack while the references were held
    r["where"] = t.stacks[-1] if r["blocked"] and t.stacks else []
    r["layout_wait"] = r["blocked"] and any(layout_wait(s) for s in t.stacks)
    r["stopped"] = any(s in ("T", "t") for s in t.states)
    r["traced"] = t.traced


def cmd_learner_hold(args: Any) -> dict[str, Any]:
    return judge(source_and_file(args), args.path, args.size, args.timeout, args.hold, args.after,
                 user=args.learner_user)


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--path", required=True, help="the file to map and truncate (created, every page written)")
    dax_target_args(sp)
    sp.add_argument("--size", type=byte_size, default=DEFAULT_SIZE)
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for each call of the learner's code")
    sp.add_argument("--hold", type=float, default=2.0, help="seconds the truncate runs before the release")
    sp.add_argument("--after", type=float, default=10.0, help="max seconds the truncate may take after the release")
    learner_user_arg(sp)


COMMANDS = (Command("learner-hold", "run a learner's hold(m) (source on stdin) on a shared mapping of an fs-dax "
                    "file; truncate the file; call the release function hold returned", _arguments,
                    cmd_learner_hold),)
