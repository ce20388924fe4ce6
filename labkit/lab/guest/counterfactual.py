#!/usr/bin/env python3
"""counterfactual: the guest side of "what if the check were not there".

Runs *inside* the lab guest, as root, uploaded by the host to
``/run/labkit/counterfactual.py``::

    python3 /run/labkit/counterfactual.py hold-truncate --path F --hold S
    python3 /run/labkit/counterfactual.py stale-write --path A --victim B

hold-truncate  register an RDMA MR (ibv_reg_mr) on a MAP_SHARED file, truncate
               the file in another process, hold the MR for S seconds, then
               deregister: when did the truncate return?
stale-write    register an MR on file A, truncate A, write file B until it
               reuses A's blocks (FIEMAP), then RDMA WRITE through A's MR over
               a loopback RC queue pair: did B's bytes change?
fence-trace    one registration of a MAP_SHARED file, in a child killed after
               --seconds if it has not returned, while kretprobes count what
               each of --functions returned (tracefs hist triggers): which
               fence refused, or where GUP went round in circles?

A registration runs in a forked child with a deadline first (``--register-timeout``):
on a kernel where GUP retries for ever (7.3 with module 1: the fs-dax folios are
not long-term pinnable, migration answers -EAGAIN) ibv_reg_mr never returns, and
only SIGKILL ends it; the experiment then reports that instead of hanging.

Contract (as pinprobe.py): exactly one JSON object on stdout, last line. Exit 0
when the experiment ran, whatever the kernel answered; exit 2 with
``{"error": ...}`` for a setup problem. Only the standard library, ctypes and
pyverbs (python3-pyverbs). Structure layouts and ioctl numbers are x86-64.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import select
import signal
import struct
import sys
import time
from typing import Any, NoReturn

PAGE = os.sysconf("SC_PAGE_SIZE")
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
FIEMAP_MAX_EXTENTS = 256
PATTERN = b"LABKIT stale-MR RDMA WRITE "
VICTIM_BYTE = ord("v")      # B's own data; not in PATTERN, so every byte the device writes shows as changed

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.syncfs.argtypes = [ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


class SetupError(Exception):
    """Bad arguments or an environment problem: exit 2, not a result."""


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> NoReturn:
    emit({"error": message})
    sys.exit(code)


def errname(err: int | None) -> str | None:
    if err is None:
        return None
    return "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, f"E{err}")


def vmpin_kb() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPin:"):
                return int(line.split()[1])
    return None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- files and their blocks ---------------------------------------------------

def fill(fd: int, start: int, length: int, byte: int) -> None:
    """Write real blocks (no holes, no unwritten extents) and make them durable."""
    chunk = bytes([byte]) * (1 << 20)
    off = start
    while off < start + length:
        n = min(len(chunk), start + length - off)
        os.pwrite(fd, chunk[:n], off)
        off += n
    os.fsync(fd)


def fiemap(fd: int) -> list[dict[str, int]]:
    """The file's extents (logical, physical, length in bytes), via FS_IOC_FIEMAP."""
    head = struct.pack("=QQIIII", 0, 0xFFFFFFFFFFFFFFFF, FIEMAP_FLAG_SYNC, 0, FIEMAP_MAX_EXTENTS, 0)
    buf = bytearray(head + bytes(56 * FIEMAP_MAX_EXTENTS))
    fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
    mapped = struct.unpack_from("=I", buf, 20)[0]
    out = []
    for i in range(mapped):
        logical, physical, length = struct.unpack_from("=QQQ", buf, 32 + 56 * i)
        out.append({"logical": logical, "physical": physical, "length": length})
    return out


def overlap(a: list[dict[str, int]], b: list[dict[str, int]]) -> list[dict[str, int]]:
    """Physical byte ranges that both extent lists cover, with B's file offset of each."""
    out = []
    for x in a:
        for y in b:
            lo = max(x["physical"], y["physical"])
            hi = min(x["physical"] + x["length"], y["physical"] + y["length"])
            if lo < hi:
                out.append({"physical": lo, "length": hi - lo,
                            "victim_offset": y["logical"] + lo - y["physical"],
                            "mr_offset": x["logical"] + lo - x["physical"]})
    return sorted(out, key=lambda r: r["physical"])


