"""Kernel log and kprobe tracing around a guest command: a kretprobe on
``check_vma_flags`` (where long-term pins of fs-dax memory are refused) and
the kernel log lines after a marker written to /dev/kmsg, collected in one
SSH round trip.

The guest shell scripts here are constants; every value reaches them as a
positional argument (``"$1"``, ``"$@"``), never pasted into the script text.
"""

from __future__ import annotations

import logging
import re
import shlex
import uuid
from collections.abc import Sequence

from labkit.command import CommandResult
from labkit.lab.protocols import Machine
from labkit.lab.results import KPROBE, Observation

log = logging.getLogger(__name__)

# $1 = probe name. A kretprobe on check_vma_flags recording its return value.
KPROBE_SCRIPT = """cd /sys/kernel/tracing || exit 1
grep -q "kprobes/$1 " kprobe_events || echo "r:$1 check_vma_flags ret=\\$retval:s32" >> kprobe_events || exit 1
echo 1 > "events/kprobes/$1/enable" && echo 1 > tracing_on"""

# $1 = marker, then the command's argv. Prints sections framed by "@@MARKER NAME".
OBSERVE_SCRIPT = """m=$1; shift
echo "labkit-mark $m" > /dev/kmsg; : > /sys/kernel/tracing/trace
err=$(mktemp)
echo "@@$m out"; "$@" 2>"$err"; rc=$?
echo "@@$m err"; cat "$err"; rm -f "$err"
echo "@@$m rc"; echo $rc
echo "@@$m log"; dmesg
echo "@@$m trace"; cat /sys/kernel/tracing/trace"""


def parse_sections(text: str, marker: str) -> dict[str, str]:
    """Split output framed by '@@<marker> NAME' lines into sections."""
    out: dict[str, str] = {}
    name = None
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


def log_after_marker(dmesg: str, marker: str) -> list[str]:
    """The non-empty kernel log lines after the last line containing ``marker``."""
    lines = dmesg.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            return [ln for ln in lines[i + 1:] if ln.strip()]
    return [ln for ln in lines if ln.strip()][-20:]


def refusal_lines(trace: str) -> list[str]:
    """kretprobe lines of check_vma_flags that returned an error."""
    return [ln.strip() for ln in trace.splitlines()
            if "check_vma_flags" in ln and not re.search(r"ret=0\b", ln)]


class Tracer:
    """The kprobe, set up once per guest, and observed command runs."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self._kprobe = False

    def ensure_kprobe(self) -> None:
        """Install and enable the check_vma_flags kretprobe (idempotent)."""
        if self._kprobe:
            return
        log.debug("installing kretprobe %s on check_vma_flags", KPROBE)
        self.vm.run(["sh", "-c", KPROBE_SCRIPT, "sh", KPROBE], check=True)
        self._kprobe = True

    def observe(self, command: Sequence[str] | str, timeout: float = 60.0) -> Observation:
        """Run ``command`` (an argument list; a str is a shell script on purpose)
        and collect the kernel log lines and check_vma_flags refusals it
        caused (one SSH round trip)."""
        self.ensure_kprobe()
        argv = ["sh", "-c", command] if isinstance(command, str) else [str(a) for a in command]
        marker = uuid.uuid4().hex[:12]
        log.debug("observe %s: %s", marker, shlex.join(argv))
        r = self.vm.run(["sh", "-c", OBSERVE_SCRIPT, "sh", marker, *argv], timeout=timeout)
        sec = parse_sections(r.stdout, marker)
        rc = int(sec.get("rc", "-1").strip() or -1)
        result = CommandResult(shlex.join(argv), rc, sec.get("out", ""), sec.get("err", ""), r.seconds)
        return Observation(result, marker, log_after_marker(sec.get("log", ""), f"labkit-mark {marker}"),
                           refusal_lines(sec.get("trace", "")))
