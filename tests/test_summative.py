"""``labkit course grade`` / ``labkit course gradebook``.

Unit part (no guest): submission discovery, the default --jobs, the companion
VMs a notebook needs (the same names the lab functions connect to) and how
the sandbox exposes them, judging when the guest dies, the JSON/CSV shape and
the merge. Integration part: real guests, real sandboxed kernels: three
students' notebooks 00 and 04 (the reference solutions; blanks; forged saved
outputs) graded in one run with two guests at a time, notebooks 09 and 06
(two kernels: the grader starts the companion VM) with full marks, and a
notebook that panics its guest (its answer, recorded before, is still judged:
on the fresh judging guest). Hostile classes: tests/test_grader_hostile.py.
These runs are also the course's one execution of those notebooks, blank or
with the reference solutions (no cell may raise): tests/test_check.py's
``labkit check`` runs leave them out (tests/course_solutions.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from course_solutions import GRADER_BLANKS, GRADER_SOLUTIONS, GRADER_TWO_KERNELS, fill

from labkit.course import gradebook, grading, sandbox, summative
from labkit.course.exercises import BY_ID, for_notebook
from labkit.course.judge import ExerciseResult
from labkit.errors import ConfigError, GuestPanic

ROOT = Path(__file__).parent.parent
NOTEBOOKS = {p.name[:2]: p for p in (ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb")}


def labkit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def write_nb(directory: Path, number: str, how: str = "blank", edit=None) -> Path:
    nb = nbformat.read(NOTEBOOKS[number], as_version=4)
    if how == "solutions":
        assert fill(nb)
    if edit:
        edit(nb)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NOTEBOOKS[number].name
    nbformat.write(nb, path)
    return path


# -- unit: no guest ------------------------------------------------------------------------

def test_submissions_are_validated_before_any_guest(tmp_path):
    write_nb(tmp_path / "alice", "00")
    (tmp_path / "alice" / "notes.txt").write_text("not a notebook")
    assert summative.submissions([tmp_path / "alice"]) == [("alice", tmp_path / "alice" / NOTEBOOKS["00"].name)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad name!").mkdir()
    for bad, said in ((tmp_path / "missing", "not a submission directory"),
                      (tmp_path / "empty", "no course notebooks"),
                      (tmp_path / "bad name!", "not a usable student id")):
        with pytest.raises(ConfigError, match=said):
            summative.submissions([bad])
    with pytest.raises(ConfigError, match="given twice"):
        summative.submissions([tmp_path / "alice", tmp_path / "alice"])


def test_default_jobs_follow_the_allocations_cores_and_memory(monkeypatch):
    from labkit import cgroups

    def given(cpus: int, gib: int) -> None:
        monkeypatch.setattr(cgroups, "allocation",
                            lambda: cgroups.Allocation(cpus, gib * 2**30, "the test", "the test"))
    given(8, 3)
    assert summative.default_jobs() == 1          # memory bounds it: 3 GiB holds one 1.6 GiB job
    given(8, 64)
    assert summative.default_jobs() == 8          # cores bound it
    given(1, 64)
    assert summative.default_jobs() == 1          # a 1-CPU Slurm task on a big node


@pytest.mark.parametrize("notebook, kernel, companions", [
    ("06", "6.1", [("grade-other", "6.12")]),
    ("06", "6.12", [("grade-other", "6.1")]),
    ("09", "6.1", [("grade-k73", "7.3")]),
    ("09", "7.3", [("grade-k61", "6.1")]),
    ("00", "6.1", []),
    ("04", "6.1", []),
])
def test_the_grader_starts_the_companion_vms_the_notebook_attaches_to(notebook, kernel, companions, monkeypatch):
    """One declaration: the VMs the grader starts next to "grade" are the very
    names and kernels the notebook's comparison cells connect to."""
    from labkit.course.exercises import companions_for
    assert summative.companion_vms(notebook, kernel) == [("grade", kernel)] + companions
    assert companions_for(notebook) == {"06": ("matrix",), "09": ("odp",)}.get(notebook, ())
    if not companions:
        return
    import labkit.machine.vm
    from labkit.lab import Lab, lab, odp
    from labkit.lab.matrix import matrices_on_two_kernels
    from labkit.testing.fakes import FakeVM
    asked = []

    def connect(name, kernel, **_):
        asked.append((name, kernel))
        return FakeVM(kernel=kernel)
    monkeypatch.setattr(labkit.machine.vm, "connect", connect)
    monkeypatch.setattr(lab.Lab, "matrix", lambda self, **_: self.vm.kernel)
    monkeypatch.setattr(odp, "measure_story", lambda lab: lab.vm.kernel)
    vm = FakeVM(kernel=kernel)
    vm.name = "grade"
    compare = {"06": matrices_on_two_kernels, "09": odp.story_on_two_kernels}[notebook]
    here, there, _ = compare(Lab(vm))
    assert asked == companions and (here, there) == (kernel, companions[0][1])


