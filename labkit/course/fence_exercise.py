"""Exercise 8.2, judged by a 7.3 kernel: a learner's kretprobe line that
shows the second fence. With module 1 loaded, ``check_vma_flags()`` lets a
long-term pin of fs-dax memory through, yet the registration never returns:
some function answers, again and again, the value that sends
``__gup_longterm_locked()`` round once more. The learner names a probe that
catches that answer.

The judge installs the probe (only the shape ``probe_exercise`` accepts,
under the course's own event name), runs one fs-dax registration with module
1 loaded and one anonymous registration without it on the 7.3 guest (the
learner's own when it runs 7.3, else its "fences" companion), and compares
what the probe recorded with what the kernel's own counters
(``labkit.lab.counterfactual.fences``) say the loop's answer was. The guest is
reset afterwards, so no taint is left behind. No errno is written here: the
loop's answer is read from the live kernel."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.course.probe_exercise import INSTALL, PROBE_GROUP, REMOVE, TRACING, parse_probe

if TYPE_CHECKING:
    from labkit.course.exercises import Live

Result = tuple[bool, str]
LOOP_FUNCTION = "migrate_longterm_unpinnable_folios"     # the kernel's own counter of the loop's answer


@dataclass
class FenceProbeRun:
    accepted: bool
    problem: str = ""
    looped: bool = False                                      # the registration did not return: the loop ran
    loop_answers: set[int] = field(default_factory=set)      # negative values the loop's function returned
    fsdax_values: list[int] = field(default_factory=list)    # what the learner's probe saw meanwhile
    anon_values: list[int] = field(default_factory=list)     # ... and during an anonymous registration


# The learner's event counts its first fetched value in a hist trigger, not in the trace buffer:
# removing the fence trace's own probes resets the trace buffer, a hist map survives it.
# $1: the group; $2: "on" (a fresh, empty count) or "off".
HIST = ('t="/sys/kernel/tracing/events/$1/ex_probe/trigger"; echo "!hist:keys=v0" >> "$t" 2>/dev/null; '
        'if [ "$2" = on ]; then echo "hist:keys=v0" >> "$t"; fi')
_HIST_ROW = re.compile(r"\{\s*v0:\s*(-?\d+)\s*\}\s*hitcount:\s*(\d+)")


def _signed(value: int) -> int:
    for bits in (32, 64):
        if 2 ** (bits - 1) <= value < 2 ** bits:
            return value - 2 ** bits
    return value


def _hist(lab: Any, on: bool) -> None:
    lab.vm.run(["sh", "-c", HIST, "hist", PROBE_GROUP, "on" if on else "off"], timeout=30)


def _hist_values(lab: Any, limit: int = 64) -> list[int]:
    """The values the learner's probe counted (each repeated up to ``limit`` times)."""
    text = lab.vm.run(["cat", f"{TRACING}/events/{PROBE_GROUP}/ex_probe/hist"], timeout=30).stdout
    return [_signed(int(v)) for v, n in _HIST_ROW.findall(text) for _ in range(min(int(n), limit))]


def _measure(lab73: Any, definition: str) -> FenceProbeRun:
    from labkit.lab.counterfactual import counterfactual, fence_trace

    symbol, args = parse_probe(definition) or ("", [])
    event = f"r:{PROBE_GROUP}/ex_probe {symbol} {' '.join(args)}"
    if lab73.vm.run(["sh", "-c", INSTALL, "install", event, PROBE_GROUP], timeout=30).rc != 0:
        return FenceProbeRun(False, "the kernel did not accept that probe (is the function probe-able?)")
    try:
        _hist(lab73, True)
        with counterfactual(lab73, "no-longterm-check"):
            ft = fence_trace(lab73, seconds=2.0)
        fsdax = _hist_values(lab73)
        _hist(lab73, True)
        lab73.pin("rdma", "anon")
        anon = _hist_values(lab73)
    finally:
        _hist(lab73, False)
        lab73.vm.run(["sh", "-c", REMOVE, "remove", PROBE_GROUP], timeout=30)
    answers = {v for v in ft.counts.get(LOOP_FUNCTION, {}) if v < 0}
    return FenceProbeRun(True, "", not ft.completed and ft.second_fence, answers, fsdax, anon)


def run_fence_probe(lab: Any, definition: str) -> FenceProbeRun:
    """The learner's probe around the second fence, on a 7.3 guest; that guest is
    reset afterwards (a companion is stopped)."""
    from labkit.lab.counterfactual import fence_lab

    if parse_probe(definition) is None:
        return FenceProbeRun(False, "not a return probe of the form  r[:NAME] FUNCTION $retval[:TYPE]")
    lab73, is_companion = fence_lab(lab)
    try:
        return _measure(lab73, definition)
    finally:
        if is_companion:
            lab73.vm.stop()
        else:
            lab73.vm.reset()


def check_fence_probe(answer: Any, live: Live) -> Result:
    """Right when the learner's probe recorded, more than once, the negative answer the
    kernel's own counters say sent GUP round again, and never during an ordinary
    anonymous registration."""
    if parse_probe(answer) is None:
        return False, "write one return probe line:  r FUNCTION $retval:s32"
    run = live.fence_probe(answer)
    if not run.accepted:
        return False, run.problem
    if not run.looped or not run.loop_answers:
        return False, "the 7.3 guest did not show the second fence just now (try again)"
    caught = [v for v in run.fsdax_values if v in run.loop_answers]
    if len(caught) < 2:
        return False, "your probe did not catch the answer that sends GUP round again"
    if any(v in run.loop_answers for v in run.anon_values):
        return False, "your probe also records that answer when nothing goes round"
    return True, ""
