"""Two fences: what GUP does with a long-term pin of fs-dax memory once
``check_vma_flags()`` lets it through.

Up to 6.14 the VMA test in ``check_vma_flags()`` is the only fence: with
module 1 loaded the registration succeeds. From 6.15 (e5cb23256347, "mm/gup:
don't allow FOLL_LONGTERM pinning of FS DAX pages") ``folio_is_longterm_pinnable()``
is false for fs-dax folios as well, so after pinning, ``__gup_longterm_locked()``
hands every folio to the migration step, which cannot isolate a DAX folio from
an LRU it is not on, unpins everything and answers ``-EAGAIN``: GUP pins
again, for ever, until the process gets a fatal signal.

``fence_trace(lab)`` measures that in the live guest: one registration of a
MAP_SHARED fs-dax file in a child process with a deadline, while a kretprobe
with a ``hist:keys=ret`` trigger counts each return value of the GUP functions
on the way. It measures whatever rules are in force (module loaded or not).
"""

from __future__ import annotations

import errno as errno_mod
import logging
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import ConfigError
from labkit.lab.counterfactual.experiments import _fs, _run_guest
from labkit.lab.counterfactual.switch import Observed, loaded
from labkit.lab.guest.vocab import errname

log = logging.getLogger(__name__)

# The functions on the way, outermost first, each with the type its return value is read as
# (folio_isolate_lru returns a bool: only the low byte means anything). Functions a kernel has
# inlined or renamed are reported as not probed.
FENCE_FUNCTIONS: tuple[str, ...] = (
    "__gup_longterm_locked", "__get_user_pages", "check_vma_flags:s32", "collect_longterm_unpinnable_folios",
    "folio_isolate_lru:u8", "migrate_longterm_unpinnable_folios:s32",
)
MAX_SECONDS = 30.0
FENCE_KERNEL = "7.3"            # the lab's kernel with e5cb23256347


def _name(spec: str) -> str:
    return spec.partition(":")[0]


def errno_text(value: int) -> str:
    """A negative kernel return value as its errno name, e.g. -11 -> '-EAGAIN (-11)'."""
    if value < 0 and -value in errno_mod.errorcode:
        return f"-{errname(-value)} ({value})"
    return str(value)


