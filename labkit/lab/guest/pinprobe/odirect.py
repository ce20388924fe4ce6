"""An O_DIRECT read into the buffer: a transient pin, legal on fs-dax."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .args import memory_args
from .buffer import Buffer
from .common import SetupError, base_result, set_error
from .measure import Meter
from .registry import Command


def _prepare_source(target: str, size: int) -> int:
    """``target`` with at least ``size`` bytes of real data (a read of a hole
    might not do any DMA/pinning), opened O_DIRECT."""
    try:
        st_size = os.stat(target).st_size if os.path.exists(target) else -1
        if st_size < size:
            with open(target, "r+b" if st_size >= 0 else "wb") as f:
                f.seek(max(st_size, 0))
                chunk = bytes(range(256)) * 4096
                left = size - max(st_size, 0)
                while left > 0:
                    left -= f.write(chunk[:min(left, len(chunk))])
                f.flush()
                os.fsync(f.fileno())
        return os.open(target, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        raise SetupError(f"cannot prepare O_DIRECT target {target}: {e}") from e


def cmd_odirect(args: Any) -> dict[str, Any]:
    fd = _prepare_source(args.target, args.size)
    buf = Buffer(args.memory, args.size, args.mapping, args.path, args.dax_fs, args.dax_device)
    r = base_result("odirect", buf, target=args.target, bytes_read=None)
    meter = Meter()
    t0 = time.monotonic()
    view = buf.view()
    try:
        # The pin lasts only for the duration of the I/O (FOLL_PIN without
        # FOLL_LONGTERM), so "held" is measured after it already ended.
        n = os.preadv(fd, [view], 0)
        r.update(ok=True, bytes_read=n, message="read")
    except OSError as e:
        set_error(r, e.errno, f"preadv O_DIRECT: {e.strerror}")
    r["held_seconds"] = round(time.monotonic() - t0, 3)
    meter.held()
    view.release()
    r.update(meter.fields())
    r["first16_hex"] = buf.head(16)
    os.close(fd)
    buf.close()
    return r


def _arguments(sp: argparse.ArgumentParser) -> None:
    memory_args(sp)
    sp.add_argument("--target", required=True, help="regular file on a non-DAX fs to read")


COMMANDS = (Command("odirect", "O_DIRECT read into the buffer (transient pin)", _arguments, cmd_odirect, pins=True),)
