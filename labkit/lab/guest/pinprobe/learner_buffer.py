"""Exercise 3.8's judge, in the guest: a learner's ``def buffer(path, size)``
(Python source on stdin, never shell text) returns an mmap over the fs-dax
file at ``path``; this registers it for RDMA (ibv_reg_mr, like ``rdma``) and
reports what the kernel did: whether the buffer is the file's (its VMA in
/proc/self/maps names the file's inode), shared or private, whether the
registration was refused, and how much was pinned (VmPin, nr_foll_pin_*).

The learner's code runs in this process, with a time limit and with its own
prints sent to stderr, so that only this module writes the one JSON answer."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import signal
import sys
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

from .args import byte_size, dax_target_args, rdma_device_arg
from .buffer import _prepare_file
from .common import DEFAULT_SIZE, PAGE, SetupError, base_result
from .measure import Meter
from .rdma import _open_device, _register
from .registry import Command
from .target import check_dax_dir, check_dax_file

MAX_SOURCE = 20_000


class _TimeUp(Exception):
    """The learner's code ran past its time limit."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _TimeUp()


def _learner_error(stage: str, exc: BaseException) -> dict[str, Any]:
    """What a learner sees of their own code's failure: the exception and the
    last line of the traceback inside their code."""
    where = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<your code>"]
    line = where[-1].lineno if where else None
    text = "time limit exceeded" if isinstance(exc, _TimeUp) else f"{type(exc).__name__}: {exc}"[:300]
    return {"stage": stage, "exception": text, "line": line}


def run_learner(source: str | None, fn: str | Callable[..., Any], args: tuple[Any, ...], timeout: float,
                tools: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """Define the learner's code (``source``, with ``tools`` in its namespace)
    and call its function named ``fn`` with ``args`` - or, without source,
    call ``fn``, a function their code returned - under a time limit, their
    prints sent to stderr; (its return value, None) or (None, the failure)."""
    namespace: dict[str, Any] = {"__name__": "learner", **(tools or {})}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    stage = "define"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if source is not None:
                exec(compile(source, "<your code>", "exec"), namespace)   # noqa: S102 - the exercise runs learner code
            func = namespace.get(fn) if isinstance(fn, str) else fn
            if not callable(func):
                return None, {"stage": "define", "exception": f"no function named {fn}", "line": None}
            stage = "call"
            return func(*args), None
    except BaseException as exc:  # noqa: BLE001 - anything the learner's code raises is reported, not fatal
        return None, _learner_error(stage, exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vmas(start: int, end: int) -> list[dict[str, Any]]:
    """The VMAs of this process overlapping [start, end), from /proc/self/maps."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo < end and hi > start:
                out.append({"perms": parts[1], "inode": int(parts[4]),
                            "path": parts[5].strip() if len(parts) > 5 else ""})
    return out


def describe_mapping(m: Any, path: str, size: int) -> tuple[dict[str, Any], Any]:
    """What the learner returned, as the kernel sees it: (fields, the address
    holder to keep alive while registered, or None)."""
    if not isinstance(m, mmap.mmap):
        return {"problem": "not_mmap", "returned": type(m).__name__}, None
    if len(m) < size:
        return {"problem": "too_small", "length": len(m)}, None
    try:
        holder = ctypes.c_char.from_buffer(m)
    except TypeError:
        return {"problem": "read_only"}, None
    addr = ctypes.addressof(holder)
    vmas = _vmas(addr, addr + size)
    inode = os.stat(path).st_ino
    backed = bool(vmas) and all(v["inode"] == inode and v["path"].split(" (")[0] == os.path.realpath(path)
                                for v in vmas)
    shared = bool(vmas) and all(v["perms"][3] == "s" for v in vmas)
    return {"problem": None, "addr": addr, "backed_by_file": backed, "shared": shared,
            "vmas": vmas[:4]}, holder


def _register_and_measure(r: dict[str, Any], addr: int, size: int, device: str | None) -> None:
    name, ctx, pd = _open_device(device)
    r["device"] = name
    meter = Meter()
    try:
        mr = _register(pd, cast(Any, SimpleNamespace(addr=addr, size=size)), r)   # only .addr, .size are read
        meter.held()
        if mr is not None:
            r.update(ok=True, message="registered")
            mr.close()
        meter.released()
        r.update(meter.fields())
    finally:
        pd.close()
        ctx.close()


def judge(source: str, path: str, size: int, timeout: float,
          register: Callable[[dict[str, Any], int, int], None]) -> dict[str, Any]:
    """Run the learner's code on the prepared file, describe what it returned
    and, when that is a writable mapping, ``register`` it (the seam the unit
    tests replace; in the guest, ibv_reg_mr)."""
    r = base_result("rdma", None, memory="learner", path=path, size=size, stage="done",
                    exception=None, line=None, pages=size // PAGE)
    m, failure = run_learner(source, "buffer", (path, size), timeout)
    if failure is not None:
        r.update(failure)
        return r
    fields, holder = describe_mapping(m, path, size)
    r.update(fields)
    if holder is not None:
        register(r, fields["addr"], size)
        del holder
    return r


def source_and_file(args: Any) -> str:
    """The learner's source from stdin, and the file of ``--path`` made
    ready (written, on its DAX filesystem when ``--dax-fs`` is given)."""
    source = sys.stdin.read(MAX_SOURCE + 1)
    if len(source) > MAX_SOURCE:
        raise SetupError(f"the code is longer than {MAX_SOURCE} characters")
    if args.dax_fs:
        check_dax_dir(args.path, args.dax_fs, args.dax_device)
    os.close(_prepare_file(args.path, args.size))
    if args.dax_fs:
        check_dax_file(args.path, args.dax_fs)
    return source


def cmd_learner_buffer(args: Any) -> dict[str, Any]:
    source = source_and_file(args)
    return judge(source, args.path, args.size, args.timeout,
                 lambda r, addr, size: _register_and_measure(r, addr, size, args.device))


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--path", required=True, help="the file buffer() is to map (created, every page written)")
    dax_target_args(sp)
    sp.add_argument("--size", type=byte_size, default=DEFAULT_SIZE)
    rdma_device_arg(sp)
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for the learner's code")


COMMANDS = (Command("learner-buffer", "run a learner's buffer(path, size) (source on stdin), register it",
                    _arguments, cmd_learner_buffer),)
