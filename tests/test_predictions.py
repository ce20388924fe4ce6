"""Prediction beside observation: the comparison is made only against the
observation passed in (live pin results in the notebooks), errnos compare by
number, free words are shown and not judged, and nothing is graded."""

from __future__ import annotations

import pytest

from labkit.course import grading
from labkit.course.predictions import compare, comparison_html, observed_cells
from labkit.lab.results import PinResult


def result(memory: str, ok: bool, errno: int | None = None, name: str | None = None) -> PinResult:
    return PinResult("rdma", memory, "shared", ok, errno, name, None, None, [], [])


OBSERVED = [result("anon", True), result("fsdax-xfs", False, 95, "EOPNOTSUPP"),
            result("pagecache", False, 14, "EFAULT"), result("devdax", True)]


def test_each_observed_case_beside_its_prediction():
    c = compare({"anon": "ok", "fsdax-xfs": "ENOTSUP", "pagecache": "ok", "devdax": "fails"}, OBSERVED)
    assert [(r.case, r.observed, r.match) for r in c.rows] == [
        ("anon", "ok", True), ("fsdax-xfs", "EOPNOTSUPP (95)", True),   # ENOTSUP is 95 too
        ("pagecache", "EFAULT (14)", False), ("devdax", "ok", False)]
    assert (c.matched, c.compared) == (2, 4)


@pytest.mark.parametrize("predicted,match", [
    ("EOPNOTSUPP", True), ("-95", True), (95, True), ("eopnotsupp", True), ("EPERM", False), ("ok", False),
    ("refused", True), (True, False), ("it fails because the filesystem owns the blocks", None), ("", None)])
def test_forms_of_a_prediction_for_a_refused_case(predicted, match):
    (row,) = compare({"fsdax-xfs": predicted}, [OBSERVED[1]]).rows
    assert row.match is match


def test_missing_entries_and_free_text_are_shown_not_judged():
    c = compare({"ANON": "ok"}, OBSERVED)
    assert c.rows[0].match is True and all(r.match is None and r.predicted == "" for r in c.rows[1:])
    text = compare("anon works, <b>fs-dax</b> is refused", OBSERVED)
    assert text.compared == 0 and "&lt;b&gt;fs-dax&lt;/b&gt;" in comparison_html(text)
    assert "No prediction recorded" in comparison_html(compare(None, OBSERVED))


def test_the_table_says_what_the_kernel_did_and_escapes_everything():
    page = comparison_html(compare({"anon": "<script>"}, {"anon": "ok", "x<y": "EFAULT (14)"}))
    assert "<script>" not in page and "&lt;script&gt;" in page and "x&lt;y" in page
    assert "the kernel did" in page and "EFAULT (14)" in page


def test_several_mechanisms_name_each_case_by_mechanism_and_memory():
    both = [PinResult("odirect", "fsdax-xfs", "shared", True, None, None, None, 512, [], []),
            PinResult("io_uring", "fsdax-xfs", "shared", False, 95, "EOPNOTSUPP", None, None, [], [])]
    c = compare({"odirect fsdax-xfs": "ok", "io_uring fsdax-xfs": "ok"}, both)
    assert [(r.case, r.match) for r in c.rows] == [("odirect fsdax-xfs", True), ("io_uring fsdax-xfs", False)]


def test_observations_must_be_results_or_a_mapping():
    assert observed_cells({"a": "ok"}) == {"a": "ok"}
    with pytest.raises(TypeError, match="pin results"):
        observed_cells(["ok"])
    with pytest.raises(TypeError, match="pin results"):
        observed_cells(42)


def test_record_remembers_the_prediction_for_a_later_cell():
    grading.record("ex-test.0", {"anon": "ok"})
    assert grading.recorded("ex-test.0") == {"anon": "ok"}
    assert grading.recorded("ex-never") is None


def test_every_recorded_prediction_is_shown_beside_its_measurement():
    """Each prediction exercise's notebook displays prediction_table(recorded(<its id>), ...)
    in a code cell after the one that records it: a learner always sees their
    prediction next to what the kernel did."""
    import json
    from pathlib import Path

    from labkit.course.exercises import EXERCISES
    root = Path(__file__).resolve().parent.parent / "notebooks"
    for ex in (e for e in EXERCISES if e.kind == "prediction"):
        [path] = root.glob(f"{ex.notebook}-*.ipynb")
        code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        at = next(i for i, s in enumerate(code) if f'record("{ex.id}"' in s)
        assert any(f'prediction_table(recorded("{ex.id}")' in s for s in code[at + 1:]), (ex.id, path.name)