@dataclass
class FenceTrace:
    """One registration attempt and what each GUP function returned meanwhile."""

    kernel: str
    modules: list[str]
    fs: str
    deadline: float
    completed: bool                 # did ibv_reg_mr return before the deadline?
    registered: bool
    errno: int | None
    errname: str | None
    seconds: float
    counts: dict[str, dict[int, int]]   # function -> {return value: how often}
    not_probed: list[str]
    overrides: int | None           # module 1's overrides during this run (None: not loaded)
    pages: int
    kernel_log: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)

    def calls(self, function: str) -> int:
        return sum(self.counts.get(function, {}).values())

    def returned(self, function: str, value: int) -> int:
        """How often ``function`` returned ``value``."""
        return self.counts.get(function, {}).get(value, 0)

    @property
    def retries(self) -> int:
        """Rounds in which migration answered -EAGAIN (each one a new pin of every page)."""
        return self.returned("migrate_longterm_unpinnable_folios", -errno_mod.EAGAIN)

    @property
    def second_fence(self) -> bool:
        """The pin got past check_vma_flags but the folios were found not long-term pinnable."""
        return self.retries > 0 or any(v > 0 for v in self.counts.get("collect_longterm_unpinnable_folios", {}))

    def table(self) -> str:
        """Function, return value, count: one row per distinct return value."""
        rows = [f"{'function':40s} {'returned':>18s} {'times':>9s}"]
        for spec in FENCE_FUNCTIONS:
            fn = _name(spec)
            if fn in self.not_probed:
                rows.append(f"{fn:40s} {'(not probe-able here)':>18s}")
                continue
            for value, n in sorted(self.counts.get(fn, {}).items(), key=lambda kv: -kv[1]):
                rows.append(f"{fn:40s} {errno_text(value):>18s} {n:9d}")
            if not self.counts.get(fn):
                rows.append(f"{fn:40s} {'(never returned)':>18s} {0:9d}")
        return "\n".join(rows)

    def verdict(self) -> str:
        first = self.counts.get("check_vma_flags", {})
        past_first = sum(n for v, n in first.items() if v == 0)
        if self.completed and self.registered:
            return (f"ibv_reg_mr registered in {self.seconds:.2f} s: check_vma_flags() let the pin through "
                    f"{past_first} time(s) and no folio was found unpinnable: one fence, and it was off")
        if self.completed:
            refused = [f"{fn}() {errno_text(v)}" for fn, c in self.counts.items() for v in c if v < 0
                       and fn == "check_vma_flags"]
            return (f"ibv_reg_mr refused: {self.errname} ({self.errno}) in {self.seconds:.2f} s"
                    + (f"; refused by {', '.join(sorted(set(refused)))}" if refused else ""))
        if self.second_fence:
            unpinnable = max(self.counts.get("collect_longterm_unpinnable_folios", {0: 0}), default=0)
            return (f"two fences: ibv_reg_mr had not returned after {self.seconds:.1f} s (then killed). "
                    f"check_vma_flags() let the pin through {past_first} times, but each round "
                    f"collect_longterm_unpinnable_folios() found {unpinnable} of the {self.pages} pages' folios "
                    f"not long-term pinnable, migrate_longterm_unpinnable_folios() unpinned them and answered "
                    f"{errno_text(-errno_mod.EAGAIN)} {self.retries} times, and __gup_longterm_locked() pinned "
                    f"again each time")
        return (f"ibv_reg_mr had not returned after {self.seconds:.1f} s (then killed), and the traced "
                f"functions do not show why: see the table")

    @classmethod
    def from_guest(cls, data: dict, o: Observed, fs: str, modules: list[str]) -> FenceTrace:
        counts = {fn: {int(v): int(n) for v, n in c.items()} for fn, c in dict(data.get("counts", {})).items()}
        return cls(kernel=data.get("kernel", "?"), modules=modules, fs=fs, deadline=float(data.get("deadline", 0)),
                   completed=bool(data.get("completed")), registered=bool(data.get("registered")),
                   errno=data.get("errno"), errname=data.get("errname"), seconds=float(data.get("seconds", 0)),
                   counts=counts, not_probed=list(data.get("not_probed", [])), overrides=data.get("overrides"),
                   pages=int(data.get("size", 0)) // 4096, kernel_log=o.kernel_log, detail=data)


def fence_trace(lab: Any, fs: str = "xfs", seconds: float = 3.0) -> FenceTrace:
    """One ibv_reg_mr of a 2 MiB MAP_SHARED fs-dax file, given ``seconds`` to
    return, with the return values of ``FENCE_FUNCTIONS`` counted meanwhile."""
    _fs(fs)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_SECONDS:
        raise ConfigError(f"deadline {seconds!r} s is out of range",
                          hint=f"use a number of seconds in (0, {MAX_SECONDS:g}]")
    argv = ["fence-trace", "--path", f"/mnt/fsdax-{fs}/cf-fence.dat", "--seconds", str(float(seconds)),
            "--functions", ",".join(FENCE_FUNCTIONS)]
    data, o = _run_guest(lab, argv, timeout=60 + seconds)
    return FenceTrace.from_guest(data, o, fs, loaded(lab))


def fence_lab(lab: Any) -> tuple[Any, bool]:
    """A Lab on a guest with the second fence (7.3): ``lab`` itself when it runs 7.3, else
    its "fences" companion (``labkit.lab.companion``), attached or started, DAX mounts and
    soft-RoCE ready. Returns ``(lab, is_companion)``."""
    from labkit.lab.companion import companion
    from labkit.lab.counterfactual.experiments import prepare
    from labkit.lab.lab import Lab
    from labkit.machine import vm as machine

    kernel = lab.vm.describe()["kernel"]
    if kernel == FENCE_KERNEL:
        prepare(lab)
        return lab, False
    peer = companion("fences", lab.vm.name, kernel, FENCE_KERNEL)
    other = Lab(machine.connect(name=peer.name, kernel=peer.kernel))
    prepare(other)
    return other, True


def fences_on_7_3(lab: Any, seconds: float = 3.0) -> tuple[FenceTrace, FenceTrace, Any]:
    """The fence trace on a 7.3 guest (``fence_lab``), without and then with module 1;
    the guest is reset afterwards, so it leaves no taint behind. Returns
    ``(real, switched, vm)``; the caller stops ``vm`` when it is a companion."""
    from labkit.lab.counterfactual.switch import counterfactual
    other, _ = fence_lab(lab)
    real = fence_trace(other, seconds=seconds)
    with counterfactual(other, "no-longterm-check"):
        switched = fence_trace(other, seconds=seconds)
    other.vm.reset()
    return real, switched, other.vm


__all__ = ["FENCE_FUNCTIONS", "FENCE_KERNEL", "FenceTrace", "errno_text", "fence_lab", "fence_trace", "fences_on_7_3"]
