"""The counters a pin moves: VmPin of the process and the global FOLL_PIN counters."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .registry import Command


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


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    pid = args.pid if args.pid is not None else os.getpid()
    return {"pid": pid, "alive": os.path.exists(f"/proc/{pid}"), "vmpin_kb": read_vmpin_kb(pid),
            **read_foll_pins()}


def _arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--pid", type=int, default=None, help="default: this process")


COMMANDS = (Command("status", "VmPin of --pid and the FOLL_PIN counters", _arguments, cmd_status),)
