"""Exercise 6.5, a code exercise the kernel judges: the learner writes
``def hold(m)`` that takes references on the pages of ``m`` (a MAP_SHARED
mapping of a file on the fs-dax XFS mount) which a truncate of the file must
wait for, and returns a function that drops them. The source reaches the
guest on the helper's stdin (never as shell text); the guest helper
(``pinprobe learner-hold``) runs it in a process of its own as an unprivileged uid,
truncates the file itself, has the learner's process call the release
function, and reports what it read of the truncate from outside: whether it
waited, whether its kernel stack was the filesystem's wait for the pages
(not a stop, a trace or another sleep), and whether it finished after the
release while the learner's process still ran. The check judges what the
kernel did, never what the learner's process printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.course import learner_code
from labkit.course.learner_code import TIME_UP

if TYPE_CHECKING:
    from labkit.course.exercises import Live

Result = tuple[bool, str]

MEMORY = "fsdax-xfs"
HOLD_S = 2.0          # the truncate runs this long before the learner's release is called
AFTER_S = 10.0        # and may take this long after it


@dataclass
class HoldRun:
    """What the guest reported for one run of the learner's ``hold``."""

    blocked: bool = False                # the truncate had not finished HOLD_S after it started
    layout_wait: bool = False            # ... and its kernel stack showed it waiting for the file's pages
    stopped: bool = False                # it was seen stopped (SIGSTOP) or
    traced: bool = False                 # traced (ptrace) while the references were held
    learner_exited: bool = False         # the learner's process ended before the judge had seen it through
    completed: bool = False              # it finished, successfully, after the release
    seconds_after_release: float | None = None
    where: list[str] = field(default_factory=list)    # functions the truncating process slept in
    stage: str | None = None             # where the learner's code failed: define, call, release
    exception: str | None = None
    line: int | None = None
    problem: str | None = None
    truncate_error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the notebook: what the truncate did around the learner's references."""
        if self.exception and self.stage != "release":
            where = f" (line {self.line})" if self.line else ""
            return f"your hold() raised{where}: {self.exception}"
        if self.problem:
            return f"nothing was truncated: {PROBLEMS.get(self.problem, self.problem)}"
        if self.learner_exited:
            return "your code's process ended while the truncate was being watched"
        waited = (f"truncate waited (asleep in {', '.join(self.where[:3])})" if self.blocked and self.where
                  else "truncate waited" if self.blocked else "truncate did not wait")
        if self.exception:
            return f"{waited}; your release function raised: {self.exception}"
        if self.completed:
            return f"{waited}; it finished {self.seconds_after_release:.2f} s after your release"
        if self.truncate_error:
            return f"{waited}; truncate failed: {self.truncate_error.strip()}"
        return f"{waited}; it was still waiting {AFTER_S:.0f} s after your release (then stopped by the lab)"


def source_problem(answer: Any) -> str | None:
    """Why ``answer`` cannot be run at all (checked on the host, never executed here), or None."""
    return learner_code.source_problem(answer, "hold(m)")


def from_report(data: dict[str, Any] | None) -> HoldRun:
    """The guest helper's JSON answer as a HoldRun."""
    if not data or "error" in data:
        return HoldRun(problem="no_answer",
                       exception=(data or {}).get("error") or "the process ended without an answer")
    return HoldRun(bool(data.get("blocked")), bool(data.get("layout_wait")), bool(data.get("stopped")),
                   bool(data.get("traced")), bool(data.get("learner_exited")), bool(data.get("completed")),
                   data.get("seconds_after_release"), list(data.get("where") or []),
                   data.get("stage") if data.get("exception") else None, data.get("exception"), data.get("line"),
                   data.get("problem"), data.get("truncate_error"), data)


def run_learner_hold(lab: Any, source: str, timeout: float = 20.0) -> HoldRun:
    """Run the learner's ``hold`` in the guest on the lab's fs-dax XFS file,
    truncate the file, release, and report what the truncate did."""
    return from_report(learner_code.run_in_guest(lab, "learner-hold", MEMORY, "ex6-5", source, timeout,
                                                 "--hold", str(HOLD_S), "--after", str(AFTER_S),
                                                 wait=timeout + HOLD_S + AFTER_S + 60))


PROBLEMS = {
    "not_callable": "hold(m) must return a function (called with no arguments) that drops the references",
    "no_answer": "your code ended the process before the truncate could be watched",
}
ENDED = ("your code's process ended while the truncate was being watched: a process that ends drops every "
         "reference it held, so nothing was shown to hold them")


def check_hold(answer: Any, live: Live) -> Result:
    """Right when the truncate waited while the learner's references were held
    and finished after their release function ran."""
    problem = source_problem(answer)
    if problem:
        return False, problem
    run = live.learner_hold(answer)
    if run.exception == TIME_UP:
        return False, "your code did not return within the time limit"
    if run.exception and run.stage != "release" and run.problem != "no_answer":
        where = f" on line {run.line}" if run.line else ""
        return False, f"your hold() raised{where}: {run.exception}"
    if run.problem:
        return False, PROBLEMS.get(run.problem, run.problem)
    if run.learner_exited:
        return False, ENDED
    if not run.blocked:
        return False, ("truncate did not wait: when it ran, nothing held a reference to the file's pages "
                       "(a copy of the data, or a reference already dropped, is nothing to wait for)")
    if run.stopped or run.traced or not run.layout_wait:
        how = "it was traced" if run.traced else "it was stopped" if run.stopped else \
            f"it slept in {', '.join(run.where[:3]) or 'an unknown place'}"
        return False, (f"truncate was held up, but not waiting for the file's pages ({how}): only the "
                       "filesystem's wait for references to its pages counts")
    if run.exception:
        return False, f"truncate waited, but your release function raised: {run.exception}"
    if not run.completed:
        if run.truncate_error:
            return False, f"truncate waited, then failed: {run.truncate_error.strip()}"
        return False, (f"truncate was still waiting {AFTER_S:.0f} s after your release function ran: "
                       "it did not drop the references")
    return True, ""


def try_hold(lab: Any, answer: Any) -> str:
    """Run the learner's ``hold`` in the guest the way the check does and say
    what the truncate did (for the notebook; grading is ``labkit check``)."""
    if answer is Ellipsis:
        return "write your code into my_code first"
    problem = source_problem(answer)
    return problem if problem else run_learner_hold(lab, answer).summary()