def changed_ranges(before: bytes, after: bytes, limit: int = 16) -> tuple[int, list[list[int]]]:
    """(number of changed bytes, up to ``limit`` [start, end) ranges of them)."""
    n = 0
    ranges: list[list[int]] = []
    i, size = 0, min(len(before), len(after))
    while i < size:
        if before[i] == after[i]:
            i += 1
            continue
        j = i
        while j < size and before[j] != after[j]:
            j += 1
        n += j - i
        if len(ranges) < limit:
            ranges.append([i, j])
        i = j
    return n, ranges


class Mapping:
    """A MAP_SHARED mapping of a file whose blocks were written first."""

    def __init__(self, path: str, size: int, byte: int = 0x5A) -> None:
        if size <= 0 or size % PAGE:
            raise SetupError(f"--size must be a positive multiple of {PAGE}")
        self.path, self.size = path, size
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fill(self.fd, 0, size, byte)
        except OSError as e:
            raise SetupError(f"cannot prepare {path}: {e}") from e
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self.fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            os.close(self.fd)
            raise SetupError(f"mmap of {path} failed: {os.strerror(err)}")
        self.addr: int = addr
        for off in range(0, size, PAGE):      # fault every page in for writing
            ctypes.memset(self.addr + off, byte, 1)

    def close(self) -> None:
        libc.munmap(self.addr, self.size)
        os.close(self.fd)


# -- RDMA ----------------------------------------------------------------------

class Rdma:
    """One rxe context and protection domain; MRs and a loopback RC queue pair."""

    def __init__(self, device: str | None) -> None:
        try:
            import pyverbs.device as pdev
            import pyverbs.enums as pe
            from pyverbs.pd import PD
        except ImportError as e:
            raise SetupError(f"pyverbs not importable (install python3-pyverbs): {e}") from e
        self.e = pe
        if device is None:
            devs = pdev.get_device_list()
            if not devs:
                raise SetupError("no RDMA device (rdma link add rxe0 type rxe netdev eth0)")
            raw = devs[0].name
            device = raw.decode() if isinstance(raw, bytes) else str(raw)
        self.name = device
        self.ctx = pdev.Context(name=device)
        self.pd = PD(self.ctx)
        self.access = pe.IBV_ACCESS_LOCAL_WRITE | pe.IBV_ACCESS_REMOTE_WRITE | pe.IBV_ACCESS_REMOTE_READ

    def register(self, addr: int, size: int) -> tuple[Any, int | None, str]:
        """(mr or None, errno, message): the kernel's answer to ibv_reg_mr."""
        from pyverbs.mr import MR
        from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
        try:
            return MR(self.pd, size, self.access, address=addr), None, "registered"
        except PyverbsRDMAError as e:
            return None, (e.error_code if e.error_code not in (None, -1) else None), str(e)
        except PyverbsError as e:
            return None, None, str(e)

    def _gid_index(self) -> int:
        """Prefer an IPv4-mapped RoCE v2 GID (loopback through the guest's own address)."""
        best = None
        for i in range(self.ctx.query_port(1).gid_tbl_len):
            try:
                gid = str(self.ctx.query_gid(1, i))
            except Exception:
                break
            if gid.replace(":", "").strip("0") == "":
                continue
            if "ffff" in gid and gid.startswith("0000:0000:0000:0000:0000:ffff"):
                return i
            best = i if best is None else best
        if best is None:
            raise SetupError(f"{self.name} has no GID: is eth0 up?")
        return best

    def loopback_qp(self) -> tuple[Any, Any]:
        """An RC queue pair connected to itself, in RTS, and its CQ."""
        from pyverbs.addr import AHAttr, GlobalRoute
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        pe = self.e
        cq = CQ(self.ctx, 8)
        qp = QP(self.pd, QPInitAttr(qp_type=pe.IBV_QPT_RC, scq=cq, rcq=cq,
                                    cap=QPCap(max_send_wr=4, max_recv_wr=4, max_send_sge=1, max_recv_sge=1)))
        idx = self._gid_index()
        attr = QPAttr(port_num=1)
        attr.qp_access_flags = self.access
        attr.path_mtu = pe.IBV_MTU_1024
        attr.dest_qp_num = qp.qp_num
        attr.rq_psn = attr.sq_psn = 0
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout, attr.retry_cnt, attr.rnr_retry = 14, 7, 7
        attr.ah_attr = AHAttr(gr=GlobalRoute(dgid=self.ctx.query_gid(1, idx), sgid_index=idx),
                              is_global=1, port_num=1)
        qp.to_rts(attr)
        return qp, cq

    def rdma_write(self, src_mr: Any, length: int, rkey: int, remote_addr: int, timeout: float) -> dict[str, Any]:
        """Post one RDMA WRITE and wait (bounded) for its completion."""
        from pyverbs.wr import SGE, SendWR
        pe = self.e
        qp, cq = self.loopback_qp()
        wr = SendWR(opcode=pe.IBV_WR_RDMA_WRITE, num_sge=1, sg=[SGE(src_mr.buf, length, src_mr.lkey)],
                    send_flags=pe.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, remote_addr)
        t0 = time.monotonic()
        qp.post_send(wr)
        while time.monotonic() - t0 < timeout:
            n, wcs = cq.poll(1)
            if n:
                wc = wcs[0]
                return {"completed": True, "wc_status": int(wc.status), "wc_ok": wc.status == pe.IBV_WC_SUCCESS,
                        "seconds": round(time.monotonic() - t0, 4), "qp_num": qp.qp_num}
            time.sleep(0.001)
        return {"completed": False, "wc_status": None, "wc_ok": False, "seconds": timeout, "qp_num": qp.qp_num}


