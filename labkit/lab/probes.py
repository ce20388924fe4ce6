"""Pin attempts, measured: one mechanism (RDMA, V4L2, O_DIRECT, io_uring) on one
kind of memory, run by the guest helper, with the kernel log and the
check_vma_flags refusals around it; held pins; the truncate that waits.

Every attempt on fs-dax memory tells the guest helper which filesystem and
device the file must be on: the helper refuses (and the lab raises a LabError)
when the target is not on a DAX-active mount of that filesystem, instead of
measuring a file on the root disk.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labkit.errors import ConfigError, LabError
from labkit.lab.guest.vocab import (
    FILESYSTEMS,
    MAPPINGS,
    MECHANISMS,
    MEMORY_KINDS,
    SHRINK_OPS,
    fs_of_kind,
    fsdax_kind,
    mountpoint_for,
)
from labkit.lab.helper import GuestHelper, answer, last_json
from labkit.lab.pmem import Namespace, Pmem
from labkit.lab.protocols import Machine
from labkit.lab.results import Observation, PinResult, TruncateWait
from labkit.lab.tracing import Tracer, refusal_lines
from labkit.lab.validate import (
    Case,
    check_case,
    check_cases,
    check_count,
    check_pid,
    check_roles,
    check_seconds,
    check_size,
    choose,
)

if TYPE_CHECKING:
    from labkit.lab.observe import HeldPin

log = logging.getLogger(__name__)

DEFAULT_SIZE = 2 * 2**20
ODIRECT_SOURCE = "/root/odirect-src.dat"
# Constant scripts (no values pasted in): soft-RoCE on eth0, and vivid with its nodes present.
RDMA_SETUP = ("modprobe rdma_rxe && (test -e /sys/class/infiniband/rxe0 || "
              "rdma link add rxe0 type rxe netdev eth0) && rdma link show rxe0/1")
VIVID_SETUP = ("modprobe vivid && for i in $(seq 50); do ls /dev/video* >/dev/null 2>&1 && break; "
               "sleep 0.1; done; ls /dev/video*")


@dataclass(frozen=True)
class Mechanism:
    """How the host calls one pin mechanism's guest subcommand (the guest
    module of the same name registers the subcommand; every mechanism's answer
    is read by ``PinResult.from_probe``)."""

    sized: bool = True              # takes --size (V4L2: the device's sizeimage decides)
    holds: bool = False             # takes --hold SECONDS
    holdable: bool = False          # ``hold_pin`` can keep the pin until released (--hold -1)
    extra: tuple[str, ...] = ()     # arguments it always gets


# One row per name of ``vocab.MECHANISMS`` (a unit test keeps the three in step: vocabulary, guest, rows).
MECHANISM_ROWS: dict[str, Mechanism] = {
    "rdma": Mechanism(holds=True, holdable=True),
    "rdma-odp": Mechanism(holds=True),
    "v4l2": Mechanism(sized=False),
    "odirect": Mechanism(extra=("--target", ODIRECT_SOURCE)),
    "io_uring": Mechanism(),
}
HOLDABLE = tuple(m for m in MECHANISMS if MECHANISM_ROWS[m].holdable)


def pin_result(case: Case, data: dict | None, kernel_log: list[str], trace: list[str],
               fallback: str = "") -> PinResult:
    """A PinResult from the helper's answer, or a LabError with its reason."""
    if data is None or "error" in data:
        raise LabError(f"pin probe {case[0]}/{case[1]} failed: " + str((data or {}).get("error", fallback)))
    return PinResult.from_probe(case, data, kernel_log, trace)


