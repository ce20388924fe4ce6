"""The V4L2 UAPI the probe needs, as ctypes structures and ioctl numbers
(x86-64 layouts; the size asserts catch a wrong layout before an ioctl does)."""

from __future__ import annotations

import ctypes
import fcntl
from typing import Any

_IOC_WRITE, _IOC_READ = 1, 2


def _IOC(direction: int, typ: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(typ) << 8) | nr


def _IOR(typ: str, nr: int, st: Any) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(st))


def _IOW(typ: str, nr: int, st: Any) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(st))


def _IOWR(typ: str, nr: int, st: Any) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(st))


class v4l2_capability(ctypes.Structure):
    _fields_ = [("driver", ctypes.c_char * 16), ("card", ctypes.c_char * 32),
                ("bus_info", ctypes.c_char * 32), ("version", ctypes.c_uint32),
                ("capabilities", ctypes.c_uint32), ("device_caps", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32 * 3)]


class v4l2_pix_format(ctypes.Structure):
    _fields_ = [("width", ctypes.c_uint32), ("height", ctypes.c_uint32),
                ("pixelformat", ctypes.c_uint32), ("field", ctypes.c_uint32),
                ("bytesperline", ctypes.c_uint32), ("sizeimage", ctypes.c_uint32),
                ("colorspace", ctypes.c_uint32), ("priv", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("ycbcr_enc", ctypes.c_uint32),
                ("quantization", ctypes.c_uint32), ("xfer_func", ctypes.c_uint32)]


class _v4l2_format_union(ctypes.Union):
    # raw_data is 200 bytes; the kernel union also holds struct v4l2_window,
    # which contains pointers, so the union is 8-byte aligned (offset 8 below).
    _fields_ = [("pix", v4l2_pix_format), ("raw_data", ctypes.c_uint8 * 200),
                ("_align", ctypes.c_uint64)]


class v4l2_format(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("fmt", _v4l2_format_union)]


class v4l2_requestbuffers(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("memory", ctypes.c_uint32), ("capabilities", ctypes.c_uint32),
                ("flags", ctypes.c_uint8), ("reserved", ctypes.c_uint8 * 3)]


class timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class v4l2_timecode(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("frames", ctypes.c_uint8), ("seconds", ctypes.c_uint8),
                ("minutes", ctypes.c_uint8), ("hours", ctypes.c_uint8),
                ("userbits", ctypes.c_uint8 * 4)]


class _v4l2_buffer_m(ctypes.Union):
    _fields_ = [("offset", ctypes.c_uint32), ("userptr", ctypes.c_ulong),
                ("planes", ctypes.c_void_p), ("fd", ctypes.c_int32)]


class v4l2_buffer(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("bytesused", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("field", ctypes.c_uint32), ("timestamp", timeval),
                ("timecode", v4l2_timecode), ("sequence", ctypes.c_uint32),
                ("memory", ctypes.c_uint32), ("m", _v4l2_buffer_m),
                ("length", ctypes.c_uint32), ("reserved2", ctypes.c_uint32),
                ("request_fd", ctypes.c_int32)]


# Sizes must match the kernel or the ioctl numbers are wrong (ENOTTY).
assert ctypes.sizeof(v4l2_capability) == 104
assert ctypes.sizeof(v4l2_format) == 208
assert ctypes.sizeof(v4l2_requestbuffers) == 20
assert ctypes.sizeof(v4l2_buffer) == 88

VIDIOC_QUERYCAP = _IOR("V", 0, v4l2_capability)
VIDIOC_G_FMT = _IOWR("V", 4, v4l2_format)
VIDIOC_REQBUFS = _IOWR("V", 8, v4l2_requestbuffers)
VIDIOC_QBUF = _IOWR("V", 15, v4l2_buffer)
VIDIOC_DQBUF = _IOWR("V", 17, v4l2_buffer)
VIDIOC_STREAMON = _IOW("V", 18, ctypes.c_int)
VIDIOC_STREAMOFF = _IOW("V", 19, ctypes.c_int)

V4L2_CAP_VIDEO_CAPTURE = 0x00000001
V4L2_CAP_STREAMING = 0x04000000
V4L2_CAP_DEVICE_CAPS = 0x80000000
V4L2_BUF_TYPE_VIDEO_CAPTURE = 1
V4L2_MEMORY_USERPTR = 2


def ioctl(fd: int, req: int, arg: Any) -> None:
    # fcntl.ioctl copies the ctypes object in and (mutate=True) back out.
    fcntl.ioctl(fd, req, arg, True)
