"""Exercise 6.5's judge, in the guest: a learner's ``def hold(m)`` (Python
source on stdin, never shell text) receives ``m``, a writable MAP_SHARED mmap
of an fs-dax file whose pages are all present, and must take references on
its pages that a truncate of the file has to wait for; it returns a function
that drops them. This runs it, truncates the file from another process
(``truncate -s 0``, all descriptors closed), watches where that process
sleeps, calls the learner's release function and reports whether the truncate
waited while the references were held and finished once they were dropped.

The learner's namespace has two tools besides the standard library:
``vmsplice(fd, buf, length)`` (the pipe behind ``fd`` takes page references
on ``buf``, see vmsplice(2)) and ``register_mr(buf, length)`` (an RDMA
registration, a long-term pin; raises OSError with the kernel's errno when
refused). Which one holds a reference truncate must wait for is the exercise.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import subprocess
import time
from types import SimpleNamespace
from typing import Any

from .args import byte_size, dax_target_args
from .common import DEFAULT_SIZE, PAGE, base_result, iovec, libc
from .learner_buffer import run_learner, source_and_file
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


def _truncate(path: str) -> tuple[subprocess.Popen[bytes], Child]:
    """Truncate ``path`` to 0 in a separate process that inherits none of our
    descriptors (a pipe end it kept open would keep the references alive)."""
    p = subprocess.Popen(["truncate", "-s", "0", path], close_fds=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, Child(p.pid, -1)


def _watch(p: subprocess.Popen[bytes], child: Child, seconds: float) -> bool:
    """Sample where it sleeps for up to ``seconds``; True if it finished."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if p.poll() is not None:
            return True
        child.sample()
        time.sleep(0.05)
    return p.poll() is not None


def judge(source: str, path: str, size: int, timeout: float, hold_s: float = 2.0,
          after_s: float = 10.0) -> dict[str, Any]:
    """Run the learner's ``hold`` on a mapping of the prepared file, truncate
    the file, release after ``hold_s``, and report what the truncate did."""
    r = base_result("truncate-wait", None, memory="learner", path=path, size=size, stage="done",
                    exception=None, line=None, blocked=False, completed=False, release_called=False,
                    seconds_after_release=None, where=[], truncate_error=None)
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    for off in range(0, size, PAGE):
        m[off] = m[off]                 # every page present in the mapping, written through to the file
    release, failure = run_learner(source, "hold", (m,), timeout, TOOLS)
    if failure is not None:
        r.update(failure)
        return r
    if not callable(release):
        r.update(problem="not_callable", returned=type(release).__name__)
        return r
    p, child = _truncate(path)
    finished_early = _watch(p, child, hold_s)
    r["blocked"] = not finished_early
    # where it slept: its latest distinct kernel stack while the references were held
    r["where"] = child.stacks[-1] if r["blocked"] and child.stacks else []
    t_release = time.monotonic()
    _, failure = run_learner(None, release, (), timeout)
    r["release_called"] = failure is None
    if failure is not None:
        failure["stage"] = "release"
        r.update(failure)
    if _watch(p, child, after_s):
        r["completed"] = p.returncode == 0
        r["seconds_after_release"] = round(time.monotonic() - t_release, 3)
        if p.returncode:
            r["truncate_error"] = (p.stderr.read() if p.stderr else b"").decode(errors="replace")[-300:]
    else:
        p.kill()                       # the DAX layout wait sleeps interruptibly
        p.wait()
        r["message"] = f"truncate still waited {after_s:.0f} s after the release; killed"
    return r


def cmd_learner_hold(args: Any) -> dict[str, Any]:
    return judge(source_and_file(args), args.path, args.size, args.timeout, args.hold, args.after)


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--path", required=True, help="the file to map and truncate (created, every page written)")
    dax_target_args(sp)
    sp.add_argument("--size", type=byte_size, default=DEFAULT_SIZE)
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for each call of the learner's code")
    sp.add_argument("--hold", type=float, default=2.0, help="seconds the truncate runs before the release")
    sp.add_argument("--after", type=float, default=10.0, help="max seconds the truncate may take after the release")


COMMANDS = (Command("learner-hold", "run a learner's hold(m) (source on stdin) on a shared mapping of an fs-dax "
                    "file; truncate the file; call the release function hold returned", _arguments,
                    cmd_learner_hold),)
