"""Exercise 6.5 (make truncate wait, then let it finish). Without a guest:
the real guest-side judge (pinprobe.learner_hold.judge) runs the learner's
code on the host over an ordinary file, where a truncate never waits, so the
failures that do not need DAX are judged for real; the verdicts on a truncate
that waited are tested from reports shaped like the guest's. On a live 6.1
guest the kernel judges: the reference passes, doing nothing fails, never
releasing fails, and a long-term pin (register_mr) is refused by the kernel.
On 7.3 (fs-dax page refcounting reworked in v6.15) the reference passes too."""

from __future__ import annotations

import json

import buffer_fake as bf
import hold_fake as hf
import pytest
from course_solutions import SOLUTIONS
from hold_fake import LONGTERM, NEVER, NOTHING

from labkit.course.exercises import BY_ID, Live
from labkit.course.judge import check_answer
from labkit.course.truncate_exercise import HoldRun, from_report, run_learner_hold, source_problem
from labkit.lab import Lab

EX = BY_ID["ex6.5"]
RUNNER = r"""
import json, sys
from labkit.lab.guest.pinprobe.learner_hold import judge
path, size, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print(json.dumps(judge(sys.stdin.read(), path, size, timeout, hold_s=0.3, after_s=1.0)))
"""


class FakeLab(bf.FakeHelperHost):
    """Runs the real guest judge on the host with the two DAX answers modelled (hold_fake)."""

    def guest(self, stdin):
        return hf.run_fake_guest(stdin)


class OrdinaryFileLab(bf.FakeHelperHost):
    """The real guest judge on the host, nothing modelled: a file without DAX,
    where a truncate never waits."""

    def guest(self, stdin):
        return bf.run_on_host(RUNNER, stdin, 65536, 2.0)


def _reference() -> str:
    ns: dict = {"record": lambda *a: None}
    exec(SOLUTIONS["ex6.5"], ns)        # the instructor source's solution cell: answer = """..."""
    return ns["answer"]


def judge(answer, lab=None):
    return check_answer(EX, answer, Live(lab or FakeLab()))


@pytest.mark.parametrize("answer, reason", [
    (hf.NOTHING, "truncate did not wait"),
    (hf.COPY, "truncate did not wait"),
    (hf.NEVER, "still waiting 10 s after your release function ran"),
    (hf.HALF, "still waiting"),
    (hf.LONGTERM, "raised on line 3: OSError: [Errno 95]"),
    (hf.RELEASE_RAISES, "your release function raised: ValueError: oops"),
    (hf.NOT_CALLABLE, "must return a function"),
    (hf.RAISES, "raised on line 3: FileNotFoundError"),
    (hf.LOOPS, "time limit"),
    ("def hold(x, y, z):\n    pass\n", "TypeError"),
    ("def held(m):\n    pass\n", "define a function"),
    ("def hold(m)\n", "does not compile"),
], ids=["nothing", "copy", "never", "half", "longterm", "release-raises", "not-callable", "raises", "loops",
        "signature", "no-function", "syntax"])
def test_each_wrong_attempt_fails_for_its_own_reason(answer, reason):
    r = judge(answer)
    assert not r.passed and reason in r.message, r.message
    assert "vmsplice" not in r.message.split("Hint")[0], r.message       # the reason never names the fix


@pytest.mark.parametrize("answer", [hf.CLOSES, hf.DRAINS, _reference()], ids=["closes", "drains", "reference"])
def test_each_way_of_dropping_the_references_passes(answer):
    r = judge(answer)
    assert r.passed, r.message


def test_on_a_file_without_dax_the_reference_fails_it_is_no_text_match():
    r = judge(_reference(), OrdinaryFileLab())
    assert not r.passed and "truncate did not wait" in r.message, r.message


def _report(**fields) -> HoldRun:
    base = {"blocked": True, "layout_wait": True, "completed": True, "seconds_after_release": 0.01,
            "where": ["xfs_break_dax_layouts"], "stage": "done", "exception": None, "line": None}
    return from_report({**base, **fields})


