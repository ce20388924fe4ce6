"""Integrity of grading (issue 15), without a guest: what a notebook file
claims is not trusted, hostile answers never crash the checker, every
notebook is judged on its own whatever the order, and a computed answer
without record() is found by the grader's hidden record cell (a real
ipykernel runs it; the checks talk to a fake lab)."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from labkit.course import grading
from labkit.course.exercises import BY_ID
from labkit.course.judge import ExerciseResult, judge
from labkit.errors import GuestDied


def _cell(ex: str, source: str, payload: dict | None = None, count: int | None = None):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["exercise", ex]
    if payload is not None:
        cell.outputs = [nbformat.v4.new_output("display_data", data={grading.MIME: payload, "text/plain": "x"})]
    cell.execution_count = count
    return cell


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


# -- what a saved notebook claims ---------------------------------------------------------

def test_forged_payload_on_a_cell_that_never_ran_is_not_an_answer():
    forged = _cell("ex1.1", 'answer = ...\nrecord("ex1.1", answer)',
                   {"id": "ex1.1", "blank": False, "value": "devdax"}, count=None)
    got = grading.answers(_nb(forged))["ex1.1"]
    assert got.get("value") != "devdax" and got.get("blank"), got


def test_payload_recorded_under_another_exercise_id_is_rejected():
    wrong = _cell("ex1.1", "answer = lab.thing()\nrecord('ex1.2', answer)",
                  {"id": "ex1.2", "blank": False, "value": 502}, count=4)
    got = grading.answers(_nb(wrong))
    assert got["ex1.1"].get("not_run") and "ex1.2" not in got, got


def test_hidden_record_cell_saved_in_the_file_is_ignored():
    ex = _cell("ex1.1", "answer = lab.thing()", None, count=1)
    fake = nbformat.v4.new_code_cell("")
    fake.metadata["labkit_record"] = True
    fake.outputs = [nbformat.v4.new_output("display_data", data={
        grading.MIME: {"id": "ex1.1", "blank": False, "value": "devdax"}})]
    fake.execution_count = 2
    assert grading.answers(_nb(ex, fake))["ex1.1"].get("not_run")
    assert grading.answers(_nb(ex, fake), marker="abc")["ex1.1"].get("not_run")


def test_re_execution_drops_saved_outputs_and_record_cells():
    saved = _cell("ex1.1", 'answer = ...\nrecord("ex1.1", answer)',
                  {"id": "ex1.1", "blank": False, "value": "devdax"}, count=7)
    fake = nbformat.v4.new_code_cell("")
    fake.metadata["labkit_record"] = True
    nb = _nb(saved, fake)
    marker = grading.prepare_for_execution(nb)
    assert len(nb.cells) == 2 and nb.cells[1].metadata["labkit_record"] == marker
    assert nb.cells[0].outputs == [] and nb.cells[0].execution_count is None
    assert "'ex1.1'" in nb.cells[1].source


# -- hostile answer values ----------------------------------------------------------------

class _Boom:
    def __repr__(self):
        raise RuntimeError("no repr for you")


def _deep(n: int):
    v: list = []
    for _ in range(n):
        v = [v]
    return v


HOSTILE = {
    "huge list": list(range(10**6)),
    "huge string": "x" * 10**7,
    "deeply nested": _deep(10_000),
    "mixed set": {1, "a", (2, 3)},
    "nan": math.nan,
    "inf": [math.inf],
    "big int": 10**4000,
    "bad repr": _Boom(),
    "dict with tuple keys": {(1, 2): {3}},
    "unhashable in dict": {"rdma": ["long-term"], "v4l2": {"a": 1}},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_record_never_raises_and_stays_strict_json(name):
    p = grading.answer_payload("ex5.1", HOSTILE[name])
    text = json.dumps(p, allow_nan=False)          # strict JSON, as Jupyter sends it
    assert len(text) <= grading.MAX_CHARS + 200


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("ex", ["ex1.2", "ex3.2", "ex5.1", "ex6.2", "ex3.1", "ex7.1", "ex2.0", "ex1.3"])
def test_hostile_answers_fail_their_check_with_a_message(name, ex):
    payload = grading.answer_payload(ex, HOSTILE[name])
    result = judge([BY_ID[ex]], {ex: grading.checked_payload(payload, ex)}, _FakeLab()).results[0]
    assert result.message and result.points in (0, result.max)
    if "invalid" in payload:
        assert not result.passed and "too large" in result.message


@pytest.mark.parametrize("raw", [
    ["not", "a", "dict"], "a string", 42, None, {"id": "ex3.1"}, {"id": "ex3.1", "blank": False},
    {"id": "ex3.1", "blank": False, "value": float("nan")}, {"id": "ex3.1", "value": _deep(300)},
    {"id": ["ex3.1"], "value": 1}, {"id": "ex3.1", "blank": "yes", "value": {"x": [1] * 100_000}},
], ids=lambda r: type(r).__name__)
def test_any_payload_shape_in_a_saved_notebook_is_read_without_crashing(raw):
    cell = _cell("ex3.1", "answer = lab.x()\nrecord('ex3.1', answer)", None, count=1)
    cell.outputs = [nbformat.v4.new_output("display_data", data={grading.MIME: raw})]
    got = grading.answers(_nb(cell))
    result = judge([BY_ID["ex3.1"]], got, _FakeLab()).results[0]
    assert not result.passed and result.message


def test_a_deeply_nested_literal_does_not_crash_the_reader():
    src = "answer = " + "[" * 200_000 + "]" * 200_000
    assert grading.literal_answer(src) is None


# -- every notebook on its own, in any order -----------------------------------------------

class _FakeLab:
    """A guest with state: a reset (what notebook 08 ends with) removes the
    DAX mounts and soft-RoCE; a pin needs them, as on the real guest."""

    def __init__(self) -> None:
        self.mounted = self.rdma = False

    def reset(self) -> None:
        self.mounted = self.rdma = False

    def prepare_mounts(self):
        self.mounted = True
        return [SimpleNamespace(fs="xfs", experimental_warning=True), SimpleNamespace(fs="ext4",
                                                                                   experimental_warning=False)]

    def setup_rdma(self):
        self.rdma = True
        return "rxe0"

    def setup_vivid(self):
        pass

    def sh(self, script):
        return SimpleNamespace(stdout={"uname -r": "6.1.0-fake", "nproc": "2"}.get(script, "4096"))

    def pin(self, mechanism, memory, mapping="shared", size=2 * 2**20):
        def res(ok, err=0):
            return SimpleNamespace(ok=ok, errno=err, vmpin_kb_delta=size // 1024 if ok else 0, trace=[],
                                   foll_pin_delta=0, device_odp=None)
        if mechanism.startswith("rdma") and not self.rdma:
            return res(False, errno.ENODEV)
        if memory.startswith("fsdax"):
            return res(False, errno.ENOENT) if not self.mounted else res(False, errno.EOPNOTSUPP)
        return res(True)

    def pin_many(self, cases):
        return [self.pin(m, k, p) for m, k, p in cases]


def _course_nb(tmp_path: Path, number: str, cells) -> Path:
    nb = _nb(*cells)
    nb.metadata["labkit"] = {"notebook": number}
    path = tmp_path / f"{number}-x.ipynb"
    nbformat.write(nb, path)
    return path


ASKED = {"ex3.1", "ex7.2", "ex7.4", "ex8.1"}


def _scores(results) -> dict[str, list[tuple[str, int]]]:
    return {r.notebook: [(c.id, c.points) for c in r.checks if c.id in ASKED] for r in results}


def test_every_order_gives_the_same_scores(tmp_path, monkeypatch):
    """Notebook 08 resets the guest at its end; 07's VmPin exercise must not
    depend on soft-RoCE set up by another notebook's checks (or skipped when
    its own ex7.2 is blank)."""
    lab = _FakeLab()
    paths = {
        "03": _course_nb(tmp_path, "03", [_cell("ex3.1", 'answer = "ok"')]),   # RDMA: needs soft-RoCE
        "07": _course_nb(tmp_path, "07", [_cell("ex7.2", "answer = ..."), _cell("ex7.4", "answer = 4096")]),
        "08": _course_nb(tmp_path, "08", [_cell("ex8.1", 'answer = "check_vma_flags"')]),
    }

    def fake_execute(nb, path, timeout=600.0):
        if path.name.startswith("08"):
            lab.reset()             # the notebook's last cell: vm.reset()
        return [], None
    monkeypatch.setattr(grading, "execute", fake_execute)
    alone = {}
    for p in paths.values():
        lab.reset()
        alone.update(_scores(grading.grade([p], lab=lab)))
    assert alone == {"03": [("ex3.1", 1)], "07": [("ex7.2", 0), ("ex7.4", 2)], "08": [("ex8.1", 1)]}
    for order in (["03", "08", "07"], ["07", "08", "03"], ["08", "07", "03"]):
        lab.reset()
        assert _scores(grading.grade([paths[n] for n in order], lab=lab)) == alone, order


# -- the hidden record cell, really executed ------------------------------------------------

def test_a_computed_answer_without_record_is_found(tmp_path):
    """Like notebook 00's exercise: the answer is computed (no literal) and the
    cell does not call record(); the exercise after it fails before assigning,
    and must not be credited with the previous answer."""
    nb = _nb(_cell("ex0.1", 'answer = int("".join(["", "2"]))'),
             _cell("ex2.2", "answer = int(undefined_name)"))
    errors, marker = grading.execute(nb, tmp_path / "00-x.ipynb", timeout=120)
    got = grading.answers(nb, marker)
    assert got["ex0.1"] == {"id": "ex0.1", "blank": False, "value": 2}, errors
    assert got["ex2.2"].get("blank") and any("NameError" in e for e in errors)
    checks = judge([BY_ID["ex0.1"], BY_ID["ex2.2"]], got, _FakeLab()).results
    assert [c.points for c in checks] == [1, 0]


@pytest.mark.parametrize("source", ["answer = {[1]: 2}", "answer = {{1}, 2}", "answer = {'a': {[]}}"])
def test_an_unhashable_literal_is_no_answer_not_a_crash(source):
    """ast.literal_eval raises TypeError for these (the reader used to catch
    ValueError only, so one answer shape crashed `labkit check`)."""
    assert grading.literal_answer(source) is None
    cell = _cell("ex5.1", source)
    result = judge([BY_ID["ex5.1"]], grading.answers(_nb(cell)), _FakeLab()).results[0]
    assert not result.passed and "no recorded answer" in result.message


# -- one judge, one result model, the output shapes of each face --------------------------------

def test_one_result_serialises_as_each_face_always_showed_it():
    """``labkit check --json`` shows a result with ``message`` and ``passed``;
    the gradebook's JSON (and so its CSV) with ``feedback`` (format labkit-grades/1)."""
    r = ExerciseResult("ex6.2", "History", 2, 2, True, "right")
    res = grading.NotebookResult("06-x.ipynb", "06", False, checks=[r])
    assert grading.as_json([res])["notebooks"][0]["checks"] == [
        {"id": "ex6.2", "title": "History", "points": 2, "max": 2, "passed": True, "message": "right"}]
    assert list(grading.as_json([res])["notebooks"][0]) == ["path", "notebook", "executed", "cell_errors", "score",
                                                            "max", "seconds", "checks"]
    assert r.gradebook_json() == {"id": "ex6.2", "title": "History", "points": 2, "max": 2, "feedback": "right"}


