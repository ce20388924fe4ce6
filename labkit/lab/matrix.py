"""The whole picture: every DAX mount and every mechanism x memory kind measured
now (``MatrixResult``), two kernels side by side, and the comparison as text.

A ``MatrixResult`` is a dataclass with typed fields, and also a read-only
mapping with exactly the shape ``labkit matrix --json`` prints (so the
dashboards and notebooks that index it like a dict keep working).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.lab.companion import beside, companion
from labkit.lab.guest.vocab import ALL_CASES, MECHANISMS, MEMORY_KINDS, SHORT_CASES, result_cell
from labkit.lab.results import MountResult, PinResult, TruncateWait
from labkit.lab.validate import Case, check_cases

if TYPE_CHECKING:
    from labkit.lab.lab import Lab

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class MatrixResult(Mapping[str, Any]):
    """Mounts, pin attempts and the truncate demonstration of one kernel."""

    kernel: str
    accel: str | None
    mounts: list[MountResult] = field(default_factory=list)
    pins: list[PinResult] = field(default_factory=list)
    truncate_wait: TruncateWait | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``labkit matrix --json``."""
        return {"kernel": self.kernel, "accel": self.accel, "mounts": [m.to_dict() for m in self.mounts],
                "pins": [p.to_dict() for p in self.pins],
                "truncate_wait": None if self.truncate_wait is None else self.truncate_wait.to_dict(),
                "seconds": self.seconds}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.to_dict() == dict(other)

    __hash__ = None  # type: ignore[assignment]


def measure(lab: Lab, progress: Callable[[str], None] | None = None, cases: list[Case] | None = None,
            truncate: bool = True) -> MatrixResult:
    """``Lab.matrix()``: see there."""
    say = progress or (lambda s: None)
    checked = check_cases(ALL_CASES if cases is None else cases)    # all checked before the guest is touched
    t0 = time.monotonic()
    say("preparing persistent memory and DAX mounts")
    mounts = lab.prepare_mounts()
    roles = lab.pmem.roles or lab.prepare_pmem()
    say("bringing up soft-RoCE and vivid")
    lab.setup_rdma()
    lab.setup_vivid()
    say(f"{len(checked)} pin attempts: {', '.join(MECHANISMS)} x {', '.join(MEMORY_KINDS)}")
    pins = lab.pin_many(checked, roles=roles)
    tw = None
    if truncate:
        say("truncate while a DAX page is referenced")
        tw = lab.truncate_wait("xfs", hold=1.0)    # one second of blocking makes the point
    result = MatrixResult(kernel=lab.kernel_release(), accel=lab.vm.accel.accel if lab.vm.accel else None,
                          mounts=mounts, pins=pins, truncate_wait=tw, seconds=round(time.monotonic() - t0, 1))
    log.debug("matrix of %s: %d pins in %.1f s", result.kernel, len(pins), result.seconds or 0.0)
    return result


def pins_matrix(lab: Lab, pins: list[PinResult]) -> MatrixResult:
    """Pin results already measured, in ``matrix()``'s shape, labelled with the live kernel release."""
    return MatrixResult(kernel=lab.kernel_release(), accel=lab.vm.accel.accel if lab.vm.accel else None,
                        pins=list(pins))


def matrices_on_two_kernels(lab: Lab, other_kernel: str | None = None, cases: list[Case] | None = None,
                            truncate: bool = False) -> tuple[MatrixResult, MatrixResult, Any]:
    """``lab``'s matrix and the same cases measured on a VM of another kernel
    (``<name>-other``, started or attached: ``labkit.lab.companion``), at the same time: the other VM
    starts, prepares its persistent memory and measures in a thread while
    ``lab`` measures. Returns ``(here, there, other_vm)``; the caller stops
    ``other_vm`` when done. ``cases`` defaults to ``SHORT_CASES``."""
    from labkit.lab.lab import Lab

    checked = check_cases(list(SHORT_CASES if cases is None else cases))
    kernel = lab.vm.describe()["kernel"]
    other = companion("matrix", lab.vm.name, kernel, other_kernel)
    log.debug("measuring %d cases on %s and %s", len(checked), kernel, other.kernel)
    return beside(other, lambda: lab.matrix(cases=checked, truncate=truncate),
                  lambda vm: Lab(vm).matrix(cases=checked, truncate=truncate))


def _cell(p: Mapping[str, Any]) -> str:
    fp = p.get("foll_pin_delta")
    return f"{result_cell(p['ok'], p['errno'], p['errname'])} foll_pin {'-' if fp is None else f'{fp:+d}'}"


def _answer(p: Mapping[str, Any]) -> tuple[Any, ...]:
    return p["ok"], p["errno"], bool(p.get("foll_pin_delta"))


def compare_matrices(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Two ``matrix()`` results as text, side by side: the mount warnings and
    each pin's answer and FOLL_PIN count, marking the rows that differ."""
    lines = []
    for m in (a, b):
        warned = [mt["fs"] for mt in m.get("mounts", []) if mt.get("experimental_warning")]
        lines.append(f"{m['kernel']}: EXPERIMENTAL warning from {', '.join(warned) or 'no filesystem'}")
    lines.append(f"{'mechanism':9s} {'memory':10s} {a['kernel']:28s} | {b['kernel']}")
    theirs = {(p["mechanism"], p["memory"], p["mapping"]): p for p in b["pins"]}
    for p in a["pins"]:
        q = theirs.get((p["mechanism"], p["memory"], p["mapping"]))
        other = _cell(q) if q else "not measured"
        mark = "   <- differs" if q and _answer(p) != _answer(q) else ""
        lines.append(f"{p['mechanism']:9s} {p['memory']:10s} {_cell(p):28s} | {other}{mark}")
    return "\n".join(lines)