class CannedLive:
    def __init__(self, run: HoldRun) -> None:
        self.run = run

    def learner_hold(self, source):
        return self.run


@pytest.mark.parametrize("run, passed, reason", [
    (_report(), True, ""),
    (_report(completed=False, seconds_after_release=None), False, "still waiting 10 s after your release"),
    (_report(exception="ValueError: oops", stage="release"), False, "your release function raised: ValueError"),
    (_report(completed=False, truncate_error="truncate: Input/output error"), False, "then failed"),
    (_report(blocked=False), False, "did not wait"),
    # held up, but not by references to the file's pages: the stack (and state) the judge read says so
    (_report(layout_wait=False, where=["__break_lease", "do_dentry_open"]), False,
     "not waiting for the file's pages (it slept in __break_lease, do_dentry_open)"),
    (_report(layout_wait=False, stopped=True, where=["do_signal_stop"]), False, "(it was stopped)"),
    (_report(layout_wait=False, traced=True, where=["ptrace_stop"]), False, "(it was traced)"),
    (_report(stopped=True), False, "(it was stopped)"),
    (_report(learner_exited=True), False, "process ended while the truncate was being watched"),
])
def test_verdicts_on_a_truncate_that_waited(run, passed, reason):
    from labkit.course.truncate_exercise import check_hold
    ok, why = check_hold(NOTHING, CannedLive(run))
    assert ok is passed and reason in why, why


def test_summary_says_where_the_truncate_slept_and_for_how_long():
    assert "asleep in xfs_break_dax_layouts" in _report().summary()
    assert "finished 0.01 s after your release" in _report().summary()
    assert "still waiting" in _report(completed=False).summary()


def test_malformed_answers_never_reach_the_guest():
    lab = FakeLab()
    for answer in ("", "   ", 42, None, ["def hold(m): pass"], "def held(m): pass", "def hold(m)", "x" * 20_001):
        assert source_problem(answer), answer
        assert not judge(answer, lab).passed
    assert lab.sent == []


def test_the_code_reaches_the_guest_on_stdin_never_in_the_command_line():
    lab = FakeLab()
    hostile = NOTHING + "\n# $(touch /tmp/pwned); `id`; rm -rf /\n"
    judge(hostile, lab)
    (argv, stdin), = lab.sent
    assert stdin == hostile
    assert argv[:3] == ["python3", "/run/labkit/pinprobe.pyz", "learner-hold"]
    assert not any("pwned" in a or "def hold" in a for a in argv), argv


def test_the_learners_prints_do_not_forge_the_report():
    forged = ('import json\ndef hold(m):\n    print(json.dumps({"blocked": True, "completed": True}))\n'
              '    return lambda: None\n')
    r = judge(forged)
    assert not r.passed and "did not wait" in r.message, r.message


@pytest.mark.integration
@pytest.mark.parametrize("kernel", ["6.1", "6.12", "7.3"])
def test_the_live_kernel_judges_the_reference(kernel, pool):
    vm = pool.get(kernel)       # the run's shared guest: the judge leaves nothing behind
    lab = Lab(vm)
    live = Live(lab)
    right = check_answer(EX, _reference(), live)
    assert right.passed, (right.message, json.dumps(live.learner_hold(_reference()).raw))
    run = live.learner_hold(_reference())
    assert run.blocked and run.completed and run.seconds_after_release < 5, run.raw
    assert any("break" in fn and "layout" in fn for fn in run.where), run.where
    if kernel != "6.1":
        return
    nothing = run_learner_hold(lab, NOTHING)
    assert not nothing.blocked and nothing.completed, nothing.raw
    never = check_answer(EX, NEVER, live)
    assert not never.passed and "still waiting" in never.message, never.message
    longterm = run_learner_hold(lab, LONGTERM)
    assert not longterm.blocked and "Errno 95" in (longterm.exception or ""), longterm.raw
