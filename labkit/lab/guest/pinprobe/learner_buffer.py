"""Exercise 3.8's judge, in the guest: a learner's ``def buffer(path, size)``
(Python source on stdin, never shell text) returns an mmap over the fs-dax
file at ``path``; this registers it for RDMA (ibv_reg_mr, like ``rdma``) and
reports what the kernel did: whether the buffer is the file's (its VMA in
/proc/<pid>/maps names the file's inode), shared or private, whether the
registration was refused, and how much was pinned (VmPin, nr_foll_pin_*).

The learner's code runs in a process of its own, as an unprivileged uid of its own
(:mod:`.learner_proc`), which also makes the registration (an RDMA region
belongs to the process whose memory it maps; ``/dev/infiniband/uverbs*`` is
open to every user and 2 MiB is within the default RLIMIT_MEMLOCK). The
judge believes none of what that process says about success: it reads the
process's maps, its VmPin, the FOLL_PIN counters and the RDMA regions the
kernel lists for its pid; only this process writes the one JSON answer."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

from .args import byte_size, dax_target_args, rdma_device_arg
from .buffer import _prepare_file
from .common import DEFAULT_SIZE, PAGE, SetupError, base_result
from .learner_proc import LEARNER_USER, Channel, LearnerProcess, learner_ids
from .measure import read_foll_pins, read_vmpin_kb
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


def vmas(start: int, end: int, pid: int | str = "self") -> list[dict[str, Any]]:
    """The VMAs of process ``pid`` overlapping [start, end), from its /proc/<pid>/maps."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo < end and hi > start:
                out.append({"perms": parts[1], "inode": int(parts[4]),
                            "path": parts[5].strip() if len(parts) > 5 else ""})
    return out


def describe_mapping(m: Any, size: int) -> tuple[dict[str, Any], Any]:
    """What the learner returned (in the learner's process): (fields, the
    address holder to keep alive while registered, or None). Only its
    problems are believed; the judge reads the mapping itself."""
    if not isinstance(m, mmap.mmap):
        return {"problem": "not_mmap", "returned": type(m).__name__}, None
    if len(m) < size:
        return {"problem": "too_small", "length": len(m)}, None
    try:
        holder = ctypes.c_char.from_buffer(m)
    except TypeError:
        return {"problem": "read_only"}, None
    return {"problem": None, "addr": ctypes.addressof(holder)}, holder


def file_mapping(pid: int, addr: int, size: int, path: str) -> dict[str, Any]:
    """Whether [addr, addr+size) of process ``pid`` is a mapping of ``path``,
    and shared, read by the judge from /proc/<pid>/maps."""
    try:
        found = vmas(addr, addr + size, pid)
    except (OSError, ValueError):
        found = []
    inode = os.stat(path).st_ino
    backed = bool(found) and all(v["inode"] == inode and v["path"].split(" (")[0] == os.path.realpath(path)
                                 for v in found)
    shared = bool(found) and all(v["perms"][3] == "s" for v in found)
    return {"backed_by_file": backed, "shared": shared, "vmas": found[:4]}


TRACEFS = "/sys/kernel/tracing"
_UMEM = re.compile(r"-(?P<tid>\d+)\s+\[\d+\].*?\s(?P<event>umem|umem_ret):.*?"
                   r"(?:addr=(?P<addr>0x[0-9a-f]+) size=(?P<size>0x[0-9a-f]+)|ret=(?P<ret>0x[0-9a-f]+))")


