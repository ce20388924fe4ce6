"""``labkit course release``: the committed student notebooks are exactly what
release makes from instructor/source (drift is caught), no solution or hidden
check reaches them, and the nbgrader metadata matches the exercise table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.course import autograde, release
from labkit.course.exercises import EXERCISES
from labkit.course.grading import exercise_id

ROOT = Path(__file__).parent.parent
SOURCES = sorted((ROOT / "instructor" / "source").glob("[0-9][0-9]-*.ipynb"))
STUDENT = ROOT / "notebooks"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def test_one_source_per_notebook():
    assert [p.name for p in SOURCES] == sorted(p.name for p in STUDENT.glob("[0-9][0-9]-*.ipynb"))
    assert len(SOURCES) == 11


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("released")
    assert len(release.release(out_dir=out)) == len(SOURCES)
    return out


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_committed_notebooks_are_what_release_makes(src, released):
    committed, made = STUDENT / src.name, released / src.name
    assert committed.read_text() == made.read_text(), (
        f"{committed} differs from the release of {src}: edit the instructor source, then run "
        "`labkit course release`")


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_no_solution_or_hidden_check_reaches_students(src):
    student, instructor = _read(STUDENT / src.name), _read(src)
    assert release.leaks(student, instructor) == []
    text = "\n".join(c.source for c in student.cells)
    assert "assert_right" not in text and "SOLUTION" not in text and "HIDDEN" not in text
    for cell in student.cells:
        assert cell.get("outputs", []) == [] and cell.get("execution_count") is None


def test_leaks_finds_a_solution_pasted_into_a_student_notebook():
    """The leak check can fail: a student notebook with one solution line in it is caught."""
    src = SOURCES[1]
    student, instructor = release.student_notebook(_read(src)), _read(src)
    cell = next(c for c in student.cells if exercise_id(c) == "ex1.1")
    cell.source = cell.source.replace("answer = ...", "answer = next(ns.mode for ns in lab.namespaces() if ns.chardev)")
    assert any("ns.chardev" in leak for leak in release.leaks(student, instructor))


def test_solutions_cover_every_exercise_and_keep_the_record_call():
    sol = release.solutions()
    assert set(sol) == {e.id for e in EXERCISES}
    student = {exercise_id(c): c.source for p in STUDENT.glob("*.ipynb") for c in _read(p).cells if exercise_id(c)}
    for ex, source in sol.items():
        assert release.CODE_STUB not in source.splitlines(), ex            # a solution, not the blank
        assert "BEGIN" not in source and "assert_right" not in source, ex
        assert ("record(" in source) == ("record(" in student[ex]), ex     # the cell's record() call is kept


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nbgrader_metadata_matches_the_exercise_table(src):
    nb = _read(src)
    number = src.name[:2]
    by_grade_id = {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}
    assert len(by_grade_id) == sum("nbgrader" in c.metadata for c in nb.cells), "grade ids must be unique"
    for ex in (e for e in EXERCISES if e.notebook == number):
        gid = ex.id.replace(".", "_")
        answer = by_grade_id[gid]["metadata"]["nbgrader"]
        assert answer["solution"] and not answer["locked"], ex.id
        if ex.kind == "explain":      # graded by hand with the rubric
            assert answer["grade"] and answer["points"] == ex.manual_points and f"{gid}-check" not in by_grade_id
        else:                         # an autograded answer and its locked, hidden check
            assert not answer["grade"], ex.id
            check = by_grade_id[f"{gid}-check"]
            meta = check.metadata["nbgrader"]
            assert meta["grade"] and meta["locked"] and not meta["solution"] and meta["points"] == ex.points
            assert f"assert_right({ex.id!r}, answer)" in check.source
            assert release.BEGIN_HIDDEN in check.source


def test_reference_source_drops_markers_and_hidden_tests():
    src = "# hint\n### BEGIN SOLUTION\nanswer = 4\n### END SOLUTION\n### BEGIN HIDDEN TESTS\nsecret()\n### END HIDDEN TESTS\nrecord('ex', answer)"
    assert release.reference_source(src) == "# hint\nanswer = 4\nrecord('ex', answer)"


def test_release_cli_and_its_errors(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "labkit", "course", "release", *args],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    r = run("--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in SOURCES]
    (tmp_path / "afile").write_text("x")
    for args, expect in ((["--out", str(tmp_path / "afile")], "not a directory"),
                         (["--source", str(tmp_path / "out"), "--out", str(tmp_path / "out")], "refusing"),
                         (["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")], "no instructor source")):
        r = run(*args)
        assert r.returncode == 2 and expect in r.stderr and "hint:" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_a_malformed_source_is_a_clear_error(tmp_path):
    nb = _read(SOURCES[0])
    cell = next(c for c in nb.cells if exercise_id(c))
    del cell.metadata["nbgrader"]          # a solution region in a cell nbgrader does not know as a solution cell
    with pytest.raises(release.ReleaseError) as err:
        release.student_notebook(nb)
    assert "ClearSolutions" in str(err.value) and err.value.hint


def test_assert_right_judges_like_labkit_check_and_gives_nothing_away():
    """ex6.2 is graded from the answer alone (no guest)."""
    right = ["get_user_pages_longterm", "FOLL_LONGTERM", "FOLL_PIN", "check_vma_flags"]
    assert autograde.assert_right("ex6.2", right) is None
    with pytest.raises(AssertionError) as wrong:
        autograde.assert_right("ex6.2", list(reversed(right)))
    assert "not right" in str(wrong.value) and "get_user_pages_longterm" not in str(wrong.value)
    with pytest.raises(AssertionError, match="not answered yet"):
        autograde.assert_right("ex6.2", ...)
    with pytest.raises(AssertionError, match="no such exercise"):
        autograde.assert_right("ex99.9", 1)


def test_the_course_nbgrader_config_uses_the_release_settings():
    """nbgrader generate_assignment and labkit course release strip with the same stub and markers."""
    from traitlets.config.loader import PyFileConfigLoader
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT / "instructor")).load_config()
    assert cfg.ClearSolutions.code_stub == {"python": release.CODE_STUB}
    assert cfg.ClearHiddenTests.begin_test_delimeter == "BEGIN HIDDEN TESTS"
    assert cfg.Execute.timeout >= 600 and cfg.CourseDirectory.course_id == "labkit"
