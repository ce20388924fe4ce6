"""``Lab``: the facade notebooks use, over a running machine.

It owns one of each part (``Pmem`` namespaces, ``Mounts``, ``Probes``, the
kprobe ``Tracer`` and the ``GuestHelper`` upload) and delegates; the parts
hold the logic and are where new experiments go.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from labkit.command import CommandResult
from labkit.lab import matrix as _matrix
from labkit.lab.guest.vocab import FILESYSTEMS, mountpoint_for
from labkit.lab.helper import GuestHelper
from labkit.lab.matrix import MatrixResult
from labkit.lab.mounts import Mounts
from labkit.lab.observe import HeldPin
from labkit.lab.odp import Odp, RevokeResult
from labkit.lab.pmem import Namespace, Pmem
from labkit.lab.probes import DEFAULT_SIZE, Probes
from labkit.lab.protocols import Machine
from labkit.lab.results import MountInfo, MountResult, Observation, PinResult, TruncateWait
from labkit.lab.tracing import Tracer
from labkit.lab.validate import Case

log = logging.getLogger(__name__)


class Lab:
    """The lab layer over a running machine (``labkit.connect()``'s VM)."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.helper = GuestHelper(vm)
        self.tracer = Tracer(vm)
        self.pmem = Pmem(vm)
        self.mounts = Mounts(vm, self.helper, self.tracer, self.pmem)
        self.probes = Probes(vm, self.helper, self.tracer, self.pmem)
        self.odp = Odp(vm, self.helper, self.probes)
        log.debug("lab over %s", getattr(vm, "name", vm))

    # -- plumbing ----------------------------------------------------------
    def sh(self, script: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        """Run a shell script in the guest (the learner's own command line)."""
        return self.vm.run(["sh", "-c", script], timeout=timeout, check=check)

    def observe(self, command: Sequence[str] | str, timeout: float = 60.0) -> Observation:
        """Run ``command`` and collect the kernel log and check_vma_flags refusals it caused."""
        return self.tracer.observe(command, timeout=timeout)

    def kernel_release(self) -> str:
        return self.vm.run(["uname", "-r"], check=True).stdout.strip()

    # -- persistent memory -------------------------------------------------
    def namespaces(self) -> list[Namespace]:
        return self.pmem.namespaces()

    def set_mode(self, namespace: str, mode: str) -> Namespace:
        """Reconfigure a namespace (its data is lost, as with ndctl)."""
        return self.pmem.set_mode(namespace, mode)

    def prepare_pmem(self) -> dict[str, Namespace]:
        """Region 0 -> fsdax (XFS), region 1 -> fsdax (ext4), region 2 -> devdax; data survives."""
        return self.pmem.prepare()

    def reset_pmem(self) -> list[Namespace]:
        """Unmount the lab's DAX mounts and return every namespace to raw mode
        (erases the persistent memory's filesystems, as the learner asked)."""
        for fs in FILESYSTEMS:
            self.umount(mountpoint_for(fs))
        return self.pmem.reset()

    # -- filesystems -------------------------------------------------------
    def mkfs(self, fs: str, device: str, block_size: int | None = 4096, force: bool = False) -> CommandResult:
        """Make a filesystem. Refuses to overwrite one that exists unless ``force``."""
        return self.mounts.mkfs(fs, device, block_size=block_size, force=force)

    def mount(self, fs: str, device: str, mountpoint: str | None = None, options: str = "dax") -> MountResult:
        """Mount ``device`` and report the kernel log and whether DAX is active."""
        return self.mounts.mount(fs, device, mountpoint=mountpoint, options=options)

    def mount_info(self, mountpoint: str) -> MountInfo:
        """What is mounted on ``mountpoint`` now (fs, device, statx DAX)."""
        return self.mounts.info(mountpoint)

    def umount(self, mountpoint: str) -> None:
        self.mounts.umount(mountpoint)

    def prepare_mounts(self, options: str = "dax") -> list[MountResult]:
        """Both fs-dax namespaces formatted (only if empty) and mounted with ``options``."""
        return self.mounts.prepare(options)

    # -- pin mechanisms ----------------------------------------------------
    def setup_rdma(self) -> str:
        """Soft-RoCE on the guest NIC; returns the RDMA device name."""
        return self.probes.setup_rdma()

    def setup_vivid(self) -> None:
        self.probes.setup_vivid()

    def memory_args(self, memory: str, mechanism: str, roles: dict[str, Namespace] | None = None) -> list[str]:
        return self.probes.memory_args(memory, mechanism, roles)

    def pin(self, mechanism: str, memory: str, mapping: str = "shared", size: int = DEFAULT_SIZE,
            hold: float = 0.0, roles: dict[str, Namespace] | None = None) -> PinResult:
        """One attempt at a pin of ``memory`` through ``mechanism``, measured."""
        return self.probes.pin(mechanism, memory, mapping, size=size, hold=hold, roles=roles)

    def pin_many(self, cases: list[Case], size: int = DEFAULT_SIZE,
                 roles: dict[str, Namespace] | None = None) -> list[PinResult]:
        """Several (mechanism, memory, mapping) attempts, each with its own log and trace."""
        return self.probes.pin_many(cases, size=size, roles=roles)

    def v4l2_stream(self, memory: str = "anon", frames: int = 3,
                    roles: dict[str, Namespace] | None = None) -> PinResult:
        """vivid writing ``frames`` frames into pinned USERPTR buffers in ``memory``."""
        return self.probes.v4l2_stream(memory, frames=frames, roles=roles)

    def hold_pin(self, mechanism: str = "rdma", memory: str = "anon", mapping: str = "shared",
                 size: int = DEFAULT_SIZE, roles: dict[str, Namespace] | None = None) -> HeldPin:
        """A pin kept until ``.release()``, so a learner can watch VmPin stay up."""
        return self.probes.hold_pin(mechanism, memory, mapping, size=size, roles=roles)

    def vmpin_kb(self, pid: int) -> int | None:
        """VmPin (kB) of guest process ``pid``; None if gone or not reported."""
        return self.probes.vmpin_kb(pid)

    def pin_untouched(self, memory: str = "fsdax-xfs", mapping: str = "private") -> PinResult:
        """RDMA on a mapping whose pages were never written before the registration:
        the slow path of GUP, whose check_vma_flags() is traced (``PinResult.trace``)."""
        return self.probes.rdma_untouched(memory, mapping)

    def truncate_wait(self, fs: str = "xfs", hold: float = 3.0, op: str = "truncate") -> TruncateWait:
        """Truncate (``op="punch"``: punch a hole over) a mapped fs-dax file while
        one of its pages is referenced; where the operation slept is in ``where``."""
        return self.probes.truncate_wait(fs, hold=hold, op=op)

    def odp_revoke(self, memory: str = "fsdax-xfs", kind: str = "odp", op: str = "write",
                   roles: dict[str, Namespace] | None = None) -> RevokeResult:
        """An MR (``kind`` "odp" or "pinned") over ``memory``, an RDMA ``op``
        through it, the memory revoked (truncate / MADV_DONTNEED / munmap), the
        op again: what the live kernel and device did (``labkit.lab.odp``)."""
        return self.odp.revoke(memory, kind=kind, op=op, roles=roles)

    # -- the whole picture -------------------------------------------------
    def pins_matrix(self, pins: list[PinResult]) -> MatrixResult:
        """Pin results already measured, in ``matrix()``'s shape (for ``dashboard.matrix_table``)."""
        return _matrix.pins_matrix(self, pins)

    def matrix(self, progress: Callable[[str], None] | None = None, cases: list[Case] | None = None,
               truncate: bool = True) -> MatrixResult:
        """Every mount and every mechanism x memory kind, measured now.

        ``cases`` limits the pin attempts to some (mechanism, memory, mapping)
        triples (e.g. ``SHORT_CASES``, so a notebook can compare two kernels in
        seconds); ``truncate=False`` skips the truncate demonstration."""
        return _matrix.measure(self, progress=progress, cases=cases, truncate=truncate)