class UmemWatch:
    """Every ib_umem_get (the RDMA core's pin of a user range for a memory
    region: rxe's ibv_reg_mr goes through it) with its range and whether it
    succeeded, per thread, seen by a kprobe and a kretprobe the judge owns
    and read in a tracefs instance of its own (the lab's trace is untouched).
    ``ok`` is False when the kernel would not take the probes."""

    def __init__(self) -> None:
        self.group = f"labkit_judge_{os.getpid()}"
        self.instance = f"{TRACEFS}/instances/{self.group}"
        self.ok, self.error = False, ""
        step = "kprobe"
        try:
            self._kprobes()
            step = "instance"
            os.mkdir(self.instance)
            for event in ("umem", "umem_ret"):
                step = f"enable {event}"
                with open(f"{self.instance}/events/{self.group}/{event}/enable", "w") as f:
                    f.write("1")
            self.ok = True
        except OSError as exc:
            self.error = f"{step}: {type(exc).__name__}: {exc}"[:200]
            self.close()

    def _kprobes(self) -> None:
        """The entry probe, fetching the range by argument number or, where the
        kernel cannot, by the x86-64 registers that carry them; the return probe."""
        error: OSError | None = None
        for addr, size in (("$arg2", "$arg3"), ("%si", "%dx")):
            try:
                self._events(f"p:{self.group}/umem ib_umem_get addr={addr}:x64 size={size}:x64")
                break
            except OSError as exc:
                error = exc
        else:
            raise error or OSError("no probe")
        self._events(f"r:{self.group}/umem_ret ib_umem_get ret=$retval:x64")

    def _events(self, *lines: str) -> None:
        # os.open, not open(..., "a"): Python seeks to the end of a file opened for appending, and
        # tracefs's kprobe_events refuses SEEK_END (EINVAL)
        for line in lines:
            fd = os.open(f"{TRACEFS}/kprobe_events", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)

    def calls(self, tids: set[int]) -> list[dict[str, Any]]:
        """The ib_umem_get calls of threads ``tids``: addr, size, ok."""
        with open(f"{self.instance}/trace") as f:
            text = f.read(4 * 2**20)
        out: list[dict[str, Any]] = []
        open_call: dict[int, dict[str, Any]] = {}
        for m in _UMEM.finditer(text):
            tid = int(m.group("tid"))
            if tid not in tids:
                continue
            if m.group("event") == "umem":
                open_call[tid] = {"addr": int(m.group("addr"), 16), "size": int(m.group("size"), 16), "ok": False}
                out.append(open_call[tid])
            elif tid in open_call:
                ret = int(m.group("ret"), 16)
                open_call.pop(tid)["ok"] = ret != 0 and ret < 2**64 - 4095      # not NULL, not an ERR_PTR
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            for event in ("umem", "umem_ret"):
                with contextlib.suppress(OSError), open(f"{self.instance}/events/{self.group}/{event}/enable",
                                                        "w") as f:
                    f.write("0")
            with contextlib.suppress(OSError):
                os.rmdir(self.instance)
            for event in ("umem", "umem_ret"):
                with contextlib.suppress(OSError):
                    self._events(f"-:{self.group}/{event}")


class Kernel:
    """What the judge reads of the kernel from outside the learner's process
    (the seam the unit tests replace)."""

    def watch_umem(self) -> UmemWatch:
        """The ib_umem_get calls from now on (``ok`` False: not observable here)."""
        return UmemWatch()

    def mrs(self, pid: int) -> list[dict[str, Any]] | None:
        """The RDMA memory regions process ``pid`` holds (``rdma resource``;
        None when the tool cannot say)."""
        try:
            out = subprocess.run(["rdma", "-j", "resource", "show", "mr"], capture_output=True, text=True,
                                 timeout=10, stdin=subprocess.DEVNULL).stdout
            rows = json.loads(out or "[]")
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None
        return [r for r in rows if isinstance(r, dict) and r.get("pid") == pid]

    def vmpin_kb(self, pid: int) -> int | None:
        return read_vmpin_kb(pid)

    def foll_pins(self) -> dict[str, int | None]:
        return read_foll_pins()


def _child_body(source: str, path: str, size: int, timeout: float,
                register: Callable[[int, int], tuple[dict[str, Any], Callable[[], Any] | None]]
                ) -> Callable[[Channel], None]:
    def body(ch: Channel) -> None:
        m, failure = run_learner(source, "buffer", (path, size), timeout)
        if failure is not None:
            ch.send(**failure)
            return
        fields, holder = describe_mapping(m, size)
        if holder is None:
            ch.send(**fields)
            return
        answer, close = register(fields["addr"], size)
        ch.send(stage="registered", addr=fields["addr"], **answer)
        ch.wait(timeout + 30)              # held until the judge has looked
        if close is not None:
            close()
    return body


def _registration(device: str | None) -> Callable[[int, int], tuple[dict[str, Any], Callable[[], Any] | None]]:
    """ibv_reg_mr in the learner's process: (the kernel's answer, close)."""
    def register(addr: int, size: int) -> tuple[dict[str, Any], Callable[[], Any] | None]:
        name, ctx, pd = _open_device(device)
        r: dict[str, Any] = {"device": name}
        mr = _register(pd, cast(Any, SimpleNamespace(addr=addr, size=size)), r)   # only .addr, .size are read
        parts = [p for p in (mr, pd, ctx) if p is not None]
        return ({k: r.get(k) for k in ("errno", "errname", "message", "device")},
                lambda: [p.close() for p in parts])
    return register


