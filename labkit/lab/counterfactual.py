"""What if the check were not there: switch the v4.15 rule off in the live
guest and measure what it prevents.

Two small kernel modules, built into the guest image by
``images/build-modules.sh`` from ``images/modules/``:

* ``no-longterm-check`` (``labkit_no_longterm_check``): a kretprobe on
  ``check_vma_flags()`` turns its ``-EOPNOTSUPP`` for a ``FOLL_LONGTERM`` pin of
  an fs-dax VMA into 0, so ``ibv_reg_mr`` on a DAX file succeeds;
* ``no-layout-wait`` (``labkit_no_layout_wait``): ``dax_layout_busy_page{,_range}()``
  answer NULL, so truncate frees DAX blocks without waiting for busy pages.

``with counterfactual(lab, "no-longterm-check"):`` loads them (the kernel is
tainted, and the guest is marked modified in ``/run/labkit/modified`` until a
reset) and unloads them on exit. The experiments run
``guest/counterfactual.py`` in the guest and return what the live kernel did:
errno, waits, block numbers, checksums, kernel log lines (WARNs included). A
verdict says in words whether the kernel did what the story predicts, and if
not, which evidence says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labkit.errors import ConfigError, LabError

log = logging.getLogger(__name__)

MODULES: dict[str, str] = {
    "no-longterm-check": "labkit_no_longterm_check",
    "no-layout-wait": "labkit_no_layout_wait",
}
SCRIPT_PATH = "/run/labkit/counterfactual.py"
MARKER_PATH = "/run/labkit/modified"
MODULE_SOURCES = Path(__file__).resolve().parents[2] / "images" / "modules"
FILESYSTEMS = ("xfs", "ext4")
MAX_HOLD = 120.0
# Kernel taint bits (Documentation/admin-guide/tainted-kernels.rst): the ones a lab module can set.
TAINT_FLAGS = {0: ("P", "proprietary module"), 4: ("M", "machine check"), 7: ("D", "kernel died (oops)"),
               9: ("W", "kernel warning (WARN)"), 12: ("O", "out-of-tree module"),
               13: ("E", "unsigned module"), 15: ("K", "live patch")}
WARN_MARKERS = ("WARNING:", "cut here", "BUG:", "Oops", "Call Trace")


class Guest(Protocol):
    """What the counterfactual needs from the lab: shell commands and an upload."""

    def sh(self, script: str, timeout: float = 60.0, check: bool = True) -> Any: ...


class ModuleLoadError(LabError):
    """A lab module did not load; carries the guest's words for it."""

    def __init__(self, name: str, module: str, output: str, kernel_log: Sequence[str]) -> None:
        shown = "\n".join(f"  {ln}" for ln in kernel_log) or "  (nothing in the kernel log)"
        super().__init__(f"the lab module {module} ({name}) did not load on this kernel:\n"
                         f"  {output.strip()}\n kernel log:\n{shown}")
        self.name, self.module, self.output, self.kernel_log = name, module, output, list(kernel_log)
        self.hint = ("this kernel does not have what the module probes; the experiment does not apply here "
                     "(see the kernel log above)" if kernel_log else
                     "rebuild the image (`labkit image build --force`) so it contains the lab modules")


# -- pure helpers ------------------------------------------------------------------

def check_names(names: Iterable[str]) -> list[str]:
    out = []
    for n in names:
        if n not in MODULES:
            raise ConfigError(f"unknown counterfactual {n!r}", hint="choose from: " + ", ".join(MODULES))
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError("name at least one counterfactual", hint="e.g. 'no-longterm-check'")
    return out


def decode_taint(value: int) -> str:
    """``/proc/sys/kernel/tainted`` as letters with their meaning, e.g. 'O (out-of-tree module), ...'."""
    parts = [f"{letter} ({what})" for bit, (letter, what) in sorted(TAINT_FLAGS.items()) if value >> bit & 1]
    other = value & ~sum(1 << b for b in TAINT_FLAGS)
    if other:
        parts.append(f"other bits {other:#x}")
    return ", ".join(parts) or "not tainted"


def kernel_problems(lines: Iterable[str]) -> list[str]:
    """The kernel log lines that report a WARN, BUG or oops."""
    return [ln for ln in lines if any(m in ln for m in WARN_MARKERS)]


