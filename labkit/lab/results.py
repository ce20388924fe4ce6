"""What the lab measured, as plain dataclasses: a mount, a pin attempt, a
truncate that waits, and the kernel log and tracing around a guest command."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from labkit.command import CommandResult
from labkit.lab.guest.vocab import KPROBE, result_cell


@dataclass(frozen=True)
class Observation:
    """A guest command and what the kernel said while it ran: the log lines
    after the command's marker and the check_vma_flags refusals traced."""

    result: CommandResult
    marker: str
    kernel_log: list[str]
    trace: list[str]


@dataclass(frozen=True)
class MountInfo:
    """The mount that holds a path in the guest (/proc/self/mountinfo), and
    whether a new file there is DAX (statx STATX_ATTR_DAX)."""

    path: str
    mountpoint: str
    fs: str
    device: str
    options: str
    dax_active: bool
    proc_mounts: str = ""

    @property
    def is_mountpoint(self) -> bool:
        """True if ``path`` itself is the mount point (not a directory on another mount)."""
        return self.path.rstrip("/") == self.mountpoint.rstrip("/") or self.path == self.mountpoint

    @classmethod
    def from_probe(cls, d: dict[str, Any]) -> MountInfo:
        return cls(path=str(d.get("path", "")), mountpoint=str(d.get("mountpoint", "")), fs=str(d.get("fs", "")),
                   device=str(d.get("device", "")), options=str(d.get("options", "")),
                   dax_active=bool(d.get("dax_active")), proc_mounts=str(d.get("proc_mounts", "")))


@dataclass
class MountResult:
    """What a DAX mount really did."""

    fs: str
    device: str
    mountpoint: str
    options: str
    ok: bool
    dax_active: bool
    experimental_warning: bool
    kernel_log: list[str]
    error: str = ""
    proc_mounts: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The fields ``labkit matrix --json`` reports for a mount."""
        return {"fs": self.fs, "dax_active": self.dax_active, "experimental_warning": self.experimental_warning,
                "kernel_log": self.kernel_log, "ok": self.ok, "options": self.options, "error": self.error}


def traced_function(line: str) -> str:
    """The probed function of a kretprobe trace line: tracefs prints
    ``(CALLER+0x../0x.. <- FUNCTION) ret=-95``; '' when there is none."""
    m = re.search(r"<- ([A-Za-z_][\w.]*)\)", line)
    return m.group(1) if m else ""


ODP_SUPPORT = 0x1       # IBV_ODP_SUPPORT in odp_caps.general_caps


def pin_why(mechanism: str, ok: bool, device_odp: int | None, trace: list[str]) -> str:
    """Why the kernel answered so, from this attempt's own evidence only: the
    device's ODP capabilities and whether a function of the fs-dax rule refused
    (traced: check_vma_flags since v5.11). Two refusals with the same errno are
    told apart this way."""
    if trace:
        return f"refused in {traced_function(trace[0]) or '?'}: no long-term pin of this memory (the fs-dax rule)"
    odp = mechanism == "rdma-odp"
    has_odp = device_odp is not None and bool(device_odp & ODP_SUPPORT)
    if ok:
        return f"registered on demand (device ODP caps {device_odp:#x}): no page pinned" if odp and has_odp else ""
    if odp and device_odp is not None and not has_odp:
        return (f"the device has no on-demand paging (ODP caps {device_odp:#x}); the fs-dax rule did not "
                "refuse (nothing traced)")
    return "refused; the fs-dax rule did not refuse (nothing traced)"


@dataclass
class PinResult:
    """One pin attempt: the kernel's answer and what it did to the counters.
    ``device_odp``: the RDMA device's ``odp_caps.general_caps`` (RDMA only);
    ``why``: the reason the evidence gives (``pin_why``)."""

    mechanism: str
    memory: str
    mapping: str
    ok: bool
    errno: int | None
    errname: str | None
    vmpin_kb_delta: int | None
    foll_pin_delta: int | None
    kernel_log: list[str]
    trace: list[str]
    detail: dict[str, Any] = field(default_factory=dict)
    device_odp: int | None = None
    why: str = ""

    @property
    def cell(self) -> str:
        """"ok" or "ERRNAME (n)"."""
        return result_cell(self.ok, self.errno, self.errname)

    def summary(self) -> str:
        """One line for a learner: the kernel's answer and what it did to the counters."""
        vp = "-" if self.vmpin_kb_delta is None else f"{self.vmpin_kb_delta:+d} kB"
        fp = "-" if self.foll_pin_delta is None else f"{self.foll_pin_delta:+d}"
        why = f"   refused in: {self.trace[0].split(KPROBE + ':', 1)[-1].strip()}" if self.trace else ""
        if not why and self.why:
            why = f"   {self.why}"
        return (f"{self.mechanism:8s} {self.memory:10s} {self.cell:16s} VmPin {vp:>9s}  "
                f"nr_foll_pin_acquired {fp:>5s}{why}")

    def to_dict(self) -> dict[str, Any]:
        """The fields ``labkit matrix --json`` reports for a pin (all but ``detail``)."""
        return {k: v for k, v in asdict(self).items() if k != "detail"}

    @classmethod
    def from_probe(cls, case: tuple[str, str, str], data: dict[str, Any], kernel_log: list[str],
                   trace: list[str]) -> PinResult:
        """A result from the guest helper's JSON answer for ``case``."""
        mechanism, memory, mapping = case
        caps = data.get("odp_general_caps")
        caps = caps if isinstance(caps, int) and not isinstance(caps, bool) else None
        ok = bool(data.get("ok"))
        return cls(mechanism=mechanism, memory=memory, mapping=mapping, ok=ok,
                   errno=data.get("errno"), errname=data.get("errname"),
                   vmpin_kb_delta=data.get("vmpin_kb_delta"), foll_pin_delta=data.get("foll_pin_acquired_delta"),
                   kernel_log=kernel_log, trace=trace, detail=data, device_odp=caps,
                   why=pin_why(mechanism, ok, caps, trace) if mechanism.startswith("rdma") else "")


@dataclass
class TruncateWait:
    """A truncate of a mapped fs-dax file while one of its pages is referenced."""

    fs: str
    blocked: bool
    seconds: float | None
    where: list[str]
    completed: bool
    detail: dict[str, Any] = field(default_factory=dict)
    op: str = "truncate"            # or "punch": fallocate(PUNCH_HOLE) over the file

    def to_dict(self) -> dict[str, Any]:
        return {"fs": self.fs, "blocked": self.blocked, "seconds": self.seconds, "where": self.where,
                "completed": self.completed}
