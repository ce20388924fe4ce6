"""The code exercise the kernel judges: a learner writes a kretprobe line; it
is installed under the course's own event name, an fs-dax registration (the
kernel refuses) and an anonymous one (it allows) run, and the check looks at
what the learner's probe recorded during each. Only a return probe of the
form ``r[:NAME] FUNCTION $retval[:TYPE]`` is accepted, and it reaches the
guest as a quoted argument, never as shell text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labkit.course.exercises import Live

Result = tuple[bool, str]

PROBE_GROUP = "labkit_learner"
TRACING = "/sys/kernel/tracing"
# $1: the event definition, $2: the group; both arrive as arguments, not as shell text.
INSTALL = ('cd /sys/kernel/tracing && { echo "-:$2/ex_probe" >> kprobe_events; } 2>/dev/null; '
           'echo "$1" >> kprobe_events && echo 1 > "events/$2/ex_probe/enable"')
REMOVE = ('cd /sys/kernel/tracing && echo 0 > "events/$1/ex_probe/enable"; '
          'echo "-:$1/ex_probe" >> kprobe_events; exit 0')
_PROBE_RE = re.compile(r"^\s*r(?:\d{1,4})?(?::(?:[A-Za-z_]\w{0,31}/)?[A-Za-z_]\w{0,31})?\s+"
                       r"(?P<symbol>[A-Za-z_][\w.]{0,63})(?:\+0)?"
                       r"(?P<args>(?:\s+(?:[A-Za-z_]\w{0,31}=)?\$retval(?::(?:[su](?:8|16|32|64)|x(?:8|16|32|64)))?){1,4})"
                       r"\s*$")


def parse_probe(definition: Any) -> tuple[str, list[str]] | None:
    """A learner's kretprobe line -> (symbol, fetch args), or None when it is
    not a return probe fetching ``$retval``. Only that shape is accepted, so
    nothing else the learner types reaches the guest's tracefs; the event is
    always created under the course's own group and name."""
    if not isinstance(definition, str) or "\n" in definition:
        return None
    m = _PROBE_RE.match(definition)
    if not m:
        return None
    args = m.group("args").split()
    return m.group("symbol"), [f"v{i}={a.split('=')[-1]}" for i, a in enumerate(args)]


def _signed(value: int) -> int:
    for bits in (32, 64):
        if 2 ** (bits - 1) <= value < 2 ** bits:
            return value - 2 ** bits
    return value


def probe_values(trace: str) -> list[int]:
    """The fetched values of the course's event in a tracefs ``trace`` text,
    each read as a signed number (s32, u32, x64 ... print it differently)."""
    out = []
    for line in trace.splitlines():
        if f"{PROBE_GROUP}:" not in line and " ex_probe:" not in line:
            continue
        for raw in re.findall(r"\bv\d=(\S+)", line):
            try:
                out.append(_signed(int(raw, 0)))
            except ValueError:
                pass
    return out


@dataclass
class ProbeRun:
    accepted: bool
    problem: str = ""
    refused_values: list[int] = field(default_factory=list)   # during the fs-dax registration
    allowed_values: list[int] = field(default_factory=list)   # during the anonymous one
    refused_errno: int | None = None


def run_learner_probe(lab, definition: str) -> ProbeRun:
    """Install the learner's probe (as labkit_learner/ex_probe), register
    fs-dax memory (the kernel refuses) and anonymous memory (it allows),
    collect what the probe recorded during each, and remove the probe."""
    parsed = parse_probe(definition)
    if parsed is None:
        return ProbeRun(False, "not a return probe of the form  r[:NAME] FUNCTION $retval[:TYPE]")
    symbol, args = parsed
    event = f"r:{PROBE_GROUP}/ex_probe {symbol} {' '.join(args)}"
    add = lab.vm.run(["sh", "-c", INSTALL, "install", event, PROBE_GROUP], timeout=30)
    if add.rc != 0:
        return ProbeRun(False, "the kernel did not accept that probe (is the function probe-able?)")
    try:
        runs = {}
        for memory in ("fsdax-xfs", "anon"):
            res = lab.pin("rdma", memory)
            trace = lab.vm.run(["cat", f"{TRACING}/trace"], timeout=30).stdout
            runs[memory] = (res, probe_values(trace))
    finally:
        lab.vm.run(["sh", "-c", REMOVE, "remove", PROBE_GROUP], timeout=30)
    refused, allowed = runs["fsdax-xfs"], runs["anon"]
    return ProbeRun(True, "", refused[1], allowed[1], None if refused[0].ok else refused[0].errno)


def check_probe(answer: Any, live: Live) -> Result:
    """Right when the learner's probe, during the refused fs-dax registration,
    recorded the kernel's errno as a negative return value, and did not record
    it during the allowed anonymous registration."""
    if parse_probe(answer) is None:
        return False, "write one return probe line:  r FUNCTION $retval:s32"
    run = live.learner_probe(answer)
    if not run.accepted:
        return False, run.problem
    if run.refused_errno is None:
        return False, "the fs-dax registration was not refused just now"
    bad = -run.refused_errno
    if bad not in run.refused_values:
        return False, "your probe did not catch the refusal"
    if bad in run.allowed_values:
        return False, "your probe also fires with that error when nothing is refused"
    return True, ""
