"""truncate-wait: a truncate of a mapped fs-dax file while a pipe holds page
references to it (vmsplice, never read) has to wait until the references are
dropped (ext4_break_layouts / xfs_break_dax_layouts). Watch where it sleeps.
``--op punch`` does the cover letter's other operation instead: a hole punch
(``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``) over the whole file."""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import select
import signal
import struct
import time
from typing import Any

from ..vocab import SHRINK_OPS
from .args import byte_size, dax_target_args
from .buffer import Buffer
from .common import DEFAULT_SIZE, PAGE, SetupError, base_result, errname, iovec, libc, set_error
from .registry import Command

SPLICE_F_NONBLOCK = 0x02
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
libc.fallocate.restype = ctypes.c_int
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.vmsplice.restype = ctypes.c_ssize_t
libc.vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_size_t, ctypes.c_uint]

_STACK_FN = re.compile(r"\]\s+([A-Za-z0-9_.$]+)\+0x")
_REPORT = "=di"                         # the child's report: seconds, errno
_REPORT_SIZE = struct.calcsize(_REPORT)


class Child:
    """The truncating child: its pid, its report pipe, and where it was seen sleeping."""

    def __init__(self, pid: int, report_fd: int) -> None:
        self.pid, self.report_fd = pid, report_fd
        self.status: int | None = None
        self.wchan: list[str] = []
        self.stacks: list[list[str]] = []

    def done(self) -> bool:
        if self.status is None:
            p, st = os.waitpid(self.pid, os.WNOHANG)
            if p == self.pid:
                self.status = st
        return self.status is not None

    def sample(self) -> None:
        """Record distinct non-empty wchan values and stack traces."""
        try:
            with open(f"/proc/{self.pid}/wchan") as f:
                w = f.read().strip()
            if w and w != "0" and w not in self.wchan:
                self.wchan.append(w)
        except OSError:
            pass
        try:
            with open(f"/proc/{self.pid}/stack") as f:
                fns = [m.group(1) for m in map(_STACK_FN.search, f) if m]
            if fns and fns not in self.stacks:
                self.stacks.append(fns)
        except OSError:
            pass

    def watch(self, seconds: float) -> None:
        """Sample until it finishes or ``seconds`` pass."""
        start = time.monotonic()
        while time.monotonic() - start < seconds and not self.done():
            self.sample()
            time.sleep(0.05)

    def where(self) -> list[str]:
        out: list[str] = []
        for fn in self.wchan + [fn for s in self.stacks for fn in s]:
            if fn not in out:
                out.append(fn)
        return out


def _check_args(args: Any) -> tuple[float, float]:
    hold, timeout = float(args.hold), float(args.timeout)
    if hold < 0 or timeout <= 0:
        raise SetupError("--hold must be >= 0 and --timeout > 0")
    if not 1 <= args.pages <= 16:
        # 16 = default pipe capacity in buffers; more would block vmsplice.
        raise SetupError("--pages must be between 1 and 16")
    if args.pages * PAGE > args.size:
        raise SetupError("--pages * page size must not exceed --size")
    return hold, timeout


def _shrink(path: str, op: str, size: int) -> None:
    """The operation that frees the file's blocks: truncate to 0, or punch a
    hole over ``size`` bytes from offset 0 (the file keeps its size)."""
    if op == "truncate":
        os.truncate(path, 0)
        return
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _fork_truncate(path: str, close_fds: list[int], op: str = "truncate", size: int = 0) -> Child:
    """Fork a child that only truncates (or hole-punches) ``path``, timed from its own point of view."""
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in close_fds + [rep_r]:
                os.close(fd)
            c0 = time.monotonic()
            code = 0
            try:
                _shrink(path, op, size)
            except OSError as e:
                code = e.errno or 1
            os.write(rep_w, struct.pack(_REPORT, time.monotonic() - c0, code))
        finally:
            os._exit(0)
    os.close(rep_w)
    return Child(pid, rep_r)


def _release(rfd: int, wfd: int, buf: Buffer) -> None:
    """Drain the pipe (drops the page references) and unmap."""
    try:
        while True:
            ready, _, _ = select.select([rfd], [], [], 0)
            if not ready or not os.read(rfd, 65536):
                break
    except OSError:
        pass
    os.close(rfd)
    os.close(wfd)
    buf.close()


