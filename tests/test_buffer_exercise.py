"""Exercise 3.8 (a buffer on the fs-dax file that RDMA accepts): each wrong
kind of attempt fails for its own reason, the learner's code reaches the
guest only on stdin, and, on live 6.1 and 7.3 guests, the reference solution
passes while a MAP_SHARED mapping and an unwritten MAP_PRIVATE one are refused
by the kernel (the live test asserts what the kernel did, see
tests/test_lab.py::test_a_written_private_mapping_of_an_fsdax_file_is_pinned_by_gup_fast)."""

from __future__ import annotations

import buffer_fake as bf
import pytest
from course_solutions import SOLUTIONS

from labkit.course.buffer_exercise import run_learner_buffer, source_problem
from labkit.course.exercises import BY_ID, Live
from labkit.course.judge import check_answer
from labkit.lab import Lab

EX = BY_ID["ex3.8"]


class FakeLab(bf.FakeHelperHost):
    """Only what exercise 3.8 uses; records the guest commands it was sent."""

    def guest(self, stdin):
        return bf.run_fake_guest(stdin)


def judge(answer, lab=None):
    return check_answer(EX, answer, Live(lab or FakeLab()))


@pytest.mark.parametrize("answer, reason", [
    (bf.SHARED_WRITTEN, "shared mapping"),
    (bf.PRIVATE_UNTOUCHED, "until a page of a private mapping is written"),
    (bf.PRIVATE_READ, "until a page of a private mapping is written"),
    (bf.PRIVATE_HALF, "until a page of a private mapping is written"),
    (bf.ANON, "not a mapping of the file"),
    (bf.FORGED, "not a mapping of the file"),
    (bf.READ_ONLY, "must be writable"),
    (bf.RAISES, "your code raised on line 3: FileNotFoundError"),
    (bf.RETURNS_BYTES, "must return an mmap.mmap"),
    (bf.TOO_SMALL, "shorter than size"),
    (bf.EXITS, "ended the process"),
    (bf.LOOPS, "time limit"),
    (bf.NO_FUNCTION, "define a function"),
    (bf.SYNTAX_ERROR, "does not compile"),
], ids=["shared", "private-untouched", "private-read", "private-half", "anon", "forged-json", "read-only",
        "raises", "returns-bytes", "too-small", "exits", "loops", "no-function", "syntax-error"])
def test_each_wrong_attempt_fails_for_its_own_reason(answer, reason):
    r = judge(answer)
    assert not r.passed and reason in r.message, r.message
    assert "MAP_PRIVATE" not in r.message.split("Hint")[0], r.message     # the reason never names the fix


def test_the_reference_solution_passes_the_fake_judge():
    assert judge(bf.PRIVATE_WRITTEN).passed


def test_malformed_answers_never_reach_the_guest():
    lab = FakeLab()
    for answer in ("", "   ", 42, None, ["def buffer(p, s): pass"], bf.NO_FUNCTION, bf.SYNTAX_ERROR, "x" * 20_001):
        assert source_problem(answer), answer
        assert not judge(answer, lab).passed
    assert lab.sent == []


def test_the_code_reaches_the_guest_on_stdin_never_in_the_command_line():
    lab = FakeLab()
    hostile = bf.PRIVATE_WRITTEN + "\n# $(touch /tmp/pwned); `id`; rm -rf /\n"
    assert judge(hostile, lab).passed
    (argv, stdin), = lab.sent
    assert stdin == hostile
    assert argv[:3] == ["python3", "/run/labkit/pinprobe.pyz", "learner-buffer"]
    assert not any("pwned" in a or "def buffer" in a for a in argv), argv


def _reference_source() -> str:
    ns: dict = {"record": lambda *a: None}
    exec(SOLUTIONS["ex3.8"], ns)        # the instructor source's solution cell: answer = """..."""
    return ns["answer"]


@pytest.mark.integration
@pytest.mark.parametrize("kernel", ["6.1", "6.12", "7.3"])
def test_the_live_kernel_judges_the_reference_and_a_shared_mapping(kernel, pool):
    vm = pool.get(kernel)       # the run's shared guest: the judge leaves nothing behind
    lab = Lab(vm)
    live = Live(lab)
    right = check_answer(EX, _reference_source(), live)
    assert right.passed, right.message
    run = live.learner_buffer(_reference_source())
    assert run.ok and run.backed_by_file and not run.shared and run.vmpin_kb_delta == 2048, run.raw
    shared = check_answer(EX, bf.SHARED_WRITTEN, live)
    assert not shared.passed and "shared mapping" in shared.message, shared.message
    refused = run_learner_buffer(lab, bf.SHARED_WRITTEN)
    assert refused.backed_by_file and refused.shared and not refused.ok and refused.errname == "EOPNOTSUPP"
    untouched = run_learner_buffer(lab, bf.PRIVATE_UNTOUCHED)
    assert untouched.backed_by_file and not untouched.ok and untouched.errname == "EOPNOTSUPP", untouched.raw
