"""Shared by every probe: libc through ctypes, the one-JSON-object output,
the error names, and the result skeleton."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from typing import Any, NoReturn

from ..vocab import errname

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB2 = 2 * 1024 * 1024
DEFAULT_SIZE = MIB2
# Upper bound for "--hold -1" (hold until stdin closes / SIGTERM): every wait in
# the probe is bounded so a forgotten probe cannot pin guest memory forever.
MAX_HOLD_SECONDS = 3600.0

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.syscall.restype = ctypes.c_long
MAP_FAILED = ctypes.c_void_p(-1).value

__all__ = [
    "DEFAULT_SIZE",
    "MAP_FAILED",
    "MAX_HOLD_SECONDS",
    "MIB2",
    "PAGE",
    "SetupError",
    "base_result",
    "emit",
    "errname",
    "fail",
    "iovec",
    "last_errno",
    "libc",
    "log",
    "round_up",
    "set_error",
]


class SetupError(Exception):
    """Bad arguments or an environment problem: exit 2, not a probe result."""


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def emit(obj: dict[str, Any]) -> None:
    """Print the one JSON object; flush because the host may read it while we hold a pin."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2, **extra: Any) -> NoReturn:
    emit({"error": message, **extra})
    sys.exit(code)


def log(msg: str) -> None:
    print(f"pinprobe: {msg}", file=sys.stderr, flush=True)


def last_errno() -> tuple[int, str]:
    """The errno of the last failed libc call and its text."""
    err = ctypes.get_errno()
    return err, f"{errname(err)} {os.strerror(err)}"


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def base_result(mechanism: str, buf: Any, **kw: Any) -> dict[str, Any]:
    """The fields every probe reports, before the attempt."""
    r: dict[str, Any] = {"mechanism": mechanism}
    if buf is not None:
        r.update(buf.describe())
    r.update({"ok": False, "errno": None, "errname": None, "message": "", "held_seconds": 0.0})
    r.update(kw)
    return r


def set_error(r: dict[str, Any], err: int | None, message: str) -> None:
    r["ok"] = False
    r["errno"] = err
    r["errname"] = errname(err)
    r["message"] = message


TRACE = "/sys/kernel/tracing/trace"


def clear_trace() -> None:
    """Empty the tracefs ring buffer (best effort: tracing may be unavailable)."""
    try:
        with open(TRACE, "w"):
            pass
    except OSError:
        pass