def judge(source: str, path: str, size: int, timeout: float,
          register: Callable[[int, int], tuple[dict[str, Any], Callable[[], Any] | None]],
          kernel: Kernel | None = None, user: str | None = LEARNER_USER) -> dict[str, Any]:
    """Run the learner's code in a process of its own (as ``user``) on the
    prepared file and let it ``register`` what ``buffer`` returned; the verdict
    is what the judge reads of that process from outside: its mapping of the
    file (/proc/<pid>/maps), the RDMA region it holds (``rdma resource``), its
    VmPin and the FOLL_PIN counters. ``register`` and ``kernel`` are the
    seams the unit tests replace; in the guest, ibv_reg_mr and the kernel."""
    kernel = kernel or Kernel()
    r = base_result("rdma", None, memory="learner", path=path, size=size, stage="done",
                    exception=None, line=None, pages=size // PAGE, backed_by_file=False, shared=False,
                    mr_seen=False, vmpin_kb_delta=None, foll_pin_acquired_delta=None, learner_exited=False)
    ids = learner_ids(user)
    if ids is not None:
        os.chown(path, ids[0], ids[1])        # the learner's code opens the file itself
    before = kernel.foll_pins()
    watch = kernel.watch_umem()
    if not watch.ok:
        r["umem_error"] = watch.error
    child = LearnerProcess(_child_body(source, path, size, timeout, register), ids)
    try:
        said = child.receive(timeout + 30) or {}
        if said.get("stage") != "registered":
            r.update({k: said.get(k) for k in ("stage", "exception", "line", "problem", "returned", "length")
                      if k in said})
            if not said or said.get("garbled"):
                r.update(problem="no_answer", learner_exited=not child.alive())
            return r
        r.update({k: said.get(k) for k in ("errno", "errname", "message", "device")})
        if not child.alive():              # a process that ended holds no registration: nothing to read
            r.update(problem="no_answer", learner_exited=True)
            return r
        _observe(r, child.pid, int(said.get("addr") or 0), size, path, kernel, before)
        if watch.ok:
            _registered_on_file(r, child.pid, size, path, watch)
    finally:
        child.finish()
        watch.close()
    return r


def _tids(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")} | {pid}
    except OSError:
        return {pid}


def _registered_on_file(r: dict[str, Any], pid: int, size: int, path: str, watch: UmemWatch) -> None:
    """Whether the kernel pinned the *file's* range for an RDMA region of
    ``pid`` (ib_umem_get over a range of its mapping of ``path`` succeeded),
    not just any range of that process: the region's address is nowhere in
    /proc, so the judge's own probe on the pin says which range it was."""
    calls = watch.calls(_tids(pid))
    r["umem"] = calls[:4]
    on_file = [c for c in calls if c["ok"] and c["size"] >= size
               and file_mapping(pid, c["addr"], size, path)["backed_by_file"]]
    if on_file:
        r.update(file_mapping(pid, on_file[0]["addr"], size, path))
    elif r["ok"]:
        r.update(ok=False, message="no region over the file's pages")


def _observe(r: dict[str, Any], pid: int, addr: int, size: int, path: str, kernel: Kernel,
             before: dict[str, int | None]) -> None:
    """Read the learner's process from outside while it says its buffer is registered."""
    r.update(file_mapping(pid, addr, size, path))
    mrs = kernel.mrs(pid)
    r["mr_seen"] = any(int(m.get("mrlen") or 0) >= size for m in mrs or [])
    r["vmpin_kb_delta"] = kernel.vmpin_kb(pid)       # a fresh process: nothing was pinned before its code ran
    after = kernel.foll_pins()
    a, b = before.get("nr_foll_pin_acquired"), after.get("nr_foll_pin_acquired")
    r["foll_pin_acquired_delta"] = None if a is None or b is None else b - a
    r["ok"] = r["mr_seen"]
    if r["ok"]:
        r.update(errno=None, errname=None, message="registered")


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
    return judge(source, args.path, args.size, args.timeout, _registration(args.device), user=args.learner_user)


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--path", required=True, help="the file buffer() is to map (created, every page written)")
    dax_target_args(sp)
    sp.add_argument("--size", type=byte_size, default=DEFAULT_SIZE)
    rdma_device_arg(sp)
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for the learner's code")
    learner_user_arg(sp)


def learner_user_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--learner-user", default=LEARNER_USER,
                    help="the user the learner's code runs as (the course never changes it; the tests run "
                         "forgeries as root to show the judge's reading of the kernel holds without it)")


COMMANDS = (Command("learner-buffer", "run a learner's buffer(path, size) (source on stdin), register it",
                    _arguments, cmd_learner_buffer),)