@pytest.mark.parametrize("kernel, companions", [("6.1", [("grade-k510", "5.10")]), ("7.3", [("grade-k510", "5.10")]),
                                                ("5.10", [])])
def test_notebook_10_is_graded_beside_a_5_10_guest_unless_it_runs_5_10(kernel, companions, monkeypatch):
    """Notebook 10's cells and its judge attach to the 5.10 guest the grader starts (none when "grade" runs 5.10)."""
    import labkit.machine.vm
    from labkit.lab.companion import attach
    from labkit.testing.fakes import FakeVM
    assert summative.companion_vms("10", kernel) == [("grade", kernel)] + companions
    asked = []

    def connect(name, kernel, **_):
        asked.append((name, kernel))
        return FakeVM(kernel=kernel)
    monkeypatch.setattr(labkit.machine.vm, "connect", connect)
    vm = FakeVM(kernel=kernel)
    vm.name = "grade"
    got = attach("before511", vm)
    assert asked == companions and (got is vm) == (not companions)


def test_the_sandbox_exposes_each_companion_like_the_main_guest(tmp_path):
    comp = sandbox.Companion("grade-k73", tmp_path / "state/vms/grade-k73", tmp_path / "view-k73", 40023)
    sb = sandbox.Sandbox(uid=62001, run_dir=tmp_path / "run", vm_state=tmp_path / "state/vms/grade",
                         vm_view=tmp_path / "view", state_root=tmp_path / "state", vm_name="grade", ssh_port=40022,
                         companions=(comp,))
    argv = sandbox.bwrap_argv(sb, ["true"])
    pairs = list(zip(argv, argv[1:], argv[2:]))
    assert ("--ro-bind", str(tmp_path / "view-k73"), str(tmp_path / "state/vms/grade-k73")) in pairs
    assert ("--ro-bind", str(tmp_path / "view"), str(tmp_path / "state/vms/grade")) in pairs
    assert ("--setenv", "LABKIT_MANAGED_VMS", "grade grade-k73") in pairs
    k = sandbox.kernel_argv(sb)
    relays = [b for a, b in zip(k, k[1:]) if a == "--relay"]
    assert relays == [f"40022={tmp_path / 'run/ssh.sock'}", f"40023={tmp_path / 'run/ssh-grade-k73.sock'}"]


def test_stopping_a_vm_the_grader_owns_only_lets_go_of_it(tmp_path, monkeypatch):
    """In the sandbox the notebook's ``vm2.stop()`` neither fails on its
    read-only state dir (StateDirError, a cell error, before) nor touches the
    guest or its files: the grader stops it."""
    from labkit.machine.state import VMState
    from labkit.machine.vm import VM
    monkeypatch.setenv("LABKIT_MANAGED_VMS", "grade grade-k73")
    vm = VM("grade-k73", kernel="7.3", persistent=True, state_dir=tmp_path / "view")
    vm.state = VMState.RUNNING
    assert vm.stop() is False and vm.state is VMState.STOPPED
    assert not (tmp_path / "view").exists()      # not even the lifecycle lock was taken


