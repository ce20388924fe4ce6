"""Batch mode: one Python start-up (and one pyverbs import) for a whole matrix.

Each case runs in a forked child, so pins and counters never leak between
cases; the parent records the kernel log records and the refusal kretprobes'
trace lines that appeared while the case ran.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import select
import signal
import sys
import time
from typing import Any

from ..vocab import KPROBE
from .common import TRACE, clear_trace, emit
from .registry import Command


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


def _read_trace() -> list[str]:
    try:
        with open(TRACE) as f:
            return [ln.rstrip() for ln in f if KPROBE in ln]
    except OSError:
        return []


def _child(argv: list[str], rfd: int, wfd: int) -> None:
    """In the forked child: one probe, its JSON to the pipe; never returns."""
    from .cli import main
    code = 1
    try:
        os.dup2(wfd, 1)
        os.close(rfd)
        code = main(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:    # noqa: BLE001  (anything: the child must exit, never return)
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _read_until(rfd: int, deadline: float) -> bytes:
    out = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        out += chunk
    return out


def run_case(argv: list[str], timeout: float) -> tuple[dict[str, Any], list[str], list[str]]:
    """One probe in a forked child: (its result, kernel log lines, trace lines)."""
    clear_trace()
    kfd = _kmsg_open()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(argv, rfd, wfd)
    os.close(wfd)
    deadline = time.monotonic() + timeout
    out = _read_until(rfd, deadline)
    os.close(rfd)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    result: dict[str, Any] = {"error": f"probe produced no result within {timeout:.0f} s"}
    for line in reversed(out.decode(errors="replace").strip().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return result, _kmsg_drain(kfd), _read_trace()


def cmd_batch(args: Any) -> dict[str, Any] | None:
    cases = [json.loads(line) for line in sys.stdin if line.strip()]
    if any(isinstance(c, list) and c and c[0] in ("rdma", "rdma-odp") for c in cases):
        for mod in ("pyverbs.device", "pyverbs.pd", "pyverbs.mr"):
            try:
                importlib.import_module(mod)    # imported once, inherited by every fork
            except ImportError:
                pass
    for argv in cases:
        if not isinstance(argv, list) or not argv or argv[0] in ("batch",):
            emit({"result": {"error": f"bad batch case {argv!r}"}, "kernel_log": [], "trace": []})
            continue
        result, klog, trace = run_case([str(a) for a in argv], args.case_timeout)
        emit({"result": result, "kernel_log": klog, "trace": trace})
    return None


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--case-timeout", type=float, default=60.0)


COMMANDS = (Command("batch", "run many probes (JSON lines of argv lists on stdin), each observed", _arguments,
                    cmd_batch),)
