"""A real nbgrader round trip on two course notebooks (00 and 01), graded against a live guest.

An nbgrader course directory in tmp (instructor/nbgrader_config.py, a local
exchange), the instructor sources as the assignment's source; ``nbgrader
generate_assignment``, ``release_assignment``; two students ``fetch_assignment``
and ``submit`` (alice: the reference solutions; bob: wrong, blank, one right
answer computed his own way, and a locked check cell he emptied); ``collect``,
``autograde`` (the hidden checks call labkit's exercise checks against the guest
named by LABKIT_VM), ``export`` to CSV. Asserts the gradebook: alice gets every
autograded point, bob what his answers deserve, the "explain" cell waits for
hand grading where an answer was written and scores 0 (no response) where not."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from labkit import image
from labkit.course.exercises import for_notebook
from labkit.course.grading import exercise_id

from course_solutions import fill

ROOT = Path(__file__).parent.parent
NOTEBOOKS = ("00-welcome", "01-persistent-memory")
ASSIGNMENT, COURSE = "labkit", "labkit"
VM_NAME = "test-nbgrader"


def _nbgrader(*args: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"nbgrader {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _answer(nb, ex: str, source: str) -> None:
    cell = next(c for c in nb.cells if exercise_id(c) == ex)
    cell.source = source


def _bob(nb, name: str) -> None:
    """Wrong, blank, and one right answer that is not the reference code; a tampered check cell."""
    if name.startswith("00"):
        _answer(nb, "ex0.1", 'answer = 64')                                # a plausible wrong CPU count
        check = next(c for c in nb.cells if "ex0.1-check" in c.metadata.get("tags", []))
        check.source = "pass   # bob empties the locked check cell; nbgrader restores it"
    else:
        _answer(nb, "ex1.1", 'answer = "fsdax"\nrecord("ex1.1", answer)')   # the block-device mode, not the chardev one
        _answer(nb, "ex1.2", 'devdax = [n for n in lab.namespaces() if n.mode == "devdax"][0]\n'
                             'answer = int(devdax.align)\nrecord("ex1.2", answer)')
        # ex1.3 (explain) left as released: nbgrader scores it 0, no response


@pytest.fixture(scope="module")
def nbgrader_ok():
    try:
        import nbgrader  # noqa: F401
    except ImportError:
        pytest.fail("nbgrader is not installed: run `.venv/bin/pip install -e '.[test]'` (or `make test`)")


@pytest.fixture(scope="module")
def grading_vm(nbgrader_ok):
    from conftest import persistent_vm
    with persistent_vm(VM_NAME, image.DEFAULT_KERNEL) as vm:
        yield vm


def _course(tmp: Path) -> tuple[Path, Path]:
    course, exchange = tmp / "course", tmp / "exchange"
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    exchange.mkdir()
    exchange.chmod(0o777)
    for n in NOTEBOOKS:
        shutil.copy(ROOT / "instructor" / "source" / f"{n}.ipynb", course / "source" / ASSIGNMENT)
    config = (ROOT / "instructor" / "nbgrader_config.py").read_text()
    config += f"\nc.Exchange.root = {str(exchange)!r}\n"
    (course / "nbgrader_config.py").write_text(config)
    return course, exchange


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.fresh_guest("the notebooks attach to a persistent lab VM by name (LABKIT_VM)")
def test_nbgrader_round_trip(grading_vm, tmp_path, artifacts):
    t0 = time.monotonic()
    course, exchange = _course(tmp_path)
    # nbgrader runs the venv's `alembic` by name: the venv's bin goes first on PATH.
    env = dict(os.environ, LABKIT_VM=VM_NAME, JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    _nbgrader("generate_assignment", ASSIGNMENT, cwd=course, env=env)
    for n in NOTEBOOKS:      # nbgrader releases exactly what `labkit course release` committed
        made = nbformat.read(course / "release" / ASSIGNMENT / f"{n}.ipynb", as_version=4)
        committed = nbformat.read(ROOT / "notebooks" / f"{n}.ipynb", as_version=4)
        assert [(c.source, c.metadata.get("nbgrader")) for c in made.cells] == \
            [(c.source, c.metadata.get("nbgrader")) for c in committed.cells], n
    _nbgrader("release_assignment", ASSIGNMENT, cwd=course, env=env)

    student_args = [f"--Exchange.root={exchange}", f"--course={COURSE}"]
    for student in ("alice", "bob"):
        home = tmp_path / student
        home.mkdir()
        _nbgrader("fetch_assignment", ASSIGNMENT, *student_args, cwd=home, env=env)
        for n in NOTEBOOKS:
            path = home / ASSIGNMENT / f"{n}.ipynb"
            nb = nbformat.read(path, as_version=4)
            if student == "alice":
                assert fill(nb)
            else:
                _bob(nb, n)
            nbformat.write(nb, path)
        _nbgrader("submit", ASSIGNMENT, *student_args, f"--student={student}", cwd=home, env=env)

    _nbgrader("collect", ASSIGNMENT, cwd=course, env=env)
    t_auto = time.monotonic()
    r = _nbgrader("autograde", ASSIGNMENT, cwd=course, env=env, timeout=900)
    autograde_s = time.monotonic() - t_auto
    _nbgrader("export", "--to", str(tmp_path / "grades.csv"), cwd=course, env=env)
    (artifacts / "nbgrader.seconds").write_text(f"total {time.monotonic() - t0:.1f}\nautograde {autograde_s:.1f}\n")
    (artifacts / "nbgrader-autograde.log").write_text(r.stdout + r.stderr)

    scores = _gradebook(course)
    expect = {
        "alice": {"ex0_1-check": 1, "ex1_1-check": 1, "ex1_2-check": 1, "ex1_3": None},
        "bob": {"ex0_1-check": 0, "ex1_1-check": 0, "ex1_2-check": 1, "ex1_3": 0},
    }
    assert {s: {g: a for g, (a, _m, _n) in per.items()} for s, per in scores.items()} == expect
    assert scores["alice"]["ex1_3"][2] and not scores["bob"]["ex1_3"][2], "explain: hand grading only if answered"
    for n in ("00", "01"):
        for ex in for_notebook(n):
            gid = ex.id.replace(".", "_") + ("" if ex.kind == "explain" else "-check")
            assert scores["alice"][gid][1] == (ex.manual_points if ex.kind == "explain" else ex.points)

    rows = {row["student_id"]: row for row in csv.DictReader((tmp_path / "grades.csv").open())}
    assert set(rows) == {"alice", "bob"}
    top = sum(e.manual_points if e.kind == "explain" else e.points for n in ("00", "01") for e in for_notebook(n))
    assert float(rows["alice"]["score"]) == 3 and float(rows["alice"]["max_score"]) == top
    assert float(rows["bob"]["score"]) == 1 and float(rows["bob"]["max_score"]) == top


def _gradebook(course: Path) -> dict[str, dict[str, tuple]]:
    """student -> grade id -> (auto score, max score, needs manual grade)."""
    from nbgrader.api import Gradebook
    out: dict[str, dict[str, tuple]] = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in ("alice", "bob"):
            for n in NOTEBOOKS:
                nb = gb.find_submission_notebook(n, ASSIGNMENT, student)
                for g in nb.grades:
                    out.setdefault(student, {})[g.name] = (g.auto_score, g.max_score, g.needs_manual_grade)
    return out