def register_bounded(device: str | None, addr: int, size: int, deadline: float) -> dict[str, Any]:
    """ibv_reg_mr of [addr, addr+size) in a forked child that gets ``deadline``
    seconds: {"completed", "registered", "errno", "seconds"}. The child opens its
    own device context (verbs objects do not cross a fork) and deregisters by exiting."""
    rep_r, rep_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rep_r)
            mr, err, _ = Rdma(device).register(addr, size)
            code = 0 if mr is not None else (err or 1)
            os.write(rep_w, struct.pack("=ii", int(mr is not None), code))
        finally:
            os._exit(0)
    os.close(rep_w)
    ready, _, _ = select.select([rep_r], [], [], deadline)
    data = os.read(rep_r, 8) if ready else b""
    seconds = round(time.monotonic() - t0, 3)
    if len(data) != 8:
        os.kill(pid, signal.SIGKILL)       # GUP's loop checks for a fatal signal between rounds
    os.waitpid(pid, 0)
    os.close(rep_r)
    if len(data) != 8:
        return {"completed": False, "registered": False, "errno": None, "seconds": seconds}
    ok, code = struct.unpack("=ii", data)
    return {"completed": True, "registered": bool(ok), "errno": code or None, "seconds": seconds}


# -- kretprobes that count return values (tracefs hist triggers) ----------------

TRACEFS = "/sys/kernel/tracing"
FENCE_GROUP = "labkit_fence"


PROBE_ERRORS: list[str] = []


def _tracefs(name: str, text: str, append: bool = False) -> bool:
    """One write to a tracefs file, unbuffered (a buffered append seeks first, and the
    kernel's answer to the write itself is what matters); errors are kept for the report."""
    try:
        fd = os.open(f"{TRACEFS}/{name}", os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)
        return True
    except OSError as e:
        if not text.startswith("-:"):        # removing a probe that is not there is expected
            PROBE_ERRORS.append(f"{name} <- {text!r}: {e.strerror}")
        return False


def install_counters(functions: list[str]) -> dict[str, str | None]:
    """A kretprobe with a ``hist:keys=ret`` trigger on each function that can be
    probed here: {function: event name, or None when this kernel cannot probe it}."""
    out: dict[str, str | None] = {}
    for i, spec in enumerate(functions):
        fn, _, kind = spec.partition(":")
        ev = f"f{i}"
        _tracefs("kprobe_events", f"-:{FENCE_GROUP}/{ev}", append=True)
        ok = (_tracefs("kprobe_events", f"r:{FENCE_GROUP}/{ev} {fn} ret=$retval:{kind or 's64'}", append=True)
              and _tracefs(f"events/{FENCE_GROUP}/{ev}/trigger", "hist:keys=ret")
              and _tracefs(f"events/{FENCE_GROUP}/{ev}/enable", "1"))
        out[fn] = ev if ok else None
    _tracefs("tracing_on", "1")
    return out


