"""The one judge of every grading path: ``labkit check``
(:mod:`labkit.course.grading`), ``labkit course grade``
(:mod:`labkit.course.summative`) and the nbgrader autograde cells
(:mod:`labkit.course.autograde`) all call :func:`judge` and get
:class:`ExerciseResult` rows back.

What differs between them is said in arguments, not in a second copy:

* ``live``: the measurements the checks share (one :class:`Live` per call by
  default; the autograde cells of one notebook share theirs).
* ``contain``: the summative grader's policy. A guest that fails, hangs or
  runs out of ``deadline`` turns the answers that need it into "not graded:
  why" rows instead of an exception, ``broken`` says the guest was unusable
  before the first check, and ``guard()`` (after each code exercise, which
  runs the learner's code in the guest, in a process of its own under an
  unprivileged uid, the verdict read from the kernel) refuses that result
  and every later one when it names a problem. Without it (``labkit check``, nbgrader)
  a guest failure is raised: the learner sees the error, not a zero.

Messages never show the expected value; explanations are recorded for the
instructor, predictions count for completion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import LabError
from labkit.timeout import Deadline


@dataclass
class ExerciseResult:
    """One exercise's result (``labkit check --json`` shows it as it is; the
    gradebook as :meth:`gradebook_json`)."""

    id: str
    title: str
    points: int
    max: int
    passed: bool
    message: str

    def gradebook_json(self) -> dict[str, Any]:
        """The row of a student's JSON and the CSV (``labkit-grades/1``: the message is its ``feedback``)."""
        return {"id": self.id, "title": self.title, "points": self.points, "max": self.max,
                "feedback": self.message}


@dataclass
class Verdict:
    """The results of :func:`judge`, in the order of the exercises given, and
    why the guest could not be believed for the answers that needed it ("" if it could)."""

    results: list[ExerciseResult] = field(default_factory=list)
    problem: str = ""


def answered(ans: dict | None) -> bool:
    """Whether a payload (see :mod:`labkit.course.payload`) holds an answer to judge."""
    return ans is not None and not ans.get("blank") and not ans.get("not_run") and "invalid" not in ans


def judge(exercises: list, given: dict[str, dict], lab: Any = None, *, live: Any = None, contain: bool = False,
          broken: str = "", guard: Callable[[], str] | None = None,
          deadline: Deadline | None = None) -> Verdict:
    """Each exercise's result for the answers ``given`` (exercise id ->
    payload), measured on ``lab`` (or ``live``'s lab; None: no guest). The
    checks that run the learner's code in the guest come last."""
    if live is None:
        from labkit.course.exercises import Live
        live = Live(lab)
        live.wanted = {n for e in exercises if answered(given.get(e.id)) for n in e.needs}
    needs_guest = any(e.guest and answered(given.get(e.id)) for e in exercises)
    if contain and not broken:
        if live.lab is None:
            broken = "no guest was started to judge it"
        elif needs_guest:
            broken = _no_answer(live.lab, deadline)
    out: dict[str, ExerciseResult] = {}
    for ex in sorted(exercises, key=lambda e: e.kind == "code"):     # learner code last: it runs there
        out[ex.id], broken = _judge_one(ex, given.get(ex.id), live, contain, broken, guard, deadline)
    return Verdict([out[e.id] for e in exercises], broken if broken and needs_guest else "")


def _judge_one(ex: Any, ans: dict | None, live: Any, contain: bool, broken: str,
               guard: Callable[[], str] | None, deadline: Deadline | None) -> tuple[ExerciseResult, str]:
    """One exercise's result and what is broken from now on."""
    if broken and ex.guest and answered(ans):
        return _not_graded(ex, broken), broken
    if not contain:
        return _result(ex, ans, live), broken
    try:
        r = _result(ex, ans, live)
        problem = guard() if guard is not None and ex.kind == "code" and answered(ans) else ""
    except LabError as exc:
        problem = _failure(exc, deadline)
    if not problem:
        return r, broken
    broken = problem if deadline is None or not deadline.expired else _time_up(deadline.seconds)
    if ex.kind == "code" and not broken.startswith(("the guest", "the notebook's time")):
        broken = f"while your code ran in the judging guest, {broken}: its answers are not believed"
    return _not_graded(ex, broken), broken


def _not_graded(ex: Any, why: str) -> ExerciseResult:
    return ExerciseResult(ex.id, ex.title, 0, ex.points, False, f"not graded: {why}")


def _result(ex: Any, ans: dict | None, live: Any) -> ExerciseResult:
    """The result for a payload: a missing, unrun, blank or unreadable answer
    says so; an answer is checked."""
    def zero(message: str) -> ExerciseResult:
        return ExerciseResult(ex.id, ex.title, 0, ex.points, False, message)
    if ans is None:
        return zero(f"exercise cell tagged {ex.id} not found in the notebook")
    if ans.get("not_run"):
        return zero("no recorded answer: run the cell (it ends with record(...)) and "
                    "save the notebook, or write answer = <a literal value>")
    if ans.get("blank"):
        return zero("not answered yet (answer is still ...)")
    if "invalid" in ans:
        return zero(f"{ans['invalid']}: give a name, a number, a short list or a few sentences")
    return check_answer(ex, ans["value"], live)


def check_answer(ex: Any, value: Any, live: Any) -> ExerciseResult:
    """The exercise's check on one answer value (the step :func:`judge` takes
    for each answered exercise). The message says right or wrong (with the
    first hint), never the expected value."""
    try:
        ok, why = ex.check(value, live)
    except LabError:
        raise
    except Exception as exc:   # a malformed answer must fail its check, not the grader
        ok, why = False, f"that answer could not be read ({type(exc).__name__})"
    if ex.kind == "explain":
        msg = (f"recorded for your instructor (graded by hand, {ex.manual_points} points)" if ok
               else ex.feedback(False, why))
    elif ex.kind == "prediction":
        msg = "prediction recorded (completion counts, not correctness)" if ok else ex.feedback(False, why)
    else:
        msg = ex.feedback(ok, why)
    return ExerciseResult(ex.id, ex.title, ex.points if ok else 0, ex.points, ok, msg)


def _no_answer(lab: Any, deadline: Deadline | None) -> str:
    try:
        lab.sh("true")
        return ""
    except LabError as exc:
        return _failure(exc, deadline, "the guest did not answer")


def _failure(exc: LabError, deadline: Deadline | None, what: str = "the guest failed during the checks") -> str:
    from labkit.course.judging import OutputTooLarge, TimeUp  # the judging guest's errors (loads the channels)
    if isinstance(exc, TimeUp) or (deadline is not None and deadline.expired):
        return _time_up(deadline.seconds if deadline else 0)
    if isinstance(exc, OutputTooLarge):
        return f"{exc}"
    return f"{what} ({type(exc).__name__}: {str(exc)[:300]})"


def _time_up(seconds: float) -> str:
    from labkit.course.judging import TimeUp
    return str(TimeUp(seconds))