def test_an_unreadable_answer_in_an_autograde_cell_is_a_failed_check_not_a_crash():
    """The nbgrader cells go through the same judge as ``labkit check``: an answer
    that cannot be recorded (too large) fails with the reason (it raised KeyError before)."""
    from labkit.course import autograde
    with pytest.raises(autograde.NotRight, match="ex6.2: the answer is too large"):
        autograde.assert_right("ex6.2", ["x" * (grading.MAX_CHARS + 1)])


def test_without_containment_a_guest_failure_is_raised_with_it_a_zero_with_the_reason():
    """``labkit check`` and nbgrader show the guest's error; the summative grader
    grades what needs no guest and says why the rest was not graded."""
    class Dead:
        def __getattr__(self, name):          # whatever the check asks of the guest
            def died(*args, **kw):
                raise GuestDied("QEMU exited")
            return died
    exs = [BY_ID["ex1.2"], BY_ID["ex6.2"]]
    given = {"ex1.2": {"id": "ex1.2", "blank": False, "value": 1022},
             "ex6.2": {"id": "ex6.2", "blank": False,
                       "value": ["get_user_pages_longterm", "FOLL_LONGTERM", "FOLL_PIN", "check_vma_flags"]}}
    with pytest.raises(GuestDied):
        judge(exs, given, Dead())
    v = judge(exs, given, Dead(), contain=True)
    assert [(r.id, r.points) for r in v.results] == [("ex1.2", 0), ("ex6.2", BY_ID["ex6.2"].points)]
    assert v.results[0].message.startswith("not graded: the guest did not answer (GuestDied") and "GuestDied" in v.problem