_HIST_ROW = re.compile(r"\{\s*ret:\s*(-?\d+)\s*\}\s*hitcount:\s*(\d+)")


def read_and_remove_counters(events: dict[str, str | None]) -> dict[str, dict[str, int]]:
    """{function: {return value: how often}} (values as signed 64-bit numbers), probes removed."""
    out: dict[str, dict[str, int]] = {}
    for fn, ev in events.items():
        if ev is None:
            continue
        d = f"events/{FENCE_GROUP}/{ev}"
        counts: dict[str, int] = {}
        try:
            with open(f"{TRACEFS}/{d}/hist") as f:
                for m in _HIST_ROW.finditer(f.read()):
                    v = int(m.group(1))
                    v = v - 2 ** 64 if v >= 2 ** 63 else v
                    counts[str(v)] = counts.get(str(v), 0) + int(m.group(2))
        except OSError:
            pass
        out[fn] = counts
        _tracefs(f"{d}/enable", "0")
        _tracefs(f"{d}/trigger", "!hist:keys=ret")
        _tracefs("kprobe_events", f"-:{FENCE_GROUP}/{ev}", append=True)
    return out


def module_overrides() -> int | None:
    try:
        with open("/sys/module/labkit_no_longterm_check/parameters/overrides") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cmd_fence_trace(args: argparse.Namespace) -> dict[str, Any]:
    functions = [f for f in args.functions.split(",") if f]
    if not functions or not all(re.fullmatch(r"[A-Za-z_][\w.]{0,63}(:[su](8|16|32|64))?", f) for f in functions):
        raise SetupError("--functions: comma-separated kernel function names (optionally NAME:u8 ...)")
    m = Mapping(args.path, args.size)
    before = module_overrides()
    events = install_counters(functions)
    try:
        reg = register_bounded(args.device, m.addr, m.size, args.seconds)
    finally:
        counts = read_and_remove_counters(events)
        m.close()
    after = module_overrides()
    return {"kernel": os.uname().release, "path": args.path, "size": m.size, "deadline": args.seconds, **reg,
            "errname": errname(reg["errno"]), "counts": counts,
            "not_probed": [f.partition(":")[0] for f in functions if events.get(f.partition(":")[0]) is None],
            "probe_errors": PROBE_ERRORS[:8],
            "overrides": None if after is None or before is None else after - before}


# -- a truncate in another process ---------------------------------------------

_STACK_FN = re.compile(r"\]\s+([A-Za-z0-9_.$]+)\+0x")


class TruncateChild:
    """``truncate(path, 0)`` in a forked child that reports CLOCK_MONOTONIC start,
    end and errno, so waits are measured on one clock with the parent."""

    def __init__(self, path: str) -> None:
        self.rep_r, rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.rep_r)
                t0, code = time.monotonic(), 0
                try:
                    os.truncate(path, 0)
                except OSError as e:
                    code = e.errno or 1
                os.write(rep_w, struct.pack("=ddi", t0, time.monotonic(), code))
            finally:
                os._exit(0)
        os.close(rep_w)
        self.where: list[str] = []
        self.report: tuple[float, float, int] | None = None

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/stack") as f:
                for fn in (m.group(1) for m in map(_STACK_FN.search, f) if m):
                    if fn not in self.where:
                        self.where.append(fn)
        except OSError:
            pass

    def wait(self, timeout: float) -> bool:
        """True once the child reported; samples its kernel stack meanwhile."""
        t0 = time.monotonic()
        while self.report is None and time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([self.rep_r], [], [], 0.05)
            if ready:
                data = os.read(self.rep_r, 20)
                if len(data) == 20:
                    self.report = struct.unpack("=ddi", data)
                os.waitpid(self.pid, 0)
                break
            self.sample()
        return self.report is not None

    def kill(self) -> None:
        if self.report is None:
            os.kill(self.pid, signal.SIGKILL)    # the DAX layout wait sleeps killably
            os.waitpid(self.pid, 0)
        os.close(self.rep_r)


