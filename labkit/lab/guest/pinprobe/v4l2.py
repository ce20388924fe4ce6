"""V4L2 USERPTR on the vivid capture device: vb2 pins the user pages at
VIDIOC_QBUF (FOLL_LONGTERM, counted in FOLL_PIN, not in VmPin)."""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import select
import time
from collections.abc import Callable
from typing import Any

from . import v4l2_abi as abi
from .args import byte_size, memory_args
from .buffer import Buffer, devdax_align
from .common import MAX_HOLD_SECONDS, PAGE, SetupError, base_result, errname, log, round_up, set_error
from .hold import hold_until_released
from .measure import Meter
from .registry import Command


def _querycap(fd: int) -> abi.v4l2_capability:
    cap = abi.v4l2_capability()
    abi.ioctl(fd, abi.VIDIOC_QUERYCAP, cap)
    return cap


def _is_vivid_capture(cap: abi.v4l2_capability) -> bool:
    caps = cap.device_caps if cap.capabilities & abi.V4L2_CAP_DEVICE_CAPS else cap.capabilities
    return cap.driver == b"vivid" and bool(caps & abi.V4L2_CAP_VIDEO_CAPTURE) \
        and bool(caps & abi.V4L2_CAP_STREAMING)


def _find_vivid() -> str:
    nodes = sorted((n for n in os.listdir("/dev") if re.fullmatch(r"video\d+", n)), key=lambda n: int(n[5:]))
    for n in nodes:
        path = f"/dev/{n}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if _is_vivid_capture(_querycap(fd)):
                return path
        except OSError:
            pass
        finally:
            os.close(fd)
    raise SetupError("no vivid video capture node found (modprobe vivid?)")


def _reqbufs(fd: int, count: int) -> abi.v4l2_requestbuffers:
    req = abi.v4l2_requestbuffers(count=count, type=abi.V4L2_BUF_TYPE_VIDEO_CAPTURE,
                                  memory=abi.V4L2_MEMORY_USERPTR)
    abi.ioctl(fd, abi.VIDIOC_REQBUFS, req)
    return req


def _reqbufs0(fd: int) -> None:
    """Free the vb2 buffers, which unpins the user pages."""
    try:
        _reqbufs(fd, 0)
    except OSError as e:
        log(f"REQBUFS count=0 failed: {e}")


def _open_capture(dev: str) -> tuple[int, abi.v4l2_format, int]:
    """Open ``dev``, read its format and request USERPTR buffers: (fd, format, buffer count)."""
    try:
        # O_NONBLOCK: DQBUF must never block; we wait with select() and a timeout.
        fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK)
    except OSError as e:
        raise SetupError(f"cannot open {dev}: {e}") from e
    try:
        cap = _querycap(fd)
        if not _is_vivid_capture(cap):
            log(f"{dev} is driver {cap.driver!r}, not a vivid capture node; trying anyway")
        fmt = abi.v4l2_format(type=abi.V4L2_BUF_TYPE_VIDEO_CAPTURE)
        abi.ioctl(fd, abi.VIDIOC_G_FMT, fmt)
        req = _reqbufs(fd, 1)
    except OSError as e:
        os.close(fd)
        raise SetupError(f"{dev}: QUERYCAP/G_FMT/REQBUFS failed: {e}") from e
    return fd, fmt, max(1, req.count)    # the driver may raise count to its minimum (vivid: 2)


def _buffer_for(fd: int, args: Any, total: int) -> Buffer:
    if args.memory == "devdax":
        total = round_up(total, devdax_align(args.path or ""))
    try:
        return Buffer(args.memory, total, args.mapping, args.path, args.dax_fs, args.dax_device)
    except SetupError:
        _reqbufs0(fd)
        os.close(fd)
        raise