class _DeadLab:
    def sh(self, script):
        raise GuestPanic("grade", "Kernel panic - not syncing: sysrq triggered crash")


def test_a_dead_guest_grades_what_needs_no_guest_and_says_why():
    g = summative.NotebookGrade("alice", "06-x.ipynb", "06", "0" * 64, "0.1.0", "now")
    exs = [BY_ID["ex6.1"], BY_ID["ex6.2"]]
    given = {"ex6.1": {"id": "ex6.1", "blank": False, "value": (5.0, 5.1)},
             "ex6.2": {"id": "ex6.2", "blank": False,
                       "value": ["get_user_pages_longterm", "FOLL_LONGTERM", "FOLL_PIN", "check_vma_flags"]}}
    out = summative._judged(exs, given, _DeadLab(), g)
    assert [(e.id, e.points) for e in out] == [("ex6.1", 0), ("ex6.2", BY_ID["ex6.2"].points)]
    assert "not graded" in out[0].message and "GuestPanic" in out[0].message
    assert "GuestPanic" in g.reason


def test_student_json_csv_and_merge(tmp_path):
    def grade(student, number, points):
        g = summative.NotebookGrade(student, f"{number}-x.ipynb", number, "ab" * 32, "0.1.0", "2026-12-01T00:00:00+00:00",
                                    kernel_release="6.1.0-57-amd64", duration_s=3.0)
        g.exercises = [ExerciseResult(e.id, e.title, points and e.points, e.points, bool(points), "right")
                       for e in for_notebook(number)]
        return g
    a, b = tmp_path / "run1", tmp_path / "run2"
    gradebook.write_student(a, "alice", [grade("alice", "00", 1), grade("alice", "04", 1)])
    gradebook.write_student(b, "bob", [grade("bob", "00", 0)])
    data = json.loads((a / "alice.json").read_text())
    assert data["score"] == data["max"] == 1 + sum(e.points for e in for_notebook("04"))
    out = tmp_path / "grades.csv"
    assert gradebook.merge([a, b], out) == 2
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == gradebook.COLUMNS
    assert len(rows) == 1 + len(for_notebook("04")) + 1
    assert {(r["student"], r["exercise"], r["points"]) for r in rows if r["notebook"].startswith("00")} == {
        ("alice", "ex0.1", "1"), ("bob", "ex0.1", "0")}
    with pytest.raises(ConfigError, match="in both"):
        gradebook.merge([a, a / "alice.json"], out)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a labkit grades file"):
        gradebook.merge([tmp_path / "junk.json"], out)