def _truncate_fields(child: TruncateChild, t_ref: float) -> dict[str, Any]:
    if child.report is None:
        return {"truncate_completed": False, "truncate_errno": None, "truncate_started": None,
                "truncate_finished": None, "truncate_seconds": None, "truncate_where": child.where}
    start, end, code = child.report
    return {"truncate_completed": code == 0, "truncate_errno": code or None,
            "truncate_started": round(start - t_ref, 3), "truncate_finished": round(end - t_ref, 3),
            "truncate_seconds": round(end - start, 3), "truncate_where": child.where}


# -- experiment 1 ----------------------------------------------------------------

def _register_never_returned(args: argparse.Namespace, m: Mapping) -> dict[str, Any] | None:
    """Try the registration in a child first: when it does not return within
    --register-timeout, the result says so (no MR, no truncate) instead of the
    experiment hanging in the kernel."""
    if args.register_timeout <= 0:
        return None
    probe = register_bounded(args.device, m.addr, m.size, args.register_timeout)
    if probe["completed"]:
        return None
    return {"kernel": os.uname().release, "path": args.path, "size": m.size,
            "hold": getattr(args, "hold", None), "registered": False, "register_completed": False, "register_seconds": probe["seconds"],
            "errno": None, "errname": None, "message": f"ibv_reg_mr did not return in {probe['seconds']} s",
            "vmpin_kb_delta": None, "deregistered_at": None, "truncate_where": [], "overrides": module_overrides()}


def cmd_hold_truncate(args: argparse.Namespace) -> dict[str, Any]:
    rd = Rdma(args.device)
    m = Mapping(args.path, args.size)
    hung = _register_never_returned(args, m)
    if hung is not None:
        m.close()
        return hung
    pin0 = vmpin_kb()
    t_ref = time.monotonic()
    mr, err, msg = rd.register(m.addr, m.size)
    r: dict[str, Any] = {"kernel": os.uname().release, "path": args.path, "size": m.size, "hold": args.hold,
                         "registered": mr is not None, "errno": err, "errname": errname(err), "message": msg,
                         "vmpin_kb_delta": None if pin0 is None else (vmpin_kb() or 0) - pin0}
    child = TruncateChild(args.path)
    done_while_held = child.wait(args.hold)      # returns early if truncate does not wait
    if mr is not None:
        while time.monotonic() - t_ref < args.hold:   # hold the MR for the full time
            child.sample()
            time.sleep(0.05)
        t_dereg = time.monotonic()
        mr.close()
        r["deregistered_at"] = round(t_dereg - t_ref, 3)
    else:
        r["deregistered_at"] = None
    finished = done_while_held or child.wait(args.timeout)
    child.kill()
    m.close()
    r.update(_truncate_fields(child, t_ref), truncate_done_while_held=done_while_held,
             truncate_timed_out=not finished)
    r["size_after"] = os.stat(args.path).st_size
    return r


# -- experiment 2 ----------------------------------------------------------------

