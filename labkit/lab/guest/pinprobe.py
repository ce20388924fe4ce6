#!/usr/bin/env python3
"""pinprobe: try to pin user memory in the guest, and measure what happened.

This script runs *inside* the Debian bookworm lab guest, as root.  The host
uploads it to ``/run/labkit/pinprobe.py`` and runs::

    python3 /run/labkit/pinprobe.py SUBCOMMAND [ARGS...]

Subcommands (each pins a buffer a different way):

    rdma           RDMA memory registration (ibv_reg_mr via pyverbs), long-term pin
    v4l2           V4L2 USERPTR buffer queued on the vivid capture device, long-term pin
    odirect        an O_DIRECT read into the buffer, a short-lived (transient) pin
    io_uring       io_uring fixed-buffer registration, long-term pin
    truncate-wait  a truncate that has to wait until DAX pages held by a pipe are idle
    status         VmPin of a process and the global FOLL_PIN counters

The buffer (``--memory``) is anonymous memory, a file mapping (page cache or
fs-dax, depending on where ``--path`` lives), or a device-dax char device.

Contract with the host: every subcommand prints exactly ONE JSON object on
stdout (its last line).  Exit status 0 means "the probe ran" -- including when
the kernel *refused* the pin, because a refusal (e.g. EOPNOTSUPP for a
long-term pin of fs-dax memory) is the result the lab wants to show.  Exit 2
with ``{"error": ...}`` means bad arguments or a setup problem (no such
device, mmap failed, ...); exit 1 with ``{"error": ...}`` means a bug here.
Human-oriented chatter goes to stderr only.

Only the standard library, ctypes, and ``pyverbs`` (python3-pyverbs, imported
lazily by the rdma subcommand only) are used.  Structure layouts and ioctl
numbers are for x86-64.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import json
import mmap
import os
import re
import select
import signal
import stat
import struct
import sys
import time
from typing import Any, Callable, NoReturn

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB2 = 2 * 1024 * 1024
DEFAULT_SIZE = MIB2
# Upper bound for "--hold -1" (hold until stdin closes / SIGTERM): every wait in
# the probe is bounded so a forgotten probe cannot pin guest memory forever.
MAX_HOLD_SECONDS = 3600.0

MEMORY_KINDS = ("anon", "file", "devdax")
MAPPINGS = ("shared", "private")

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.syscall.restype = ctypes.c_long
MAP_FAILED = ctypes.c_void_p(-1).value


class SetupError(Exception):
    """Bad arguments or an environment problem: exit 2, not a probe result."""


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# --------------------------------------------------------------------------
# Output helpers


def emit(obj: dict[str, Any]) -> None:
    """Print the one JSON object; flush because the host may read it while we hold a pin."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2, **extra: Any) -> NoReturn:
    emit({"error": message, **extra})
    sys.exit(code)


# errno.errorcode picks one name for aliased values; use the names the kernel
# sources use for the errors learners will look up (95 is ENOTSUP == EOPNOTSUPP).
_PREFERRED_ERRNAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP", errno.EAGAIN: "EAGAIN",
                       errno.EDEADLK: "EDEADLK"}


def errname(err: int | None) -> str | None:
    if err is None:
        return None
    return _PREFERRED_ERRNAMES.get(err) or errno.errorcode.get(err, f"E{err}")


