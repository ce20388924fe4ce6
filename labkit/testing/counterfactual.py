"""A fake guest kernel for the counterfactual layer's unit tests: it keeps a
taint value, a module list and a kernel log, answers ``modprobe``/``rmmod`` of
the lab modules (or refuses them, like a kernel without the probed symbol),
and answers the guest helper with canned JSON. Same ``sh`` contract as
``Lab.sh``; the framing of ``counterfactual.observe`` is honoured."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from labkit.command import CommandResult

TAINT_OOT_UNSIGNED = (1 << 12) | (1 << 13)


def _helper_sha() -> str:
    return hashlib.sha256((Path(__file__).parents[1] / "lab" / "guest" / "counterfactual.py").read_bytes()).hexdigest()


@dataclass
class FakeKernelGuest:
    missing_symbol: set[str] = field(default_factory=set)     # modules whose probe target "does not exist"
    absent: set[str] = field(default_factory=set)             # modules not in the image at all
    helper_answers: list[dict] = field(default_factory=list)  # JSON lines the guest helper prints, in order
    helper_log: list[list[str]] = field(default_factory=list)  # kernel log lines each helper run causes
    taint: int = 0
    modules: list[str] = field(default_factory=list)
    marker: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    script_present: bool = True

    def sh(self, script: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        self.commands.append(script)
        m = re.search(r"echo 'labkit-cf (\w+)' > /dev/kmsg", script)
        if not m:
            return CommandResult(script, *self._plain(script), "", 0.0)
        found = re.search(r"\( (.*) \) 2>/tmp/labkit-cf-", script, re.S)
        assert found is not None, script
        inner = found.group(1)
        rc, out, klog = self._inner(inner)
        mk = m.group(1)
        text = (f"@@{mk} out\n{out}\n@@{mk} err\n\n@@{mk} rc\n{rc}\n@@{mk} taint\n{self.taint}\n"
                f"@@{mk} log\n[  1.0] old line\n[  2.0] labkit-cf {mk}\n" + "".join(f"{ln}\n" for ln in klog))
        return CommandResult(script, 0, text, "", 0.0)

    def _plain(self, script: str) -> tuple[int, str]:
        if script.startswith("cat /proc/sys/kernel/tainted"):
            return 0, f"{self.taint}\n"
        if script.startswith("cat /proc/modules"):
            return 0, "".join(f"{m} 16384 0 - Live 0x0 (OE)\n" for m in self.modules) + "nd_pmem 1 0 - Live 0x0\n"
        if script.startswith("cat /run/labkit/modified"):
            return 0, "".join(f"{ln}\n" for ln in self.marker)
        if script.startswith("sha256sum /run/labkit/counterfactual.py"):
            return 0, (_helper_sha() + "  /run/labkit/counterfactual.py\n") if self.script_present else ""
        return 0, ""

    def _inner(self, inner: str) -> tuple[int, str, list[str]]:
        if "modprobe" in inner:
            mod = _group(r"modprobe (\w+)", inner)
            name = _group(r"echo '?([\w-]+) ", inner)
            self.marker.append(f"{name} {mod} 1")
            if mod in self.absent or mod in self.missing_symbol:
                self.marker.pop()       # the helper takes the line back when modprobe fails
            if mod in self.absent:
                return 1, f"modprobe: FATAL: Module {mod} not found in directory /lib/modules/x", []
            if mod in self.missing_symbol:
                return 1, f"modprobe: ERROR: could not insert '{mod}': No such file or directory", [
                    f"[  3.0] {mod}: cannot probe check_vma_flags on this kernel (error -2)"]
            self.modules.append(mod)
            self.taint |= TAINT_OOT_UNSIGNED
            return 0, "", [f"[  3.0] {mod}: loading out-of-tree module taints kernel.", f"[  3.1] {mod}: loaded"]
        if "rmmod" in inner:
            mod = _group(r"rmmod (\w+)", inner)
            if mod not in self.modules:
                return 1, f"rmmod: ERROR: Module {mod} is not currently loaded", []
            self.modules.remove(mod)
            return 0, "", [f"[  9.0] {mod}: unloaded"]
        if "counterfactual.py" in inner:
            data = self.helper_answers.pop(0) if self.helper_answers else {"error": "no answer"}
            klog = self.helper_log.pop(0) if self.helper_log else []
            return 0, json.dumps(data), klog
        return 0, "", []


def _group(pattern: str, text: str) -> str:
    """The first group of ``pattern`` in ``text`` (the fake only sees commands the lab builds)."""
    m = re.search(pattern, text)
    if m is None:
        raise AssertionError(f"the fake kernel did not expect {text!r}")
    return m.group(1)