def _grow_until_reuse(path: str, freed: list[dict[str, int]], chunk: int, limit: int) -> tuple[int, list, list]:
    """Write ``path`` a chunk at a time until its blocks cover the freed ones
    (or ``limit`` bytes); return (size, its extents, the overlap)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    want = sum(x["length"] for x in freed)
    size, ext, ov = 0, [], []
    try:
        while size < limit:
            fill(fd, size, chunk, VICTIM_BYTE)
            size += chunk
            ext = fiemap(fd)
            ov = overlap(freed, ext)
            if sum(x["length"] for x in ov) >= want:
                break
    except OSError as e:            # ENOSPC: the filesystem is full, report what we have
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return size, ext, ov


def cmd_stale_write(args: argparse.Namespace) -> dict[str, Any]:
    rd = Rdma(args.device)
    m = Mapping(args.path, args.size)
    hung = _register_never_returned(args, m)
    if hung is not None:
        m.close()
        return dict(hung, victim=args.victim, stage="registration never returned")
    ext_a = fiemap(m.fd)
    t_ref = time.monotonic()
    mr, err, msg = rd.register(m.addr, m.size)
    r: dict[str, Any] = {"kernel": os.uname().release, "path": args.path, "victim": args.victim, "size": m.size,
                         "registered": mr is not None, "errno": err, "errname": errname(err), "message": msg,
                         "blocks_before_truncate": ext_a, "block_size": os.statvfs(args.path).f_bsize}
    if mr is None:
        m.close()
        return dict(r, stage="registration refused")
    child = TruncateChild(args.path)
    if not child.wait(args.truncate_timeout):
        # The layout wait is still in force: truncate sleeps until the MR goes.
        r.update(stage="truncate waited", **_truncate_fields(child, t_ref))
        mr.close()
        child.wait(args.truncate_timeout)
        child.kill()
        m.close()
        r["truncate_after_deregistration"] = _truncate_fields(child, t_ref)
        return r
    child.kill()
    r.update(_truncate_fields(child, t_ref))
    libc.syncfs(m.fd)                 # commit the transaction that freed A's blocks, so they can be reused
    size_b, ext_b, ov = _grow_until_reuse(args.victim, ext_a, args.size, args.victim_limit)
    r.update(victim_size=size_b, victim_blocks=ext_b, reused=ov)
    with open(args.victim, "rb") as f:
        before = f.read()
    r["victim_sha256_before"] = hashlib.sha256(before).hexdigest()
    if not ov:
        mr.close()
        m.close()
        return dict(r, stage="blocks not reused", victim_sha256_after=r["victim_sha256_before"])
    src = bytearray(PATTERN * (m.size // len(PATTERN) + 1))[:m.size]
    from pyverbs.mr import MR
    src_mr = MR(rd.pd, m.size, rd.access)
    src_mr.write(bytes(src), m.size)
    # Nothing in the stale MR changed: same rkey, same address, the blocks behind it belong to B now.
    r["rdma_write"] = rd.rdma_write(src_mr, m.size, mr.rkey, m.addr, args.write_timeout)
    os.sync()
    with open(args.victim, "rb") as f:
        after = f.read()
    n, ranges = changed_ranges(before, after)
    # Where B sits on A's old blocks, are B's bytes now exactly what the device wrote through A's MR?
    r["written_bytes_found"] = sum(x["length"] for x in ov
                                   if after[x["victim_offset"]:x["victim_offset"] + x["length"]]
                                   == bytes(src[x["mr_offset"]:x["mr_offset"] + x["length"]]))
    r.update(victim_sha256_after=hashlib.sha256(after).hexdigest(), changed_bytes=n, changed_ranges=ranges,
             changed_sample=after[ranges[0][0]:ranges[0][0] + 32].decode("ascii", "replace") if ranges else "",
             stage="written")
    mr.close()
    src_mr.close()
    m.close()
    return r


# -- command line ----------------------------------------------------------------

class JSONArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"bad arguments: {message}")


def build_parser() -> JSONArgumentParser:
    p = JSONArgumentParser(prog="counterfactual.py")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=JSONArgumentParser)
    h = sub.add_parser("hold-truncate")
    h.add_argument("--path", required=True)
    h.add_argument("--size", type=int, default=2 * 1024 * 1024)
    h.add_argument("--hold", type=float, required=True)
    h.add_argument("--timeout", type=float, default=30.0)
    h.add_argument("--register-timeout", type=float, default=0.0,
                   help="try the registration in a child first; give up after this many seconds (0: do not)")
    h.add_argument("--device")
    f = sub.add_parser("fence-trace")
    f.add_argument("--path", required=True)
    f.add_argument("--size", type=int, default=2 * 1024 * 1024)
    f.add_argument("--seconds", type=float, default=3.0)
    f.add_argument("--functions", required=True)
    f.add_argument("--device")
    s = sub.add_parser("stale-write")
    s.add_argument("--path", required=True)
    s.add_argument("--victim", required=True)
    s.add_argument("--size", type=int, default=2 * 1024 * 1024)
    s.add_argument("--victim-limit", type=int, default=256 * 1024 * 1024)
    s.add_argument("--truncate-timeout", type=float, default=10.0)
    s.add_argument("--write-timeout", type=float, default=20.0)
    s.add_argument("--register-timeout", type=float, default=0.0)
    s.add_argument("--device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        emit({"hold-truncate": cmd_hold_truncate, "stale-write": cmd_stale_write,
              "fence-trace": cmd_fence_trace}[args.cmd](args))
    except SetupError as e:
        fail(str(e))
    except Exception as e:    # a bug here, not a kernel answer
        import traceback
        traceback.print_exc()
        fail(f"{type(e).__name__}: {e}", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
