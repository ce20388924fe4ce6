"""Kernel log and kprobe tracing around a guest command: kretprobes on the
functions that refuse a long-term pin of fs-dax memory on the guest's kernel
(``check_vma_flags`` since v5.11; ``__gup_longterm_locked`` and
``get_vaddr_frames`` before), and the kernel log lines after a marker written
to /dev/kmsg, collected in one SSH round trip.

Which function refuses is the one per-kernel fact here: ``REFUSAL_SITES``, one
row per site with the releases that have it. The tracer reads the guest's
``uname -r``, takes the rows of that release, and the guest checks that each
function is a probe-able symbol of its kernel before the probe goes in.

The guest shell scripts here are constants; every value reaches them as a
positional argument (``"$1"``, ``"$@"``), never pasted into the script text.
"""

from __future__ import annotations

import logging
import re
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from labkit.command import CommandResult
from labkit.errors import ConfigError, LabError
from labkit.lab.protocols import Machine
from labkit.lab.results import KPROBE, Observation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefusalSite:
    """A function whose return value is the fs-dax long-term refusal, on the
    releases ``since`` <= release < ``until`` (``until`` None: still there)."""

    function: str
    since: tuple[int, int]
    until: tuple[int, int] | None
    test: str               # the fs-dax test in the function's source (a regex of its line)


# Newest first (the commits are in labkit/course/facts.py). v5.11 (52650c8b466b)
# moved the GUP test into check_vma_flags(); before it, __gup_longterm_locked()
# (v5.2, 932f4a630a69) refused after the pin through check_dax_vmas(), which is
# inlined on 5.10 (as check_vma_flags is: neither has a symbol to probe there).
# get_vaddr_frames() (V4L2 USERPTR's frame vector) tested vma_is_fsdax() itself
# (v4.15, b7f0554a56f2) until v5.12's 04769cb1c45a made it a FOLL_LONGTERM pin
# that GUP refuses.
REFUSAL_SITES: tuple[RefusalSite, ...] = (
    RefusalSite("check_vma_flags", (5, 11), None, r"FOLL_LONGTERM\)\s*&&\s*vma_is_fsdax\(vma\)"),
    RefusalSite("__gup_longterm_locked", (5, 2), (5, 11), r"if \(check_dax_vmas\("),
    RefusalSite("get_vaddr_frames", (4, 15), (5, 12), r"if \(vma_is_fsdax\(vma\)\)"),
)


def release_version(release: str) -> tuple[int, int]:
    """'5.10.0-46-amd64' -> (5, 10)."""
    m = re.match(r"(\d+)\.(\d+)", release.strip())
    if not m:
        raise LabError(f"cannot read a kernel version from {release!r}")
    return int(m.group(1)), int(m.group(2))


def refusal_sites(release: str) -> tuple[RefusalSite, ...]:
    """The sites that refuse on a kernel of this ``uname -r``."""
    v = release_version(release)
    return tuple(s for s in REFUSAL_SITES if s.since <= v and (s.until is None or v < s.until))


def refusing_functions(release: str) -> tuple[str, ...]:
    """The functions to put a kretprobe on for a kernel of this ``uname -r``."""
    return tuple(s.function for s in refusal_sites(release))


def probe_names(count: int) -> list[str]:
    """``labkit_cvf`` for the first probe, ``labkit_cvf_1`` ... for the others."""
    return [KPROBE if i == 0 else f"{KPROBE}_{i}" for i in range(count)]


# $@ = pairs of probe name and function. A kretprobe per function recording its
# return value; a function missing from the kernel's symbols stops with a message.
KPROBE_SCRIPT = """cd /sys/kernel/tracing || exit 1
while [ $# -ge 2 ]; do
  if ! grep -q "kprobes/$1 " kprobe_events; then
    grep -q " $2\\$" /proc/kallsyms || { echo "no symbol $2 to probe in this kernel" >&2; exit 3; }
    echo "r:$1 $2 ret=\\$retval:s32" >> kprobe_events || exit 1
  fi
  echo 1 > "events/kprobes/$1/enable" || exit 1
  shift 2
done
echo 1 > tracing_on"""

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
    """The lab's kretprobe lines whose function returned an error (a negative
    value: __gup_longterm_locked returns the number of pages it pinned)."""
    return [ln.strip() for ln in trace.splitlines()
            if KPROBE in ln and re.search(r"ret=-\d+", ln)]


class Tracer:
    """The kprobe, set up once per guest, and observed command runs."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.functions: tuple[str, ...] = ()
        self._release = ""

    def release(self) -> str:
        """The guest kernel's ``uname -r`` (asked once)."""
        if not self._release:
            self._release = self.vm.run(["uname", "-r"], check=True).stdout.strip()
        return self._release

    def kernel_version(self) -> tuple[int, int]:
        return release_version(self.release())

    def ensure_kprobe(self) -> None:
        """Install and enable a kretprobe on each function that refuses on the
        guest's kernel (``REFUSAL_SITES``; idempotent)."""
        if self.functions:
            return
        release = self.release()
        functions = refusing_functions(release)
        if not functions:
            raise ConfigError(f"no known refusal site for kernel {release}",
                           hint="add a row for it to REFUSAL_SITES in labkit/lab/tracing.py")
        pairs = [a for pair in zip(probe_names(len(functions)), functions) for a in pair]
        log.debug("installing kretprobes on %s (%s)", ", ".join(functions), release)
        self.vm.run(["sh", "-c", KPROBE_SCRIPT, "sh", *pairs], check=True)
        self.functions = functions

    def observe(self, command: Sequence[str] | str, timeout: float = 60.0) -> Observation:
        """Run ``command`` (an argument list; a str is a shell script on purpose)
        and collect the kernel log lines and the refusals traced while it
        ran (one SSH round trip)."""
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
