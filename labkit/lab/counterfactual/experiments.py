"""The two experiments with the rules switched off: one registration that
holds the filesystem hostage (MR lifetime vs truncate wait), and the world
before the wait existed (a device write through a stale MR into another
file's blocks)."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import ConfigError, LabError
from labkit.lab.counterfactual.switch import (
    FILESYSTEMS,
    MAX_HOLD,
    SCRIPT_PATH,
    Observed,
    ensure_script,
    kernel_problems,
    last_json,
    loaded,
    observe,
)

log = logging.getLogger(__name__)

# How long a registration may take before the experiment reports that it never returned (7.3 with
# module 1: GUP retries for ever, see labkit.lab.counterfactual.fences); generous for a TCG guest.
REGISTER_TIMEOUT = 15.0

# -- experiment 1: one registration holds the filesystem hostage --------------------------

@dataclass
class HoldTruncate:
    """An MR on a DAX file, held ``hold`` s, and a truncate of that file meanwhile."""

    kernel: str
    modules: list[str]
    fs: str
    hold: float
    registered: bool
    errno: int | None
    errname: str | None
    vmpin_kb_delta: int | None
    truncate_seconds: float | None
    truncate_finished: float | None
    deregistered_at: float | None
    truncate_completed: bool
    where: list[str]
    kernel_log: list[str]
    taint: int
    detail: dict = field(default_factory=dict)
    register_completed: bool = True     # False: ibv_reg_mr had not returned by the deadline (then killed)

    @property
    def after_deregistration(self) -> float | None:
        """How long after ibv_dereg_mr the truncate returned (negative: before)."""
        if self.truncate_finished is None or self.deregistered_at is None:
            return None
        return round(self.truncate_finished - self.deregistered_at, 3)

    @property
    def waited_for_mr(self) -> bool:
        return (self.registered and self.truncate_seconds is not None
                and self.truncate_seconds >= 0.8 * self.hold and (self.after_deregistration or 0) >= -0.1)

    def verdict(self) -> str:
        if not self.register_completed:
            return (f"ibv_reg_mr did not return within {self.detail.get('register_seconds', '?')} s (killed): "
                    f"check_vma_flags() was overridden {self.detail.get('overrides', '?')} times so far, yet "
                    f"no pin completed: another fence stops it (cf.fence_trace shows which)")
        if not self.registered:
            t = "" if self.truncate_seconds is None else f"; truncate returned in {self.truncate_seconds:.3f} s"
            return f"ibv_reg_mr refused: {self.errname} ({self.errno}){t}"
        if self.truncate_seconds is None:
            return (f"MR registered (VmPin {self.vmpin_kb_delta:+} kB) but the truncate never reported back: "
                    f"see where it was: {', '.join(self.where[:4])}")
        if self.waited_for_mr:
            return (f"MR registered (VmPin {self.vmpin_kb_delta:+} kB), held {self.hold:g} s: truncate waited "
                    f"{self.truncate_seconds:.2f} s and returned {self.after_deregistration:.2f} s after "
                    f"deregistration (in {', '.join(self.where[:2]) or '?'})")
        return (f"MR registered, but truncate returned after {self.truncate_seconds:.3f} s while the MR was "
                f"still held: the filesystem did not wait for the pinned page (not what the story predicts)")

    @classmethod
    def from_guest(cls, data: dict, o: Observed, fs: str, modules: list[str]) -> HoldTruncate:
        return cls(kernel=data.get("kernel", "?"), modules=modules, fs=fs, hold=float(data.get("hold") or 0),
                   registered=bool(data.get("registered")), errno=data.get("errno"), errname=data.get("errname"),
                   vmpin_kb_delta=data.get("vmpin_kb_delta"), truncate_seconds=data.get("truncate_seconds"),
                   truncate_finished=data.get("truncate_finished"), deregistered_at=data.get("deregistered_at"),
                   truncate_completed=bool(data.get("truncate_completed")),
                   where=list(data.get("truncate_where", [])), kernel_log=o.kernel_log, taint=o.taint,
                   detail=data, register_completed=data.get("register_completed", True) is not False)


def _fs(fs: str) -> str:
    if fs not in FILESYSTEMS:
        raise ConfigError(f"unknown filesystem {fs!r}", hint="choose one of: " + ", ".join(FILESYSTEMS))
    return fs


def _run_guest(lab: Any, argv: list[str], timeout: float) -> tuple[dict, Observed]:
    ensure_script(lab)
    o = observe(lab, " ".join(shlex.quote(a) for a in ["python3", SCRIPT_PATH, *argv]), timeout=timeout)
    data = last_json(o.stdout)
    if data is None or "error" in data:
        raise LabError(f"the counterfactual experiment {argv[0]} failed in the guest: "
                       + (data or {}).get("error", (o.stderr or o.stdout).strip()[-1500:]))
    return data, o


def hold_and_truncate(lab: Any, hold: float, fs: str = "xfs", size: int = 2 * 2**20) -> HoldTruncate:
    """Register an MR on a MAP_SHARED DAX file, truncate the file from another
    process, hold the MR ``hold`` s, deregister: measured in the guest."""
    _fs(fs)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= MAX_HOLD:
        raise ConfigError(f"hold time {hold!r} s is out of range", hint=f"use 0..{MAX_HOLD:g} s")
    argv = ["hold-truncate", "--path", f"/mnt/fsdax-{fs}/cf-hold.dat", "--size", str(int(size)),
            "--hold", str(float(hold)), "--timeout", "30", "--register-timeout", str(REGISTER_TIMEOUT)]
    data, o = _run_guest(lab, argv, timeout=90 + hold + REGISTER_TIMEOUT)
    return HoldTruncate.from_guest(data, o, fs, loaded(lab))


def mr_lifetime_vs_truncate(lab: Any, holds: Sequence[float] = (2.0, 4.0, 8.0), fs: str = "xfs",
                            progress=None) -> list[HoldTruncate]:
    """Experiment 1 for several hold times (for a plot of truncate wait against MR lifetime).
    A registration that never returns is measured once, not once per hold time."""
    say = progress or (lambda s: None)
    out = []
    for h in holds:
        say(f"MR held {h:g} s ...")
        out.append(hold_and_truncate(lab, h, fs))
        say("  " + out[-1].verdict())
        if not out[-1].register_completed:
            say("  (the other hold times would end the same way: not run)")
            break
    return out


def wait_plot_svg(results: Sequence[HoldTruncate], width: int = 420, height: int = 300) -> str:
    """An SVG scatter of truncate wait against MR lifetime, with the line wait = lifetime."""
    pts = [(r.hold, r.truncate_seconds) for r in results if r.truncate_seconds is not None]
    top = max([1.0] + [max(h, w) for h, w in pts]) * 1.1
    m = 45
    sx = lambda v: m + v / top * (width - m - 15)          # noqa: E731
    sy = lambda v: height - m - v / top * (height - m - 15)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">',
             f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(top)}" y2="{sy(0)}" stroke="black"/>',
             f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(top)}" stroke="black"/>',
             f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(top)}" y2="{sy(top)}" stroke="#999" stroke-dasharray="4"/>',
             f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">MR lifetime (s)</text>',
             f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
             f'truncate waited (s)</text>']
    step = max(1, round(top / 5))
    for t in range(0, int(top) + 1, step):
        parts.append(f'<text x="{sx(t)}" y="{sy(0) + 14}" text-anchor="middle">{t}</text>')
        parts.append(f'<text x="{sx(0) - 6}" y="{sy(t) + 4}" text-anchor="end">{t}</text>')
    for r in results:
        if r.truncate_seconds is None:
            continue
        colour = "#c0392b" if r.registered else "#2471a3"
        parts.append(f'<circle cx="{sx(r.hold):.1f}" cy="{sy(r.truncate_seconds):.1f}" r="5" fill="{colour}">'
                     f'<title>{r.verdict()}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


# -- experiment 2: before the wait existed ---------------------------------------------

@dataclass
class StaleWrite:
    """An MR on file A; A truncated; file B written until it has A's blocks; an RDMA WRITE through A's MR."""

    kernel: str
    modules: list[str]
    fs: str
    stage: str
    registered: bool
    errno: int | None
    errname: str | None
    truncate_seconds: float | None
    blocks_freed: list[dict]
    victim_blocks: list[dict]
    reused: list[dict]
    sha256_before: str | None
    sha256_after: str | None
    changed_bytes: int
    changed_ranges: list[list[int]]
    changed_sample: str
    rdma_write: dict
    kernel_log: list[str]
    taint: int
    detail: dict = field(default_factory=dict)

    @property
    def corrupted(self) -> bool:
        return bool(self.sha256_before and self.sha256_after and self.sha256_before != self.sha256_after)

    @property
    def warnings(self) -> list[str]:
        return kernel_problems(self.kernel_log)

    def verdict(self) -> str:
        if self.stage == "registration never returned":
            return (f"ibv_reg_mr did not return within {self.detail.get('register_seconds', '?')} s (killed): "
                    f"no MR, nothing to corrupt (cf.fence_trace shows what stops the pin)")
        if not self.registered:
            return f"ibv_reg_mr refused: {self.errname} ({self.errno}): no stale MR, nothing to corrupt"
        if self.stage == "truncate waited":
            return ("truncate waited for the MR (the layout wait is in force): the blocks were never freed "
                    "while the MR could write them")
        if self.stage == "blocks not reused":
            return "the victim file never got the freed blocks (see victim_blocks): no overlap, no write tried"
        wc = self.rdma_write
        if not wc.get("completed"):
            return "the RDMA WRITE did not complete in time: " + json.dumps(wc)
        if self.corrupted:
            a, b = self.changed_ranges[0]
            found = self.detail.get("written_bytes_found")
            exact = "" if found is None else f"; {found} of them are exactly the bytes the device wrote"
            return (f"the victim file changed: {self.changed_bytes} bytes differ (first range {a}..{b}), "
                    f"sha256 {(self.sha256_before or '?')[:12]}… -> {(self.sha256_after or '?')[:12]}…{exact}; "
                    f"its owner never wrote them")
        return (f"the RDMA WRITE completed (status {wc.get('wc_status')}) but the victim file is unchanged "
                f"(sha256 {str(self.sha256_before)[:12]}…): the device write did not reach B's blocks")

    @classmethod
    def from_guest(cls, data: dict, o: Observed, fs: str, modules: list[str]) -> StaleWrite:
        return cls(kernel=data.get("kernel", "?"), modules=modules, fs=fs, stage=data.get("stage", "?"),
                   registered=bool(data.get("registered")), errno=data.get("errno"), errname=data.get("errname"),
                   truncate_seconds=data.get("truncate_seconds"),
                   blocks_freed=list(data.get("blocks_before_truncate", [])),
                   victim_blocks=list(data.get("victim_blocks", [])), reused=list(data.get("reused", [])),
                   sha256_before=data.get("victim_sha256_before"), sha256_after=data.get("victim_sha256_after"),
                   changed_bytes=int(data.get("changed_bytes", 0)),
                   changed_ranges=list(data.get("changed_ranges", [])),
                   changed_sample=data.get("changed_sample", ""), rdma_write=dict(data.get("rdma_write", {})),
                   kernel_log=o.kernel_log, taint=o.taint, detail=data)

    def blocks_table(self) -> str:
        """A's freed extents and the parts of B that landed on them, as text (byte addresses on the pmem)."""
        bs = int(self.detail.get("block_size", 4096))
        rows = [f"{'':8s} {'file offset':>12s} {'first block':>12s} {'blocks':>7s}"]
        for e in self.blocks_freed:
            rows.append(f"{'A (MR)':8s} {e['logical']:12d} {e['physical'] // bs:12d} {e['length'] // bs:7d}")
        for e in self.reused:
            rows.append(f"{'B reuses':8s} {e['victim_offset']:12d} {e['physical'] // bs:12d} {e['length'] // bs:7d}")
        return "\n".join(rows)


def stale_mr_write(lab: Any, fs: str = "xfs", size: int = 2 * 2**20) -> StaleWrite:
    """Experiment 2 (needs both modules for the corruption; measured whatever is loaded)."""
    _fs(fs)
    argv = ["stale-write", "--path", f"/mnt/fsdax-{fs}/cf-mr.dat", "--victim", f"/mnt/fsdax-{fs}/cf-victim.dat",
            "--size", str(int(size)), "--register-timeout", str(REGISTER_TIMEOUT)]
    lab.sh(f"rm -f /mnt/fsdax-{fs}/cf-*.dat", check=False)
    data, o = _run_guest(lab, argv, timeout=180 + REGISTER_TIMEOUT)
    return StaleWrite.from_guest(data, o, fs, loaded(lab))


def prepare(lab: Any) -> None:
    """DAX mounts and soft-RoCE, as the other experiments use them."""
    lab.prepare_mounts()
    lab.setup_rdma()


__all__ = ["REGISTER_TIMEOUT", "HoldTruncate", "StaleWrite", "hold_and_truncate", "mr_lifetime_vs_truncate", "prepare", "stale_mr_write", "wait_plot_svg"]
