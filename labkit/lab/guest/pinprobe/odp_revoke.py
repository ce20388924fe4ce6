"""odp-revoke: take the memory of a registered MR away from the process and
see what the kernel and the device do.

Register an MR (on-demand, or pinned) over a buffer, run one real RDMA
operation through it (a loopback RC queue pair), then revoke: truncate the
file (file memory), MADV_DONTNEED (anonymous memory) or munmap (device-dax).
Measured: whether the revocation waited and where, how often the driver's
invalidation callback ran (a kprobe the host installed, counted from the
trace), and the completion status of the same RDMA operation afterwards.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import struct
import time
from typing import Any

from ..vocab import MR_KINDS, RDMA_OPS
from .args import memory_args, rdma_device_arg
from .buffer import Buffer
from .common import PAGE, TRACE, base_result, clear_trace, libc
from .measure import Meter
from .rdma import _open_device, _register, device_odp
from .registry import Command
from .truncate import _REPORT, _REPORT_SIZE, Child, _fork_truncate
from .verbs_loop import PATTERN, Loopback

MADV_DONTNEED = 4
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def count_events(event: str | None) -> int | None:
    """Lines of the trace event ``event`` in the trace buffer (None: no probe)."""
    if not event:
        return None
    try:
        with open(TRACE) as f:
            return sum(1 for ln in f if f" {event}:" in ln)
    except OSError:
        return None


def _truncate(path: str, timeout: float) -> dict[str, Any]:
    """Truncate in a child (a wait in the kernel cannot hang the probe); how long it took and where it slept."""
    child: Child = _fork_truncate(path, [])
    t0 = time.monotonic()
    child.watch(timeout)
    killed = not child.done()
    if killed:
        os.kill(child.pid, signal.SIGKILL)
        os.waitpid(child.pid, 0)
    ready, _, _ = select.select([child.report_fd], [], [], 0)
    data = os.read(child.report_fd, _REPORT_SIZE) if ready else b""
    os.close(child.report_fd)
    out: dict[str, Any] = {"action": "truncate", "where": child.where(), "killed": killed}
    if len(data) == _REPORT_SIZE:
        secs, code = struct.unpack(_REPORT, data)
        out.update(seconds=round(secs, 4), action_errno=code or None, completed=code == 0)
    else:
        out.update(seconds=round(time.monotonic() - t0, 4), action_errno=None, completed=False)
    return out


def _revoke(buf: Buffer, timeout: float) -> dict[str, Any]:
    """Take the buffer's memory away from the process, the way its kind allows."""
    t0 = time.monotonic()
    if buf.memory == "file":
        assert buf.path is not None
        return _truncate(buf.path, timeout)
    if buf.memory == "anon":
        rc = libc.madvise(buf.addr, buf.size, MADV_DONTNEED)
        action = "madvise(MADV_DONTNEED)"
    else:
        rc = libc.munmap(buf.addr, buf.size)
        buf.mapped = False
        action = "munmap"
    err = ctypes.get_errno() if rc else None
    return {"action": action, "seconds": round(time.monotonic() - t0, 4), "where": [], "killed": False,
            "action_errno": err, "completed": rc == 0}


def _visible(buf: Buffer) -> bool | None:
    """After a WRITE: does the process see the device's bytes in its mapping?
    Only anonymous memory can be read safely (a truncated file's page would SIGBUS)."""
    if buf.memory != "anon" or not buf.mapped:
        return None
    return buf.head(16) == bytes([PATTERN] * 16).hex()


def _experiment(r: dict[str, Any], ctx: Any, pd: Any, mr: Any, buf: Buffer, args: Any) -> None:
    loop = Loopback(ctx, pd)
    try:
        r["gid_index"] = loop.gid_index
        r["before"] = loop.rdma(args.op, mr, buf.addr, PAGE)
        clear_trace()
        r["revoke"] = _revoke(buf, args.timeout)
        r["invalidations"] = count_events(args.trace_event)
        r["after"] = loop.rdma(args.op, mr, buf.addr, PAGE)
        r["invalidations_total"] = count_events(args.trace_event)
        r["visible_to_process"] = _visible(buf) if args.op == "write" else None
    finally:
        loop.close()


def cmd_odp_revoke(args: Any) -> dict[str, Any]:
    odp = args.kind == "odp"
    name, ctx, pd = _open_device(args.device)
    buf = Buffer(args.memory, args.size, args.mapping, args.path, args.dax_fs, args.dax_device)
    r = base_result("rdma-odp" if odp else "rdma", buf, device=name, odp=odp, op=args.op,
                    registered=False, before=None, revoke=None, after=None, invalidations=None,
                    invalidations_total=None, visible_to_process=None, trace_event=args.trace_event,
                    **device_odp(ctx))
    meter = Meter()
    try:
        mr = _register(pd, buf, r, odp)
        meter.held()
        r.update(meter.fields())
        if mr is None:
            return r
        r.update(ok=True, registered=True, message="registered")
        try:
            _experiment(r, ctx, pd, mr, buf, args)
        finally:
            mr.close()
        return r
    finally:
        buf.close()
        pd.close()
        ctx.close()


def _arguments(sp: argparse.ArgumentParser) -> None:
    memory_args(sp)
    sp.add_argument("--kind", choices=MR_KINDS, default="odp", help="on-demand or pinned MR")
    sp.add_argument("--op", choices=RDMA_OPS, default="write", help="the RDMA operation")
    rdma_device_arg(sp)
    sp.add_argument("--trace-event", default=None, help="kprobe event on the invalidation callback to count")
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for the revocation")


COMMANDS = (Command("odp-revoke", "register, RDMA, revoke the memory (truncate...), RDMA again", _arguments,
                    cmd_odp_revoke),)
