"""``labkit check``: blank notebooks score zero, the reference solutions score
full marks (filled into copies of the real notebooks, executed headless and
checked against a real guest), the --json shape, and clear errors for bad input.
The notebooks the summative grader's tests already execute (blank or with the
reference solutions: tests/course_solutions.py) are not executed again here."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from course_solutions import GRADER_BLANKS, GRADER_SOLUTIONS, GRADER_TWO_KERNELS, SOLUTIONS, check_notebooks, fill

from labkit.course import grading
from labkit.course.exercises import EXERCISES, Live, check_history, check_nproc
from labkit.lab import Lab
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.vm import VM

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
VM_NAME = "test-check"
# What the runs below execute: the notebooks the grader's tests do not (tests/course_solutions.py).
BLANK_HERE = check_notebooks(NOTEBOOKS, GRADER_BLANKS)
SOLVED_HERE = check_notebooks(NOTEBOOKS, (*GRADER_SOLUTIONS, *GRADER_TWO_KERNELS))


def _reads_answers(source: str) -> bool:
    """Whether cell code names ``answer`` or ``recorded`` (comments aside; code that
    does not parse as Python, a magic say, counts as reading them)."""
    try:
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    except SyntaxError:
        return True
    return bool(names & {"answer", "recorded"})


def _only_literals(path: Path) -> bool:
    """Whether ``path`` solved runs exactly the code of ``path`` blank but for literal
    answers: each reference solution only assigns ``answer`` a literal and records it,
    and no other cell reads ``answer`` or ``recorded(...)``."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        ex = grading.exercise_id(cell)
        if ex is None:
            if cell.cell_type == "code" and _reads_answers(cell.source):
                return False
            continue
        for node in ast.parse(SOLUTIONS[ex]).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["answer"]:
                try:
                    ast.literal_eval(node.value)
                    continue
                except ValueError:
                    return False
            call = node.value if isinstance(node, ast.Expr) else None
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "record"):
                return False
    return True


# Of those, the notebooks whose solutions are literals execute, solved, exactly the code
# the blank run executes (no cell raising): the reference run grades them as a learner
# saved them after running the exercise cells (their answers judged on the live guest,
# nothing re-run), and executes the others.
SAVED_HERE = [p for p in SOLVED_HERE if _only_literals(p)]


def labkit_check(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, LABKIT_VM=VM_NAME)
    return subprocess.run([sys.executable, "-m", "labkit", "check", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


# -- logic, no guest -----------------------------------------------------------

def test_every_exercise_has_a_cell_and_a_solution():
    tagged = {grading.exercise_id(c) for p in NOTEBOOKS for c in nbformat.read(p, as_version=4).cells} - {None}
    ids = {e.id for e in EXERCISES}
    assert ids == tagged
    assert ids == set(SOLUTIONS)
    for n in ("01", "02", "03", "04", "05", "06", "07"):
        assert any(e.notebook == n for e in EXERCISES), n


def test_every_notebook_is_executed_blank_and_solved_against_a_guest_once():
    """Between this file's two runs and the grader's tests (tests/test_summative.py),
    every notebook is executed once as given and once with every reference
    solution, and each of those runs asserts no cell raised."""
    numbers = sorted(p.name[:2] for p in NOTEBOOKS)
    assert set(SAVED_HERE) <= set(BLANK_HERE)       # executed blank, here
    computed = {p.name[:2] for p in SOLVED_HERE if not _only_literals(p)}
    assert {"01", "03", "07"} <= computed, computed  # solutions that measure (and 09: recorded(...))
    assert not _only_literals(next(p for p in NOTEBOOKS if p.name.startswith("09-")))
    by_the_grader = [*GRADER_SOLUTIONS, *GRADER_TWO_KERNELS]
    assert sorted([p.name[:2] for p in SOLVED_HERE] + by_the_grader) == numbers
    assert sorted([p.name[:2] for p in BLANK_HERE] + list(GRADER_BLANKS)) == numbers
    solved = {e.id for e in EXERCISES if e.notebook in {p.name[:2] for p in SOLVED_HERE} | set(by_the_grader)}
    assert solved == {e.id for e in EXERCISES}


def test_answer_payloads_and_literals():
    assert grading.answer_payload("ex1.1", ...)["blank"]
    assert grading.answer_payload("ex1.1", None)["blank"]
    assert grading.answer_payload("ex3.2", {"devdax", "anon"}) == {"id": "ex3.2", "blank": False,
                                                                    "value": ["anon", "devdax"]}
    assert grading.literal_answer("answer = ...   # fill in\nrecord('x', answer)")["blank"]
    assert grading.literal_answer("answer = 'devdax'")["value"] == "devdax"
    assert grading.literal_answer("answer = lab.namespaces()[0].mode") is None   # needs a run


def test_answers_read_from_recorded_outputs():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("answer = lab.thing()\nrecord('ex1.1', answer)")
    cell.metadata["tags"] = ["exercise", "ex1.1"]
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        grading.MIME: {"id": "ex1.1", "blank": False, "value": "devdax"}, "text/plain": "x"})]
    cell.execution_count = 3          # saved after the learner ran it
    nb.cells = [cell]
    assert grading.answers(nb) == {"ex1.1": {"id": "ex1.1", "blank": False, "value": "devdax"}}
    cell.outputs = []
    assert grading.answers(nb)["ex1.1"].get("not_run")