def parse_marked(text: str, marker: str) -> dict[str, str]:
    """Split output framed by '@@MARKER NAME' lines into named sections."""
    out: dict[str, str] = {}
    name: str | None = None
    buf: list[str] = []
    for line in text.splitlines():
        if line.startswith(f"@@{marker} "):
            if name is not None:
                out[name] = "\n".join(buf)
            name, buf = line.split(" ", 1)[1].strip(), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf)
    return out


def lines_after(dmesg: str, marker: str) -> list[str]:
    lines = dmesg.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            return [ln for ln in lines[i + 1:] if ln.strip()]
    return []


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def module_excerpt(name: str, max_lines: int = 14) -> str:
    """The heart of a lab module's source (its probe handler), for the notebook."""
    src = (MODULE_SOURCES / f"{MODULES[check_names([name])[0]]}.c").read_text().splitlines()
    start = next(i for i, ln in enumerate(src) if ln.startswith("static int") and "_return(" in ln)
    end = next(i for i in range(start, len(src)) if src[i] == "}")
    return "\n".join(src[start:min(end + 1, start + max_lines)])


# -- running things in the guest -----------------------------------------------------

@dataclass
class Observed:
    """A guest command's output, exit code and the kernel log lines it caused."""

    rc: int
    stdout: str
    stderr: str
    kernel_log: list[str]
    taint: int


def observe(lab: Guest, script: str, timeout: float = 60.0) -> Observed:
    """Run ``script`` and collect, in the same round trip, the kernel log lines
    after a marker and the taint value."""
    m = uuid.uuid4().hex[:12]
    wrapped = (f"echo 'labkit-cf {m}' > /dev/kmsg\n"
               f"echo '@@{m} out'; ( {script} ) 2>/tmp/labkit-cf-{m}.err; rc=$?\n"
               f"echo '@@{m} err'; cat /tmp/labkit-cf-{m}.err; rm -f /tmp/labkit-cf-{m}.err\n"
               f"echo '@@{m} rc'; echo $rc\n"
               f"echo '@@{m} taint'; cat /proc/sys/kernel/tainted\n"
               f"echo '@@{m} log'; dmesg\n")
    r = lab.sh(wrapped, timeout=timeout, check=False)
    sec = parse_marked(r.stdout, m)
    return Observed(rc=int(sec.get("rc", "").strip() or -1), stdout=sec.get("out", ""), stderr=sec.get("err", ""),
                    kernel_log=lines_after(sec.get("log", ""), f"labkit-cf {m}"),
                    taint=int(sec.get("taint", "").strip() or 0))


def ensure_script(lab: Any) -> None:
    """Upload the guest helper unless the guest already has this very version
    (/run is a tmpfs: a reset or reboot removes it)."""
    src = (Path(__file__).parent / "guest" / "counterfactual.py").read_bytes()
    have = lab.sh(f"sha256sum {SCRIPT_PATH} 2>/dev/null || true", check=False).stdout.split()
    if have and have[0] == hashlib.sha256(src).hexdigest():
        return
    lab.vm.run(["mkdir", "-p", "/run/labkit"], check=True)
    lab.vm.ssh.upload(src, SCRIPT_PATH, mode=0o755)


def tainted(lab: Guest) -> int:
    return int(lab.sh("cat /proc/sys/kernel/tainted").stdout.strip() or 0)


def modified(lab: Guest) -> list[str]:
    """What this guest's kernel had switched off since its last reset ([] for an unmodified guest)."""
    text = lab.sh(f"cat {MARKER_PATH} 2>/dev/null || true").stdout
    return [ln for ln in text.splitlines() if ln.strip()]


def loaded(lab: Guest) -> list[str]:
    text = lab.sh("cat /proc/modules").stdout
    have = {ln.split()[0] for ln in text.splitlines() if ln.strip()}
    return [n for n, mod in MODULES.items() if mod in have]


# -- switching the rules off ------------------------------------------------------------

@dataclass
class Switch:
    """One module load or unload, as the guest reported it."""

    name: str
    module: str
    action: str
    ok: bool
    output: str
    kernel_log: list[str]
    taint: int

    @property
    def taint_text(self) -> str:
        return decode_taint(self.taint)