class Probes:
    """Pin attempts in one guest."""

    def __init__(self, vm: Machine, helper: GuestHelper, tracer: Tracer, pmem: Pmem) -> None:
        self.vm, self.helper, self.tracer, self.pmem = vm, helper, tracer, pmem

    # -- set-up of the pinning devices -------------------------------------
    def setup_rdma(self) -> str:
        """Soft-RoCE on the guest NIC; returns the RDMA device name."""
        r = self.vm.run(["sh", "-c", RDMA_SETUP])
        if r.rc != 0:
            raise LabError("soft-RoCE (rdma_rxe) could not be set up on eth0: " + (r.stderr or r.stdout).strip())
        return "rxe0"

    def setup_vivid(self) -> None:
        """The vivid V4L2 test driver loaded and its nodes present."""
        r = self.vm.run(["sh", "-c", VIVID_SETUP])
        if r.rc != 0:
            raise LabError("the vivid V4L2 test driver could not be loaded: " + (r.stderr or r.stdout).strip())

    # -- arguments ---------------------------------------------------------
    def memory_args(self, memory: str, mechanism: str, roles: dict[str, Namespace] | None = None) -> list[str]:
        """The helper's memory arguments for ``memory``, with the mount an
        fs-dax file must be on (``--dax-fs``, ``--dax-device``)."""
        choose(memory, MEMORY_KINDS, "memory kind")
        roles = check_roles(roles)
        if memory == "anon":
            return ["--memory", "anon"]
        if memory == "pagecache":
            return ["--memory", "file", "--path", f"/root/pin-{mechanism}.dat"]
        fs = fs_of_kind(memory)
        if fs is not None:
            return ["--memory", "file", "--path", f"{mountpoint_for(fs)}/pin-{mechanism}.dat",
                    *self.dax_target_args(fs, roles)]
        ns = (roles or self.pmem.roles or self.pmem.prepare())["devdax"]
        if not ns.chardev:
            raise ConfigError(f"namespace {ns.dev} is in mode {ns.mode} and has no device-dax node",
                           hint="lab.prepare_pmem() puts it back in devdax mode")
        return ["--memory", "devdax", "--path", f"/dev/{ns.chardev}"]

    def dax_target_args(self, fs: str, roles: dict[str, Namespace] | None = None) -> list[str]:
        """``--dax-fs FS [--dax-device DEV]``: what the guest helper verifies."""
        ns = (roles or {}).get(fsdax_kind(fs))
        device = f"/dev/{ns.blockdev}" if ns is not None and ns.blockdev else self.pmem.device_of(fsdax_kind(fs))
        return ["--dax-fs", fs, *(["--dax-device", device] if device else [])]

    def probe_argv(self, case: Case, size: int, hold: float, roles: dict[str, Namespace] | None) -> list[str]:
        """The helper's argument list for one attempt (validated)."""
        mechanism, memory, mapping = check_case(case)
        check_size(size)
        check_seconds(hold, "hold time", 600)
        row = MECHANISM_ROWS[mechanism]
        args = [mechanism, *self.memory_args(memory, mechanism, roles), "--mapping", mapping]
        if row.sized:
            args += ["--size", str(size)]
        if row.holds:
            args += ["--hold", str(float(hold))]
        return args + list(row.extra)

    # -- attempts ----------------------------------------------------------
    def pin(self, mechanism: str, memory: str, mapping: str = "shared", size: int = DEFAULT_SIZE,
            hold: float = 0.0, roles: dict[str, Namespace] | None = None) -> PinResult:
        """One attempt at a pin of ``memory`` through ``mechanism``, measured."""
        case = (mechanism, memory, mapping)
        argv = self.probe_argv(case, size, hold, roles)
        return self._observed(argv, check_case(case), timeout=120 + float(hold))

    def rdma_untouched(self, memory: str, mapping: str = "private", size: int = DEFAULT_SIZE) -> PinResult:
        """An RDMA registration of a mapping whose pages nobody wrote before
        (``--touch none``): the registration faults them in itself, so it takes
        GUP's slow path, where check_vma_flags() sees the VMA (traced)."""
        case = ("rdma", memory, mapping)
        argv = self.probe_argv(case, size, 0.0, None) + ["--touch", "none"]
        return self._observed(argv, check_case(case), timeout=120)

    def _observed(self, argv: list[str], case: Case, timeout: float) -> PinResult:
        obs: Observation = self.tracer.observe(self.helper.argv(*argv), timeout=timeout)
        return pin_result(case, last_json(obs.result.stdout), obs.kernel_log, obs.trace,
                          (obs.result.stderr or obs.result.stdout).strip()[-1000:])

    def pin_many(self, cases: list[Case], size: int = DEFAULT_SIZE,
                 roles: dict[str, Namespace] | None = None) -> list[PinResult]:
        """Several (mechanism, memory, mapping) attempts in one guest process
        (each in its own forked child), each with its own log and trace."""
        checked = check_cases(cases)
        argvs = [self.probe_argv(case, size, 0.0, roles) for case in checked]
        self.tracer.ensure_kprobe()
        stdin = "".join(json.dumps(a) + "\n" for a in argvs)
        log.debug("pin batch of %d cases", len(argvs))
        r = self.vm.run(self.helper.argv("batch"), stdin=stdin, timeout=60 + 60 * len(argvs))
        rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        if len(rows) != len(argvs):
            raise LabError(f"pin probe batch returned {len(rows)} of {len(argvs)} results: "
                           + (r.stderr or r.stdout).strip()[-1000:])
        return [pin_result(case, row.get("result"), row.get("kernel_log", []),
                           refusal_lines("\n".join(row.get("trace", []))))
                for case, row in zip(checked, rows)]

    def v4l2_stream(self, memory: str = "anon", frames: int = 3,
                    roles: dict[str, Namespace] | None = None) -> PinResult:
        """Queue USERPTR buffers in ``memory`` and let vivid write ``frames``
        frames into them: the device writing pinned user memory."""
        check_count(frames, "frame count", 1, 100)
        case = ("v4l2", memory, "shared")
        argv = self.probe_argv(case, DEFAULT_SIZE, 0.0, roles) + ["--stream", str(frames)]
        return self._observed(argv, case, timeout=60 + 10 * frames)

    def hold_pin(self, mechanism: str = "rdma", memory: str = "anon", mapping: str = "shared",
                 size: int = DEFAULT_SIZE, roles: dict[str, Namespace] | None = None) -> HeldPin:
        """Register a buffer and keep it pinned until ``.release()`` (a HeldPin),
        so a learner can watch VmPin stay up."""
        from labkit.lab.observe import open_held_pin
        choose(mechanism, HOLDABLE, "holdable pin mechanism")
        choose(memory, MEMORY_KINDS, "memory kind")
        choose(mapping, MAPPINGS, "mapping")
        check_size(size)
        argv = self.helper.argv(mechanism, *self.memory_args(memory, mechanism, roles), "--mapping", mapping,
                                "--size", str(size), "--hold", "-1")
        return open_held_pin(self.vm, argv)

    def vmpin_kb(self, pid: int) -> int | None:
        """VmPin (kB) of guest process ``pid`` from /proc/PID/status; None if
        the process is gone or the kernel does not report VmPin."""
        r = self.vm.run(["grep", "^VmPin:", f"/proc/{check_pid(pid)}/status"])
        m = re.search(r"VmPin:\s+(\d+)\s*kB", r.stdout)
        return int(m.group(1)) if m else None

    def truncate_wait(self, fs: str = "xfs", hold: float = 3.0, op: str = "truncate") -> TruncateWait:
        """Truncate (``op="punch"``: punch a hole over) a mapped fs-dax file while
        a pipe references one of its pages: on a DAX mount the operation waits
        until the reference is gone."""
        choose(fs, FILESYSTEMS, "filesystem")
        choose(op, SHRINK_OPS, "operation")
        hold = check_seconds(hold, "hold time", 20)
        args = ["truncate-wait", "--path", f"{mountpoint_for(fs)}/truncate.dat", *self.dax_target_args(fs),
                "--op", op, "--hold", str(hold), "--timeout", "30"]
        log.debug("truncate-wait on %s, hold %.1f s", fs, hold)
        data = answer(self.vm.run(self.helper.argv(*args), timeout=90), "truncate demonstration")
        return TruncateWait(fs=fs, op=op, blocked=bool(data.get("blocked")), seconds=data.get("seconds"),
                            where=list(data.get("where", [])), completed=bool(data.get("completed")), detail=data)
