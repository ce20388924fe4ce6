"""Switching the rules off: the two modules, loading and unloading them
(``counterfactual(lab, ...)``), the taint and "modified" marker, and the
pure helpers the experiments share (kernel log sections, WARN lines)."""


from __future__ import annotations

import hashlib
import logging
import shlex
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from labkit.errors import ConfigError, LabError
from labkit.lab.guest import files as guest_files
from labkit.lab.guest.vocab import FILESYSTEMS
from labkit.lab.helper import last_json
from labkit.lab.tracing import parse_sections

log = logging.getLogger(__name__)

MODULES: dict[str, str] = {
    "no-longterm-check": "labkit_no_longterm_check",
    "no-layout-wait": "labkit_no_layout_wait",
}
SCRIPT_PATH = "/run/labkit/counterfactual.py"
MARKER_PATH = "/run/labkit/modified"
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


def lines_after(dmesg: str, marker: str) -> list[str]:
    lines = dmesg.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            return [ln for ln in lines[i + 1:] if ln.strip()]
    return []


def module_excerpt(name: str, max_lines: int = 14) -> str:
    """The heart of a lab module's source (its probe handler), for the notebook."""
    src = guest_files.module_source(MODULES[check_names([name])[0]]).splitlines()
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
    sec = parse_sections(r.stdout, m)
    return Observed(rc=int(sec.get("rc", "").strip() or -1), stdout=sec.get("out", ""), stderr=sec.get("err", ""),
                    kernel_log=lines_after(sec.get("log", ""), f"labkit-cf {m}"),
                    taint=int(sec.get("taint", "").strip() or 0))


def ensure_script(lab: Any) -> None:
    """Upload the guest helper unless the guest already has this very version
    (/run is a tmpfs: a reset or reboot removes it)."""
    src = guest_files.counterfactual_script()
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


__all__ = ["Counterfactual", "FILESYSTEMS", "Guest", "LabError", "MARKER_PATH", "MAX_HOLD", "MODULES", "ModuleLoadError", "Observed", "SCRIPT_PATH", "Switch", "TAINT_FLAGS", "WARN_MARKERS", "check_names", "counterfactual", "decode_taint", "ensure_script", "kernel_problems", "last_json", "lines_after", "loaded", "modified", "module_excerpt", "observe", "tainted"]
