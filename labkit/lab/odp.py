"""On-demand paging and revocation: an RDMA memory region whose memory is
taken away from the process (truncate of an fs-dax file, MADV_DONTNEED of
anonymous memory), measured on the live guest.

The guest helper's ``odp-revoke`` registers the MR (``kind="odp"``: with
IBV_ACCESS_ON_DEMAND; ``"pinned"``: an ordinary long-term pin), posts one real
RDMA operation through a loopback RC queue pair, revokes the memory, and posts
it again. The host adds a kprobe on the driver's MMU-interval-notifier
callback (rxe: ``rxe_ib_invalidate_range``) when the live kernel has that
function, so the result says how often the device's mapping was invalidated.
Nothing here states what a kernel does: every field is what this run saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import LabError
from labkit.lab.companion import beside, companion
from labkit.lab.guest.vocab import MEMORY_KINDS, MR_KINDS, RDMA_OPS
from labkit.lab.helper import GuestHelper, answer
from labkit.lab.pmem import Namespace
from labkit.lab.probes import Probes
from labkit.lab.protocols import Machine
from labkit.lab.validate import check_roles, check_seconds, choose

log = logging.getLogger(__name__)

INVALIDATE_EVENT = "labkit_odp_inv"
INVALIDATE_FUNCTION = "rxe_ib_invalidate_range"
# $1 = event name, $2 = function. Exit 3: the live kernel has no such function to probe.
INVALIDATE_PROBE_SCRIPT = """cd /sys/kernel/tracing || exit 1
grep -qw "^$2" available_filter_functions || exit 3
grep -q "kprobes/$1 " kprobe_events || echo "p:$1 $2" >> kprobe_events || exit 1
echo 1 > "events/kprobes/$1/enable" && echo 1 > tracing_on"""


@dataclass(frozen=True)
class RdmaOp:
    """One RDMA operation through the MR and the completion the device gave."""

    op: str
    status: int | None          # enum ibv_wc_status; None: no completion arrived
    status_name: str
    seconds: float | None
    vendor_err: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0

    @classmethod
    def from_probe(cls, d: dict[str, Any] | None) -> RdmaOp | None:
        if not isinstance(d, dict):
            return None
        status = d.get("status")
        return cls(op=str(d.get("op", "")), status=status if isinstance(status, int) else None,
                   status_name=str(d.get("status_name", "")), seconds=d.get("seconds"),
                   vendor_err=d.get("vendor_err"))


@dataclass
class RevokeResult:
    """An MR whose memory was revoked: what the live kernel and device did."""

    memory: str
    mapping: str
    kind: str                       # "odp" or "pinned"
    registered: bool
    errno: int | None
    errname: str | None
    device_odp: int | None          # odp_caps.general_caps
    vmpin_kb_delta: int | None
    action: str | None              # "truncate", "madvise(MADV_DONTNEED)", "munmap"
    action_seconds: float | None
    action_waited: bool             # still waiting when the probe gave up (killed)
    where: list[str]                # where the truncating thread was seen sleeping
    invalidations: int | None       # invalidation callbacks during the revocation; None: not probed
    before: RdmaOp | None
    after: RdmaOp | None
    visible_to_process: bool | None  # after a WRITE: the process sees the device's bytes (anon only)
    kernel: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: registration, revocation, invalidations, the RDMA op after."""
        if not self.registered:
            return (f"{self.kind:6s} MR on {self.memory}: registration refused, {self.errname} ({self.errno}); "
                    f"device ODP caps {_caps(self.device_odp)}")
        secs = "-" if self.action_seconds is None else f"{self.action_seconds:.3f} s"
        inv = "not probed" if self.invalidations is None else str(self.invalidations)
        after = self.after.status_name if self.after else "-"
        before = self.before.status_name if self.before else "-"
        seen = "" if self.visible_to_process is None else f", write visible to the process: {self.visible_to_process}"
        return (f"{self.kind:6s} MR on {self.memory}: VmPin {self.vmpin_kb_delta:+d} kB, op before {before}; "
                f"{self.action} took {secs}{' (still waiting, killed)' if self.action_waited else ''}, "
                f"invalidations {inv}; op after {after}{seen}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("detail", "before", "after")}
        d["before"] = None if self.before is None else self.before.__dict__ | {"ok": self.before.ok}
        d["after"] = None if self.after is None else self.after.__dict__ | {"ok": self.after.ok}
        return d


def _caps(caps: int | None) -> str:
    return "unknown" if caps is None else f"{caps:#x}"


def parse_revoke(memory: str, kind: str, data: dict[str, Any]) -> RevokeResult:
    """The guest helper's ``odp-revoke`` JSON as a RevokeResult (pure)."""
    if "error" in data:
        raise LabError(f"odp-revoke on {memory} failed: {data['error']}")
    rv = data.get("revoke") or {}
    caps = data.get("odp_general_caps")
    return RevokeResult(
        memory=memory, mapping=str(data.get("mapping", "")), kind=kind, registered=bool(data.get("registered")), errno=data.get("errno"),
        errname=data.get("errname"), device_odp=caps if isinstance(caps, int) else None,
        vmpin_kb_delta=data.get("vmpin_kb_delta"), action=rv.get("action"), action_seconds=rv.get("seconds"),
        action_waited=bool(rv.get("killed")), where=list(rv.get("where") or []),
        invalidations=data.get("invalidations"), before=RdmaOp.from_probe(data.get("before")),
        after=RdmaOp.from_probe(data.get("after")), visible_to_process=data.get("visible_to_process"),
        kernel=str(data.get("kernel", "")), detail=data)


class Odp:
    """ODP experiments in one guest (RDMA set up through ``Probes``)."""

    def __init__(self, vm: Machine, helper: GuestHelper, probes: Probes) -> None:
        self.vm, self.helper, self.probes = vm, helper, probes
        self._event: str | None = None
        self._probed = False

    def invalidate_probe(self) -> str | None:
        """The kprobe event on the driver's invalidation callback, installed
        once; None when the live kernel has no such function (no ODP in rxe)."""
        if not self._probed:
            r = self.vm.run(["sh", "-c", INVALIDATE_PROBE_SCRIPT, "sh", INVALIDATE_EVENT, INVALIDATE_FUNCTION])
            if r.rc not in (0, 3):
                raise LabError(f"cannot install a kprobe on {INVALIDATE_FUNCTION}: {(r.stderr or r.stdout).strip()}")
            self._event = INVALIDATE_EVENT if r.rc == 0 else None
            self._probed = True
            log.debug("invalidation probe on %s: %s", INVALIDATE_FUNCTION, self._event or "function absent")
        return self._event

    def revoke(self, memory: str = "fsdax-xfs", kind: str = "odp", op: str = "write",
               roles: dict[str, Namespace] | None = None, timeout: float = 20.0) -> RevokeResult:
        """Register ``kind`` MR over ``memory``, RDMA ``op`` through it, revoke
        the memory, RDMA again: measured."""
        choose(memory, MEMORY_KINDS, "memory kind")     # every kind can be taken away from the process
        choose(kind, MR_KINDS, "MR kind")
        choose(op, RDMA_OPS, "RDMA operation")
        check_seconds(timeout, "timeout", 120)
        roles = check_roles(roles)
        self.probes.setup_rdma()
        event = self.invalidate_probe()
        # Anonymous memory private: MADV_DONTNEED then really drops the pages
        # (a shared anonymous mapping would refault the very same shmem page).
        mapping = "private" if memory == "anon" else "shared"
        argv = ["odp-revoke", *self.probes.memory_args(memory, "odp", roles), "--mapping", mapping,
                "--kind", kind, "--op", op,
                "--timeout", str(float(timeout)), *(["--trace-event", event] if event else [])]
        log.debug("odp-revoke %s %s %s", kind, memory, op)
        data = answer(self.vm.run(self.helper.argv(*argv), timeout=60 + timeout), "odp-revoke")
        return parse_revoke(memory, kind, data)


# -- the notebook's story on one kernel, and on two side by side -------------------

REVOCATIONS = (("fsdax-xfs", "odp"), ("anon", "odp"), ("anon", "pinned"))


@dataclass
class OdpStory:
    """What one kernel did: ODP registrations on every memory kind, the pinned
    registration of fs-dax for comparison, and the revocations."""

    kernel: str
    pins: list[Any]                 # PinResult
    revocations: list[RevokeResult]

    def pin(self, mechanism: str, memory: str) -> Any:
        return next(p for p in self.pins if (p.mechanism, p.memory) == (mechanism, memory))

    def revocation(self, memory: str, kind: str) -> RevokeResult:
        return next(r for r in self.revocations if (r.memory, r.kind) == (memory, kind))


def measure_story(lab: Any) -> OdpStory:
    """``OdpStory`` of ``lab``'s guest (mounts prepared, soft-RoCE up)."""
    lab.prepare_mounts()
    lab.setup_rdma()
    cases = [("rdma-odp", k, "shared") for k in MEMORY_KINDS] + [("rdma", "fsdax-xfs", "shared")]
    pins = lab.pin_many(cases)
    revs = [lab.odp_revoke(memory, kind=kind) for memory, kind in REVOCATIONS]
    return OdpStory(kernel=lab.kernel_release(), pins=pins, revocations=revs)


def story_on_two_kernels(lab: Any, other_kernel: str | None = None) -> tuple[OdpStory, OdpStory, Any]:
    """``lab``'s story and another kernel's (default: 7.3, or 6.1 when ``lab``
    runs 7.3), measured at the same time (the other VM, ``<name>-k<kernel>``
    of ``labkit.lab.companion``, starts or is attached in a thread). Returns
    ``(here, there, other_vm)``; the caller stops ``other_vm``."""
    from labkit.lab.lab import Lab

    peer = companion("odp", lab.vm.name, lab.vm.describe()["kernel"], other_kernel)
    return beside(peer, lambda: measure_story(lab), lambda vm: measure_story(Lab(vm)))


def _pin_cell(p: Any) -> str:
    caps = "?" if p.device_odp is None else f"{p.device_odp:#x}"
    vp = "-" if p.vmpin_kb_delta is None else f"{p.vmpin_kb_delta:+d}"
    return f"{p.cell} caps {caps} VmPin {vp}{' [cvf]' if p.trace else ''}"


def _rev_cell(r: RevokeResult) -> str:
    if not r.registered:
        return f"not registered: {r.errname} ({r.errno})"
    inv = "-" if r.invalidations is None else str(r.invalidations)
    secs = "?" if r.action_seconds is None else f"{r.action_seconds:.3f}s"
    seen = "" if r.visible_to_process is None else f", process sees it: {'yes' if r.visible_to_process else 'no'}"
    return f"{secs}{' WAITED' if r.action_waited else ''} inval {inv} -> {r.after.status_name if r.after else '-'}{seen}"


def _rev_key(r: RevokeResult) -> tuple[Any, ...]:
    """What a revocation answered, without its timings (which differ every run)."""
    return (r.registered, r.errno, r.action_waited, bool(r.invalidations), r.after.status if r.after else None,
            r.visible_to_process)


def _action(memory: str) -> str:
    return {"anon": "MADV_DONTNEED", "devdax": "munmap"}.get(memory, "truncate")


def compare_stories(a: OdpStory, b: OdpStory) -> str:
    """Two kernels' stories as text, side by side (rows whose answers differ marked)."""
    rows = []
    for p in a.pins:
        q = b.pin(p.mechanism, p.memory)
        # the device's caps matter to the ODP rows only
        same = (p.ok, p.errno, p.vmpin_kb_delta, bool(p.trace)) == (q.ok, q.errno, q.vmpin_kb_delta, bool(q.trace)) \
            and (p.mechanism != "rdma-odp" or p.device_odp == q.device_odp)
        rows.append((f"{p.mechanism} {p.memory}", _pin_cell(p), _pin_cell(q), same))
    for r in a.revocations:
        o = b.revocation(r.memory, r.kind)
        mr = "an ODP" if r.kind == "odp" else "a pinned"
        rows.append((f"{_action(r.memory)} under {mr} MR on {r.memory}", _rev_cell(r), _rev_cell(o),
                     _rev_key(r) == _rev_key(o)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max([len(r[1]) for r in rows] + [len(a.kernel)])
    lines = [f"{'':{w0}s}   {a.kernel:{w1}s} | {b.kernel}"]
    lines += [f"{label:{w0}s}   {x:{w1}s} | {y}{'' if same else '   <- differs'}" for label, x, y, same in rows]
    lines.append("[cvf]: check_vma_flags refused (traced); caps: odp_caps.general_caps; inval: invalidation "
                 f"callbacks ({INVALIDATE_FUNCTION}) during the revocation; -> the RDMA WRITE's completion after it")
    return "\n".join(lines)