def test_gradebook_cli_errors_are_clear(tmp_path):
    r = labkit("course", "gradebook", str(tmp_path / "nowhere"), "-o", str(tmp_path / "g.csv"), timeout=60)
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "Traceback" not in r.stderr
    r = labkit("course", "grade", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 2 and "not a submission directory" in r.stderr and "Traceback" not in r.stderr


# -- integration: real guests, sandboxed kernels ------------------------------------------

def _forge(nb) -> None:
    """Saved outputs claiming a right answer the source never computes."""
    for cell in nb.cells:
        if grading.exercise_id(cell) == "ex0.1":
            cell.execution_count = 9
            cell.outputs = [nbformat.v4.new_output("display_data", data={
                grading.MIME: {"id": "ex0.1", "blank": False, "value": os.uname().release}})]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    from conftest import ARTIFACTS as artifacts
    from conftest import require_image
    artifacts.mkdir(exist_ok=True)
    require_image("6.1")
    base = tmp_path_factory.mktemp("submissions")
    for number in GRADER_SOLUTIONS:
        write_nb(base / "alice", number, "solutions")
    for number in GRADER_BLANKS:
        write_nb(base / "bob", number, "blank")
    write_nb(base / "carol", "00", "blank", edit=_forge)
    out = base / "out"
    t0 = time.monotonic()
    r = labkit("course", "grade", *(str(base / s) for s in ("alice", "bob", "carol")), "--out", str(out),
               "--jobs", "2", "--timeout", "600", "--kernel", "6.1", timeout=1500)
    (artifacts / "course-grade.seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    (artifacts / "course-grade.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    return SimpleNamespace(base=base, out=out, r=r)


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1600)
def test_reference_solutions_full_marks_blanks_and_forgeries_zero(graded):
    scores, feedback = {}, {}
    for student in ("alice", "bob", "carol"):
        data = json.loads((graded.out / f"{student}.json").read_text())
        for nb in data["notebooks"]:
            path = graded.base / student / nb["path"]
            assert nb["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert re.fullmatch(r"\d+\.\d+\.\d+-\S+", nb["kernel_release"]), nb
            assert nb["labkit_version"] and nb["started_at"] and nb["duration_s"] > 0
            scores[(student, nb["notebook"])] = (nb["score"], nb["max"], nb["reason"], nb["cell_errors"])
            feedback[(student, nb["notebook"])] = [e["feedback"] for e in nb["exercises"]]
    for number in GRADER_SOLUTIONS:
        top = sum(e.points for e in for_notebook(number))
        score, mx, reason, errors = scores[("alice", number)]
        assert (score, mx) == (top, top) and not reason and not errors, scores[("alice", number)]
    for number in GRADER_BLANKS:       # the notebook as given: no cell raises, nothing is answered
        top = sum(e.points for e in for_notebook(number))
        score, mx, reason, errors = scores[("bob", number)]
        assert (score, mx) == (0, top) and not reason and not errors, scores[("bob", number)]
        said = feedback[("bob", number)]
        assert len(said) == len(for_notebook(number)) and all("not answered yet" in f for f in said), said
    assert scores[("carol", "00")][:2] == (0, 1)     # the forged saved output was not believed


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1600)
def test_csv_has_one_row_per_exercise_and_gradebook_reproduces_it(graded, tmp_path):
    rows = list(csv.DictReader((graded.out / "grades.csv").open()))
    assert tuple(rows[0]) == gradebook.COLUMNS
    expect = 2 * (len(for_notebook("00")) + len(for_notebook("04"))) + len(for_notebook("00"))
    assert len(rows) == expect
    for r in rows:          # feedback never shows an expected value: right/wrong and a hint
        assert r["feedback"] == "right" or r["feedback"].startswith(("not ", "prediction", "recorded")), r
    merged = tmp_path / "merged.csv"
    r = labkit("course", "gradebook", str(graded.out), "-o", str(merged), timeout=60)
    assert r.returncode == 0, r.stderr
    assert merged.read_text() == (graded.out / "grades.csv").read_text()
    assert "N of M" not in graded.r.stderr and re.search(r"\d+ of 5, ETA \d+ s", graded.r.stderr)


def _panic(nb) -> None:
    """Answer ex0.1 right, then crash the guest: the answer is judged on the
    fresh judging guest, the crash is the cell's error."""
    for cell in nb.cells:
        if grading.exercise_id(cell) == "ex0.1":
            cell.source = 'answer = int(vm.run("nproc").stdout)\nrecord("ex0.1", answer)'
    nb.cells.append(nbformat.v4.new_code_cell(
        'vm.run(["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger"], timeout=60)'))


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(900)
def test_a_notebook_that_panics_its_guest_is_graded_with_the_reason(tmp_path):
    from conftest import require_image
    require_image("6.1")
    write_nb(tmp_path / "dave", "00", edit=_panic)
    out = tmp_path / "out"
    r = labkit("course", "grade", str(tmp_path / "dave"), "--out", str(out), "--jobs", "1", "--timeout", "300",
               "--kernel", "6.1", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    nb = json.loads((out / "dave.json").read_text())["notebooks"][0]
    assert nb["score"] == 1 and nb["exercises"][0]["feedback"] == "right", nb
    assert re.search(r"Guest(Panic|Died|Hung)", " ".join(nb["cell_errors"])), nb


def _companion_qemus() -> list[str]:
    """Command lines of running QEMUs of a grader's companion VMs."""
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if argv and "qemu-system" in argv[0] and re.search(r"-name labkit-grade-(other|k\d+) ", " ".join(argv) + " "):
            found.append(" ".join(argv))
    return found


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("number, other", list(GRADER_TWO_KERNELS.items()))
def test_a_notebook_comparing_two_kernels_gets_full_marks(number, other, tmp_path):
    """Notebooks 06 and 09 attach to a companion VM of another kernel: the
    grader starts it next to "grade" (the sandbox cannot boot one), exposes
    it like the main guest, and stops it; the reference solutions score every
    autograded point (9.1 and 9.2 read the two-kernel comparison) with no cell
    error (the notebook's own ``vm2.stop()`` included)."""
    from conftest import ARTIFACTS as artifacts
    from conftest import require_image
    require_image("6.1")
    require_image(other)
    write_nb(tmp_path / "alice", number, "solutions")
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = labkit("course", "grade", str(tmp_path / "alice"), "--out", str(out), "--jobs", "1", "--timeout", "900",
               "--kernel", "6.1", timeout=1400)
    artifacts.mkdir(exist_ok=True)
    (artifacts / f"course-grade-{number}.seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    nb = json.loads((out / "alice.json").read_text())["notebooks"][0]
    top = sum(e.points for e in for_notebook(number))
    assert (nb["score"], nb["max"]) == (top, top) and not nb["reason"] and not nb["cell_errors"], nb
    assert all(e["points"] == e["max"] for e in nb["exercises"]), nb["exercises"]
    assert not _companion_qemus()


def _grade_record() -> summative.NotebookGrade:
    return summative.NotebookGrade("eve", "03-pins.ipynb", "03", "", "test", "now")


@pytest.mark.integration
@pytest.mark.parametrize("kernel", ["6.1"])
def test_the_grader_refuses_a_judging_guest_that_is_tainted_or_has_a_labkit_module(kernel, pool):
    """Issue 28: the judging guest of ``labkit course grade`` is refused, and the
    reason said, when a labkit module is loaded in it, and still when the
    module is gone but its taint stays, even if the notebook's own guest was
    tainted the same way at its start (a snapshot made after a load): the
    code exercise is "not graded", nothing is scored. A clean guest judges."""
    from labkit.course import judging
    from labkit.timeout import Deadline
    vm = pool.fresh(kernel)               # changed for good below; restored from the snapshot after
    try:
        ex = BY_ID["ex3.8"]
        given = {"ex3.8": {"blank": False, "value": "def buffer(path, size):\n    return None\n"}}
        clean = judging.read_integrity(vm)
        assert not clean.foreign(), clean
        ok = summative.judge_on_guest(vm, [ex], given, _grade_record(), clean, Deadline(300))
        assert ok[0].message.startswith("not right: buffer() must return an mmap"), ok     # judged
        vm.run(["modprobe", "labkit_no_longterm_check"], timeout=60, check=True)
        g = _grade_record()
        loaded = summative.judge_on_guest(vm, [ex], given, g, clean, Deadline(300))
        assert loaded[0].points == 0 and loaded[0].message.startswith(
            "not graded: the judging guest, fresh from the snapshot, is not clean: its kernel became tainted ("), loaded
        assert "a labkit module is loaded (labkit_no_longterm_check)" in loaded[0].message, loaded
        assert g.reason == loaded[0].message.removeprefix("not graded: "), g.reason
        vm.run(["rmmod", "labkit_no_longterm_check"], timeout=60, check=True)
        same_start = judging.read_integrity(vm)       # as if the snapshot itself had been tainted so
        assert same_start.taint and not same_start.modules, same_start
        gone = summative.judge_on_guest(vm, [ex], given, _grade_record(), same_start, Deadline(300))
        assert gone[0].points == 0 and gone[0].message.startswith(
            "not graded: the judging guest, fresh from the snapshot, is not clean: its kernel is tainted (O "
            "(out-of-tree module)"), gone
    finally:
        pool.fresh(kernel)
