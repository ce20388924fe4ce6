"""io_uring fixed-buffer registration (IORING_REGISTER_BUFFERS): a long-term pin."""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from typing import Any

from .args import memory_args
from .buffer import Buffer
from .common import MAX_HOLD_SECONDS, SetupError, base_result, iovec, last_errno, libc, set_error
from .hold import hold_until_released
from .measure import Meter
from .registry import Command

SYS_io_uring_setup = 425
SYS_io_uring_register = 427
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1


def _register(ring: int, op: int, iov: iovec | None) -> int:
    return libc.syscall(ctypes.c_long(SYS_io_uring_register), ctypes.c_int(ring), ctypes.c_uint(op),
                        ctypes.byref(iov) if iov is not None else None, ctypes.c_uint(1 if iov is not None else 0))


def cmd_io_uring(args: Any) -> dict[str, Any]:
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zero = defaults
    ring = libc.syscall(ctypes.c_long(SYS_io_uring_setup), ctypes.c_uint(4), params)
    if ring < 0:
        raise SetupError(f"io_uring_setup failed: {last_errno()[1]}") from None
    buf = Buffer(args.memory, args.size, args.mapping, args.path, args.dax_fs, args.dax_device)
    r = base_result("io_uring", buf, vmpin_kb_released=None)
    meter = Meter()
    t_pinned = None
    if _register(ring, IORING_REGISTER_BUFFERS, iovec(buf.addr, buf.size)) < 0:
        err = ctypes.get_errno()
        set_error(r, err, f"IORING_REGISTER_BUFFERS: {os.strerror(err)}")
    else:
        r.update(ok=True, message="registered")
        t_pinned = time.monotonic()
    meter.held()
    if t_pinned is not None:
        if args.hold:
            hold_until_released(max(0.0, min(args.hold, MAX_HOLD_SECONDS)))
        if _register(ring, IORING_UNREGISTER_BUFFERS, None) < 0:
            r["unregister_error"] = last_errno()[1]
        r["held_seconds"] = round(time.monotonic() - t_pinned, 3)
    os.close(ring)
    meter.released()
    r.update(meter.fields())
    buf.close()
    return r


def _arguments(sp: argparse.ArgumentParser) -> None:
    memory_args(sp)
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the registration")


COMMANDS = (Command("io_uring", "IORING_REGISTER_BUFFERS", _arguments, cmd_io_uring, pins=True),)