class Counterfactual:
    """Context manager: the named rules are off inside the ``with`` block."""

    def __init__(self, lab: Guest, names: Sequence[str]) -> None:
        self.lab = lab
        self.names = check_names(names)
        self.switches: list[Switch] = []
        self.taint_before: int | None = None

    def __enter__(self) -> Counterfactual:
        self.taint_before = tainted(self.lab)
        try:
            for name in self.names:
                self.switches.append(self._load(name))
        except BaseException:
            self._unload_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unload_all()

    def _load(self, name: str) -> Switch:
        mod = MODULES[name]
        q = shlex.quote
        # The marker is written before the load (even a load that crashes the guest leaves it marked
        # modified) and taken back when the kernel refused the module.
        o = observe(self.lab, f"mkdir -p /run/labkit && echo {q(name + ' ' + mod)} $(date +%s) >> {MARKER_PATH} "
                              f"&& modprobe {q(mod)} 2>&1 || {{ rc=$?; sed -i '$ d' {MARKER_PATH}; exit $rc; }}")
        sw = Switch(name, mod, "load", o.rc == 0, o.stdout.strip(), o.kernel_log, o.taint)
        log.debug("load %s: rc=%s taint=%s log=%s", mod, o.rc, o.taint, o.kernel_log)
        if not sw.ok:
            raise ModuleLoadError(name, mod, o.stdout + o.stderr, o.kernel_log)
        return sw

    def _unload_all(self) -> None:
        for sw in reversed([s for s in self.switches if s.action == "load" and s.ok]):
            o = observe(self.lab, f"rmmod {shlex.quote(sw.module)} 2>&1")
            self.switches.append(Switch(sw.name, sw.module, "unload", o.rc == 0, o.stdout.strip(), o.kernel_log,
                                        o.taint))
            log.debug("unload %s: rc=%s", sw.module, o.rc)

    @property
    def taint(self) -> int | None:
        return self.switches[-1].taint if self.switches else self.taint_before

    def report(self) -> str:
        lines = [f"{s.action:6s} {s.module}: {'ok' if s.ok else 'FAILED ' + s.output}" for s in self.switches]
        for s in self.switches:
            lines += [f"    kernel: {ln}" for ln in s.kernel_log]
        if self.taint is not None:
            lines.append(f"/proc/sys/kernel/tainted = {self.taint}: {decode_taint(self.taint)}")
        return "\n".join(lines)


def counterfactual(lab: Guest, *names: str) -> Counterfactual:
    """``with counterfactual(lab, "no-longterm-check", "no-layout-wait"):`` the rules are off inside."""
    return Counterfactual(lab, names)


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
        return cls(kernel=data.get("kernel", "?"), modules=modules, fs=fs, hold=float(data.get("hold", 0)),
                   registered=bool(data.get("registered")), errno=data.get("errno"), errname=data.get("errname"),
                   vmpin_kb_delta=data.get("vmpin_kb_delta"), truncate_seconds=data.get("truncate_seconds"),
                   truncate_finished=data.get("truncate_finished"), deregistered_at=data.get("deregistered_at"),
                   truncate_completed=bool(data.get("truncate_completed")),
                   where=list(data.get("truncate_where", [])), kernel_log=o.kernel_log, taint=o.taint,
                   detail=data)


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
            "--hold", str(float(hold)), "--timeout", "30"]
    data, o = _run_guest(lab, argv, timeout=90 + hold)
    return HoldTruncate.from_guest(data, o, fs, loaded(lab))


def mr_lifetime_vs_truncate(lab: Any, holds: Sequence[float] = (2.0, 4.0, 8.0), fs: str = "xfs",
                            progress=None) -> list[HoldTruncate]:
    """Experiment 1 for several hold times (for a plot of truncate wait against MR lifetime)."""
    say = progress or (lambda s: None)
    out = []
    for h in holds:
        say(f"MR held {h:g} s ...")
        out.append(hold_and_truncate(lab, h, fs))
        say("  " + out[-1].verdict())
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
            "--size", str(int(size))]
    lab.sh(f"rm -f /mnt/fsdax-{fs}/cf-*.dat", check=False)
    data, o = _run_guest(lab, argv, timeout=180)
    return StaleWrite.from_guest(data, o, fs, loaded(lab))


def prepare(lab: Any) -> None:
    """DAX mounts and soft-RoCE, as the other experiments use them."""
    lab.prepare_mounts()
    lab.setup_rdma()