class _FakeLab:
    def sh(self, script):
        class R:
            stdout = "2\n"
        return R()


def test_the_slowest_cells_come_from_nbclients_timing():
    nb = nbformat.v4.new_notebook()
    for i, secs in enumerate((1.5, 40.25, 3.0)):
        cell = nbformat.v4.new_code_cell(f"\n# cell {i}\nx = {i}")
        cell.metadata["execution"] = {"iopub.execute_input": "2026-12-07T10:00:00.000000Z",
                                      "shell.execute_reply": f"2026-12-07T10:00:{secs:09.6f}Z"}
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_markdown_cell("text"))
    nb.cells.append(nbformat.v4.new_code_cell("never run"))
    assert grading.slowest_cells(nb, 2) == [{"cell": 1, "seconds": 40.2, "first_line": "# cell 1"},
                                            {"cell": 2, "seconds": 3.0, "first_line": "# cell 2"}]


def test_checks_compare_with_what_the_lab_reports():
    live = Live(_FakeLab())
    assert check_nproc("2", live)[0]
    ok, msg = check_nproc(4, live)
    assert not ok and "2" not in msg          # feedback never shows the expected value
    assert not check_history({"FOLL_PIN": "5.6"}, live)[0]


def test_qmp_sync_from_inside_a_running_event_loop():
    """A Jupyter kernel runs cells inside an event loop; QMP calls (vm.stop()) must still work there."""
    ch = QMPChannel(Path("/nonexistent"))

    async def value():
        return 42

    async def inside():
        return ch._sync(value(), 1.0)
    try:
        assert asyncio.run(inside()) == 42
    finally:
        ch.close()
    assert not ch._thread.is_alive(), "the QMP channel's loop thread must end with close()"