def log(msg: str) -> None:
    print(f"pinprobe: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Measurements


def read_vmpin_kb(pid: int | str = "self") -> int | None:
    """VmPin from /proc/PID/status: mm->pinned_vm, i.e. what pinners *accounted*.

    Not every pinner accounts (RDMA and io_uring do, V4L2 and O_DIRECT do not),
    which is exactly one of the things the lab shows.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmPin:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def read_foll_pins() -> dict[str, int | None]:
    """The global FOLL_PIN counters; absent on some kernels, then None."""
    out: dict[str, int | None] = {"nr_foll_pin_acquired": None, "nr_foll_pin_released": None}
    # The counters are batched per CPU and /proc/vmstat does not fold those
    # batches, so small deltas would be off by a few pages.  Reading
    # /proc/sys/vm/stat_refresh (root only) folds every CPU's batch first.
    try:
        with open("/proc/sys/vm/stat_refresh") as f:
            f.read()
    except OSError:
        pass
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, _, val = line.partition(" ")
                if key in out:
                    out[key] = int(val)
    except OSError:
        pass
    return out


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


class Meter:
    """Snapshot counters before a pin attempt and while it is held.

    The FOLL_PIN counters are system wide, so another pinner running at the
    same time adds noise; the lab guest is otherwise idle.
    """

    def __init__(self) -> None:
        self.vm0 = read_vmpin_kb()
        self.fp0 = read_foll_pins()
        self.vm1: int | None = None
        self.fp1: dict[str, int | None] = {}
        self.vm2: int | None = None
        self.fp2: dict[str, int | None] | None = None

    def held(self) -> None:
        self.vm1 = read_vmpin_kb()
        self.fp1 = read_foll_pins()

    def released(self) -> None:
        self.vm2 = read_vmpin_kb()
        self.fp2 = read_foll_pins()

    def fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "vmpin_kb_before": self.vm0,
            "vmpin_kb_after": self.vm1,
            "vmpin_kb_delta": _delta(self.vm0, self.vm1),
            "foll_pin_acquired_delta": _delta(self.fp0["nr_foll_pin_acquired"],
                                              self.fp1.get("nr_foll_pin_acquired")),
            "foll_pin_released_delta": _delta(self.fp0["nr_foll_pin_released"],
                                              self.fp1.get("nr_foll_pin_released")),
        }
        if self.fp2 is not None:
            # After the pin is dropped: did VmPin come back and were the pins released?
            d["vmpin_kb_released"] = self.vm2
            d["foll_pin_acquired_delta_total"] = _delta(self.fp0["nr_foll_pin_acquired"],
                                                        self.fp2["nr_foll_pin_acquired"])
            d["foll_pin_released_delta_total"] = _delta(self.fp0["nr_foll_pin_released"],
                                                        self.fp2["nr_foll_pin_released"])
        return d


# --------------------------------------------------------------------------
# The buffer


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Buffer:
    """A mapping made with libc mmap (not the mmap module) so that we know its
    address for the pinning calls and can munmap it exactly when we choose."""

    def __init__(self, memory: str, size: int, mapping: str = "shared",
                 path: str | None = None) -> None:
        if size <= 0 or size % PAGE:
            raise SetupError(f"--size must be a positive multiple of {PAGE}, got {size}")
        self.memory, self.size, self.mapping, self.path = memory, size, mapping, path
        self.fd = -1
        share = mmap.MAP_SHARED if mapping == "shared" else mmap.MAP_PRIVATE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if memory == "anon":
            flags, fd = share | mmap.MAP_ANONYMOUS, -1
        elif memory == "file":
            if not path:
                raise SetupError("--memory file needs --path FILE")
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                if os.fstat(self.fd).st_size < size:
                    os.ftruncate(self.fd, size)
                # Write every page through the file first so blocks / page-cache
                # pages really exist (no holes, no unwritten extents) before we map.
                page = b"\x5a" * PAGE
                for off in range(0, size, PAGE):
                    os.pwrite(self.fd, page, off)
                os.fsync(self.fd)
            except OSError as e:
                raise SetupError(f"cannot prepare {path}: {e}") from e
            flags, fd = share, self.fd
        elif memory == "devdax":
            if not path:
                raise SetupError("--memory devdax needs --path /dev/daxX.Y")
            if mapping != "shared":
                # device-dax refuses private mappings; that's a usage error, not a pin result
                raise SetupError("--memory devdax supports only --mapping shared")
            align = _devdax_align(path)
            if size % align:
                raise SetupError(f"--size must be a multiple of the device-dax alignment "
                                 f"({align} bytes) for {path}, got {size}")
            try:
                self.fd = os.open(path, os.O_RDWR)
            except OSError as e:
                raise SetupError(f"cannot open {path}: {e}") from e
            flags, fd = mmap.MAP_SHARED, self.fd
        else:
            raise SetupError(f"unknown memory kind {memory!r}; valid: {', '.join(MEMORY_KINDS)}")
        addr = libc.mmap(None, size, prot, flags, fd, 0)
        if addr is None or addr == MAP_FAILED:
            err = ctypes.get_errno()
            self._close_fd()
            raise SetupError(f"mmap of {memory} ({path or 'anonymous'}, {size} bytes) failed: "
                             f"{errname(err)} {os.strerror(err)}")
        self.addr: int = addr
        self.mapped = True
        # Fault every page in for writing: pins of not-yet-present pages would
        # measure page-fault behaviour rather than pinning.
        for off in range(0, size, PAGE):
            ctypes.memset(self.addr + off, 0x5A, 1)
        # A recognisable first 16 bytes, so a device write into the buffer is visible.
        ctypes.memset(self.addr, 0xAA, 16)

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable memoryview over (part of) the mapping, e.g. for os.preadv."""
        length = self.size - offset if length is None else length
        return memoryview((ctypes.c_char * length).from_address(self.addr + offset)).cast("B")

    def head(self, n: int = 16, offset: int = 0) -> str:
        return ctypes.string_at(self.addr + offset, n).hex()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if self.mapped:
            libc.munmap(self.addr, self.size)
            self.mapped = False
        self._close_fd()

    def describe(self) -> dict[str, Any]:
        return {"memory": self.memory, "mapping": self.mapping, "size": self.size, "path": self.path}


def _devdax_align(path: str) -> int:
    """device-dax mappings must be sized (and placed) at the device's alignment."""
    name = os.path.basename(os.path.realpath(path))
    try:
        with open(f"/sys/bus/dax/devices/{name}/align") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return MIB2


def base_result(mechanism: str, buf: Buffer | None, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"mechanism": mechanism}
    if buf is not None:
        r.update(buf.describe())
    r.update({"ok": False, "errno": None, "errname": None, "message": "",
              "held_seconds": 0.0})
    r.update(kw)
    return r


def set_error(r: dict[str, Any], err: int | None, message: str) -> None:
    r["ok"] = False
    r["errno"] = err
    r["errname"] = errname(err)
    r["message"] = message


# --------------------------------------------------------------------------
# Holding a pin


class _Stop(Exception):
    pass


def hold_until_released(seconds: float) -> float:
    """Keep the pin up.  seconds >= 0: sleep that long.  seconds < 0: wait until
    stdin reaches EOF (the host's SSH session went away) or SIGTERM/SIGHUP/SIGINT,
    at most MAX_HOLD_SECONDS.  Returns how long we waited."""
    t0 = time.monotonic()
    if seconds >= 0:
        time.sleep(seconds)
        return time.monotonic() - t0

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop()

    # Only a pipe, socket or terminal on stdin can tell us "the host went away"
    # by EOF; /dev/null or a file would read EOF at once and end the hold early.
    try:
        mode = os.fstat(0).st_mode
        watch_stdin = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(0)
    except OSError:
        watch_stdin = False
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        deadline = t0 + MAX_HOLD_SECONDS
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log("hold: safety limit reached, releasing")
                break
            if not watch_stdin:
                time.sleep(min(left, 60.0))  # a signal interrupts this via _Stop
                continue
            ready, _, _ = select.select([0], [], [], min(left, 60.0))
            if ready:
                try:
                    if not os.read(0, 4096):
                        break  # EOF
                except OSError:
                    break
    except _Stop:
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return time.monotonic() - t0


# --------------------------------------------------------------------------
# rdma


def cmd_rdma(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import pyverbs.device as pdev
        import pyverbs.enums as penums
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
    except ImportError as e:
        raise SetupError(f"pyverbs not importable (install python3-pyverbs): {e}") from e

    name = args.device
    if name is None:
        try:
            devs = pdev.get_device_list()
        except PyverbsError as e:
            raise SetupError(f"cannot list RDMA devices: {e}") from e
        if not devs:
            raise SetupError("no RDMA device (e.g. modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0)")
        raw = devs[0].name
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        ctx = pdev.Context(name=name)
        pd = PD(ctx)
    except PyverbsError as e:
        raise SetupError(f"cannot open RDMA device {name}: {e}") from e

    buf = Buffer(args.memory, args.size, args.mapping, args.path)
    r = base_result("rdma", buf, device=name, vmpin_kb_released=None)
    access = (penums.IBV_ACCESS_LOCAL_WRITE | penums.IBV_ACCESS_REMOTE_WRITE
              | penums.IBV_ACCESS_REMOTE_READ)
    meter = Meter()
    mr = None
    try:
        mr = MR(pd, buf.size, access, address=buf.addr)
    except PyverbsRDMAError as e:
        set_error(r, e.error_code if e.error_code not in (None, -1) else None, str(e))
    except PyverbsError as e:
        set_error(r, None, str(e))
    meter.held()
    if mr is None:
        r.update(meter.fields())
        r["vmpin_kb_released"] = None
        buf.close()
        pd.close()
        ctx.close()
        return r

    r.update(ok=True, message="registered", lkey=mr.lkey, rkey=mr.rkey)
    t_pinned = time.monotonic()
    if args.hold is not None and args.hold < 0:
        # Long-running mode for the dashboard: report now, keep the MR until told to stop.
        r.update(meter.fields())
        r["held_seconds"] = None
        r["pid"] = os.getpid()
        r["holding"] = True
        r["kernel"] = os.uname().release
        emit(r)
        hold_until_released(-1)
        mr.close()
        meter.released()
        log(f"deregistered after {time.monotonic() - t_pinned:.1f}s; VmPin now {meter.vm2} kB")
        buf.close()
        pd.close()
        ctx.close()
        return {}  # already emitted
    hold_until_released(args.hold or 0)
    mr.close()  # ibv_dereg_mr: unpins and un-accounts VmPin
    r["held_seconds"] = round(time.monotonic() - t_pinned, 3)
    meter.released()
    r.update(meter.fields())
    buf.close()
    pd.close()
    ctx.close()
    return r


# --------------------------------------------------------------------------
# v4l2 (x86-64 UAPI layouts)

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


def _ioctl(fd: int, req: int, arg: Any) -> None:
    # fcntl.ioctl copies the ctypes object in and (mutate=True) back out.
    fcntl.ioctl(fd, req, arg, True)


def _querycap(fd: int) -> v4l2_capability:
    cap = v4l2_capability()
    _ioctl(fd, VIDIOC_QUERYCAP, cap)
    return cap


def _is_vivid_capture(cap: v4l2_capability) -> bool:
    caps = cap.device_caps if cap.capabilities & V4L2_CAP_DEVICE_CAPS else cap.capabilities
    return cap.driver == b"vivid" and bool(caps & V4L2_CAP_VIDEO_CAPTURE) \
        and bool(caps & V4L2_CAP_STREAMING)


def _find_vivid() -> str:
    nodes = sorted((n for n in os.listdir("/dev") if re.fullmatch(r"video\d+", n)),
                   key=lambda n: int(n[5:]))
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


def cmd_v4l2(args: argparse.Namespace) -> dict[str, Any]:
    dev = args.device or _find_vivid()
    try:
        # O_NONBLOCK: DQBUF must never block; we wait with select() and a timeout.
        fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK)
    except OSError as e:
        raise SetupError(f"cannot open {dev}: {e}") from e
    try:
        cap = _querycap(fd)
        if not _is_vivid_capture(cap):
            log(f"{dev} is driver {cap.driver!r}, not a vivid capture node; trying anyway")
        fmt = v4l2_format(type=V4L2_BUF_TYPE_VIDEO_CAPTURE)
        _ioctl(fd, VIDIOC_G_FMT, fmt)
        sizeimage = fmt.fmt.pix.sizeimage
        req = v4l2_requestbuffers(count=1, type=V4L2_BUF_TYPE_VIDEO_CAPTURE,
                                  memory=V4L2_MEMORY_USERPTR)
        _ioctl(fd, VIDIOC_REQBUFS, req)
    except OSError as e:
        os.close(fd)
        raise SetupError(f"{dev}: QUERYCAP/G_FMT/REQBUFS failed: {e}") from e
    nbufs = max(1, req.count)  # the driver may raise count to its minimum (vivid: 2)
    bufsize = _round_up(sizeimage, PAGE)
    total = nbufs * bufsize
    if args.memory == "devdax":
        total = _round_up(total, _devdax_align(args.path or ""))
    try:
        buf = Buffer(args.memory, total, args.mapping, args.path)
    except SetupError:
        _reqbufs0(fd)
        os.close(fd)
        raise
    r = base_result("v4l2", buf, device=dev, sizeimage=sizeimage, buffers=nbufs,
                    width=fmt.fmt.pix.width, height=fmt.fmt.pix.height)

    def qbuf(index: int) -> None:
        b = v4l2_buffer(index=index, type=V4L2_BUF_TYPE_VIDEO_CAPTURE,
                        memory=V4L2_MEMORY_USERPTR, length=sizeimage)
        b.m.userptr = buf.addr + index * bufsize
        _ioctl(fd, VIDIOC_QBUF, b)

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
    _reqbufs0(fd)  # frees the vb2 buffers, which unpins the user pages
    if t_pinned is not None:
        r["held_seconds"] = round(time.monotonic() - t_pinned, 3)
    meter.released()
    r.update(meter.fields())
    os.close(fd)
    buf.close()
    return r


def _reqbufs0(fd: int) -> None:
    try:
        _ioctl(fd, VIDIOC_REQBUFS, v4l2_requestbuffers(
            count=0, type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_USERPTR))
    except OSError as e:
        log(f"REQBUFS count=0 failed: {e}")


def _stream(fd: int, buf: Buffer, bufsize: int, nbufs: int, frames_wanted: int,
            qbuf: Callable[[int], None]) -> dict[str, Any]:
    """Capture a few frames into the pinned buffers, to show the device writes them."""
    out: dict[str, Any] = {"frames": 0, "stream_error": None}
    try:
        for i in range(1, nbufs):  # vivid only starts streaming with >= 2 buffers queued
            qbuf(i)
        _ioctl(fd, VIDIOC_STREAMON, ctypes.c_int(V4L2_BUF_TYPE_VIDEO_CAPTURE))
    except OSError as e:
        out["stream_error"] = f"STREAMON/QBUF: {errname(e.errno)} {e.strerror}"
        return out
    try:
        while out["frames"] < frames_wanted:
            ready, _, _ = select.select([fd], [], [], 5.0)
            if not ready:
                out["stream_error"] = "timeout: no frame within 5 s"
                break
            b = v4l2_buffer(type=V4L2_BUF_TYPE_VIDEO_CAPTURE, memory=V4L2_MEMORY_USERPTR)
            try:
                _ioctl(fd, VIDIOC_DQBUF, b)
            except BlockingIOError:
                continue
            out["frames"] += 1
            if out["frames"] == 1:
                out["first_frame_index"] = b.index
                out["first_frame_bytesused"] = b.bytesused
                out["first_frame_first16_hex"] = buf.head(16, b.index * bufsize)
            if out["frames"] < frames_wanted:
                qbuf(b.index)  # give it back so the device keeps writing pinned memory
    except OSError as e:
        out["stream_error"] = f"DQBUF/QBUF: {errname(e.errno)} {e.strerror}"
    finally:
        try:
            _ioctl(fd, VIDIOC_STREAMOFF, ctypes.c_int(V4L2_BUF_TYPE_VIDEO_CAPTURE))
        except OSError as e:
            out["stream_error"] = out["stream_error"] or f"STREAMOFF: {e.strerror}"
    return out


# --------------------------------------------------------------------------
# odirect


def cmd_odirect(args: argparse.Namespace) -> dict[str, Any]:
    target = args.target
    try:
        st_size = os.stat(target).st_size if os.path.exists(target) else -1
        if st_size < args.size:
            # Real data, not a hole: a read of a hole might not do any DMA/pinning.
            with open(target, "r+b" if st_size >= 0 else "wb") as f:
                f.seek(max(st_size, 0))
                chunk = bytes(range(256)) * 4096
                left = args.size - max(st_size, 0)
                while left > 0:
                    left -= f.write(chunk[:min(left, len(chunk))])
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(target, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        raise SetupError(f"cannot prepare O_DIRECT target {target}: {e}") from e
    buf = Buffer(args.memory, args.size, args.mapping, args.path)
    r = base_result("odirect", buf, target=target, bytes_read=None)
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


# --------------------------------------------------------------------------
# io_uring

SYS_io_uring_setup = 425
SYS_io_uring_register = 427
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1


def cmd_io_uring(args: argparse.Namespace) -> dict[str, Any]:
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zero = defaults
    ring = libc.syscall(ctypes.c_long(SYS_io_uring_setup), ctypes.c_uint(4), params)
    if ring < 0:
        err = ctypes.get_errno()
        raise SetupError(f"io_uring_setup failed: {errname(err)} {os.strerror(err)}",
                         ) from None
    buf = Buffer(args.memory, args.size, args.mapping, args.path)
    r = base_result("io_uring", buf, vmpin_kb_released=None)
    iov = iovec(buf.addr, buf.size)
    meter = Meter()
    t_pinned = None
    rc = libc.syscall(ctypes.c_long(SYS_io_uring_register), ctypes.c_int(ring),
                      ctypes.c_uint(IORING_REGISTER_BUFFERS), ctypes.byref(iov), ctypes.c_uint(1))
    if rc < 0:
        err = ctypes.get_errno()
        set_error(r, err, f"IORING_REGISTER_BUFFERS: {os.strerror(err)}")
    else:
        r.update(ok=True, message="registered")
        t_pinned = time.monotonic()
    meter.held()
    if t_pinned is not None:
        if args.hold:
            hold_until_released(max(0.0, min(args.hold, MAX_HOLD_SECONDS)))
        rc = libc.syscall(ctypes.c_long(SYS_io_uring_register), ctypes.c_int(ring),
                          ctypes.c_uint(IORING_UNREGISTER_BUFFERS), None, ctypes.c_uint(0))
        if rc < 0:
            err = ctypes.get_errno()
            r["unregister_error"] = f"{errname(err)} {os.strerror(err)}"
        r["held_seconds"] = round(time.monotonic() - t_pinned, 3)
    os.close(ring)
    meter.released()
    r.update(meter.fields())
    buf.close()
    return r


# --------------------------------------------------------------------------
# truncate-wait

SPLICE_F_NONBLOCK = 0x02
libc.vmsplice.restype = ctypes.c_ssize_t
libc.vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_size_t, ctypes.c_uint]

_STACK_FN = re.compile(r"\]\s+([A-Za-z0-9_.$]+)\+0x")


def _sample(pid: int, seen_wchan: list[str], seen_stacks: list[list[str]]) -> None:
    """Record distinct non-empty wchan values and stack traces of the truncating child."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            w = f.read().strip()
        if w and w != "0" and w not in seen_wchan:
            seen_wchan.append(w)
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stack") as f:
            fns = [m.group(1) for m in map(_STACK_FN.search, f) if m]
        if fns and fns not in seen_stacks:
            seen_stacks.append(fns)
    except OSError:
        pass


def cmd_truncate_wait(args: argparse.Namespace) -> dict[str, Any]:
    hold, timeout = float(args.hold), float(args.timeout)
    if hold < 0 or timeout <= 0:
        raise SetupError("--hold must be >= 0 and --timeout > 0")
    if not 1 <= args.pages <= 16:
        # 16 = default pipe capacity in buffers; more would block vmsplice.
        raise SetupError("--pages must be between 1 and 16")
    if args.pages * PAGE > args.size:
        raise SetupError("--pages * page size must not exceed --size")
    buf = Buffer("file", args.size, "shared", args.path)
    r = base_result("truncate-wait", buf, hold=hold, timeout=timeout, blocked=False, seconds=None,
                    released_after=None, completed=False, where=[], wchan=[], stacks=[],
                    spliced_bytes=None, size_after=None)
    rfd, wfd = os.pipe()
    iov = iovec(buf.addr, args.pages * PAGE)
    # Without SPLICE_F_GIFT the pipe takes page references (GUP, not FOLL_PIN)
    # on the mapped file pages; nobody reads the pipe, so they stay referenced.
    n = libc.vmsplice(wfd, ctypes.byref(iov), 1, SPLICE_F_NONBLOCK)
    if n < 0:
        err = ctypes.get_errno()
        set_error(r, err, f"vmsplice: {os.strerror(err)}")
        os.close(rfd)
        os.close(wfd)
        buf.close()
        return r
    r["spliced_bytes"] = n
    r["ok"] = True
    rep_r, rep_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: only the truncate, timed from its own point of view
        try:
            os.close(rfd)
            os.close(wfd)
            os.close(rep_r)
            c0 = time.monotonic()
            code = 0
            try:
                os.truncate(args.path, 0)
            except OSError as e:
                code = e.errno or 1
            os.write(rep_w, struct.pack("=di", time.monotonic() - c0, code))
        finally:
            os._exit(0)
    os.close(rep_w)
    wchan: list[str] = []
    stacks: list[list[str]] = []
    status: int | None = None

    def poll_child() -> bool:
        nonlocal status
        if status is None:
            p, st = os.waitpid(pid, os.WNOHANG)
            if p == pid:
                status = st
        return status is not None

    # Phase 1: the references are held; watch where the truncate sleeps.
    while time.monotonic() - t0 < hold and not poll_child():
        _sample(pid, wchan, stacks)
        time.sleep(0.05)
    done_before_release = poll_child()
    # Release: drain the pipe (drops the page references) and unmap.
    released_at = time.monotonic() - t0
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
    r["released_after"] = round(released_at, 3)
    # Phase 2: the truncate should now finish; bounded by --timeout (counted
    # from the release, so a short --timeout cannot kill a truncate that was
    # only waiting for the release we had not done yet).
    release_time = time.monotonic()
    while time.monotonic() - release_time < timeout and not poll_child():
        _sample(pid, wchan, stacks)
        time.sleep(0.05)
    killed = False
    if not poll_child():
        # The DAX layout wait sleeps interruptibly, so SIGKILL ends it.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed = True
    # The child may have finished (and reported) in the instant before the kill.
    ready, _, _ = select.select([rep_r], [], [], 0)
    data = os.read(rep_r, 12) if ready else b""
    if killed and len(data) != 12:
        r["message"] = f"truncate still blocked {timeout}s after the release; child killed"
        r["seconds"] = round(time.monotonic() - t0, 3)
    else:
        if len(data) == 12:
            secs, code = struct.unpack("=di", data)
            r["seconds"] = round(secs, 3)
            r["completed"] = code == 0
            if code:
                r["errno"], r["errname"] = code, errname(code)
                r["message"] = f"truncate failed: {os.strerror(code)}"
            else:
                r["message"] = "truncate completed"
        else:
            r["message"] = "truncate child exited without reporting"
    os.close(rep_r)
    r["blocked"] = bool(not done_before_release and r["seconds"] is not None
                        and hold > 0 and r["seconds"] >= 0.8 * hold)
    r["held_seconds"] = r["released_after"]
    where: list[str] = []
    for fn in wchan + [fn for s in stacks for fn in s]:
        if fn not in where:
            where.append(fn)
    r.update(where=where, wchan=wchan, stacks=stacks[:6])
    try:
        r["size_after"] = os.stat(args.path).st_size
    except OSError:
        pass
    return r


# --------------------------------------------------------------------------
# status


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    pid = args.pid if args.pid is not None else os.getpid()
    vm = read_vmpin_kb(pid)
    return {"pid": pid, "alive": os.path.exists(f"/proc/{pid}"), "vmpin_kb": vm,
            **read_foll_pins()}


# --------------------------------------------------------------------------
# Arguments


class JSONArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as the one JSON object (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(self.format_usage().rstrip(), file=sys.stderr)
        fail(f"{self.prog}: {message}", 2)


def _size(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer byte count: {text!r}") from None


def build_parser() -> JSONArgumentParser:
    p = JSONArgumentParser(prog="pinprobe", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    def memory_args(sp: argparse.ArgumentParser, size: bool = True) -> None:
        sp.add_argument("--memory", choices=MEMORY_KINDS, default="anon",
                        help="anon, file (page cache or fs-dax, via --path) or devdax")
        sp.add_argument("--path", help="file for --memory file, /dev/daxX.Y for devdax")
        sp.add_argument("--mapping", choices=MAPPINGS, default="shared")
        if size:
            sp.add_argument("--size", type=_size, default=DEFAULT_SIZE,
                            help="buffer bytes, multiple of 4096 (default 2 MiB)")

    sp = sub.add_parser("rdma", help="ibv_reg_mr via pyverbs")
    memory_args(sp)
    sp.add_argument("--device", help="RDMA device (default: first, e.g. rxe0)")
    sp.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the MR; -1 = print, then hold until stdin EOF/SIGTERM")
    sp.set_defaults(func=cmd_rdma)

    sp = sub.add_parser("v4l2", help="V4L2 USERPTR QBUF on vivid")
    memory_args(sp, size=False)
    sp.add_argument("--device", help="/dev/videoN (default: first vivid capture node)")
    sp.add_argument("--size", type=_size, default=None, help="ignored: sizeimage decides")
    sp.add_argument("--stream", type=int, default=0, metavar="N",
                    help="capture N frames into the pinned buffers")
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the buffer queued")
    sp.set_defaults(func=cmd_v4l2)

    sp = sub.add_parser("odirect", help="O_DIRECT read into the buffer (transient pin)")
    memory_args(sp)
    sp.add_argument("--target", required=True, help="regular file on a non-DAX fs to read")
    sp.set_defaults(func=cmd_odirect)

    sp = sub.add_parser("io_uring", help="IORING_REGISTER_BUFFERS")
    memory_args(sp)
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the registration")
    sp.set_defaults(func=cmd_io_uring)

    sp = sub.add_parser("truncate-wait", help="truncate vs. DAX pages referenced by a pipe")
    sp.add_argument("--path", required=True, help="file to create (on an fs-dax mount)")
    sp.add_argument("--size", type=_size, default=DEFAULT_SIZE)
    sp.add_argument("--pages", type=int, default=4, help="pages to vmsplice (1..16)")
    sp.add_argument("--hold", type=float, default=3.0, help="seconds before draining the pipe")
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds to wait for the truncate after the release")
    sp.set_defaults(func=cmd_truncate_wait)

    sp = sub.add_parser("status", help="VmPin of --pid and the FOLL_PIN counters")
    sp.add_argument("--pid", type=int, default=None, help="default: this process")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("batch", help="run many probes (JSON lines of argv lists on stdin), each observed")
    sp.add_argument("--case-timeout", type=float, default=60.0)
    sp.set_defaults(func=cmd_batch)
    return p


# --------------------------------------------------------------------------
# Batch mode: one Python start-up (and one pyverbs import) for a whole matrix.
# Each case runs in a forked child, so pins and counters never leak between
# cases; the parent records the kernel log records and check_vma_flags trace
# lines that appeared while the case ran.

TRACE = "/sys/kernel/tracing/trace"


def _kmsg_open() -> int | None:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(fd, 0, os.SEEK_END)      # only records written from now on
        return fd
    except OSError:
        return None


def _kmsg_drain(fd: int | None) -> list[str]:
    """New kernel log records, formatted like dmesg: '[   12.345678] text'."""
    lines: list[str] = []
    while fd is not None:
        try:
            rec = os.read(fd, 8192).decode(errors="replace")
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.EPIPE:     # records overwritten: skip ahead
                continue
            break
        head, _, text = rec.partition(";")
        fields = head.split(",")
        ts = int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() else 0.0
        lines.append(f"[{ts:12.6f}] {text.splitlines()[0] if text else ''}")
    if fd is not None:
        os.close(fd)
    return lines


def _run_case(argv: list[str], timeout: float) -> tuple[dict[str, Any], list[str], list[str]]:
    try:
        with open(TRACE, "w"):
            pass                            # clears the trace buffer
    except OSError:
        pass
    kfd = _kmsg_open()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                            # child: one probe, JSON to the pipe
        code = 1
        try:
            os.dup2(wfd, 1)
            os.close(rfd)
            code = main(argv) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(wfd)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        out += chunk
    os.close(rfd)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    result: dict[str, Any] = {"error": f"probe produced no result within {timeout:.0f} s"}
    for line in reversed(out.decode(errors="replace").strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    trace: list[str] = []
    try:
        with open(TRACE) as f:
            trace = [ln.rstrip() for ln in f if "check_vma_flags" in ln]
    except OSError:
        pass
    return result, _kmsg_drain(kfd), trace


def cmd_batch(args: argparse.Namespace) -> dict[str, Any] | None:
    cases = [json.loads(line) for line in sys.stdin if line.strip()]
    if any(c and c[0] == "rdma" for c in cases):
        import importlib
        for mod in ("pyverbs.device", "pyverbs.pd", "pyverbs.mr"):
            try:
                importlib.import_module(mod)    # imported once, inherited by every fork
            except ImportError:
                pass
    for argv in cases:
        if not isinstance(argv, list) or not argv or argv[0] in ("batch",):
            emit({"result": {"error": f"bad batch case {argv!r}"}, "kernel_log": [], "trace": []})
            continue
        result, klog, trace = _run_case([str(a) for a in argv], args.case_timeout)
        emit({"result": result, "kernel_log": klog, "trace": trace})
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except SetupError as e:
        fail(str(e), 2, command=args.command)
    except Exception as e:  # a bug in the probe, not a kernel answer
        import traceback
        traceback.print_exc()
        fail(f"internal error: {type(e).__name__}: {e}", 1, command=args.command)
    if result:
        result.setdefault("kernel", os.uname().release)
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