def _finish(child: Child, timeout: float, r: dict[str, Any], t0: float) -> None:
    """Wait (bounded) for the truncate after the release; record its report in ``r``."""
    child.watch(timeout)
    killed = False
    if not child.done():
        os.kill(child.pid, signal.SIGKILL)   # the DAX layout wait sleeps interruptibly
        os.waitpid(child.pid, 0)
        killed = True
    # The child may have finished (and reported) in the instant before the kill.
    ready, _, _ = select.select([child.report_fd], [], [], 0)
    data = os.read(child.report_fd, _REPORT_SIZE) if ready else b""
    os.close(child.report_fd)
    if len(data) != _REPORT_SIZE:
        r["message"] = (f"truncate still blocked {timeout}s after the release; child killed" if killed
                        else "truncate child exited without reporting")
        if killed:
            r["seconds"] = round(time.monotonic() - t0, 3)
        return
    secs, code = struct.unpack(_REPORT, data)
    r["seconds"] = round(secs, 3)
    r["completed"] = code == 0
    if code:
        r["errno"], r["errname"] = code, errname(code)
        r["message"] = f"{r.get('op', 'truncate')} failed: {os.strerror(code)}"
    else:
        r["message"] = f"{r.get('op', 'truncate')} completed"


def cmd_truncate_wait(args: Any) -> dict[str, Any]:
    hold, timeout = _check_args(args)
    buf = Buffer("file", args.size, "shared", args.path, args.dax_fs, args.dax_device)
    r = base_result("truncate-wait", buf, op=args.op, hold=hold, timeout=timeout, blocked=False, seconds=None,
                    released_after=None, completed=False, where=[], wchan=[], stacks=[],
                    spliced_bytes=None, size_after=None)
    rfd, wfd = os.pipe()
    # Without SPLICE_F_GIFT the pipe takes page references (GUP, not FOLL_PIN)
    # on the mapped file pages; nobody reads the pipe, so they stay referenced.
    n = libc.vmsplice(wfd, ctypes.byref(iovec(buf.addr, args.pages * PAGE)), 1, SPLICE_F_NONBLOCK)
    if n < 0:
        err = ctypes.get_errno()
        set_error(r, err, f"vmsplice: {os.strerror(err)}")
        _release(rfd, wfd, buf)
        return r
    r.update(spliced_bytes=n, ok=True)
    t0 = time.monotonic()
    child = _fork_truncate(args.path, [rfd, wfd], args.op, args.size)
    child.watch(hold)                        # the references are held: where does the truncate sleep?
    done_before_release = child.done()
    r["released_after"] = round(time.monotonic() - t0, 3)
    _release(rfd, wfd, buf)
    # Bounded by --timeout counted from the release, so a short --timeout cannot
    # kill a truncate that was only waiting for the release we had not done yet.
    _finish(child, timeout, r, t0)
    r["blocked"] = bool(not done_before_release and r["seconds"] is not None
                        and hold > 0 and r["seconds"] >= 0.8 * hold)
    r.update(held_seconds=r["released_after"], where=child.where(), wchan=child.wchan, stacks=child.stacks[:6])
    try:
        r["size_after"] = os.stat(args.path).st_size
    except OSError:
        pass
    return r


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--path", required=True, help="file to create (on an fs-dax mount)")
    dax_target_args(sp)
    sp.add_argument("--size", type=byte_size, default=DEFAULT_SIZE)
    sp.add_argument("--op", choices=SHRINK_OPS, default="truncate",
                    help="truncate to 0, or punch a hole over the file (fallocate PUNCH_HOLE|KEEP_SIZE)")
    sp.add_argument("--pages", type=int, default=4, help="pages to vmsplice (1..16)")
    sp.add_argument("--hold", type=float, default=3.0, help="seconds before draining the pipe")
    sp.add_argument("--timeout", type=float, default=20.0,
                    help="max seconds to wait for the truncate after the release")


COMMANDS = (Command("truncate-wait", "truncate vs. DAX pages referenced by a pipe", _arguments, cmd_truncate_wait),)