def cmd_v4l2(args: Any) -> dict[str, Any]:
    dev = args.device or _find_vivid()
    fd, fmt, nbufs = _open_capture(dev)
    sizeimage = fmt.fmt.pix.sizeimage
    bufsize = round_up(sizeimage, PAGE)
    buf = _buffer_for(fd, args, nbufs * bufsize)
    r = base_result("v4l2", buf, device=dev, sizeimage=sizeimage, buffers=nbufs,
                    width=fmt.fmt.pix.width, height=fmt.fmt.pix.height)

    def qbuf(index: int) -> None:
        b = abi.v4l2_buffer(index=index, type=abi.V4L2_BUF_TYPE_VIDEO_CAPTURE,
                            memory=abi.V4L2_MEMORY_USERPTR, length=sizeimage)
        b.m.userptr = buf.addr + index * bufsize
        abi.ioctl(fd, abi.VIDIOC_QBUF, b)

    meter = Meter()
    t_pinned = None
    try:
        qbuf(0)  # for USERPTR, vb2 pins the user pages here (FOLL_LONGTERM)
        r.update(ok=True, message="queued")
        t_pinned = time.monotonic()
    except OSError as e:
        set_error(r, e.errno, f"VIDIOC_QBUF: {e.strerror}")
    meter.held()
    if t_pinned is not None and args.stream:
        r.update(_stream(fd, buf, bufsize, nbufs, args.stream, qbuf))
    if t_pinned is not None and args.hold:
        hold_until_released(max(0.0, min(args.hold, MAX_HOLD_SECONDS)))
    if r["ok"]:
        r["first16_hex"] = buf.head(16)
    _reqbufs0(fd)
    if t_pinned is not None:
        r["held_seconds"] = round(time.monotonic() - t_pinned, 3)
    meter.released()
    r.update(meter.fields())
    os.close(fd)
    buf.close()
    return r


def _streamon(fd: int, nbufs: int, qbuf: Callable[[int], None]) -> str | None:
    """Queue the other buffers and start streaming; an error text or None."""
    try:
        for i in range(1, nbufs):  # vivid only starts streaming with >= 2 buffers queued
            qbuf(i)
        abi.ioctl(fd, abi.VIDIOC_STREAMON, ctypes.c_int(abi.V4L2_BUF_TYPE_VIDEO_CAPTURE))
    except OSError as e:
        return f"STREAMON/QBUF: {errname(e.errno)} {e.strerror}"
    return None


def _capture(fd: int, buf: Buffer, bufsize: int, frames_wanted: int, qbuf: Callable[[int], None],
             out: dict[str, Any]) -> None:
    while out["frames"] < frames_wanted:
        ready, _, _ = select.select([fd], [], [], 5.0)
        if not ready:
            out["stream_error"] = "timeout: no frame within 5 s"
            return
        b = abi.v4l2_buffer(type=abi.V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=abi.V4L2_MEMORY_USERPTR)
        try:
            abi.ioctl(fd, abi.VIDIOC_DQBUF, b)
        except BlockingIOError:
            continue
        out["frames"] += 1
        if out["frames"] == 1:
            out["first_frame_index"] = b.index
            out["first_frame_bytesused"] = b.bytesused
            out["first_frame_first16_hex"] = buf.head(16, b.index * bufsize)
        if out["frames"] < frames_wanted:
            qbuf(b.index)  # give it back so the device keeps writing pinned memory


def _stream(fd: int, buf: Buffer, bufsize: int, nbufs: int, frames_wanted: int,
            qbuf: Callable[[int], None]) -> dict[str, Any]:
    """Capture a few frames into the pinned buffers, to show the device writes them."""
    out: dict[str, Any] = {"frames": 0, "stream_error": _streamon(fd, nbufs, qbuf)}
    if out["stream_error"]:
        return out
    try:
        _capture(fd, buf, bufsize, frames_wanted, qbuf, out)
    except OSError as e:
        out["stream_error"] = f"DQBUF/QBUF: {errname(e.errno)} {e.strerror}"
    finally:
        try:
            abi.ioctl(fd, abi.VIDIOC_STREAMOFF, ctypes.c_int(abi.V4L2_BUF_TYPE_VIDEO_CAPTURE))
        except OSError as e:
            out["stream_error"] = out["stream_error"] or f"STREAMOFF: {e.strerror}"
    return out


def _arguments(sp: argparse.ArgumentParser) -> None:
    memory_args(sp, sized=False)
    sp.add_argument("--device", help="/dev/videoN (default: first vivid capture node)")
    sp.add_argument("--size", type=byte_size, default=None, help="ignored: sizeimage decides")
    sp.add_argument("--stream", type=int, default=0, metavar="N", help="capture N frames into the pinned buffers")
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the buffer queued")


COMMANDS = (Command("v4l2", "V4L2 USERPTR QBUF on vivid", _arguments, cmd_v4l2, pins=True),)