@pytest.mark.parametrize("make, expect", [
    (lambda d: d / "missing.ipynb", "no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: (d / "notes.ipynb").write_text("not json") and d / "notes.ipynb", "not a Jupyter notebook"),
    (lambda d: nbformat.write(nbformat.v4.new_notebook(), d / "empty.ipynb") or d / "empty.ipynb",
     "not a labkit course notebook"),
], ids=["missing", "directory", "not-json", "not-course"])
def test_bad_input_is_a_clear_error(tmp_path, make, expect):
    r = labkit_check(str(make(tmp_path)), timeout=120)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_help_documents_exit_codes_and_reading_rule():
    r = subprocess.run([sys.executable, "-m", "labkit", "check", "--help"], capture_output=True, text=True)
    assert "0 every check passed, 1 some check failed, 2" in r.stdout
    assert "without outputs is first executed" in r.stdout


# -- against a real guest ------------------------------------------------------

@pytest.fixture(scope="module")
def check_vm():
    from conftest import require_image

    from labkit import image
    for k in image.KERNELS:
        require_image(k)
    vm = VM(VM_NAME, persistent=True)
    vm.start()
    try:
        yield vm
    finally:
        for name in (VM_NAME, f"{VM_NAME}-other", f"{VM_NAME}-cf73", f"{VM_NAME}-k73", f"{VM_NAME}-k510"):   # 06, 08, 09, 10
            VM(name, persistent=True).stop()


def _assert_json_shape(data: dict, paths: list[Path]) -> None:
    numbers = {p.name[:2] for p in paths}
    assert set(data) == {"notebooks", "score", "max", "passed"}
    assert [Path(n["path"]).name for n in data["notebooks"]] == [p.name for p in paths]
    for n in data["notebooks"]:
        assert set(n) == {"path", "notebook", "executed", "cell_errors", "score", "max", "seconds", "checks"}
        assert n["seconds"]["execute"] > 0 and len(n["seconds"]["slowest_cells"]) >= 1, n["seconds"]
        for c in n["checks"]:
            assert set(c) == {"id", "title", "points", "max", "passed", "message"}
            assert c["points"] in (0, c["max"]) and c["message"]
        assert n["score"] == sum(c["points"] for c in n["checks"])
    assert data["max"] == sum(e.points for e in EXERCISES if e.notebook in numbers)
    assert data["score"] == sum(n["score"] for n in data["notebooks"])


# The two runs of the course (blank: BLANK_HERE; solved: SOLVED_HERE) are among the suite's longest
# tests: under `make test` they can run side by side on the two workers (each worker has its own lab
# VM): tests/suite_areas.py.
@pytest.mark.integration
@pytest.mark.timeout(2400)
@pytest.mark.fresh_guest("the notebooks attach to a persistent lab VM by name (LABKIT_VM)")
def test_blank_notebooks_score_zero(check_vm, tmp_path, artifacts):
    """Also the one run of the student notebooks as given (tests/test_notebooks.py
    used to execute them a second time; the grader's tests run the others, blank,
    with the same assertions): each executes headless against the live guest with
    no cell raising."""
    copies = []
    for p in BLANK_HERE:      # copies, so nothing can touch the committed notebooks
        (tmp_path / p.name).write_bytes(p.read_bytes())
        copies.append(tmp_path / p.name)
    t0 = time.monotonic()
    r = labkit_check("--json", *map(str, copies))
    (artifacts / "check-blank.seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    assert r.returncode == 1, r.stderr[-3000:]
    data = json.loads(r.stdout)
    (artifacts / "check-blank.json").write_text(r.stdout)
    _assert_json_shape(data, copies)
    assert data["score"] == 0 and not data["passed"]
    for n in data["notebooks"]:
        assert n["executed"] and not n["cell_errors"], (n["path"], n["cell_errors"])
        for c in n["checks"]:
            assert not c["passed"] and "not answered yet" in c["message"], c


@pytest.mark.integration
@pytest.mark.timeout(2400)
@pytest.mark.fresh_guest("the notebooks attach to a persistent lab VM by name (LABKIT_VM)")
def test_reference_solutions_score_full_marks(check_vm, tmp_path, artifacts):
    copies = []
    for p in SOLVED_HERE:      # the grader's tests give the others' solutions full marks
        nb = nbformat.read(p, as_version=4)
        assert fill(nb), p.name
        if p in SAVED_HERE:    # what JupyterLab saves after the learner ran the exercise cells
            for cell in nb.cells:
                ex = grading.exercise_id(cell)
                if ex:
                    value = grading.literal_answer(cell.source)["value"]
                    cell.outputs = [nbformat.v4.new_output("display_data", data={
                        grading.MIME: grading.answer_payload(ex, value), "text/plain": "recorded"})]
                    cell.execution_count = 1
        nbformat.write(nb, tmp_path / p.name)
        copies.append(tmp_path / p.name)
    t0 = time.monotonic()
    r = labkit_check(*map(str, copies))        # the text report first ...
    (artifacts / "check-solutions.seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    (artifacts / "check-solutions.txt").write_text(r.stdout + r.stderr)
    total = sum(e.points for e in EXERCISES if e.notebook in {p.name[:2] for p in SOLVED_HERE})
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert f"Score: {total}/{total}" in r.stdout
    assert "FAIL" not in r.stdout and "note: cell" not in r.stdout   # no cell raised
    for p in copies:
        how = "graded from its saved outputs" if p.name in {s.name for s in SAVED_HERE} else "executed now"
        assert f"{p} ({how}" in r.stdout, (p.name, how)


@pytest.mark.integration
@pytest.mark.timeout(1200)
@pytest.mark.fresh_guest("the notebooks attach to a persistent lab VM by name (LABKIT_VM)")
def test_graded_from_saved_outputs_without_rerun(check_vm, tmp_path):
    """A notebook saved with outputs is graded from them: an answered
    notebook-1 exercise passes, and the file is not modified."""
    src = next(p for p in NOTEBOOKS if p.name.startswith("01-"))
    nb = nbformat.read(src, as_version=4)
    fill(nb)
    lab = Lab(check_vm)
    lab.prepare_pmem()
    mode = next(ns.mode for ns in lab.namespaces() if ns.chardev)
    align = next(ns.align for ns in lab.namespaces() if ns.mode == "devdax")
    for cell in nb.cells:       # what JupyterLab saves after the learner ran the exercise cells
        ex = grading.exercise_id(cell)
        if ex:
            value = {"ex1.1": mode, "ex1.2": align,
                     "ex1.3": "Raw mode has no struct pages for the device, so nothing can be "
                              "mapped or referenced directly: no DAX."}[ex]
            cell.outputs = [nbformat.v4.new_output("display_data", data={
                grading.MIME: grading.answer_payload(ex, value), "text/plain": "recorded"})]
            cell.execution_count = 1
    path = tmp_path / src.name
    nbformat.write(nb, path)
    before = path.read_bytes()
    r = labkit_check("--json", str(path), timeout=600)
    data = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert data["notebooks"][0]["executed"] is False and data["passed"]
    assert path.read_bytes() == before


@pytest.mark.integration
@pytest.mark.fresh_guest("the notebooks attach to a persistent lab VM by name (LABKIT_VM)")
def test_vmpin_kb_of_a_held_registration(check_vm):
    lab = Lab(check_vm)
    lab.setup_rdma()
    held = lab.hold_pin("rdma", "anon", size=2 * 2**20)
    try:
        assert held.ok
        assert lab.vmpin_kb(held.pid) == 2048        # the live guest, as FACTS.md measured
    finally:
        held.release()
    assert lab.vmpin_kb(held.pid) is None            # the holder has exited
