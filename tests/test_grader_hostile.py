"""``labkit course grade`` against a hostile class (issue 29).

Unit part (no guest; real bwrap, real flocks, real processes and a real
ipykernel where the behaviour is theirs): sandbox uids unique across grader
processes; a submission's duplicates, links, FIFOs, devices and oversize
files refused for that notebook alone, and the hash of the bytes graded;
malformed metadata and grader failures as one notebook's feedback while the
others are written as they come; guest output capped, every wait ended at
the notebook's deadline and the checks inside ``--timeout``; the kernel's
outputs capped with the answers kept; user namespaces off inside the
sandbox; code exercises judged last and refused when the judging guest got
tainted.

Integration part: ONE ``labkit course grade`` run (``--jobs 2``) of a class
where an honest student (notebook 00, and 03 with a right code answer) sits
beside the attackers, plus a second grader process started at the same time
for one more student: every attack fails for its own reason and the honest
work keeps its marks. The attacks are listed in ``STUDENTS``."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from labkit.course import grading, intake, judging, runner, sandbox, summative, uids
from labkit.course import judge as judge_module
from labkit.course.exercises import BY_ID, for_notebook
from labkit.course.judge import ExerciseResult, judge
from labkit.errors import ConfigError, GuestDied, LabError
from labkit.machine.channels.ssh import CommandResult
from labkit.timeout import Deadline

from course_solutions import SOLUTIONS

ROOT = Path(__file__).parent.parent
NOTEBOOKS = {p.name[:2]: p for p in (ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb")}
NB00, NB03 = NOTEBOOKS["00"], NOTEBOOKS["03"]
INSTRUCTOR_00 = ROOT / "instructor" / "source" / NB00.name


def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests run the grader's real sandbox parts (setpriv, bwrap, chown): run them as root "
                    "(CI does)")


def _nb(number: str = "00", edit=None) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS[number], as_version=4)
    if edit:
        edit(nb)
    return nb


def _write(path: Path, nb) -> Path:
    """The notebook's JSON as it is (nbformat.write would refuse a malformed one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))
    return path


# -- uids: unique on the host, across grader processes ---------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from labkit.course import uids
    try:
        leases = [uids.acquire(directory=Path(sys.argv[1])) for _ in range(int(sys.argv[2]))]
    except uids.UidError as exc:
        print("error", exc.hint, flush=True)
        sys.exit(3)
    print(" ".join(str(lease.uid) for lease in leases), flush=True)
    sys.stdin.read()        # hold them until the test closes our stdin (or kills us)
""")


def _holder(directory: Path, count: int, first: int, last: int) -> subprocess.Popen:
    env = dict(os.environ, **{uids.RANGE_ENV: f"{first}-{last}"})
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(count)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def test_two_grader_processes_at_once_never_share_a_uid(tmp_path):
    """Two processes lease at the same time from one 4-uid range: four
    different uids; a third finds none (and says what to do); when a holder
    is killed (no clean-up of its own), its uids are free again."""
    _root()
    d = tmp_path / "grade-uids"
    first, last = 62990, 62993
    a, b = _holder(d, 2, first, last), _holder(d, 2, first, last)
    try:
        got = [int(u) for p in (a, b) for u in p.stdout.readline().split()]
        assert sorted(got) == list(range(first, last + 1)), got
        c = _holder(d, 1, first, last)
        out, _ = c.communicate(timeout=30)
        assert c.returncode == 3 and "LABKIT_GRADE_UIDS" in out, out
        a.kill()
        a.wait(timeout=10)
        d2 = _holder(d, 2, first, last)
        freed = sorted(int(u) for u in d2.stdout.readline().split())
        assert freed == sorted(got[:2]), (freed, got)
        d2.kill()
        d2.wait(timeout=10)
    finally:
        for p in (a, b):
            p.kill()
            p.wait(timeout=10)
    assert d.stat().st_mode & 0o777 == 0o700 and d.stat().st_uid == 0


def test_a_uid_that_still_has_a_process_is_not_leased(tmp_path):
    _root()
    busy = 62980
    sleeper = subprocess.Popen(["setpriv", f"--reuid={busy}", f"--regid={busy}", "--clear-groups", "sleep", "60"])
    try:
        deadline = Deadline(10)
        while not uids._has_processes(busy) and not deadline.expired:
            time.sleep(0.05)
        lease = uids.acquire(range(busy, busy + 2), tmp_path / "grade-uids")
        assert lease.uid == busy + 1
        lease.release()
        with pytest.raises(uids.UidError, match="in use"):
            uids.acquire(range(busy, busy + 1), tmp_path / "grade-uids")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_directory_others_could_write_is_refused(tmp_path):
    _root()
    d = tmp_path / "grade-uids"
    d.mkdir(mode=0o700)
    d.chmod(0o777)
    with pytest.raises(uids.UidError, match="only the grader can write") as e:
        uids.acquire(range(62970, 62971), d)
    assert "remove it" in e.value.hint
    d.chmod(0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(uids.UidError, match="owner 65534"):
        uids.acquire(range(62970, 62971), d)


@pytest.mark.parametrize("text, ok", [("", range(62000, 63000)), ("63000-63009", range(63000, 63010)),
                                      ("63000", None), ("0-10", None), ("63010-63000", None), ("a-b", None)])
def test_a_jobs_own_uid_range(text, ok):
    if ok is not None:
        assert uids.uid_range({uids.RANGE_ENV: text}) == ok
    else:
        with pytest.raises(ConfigError, match=uids.RANGE_ENV):
            uids.uid_range({uids.RANGE_ENV: text})


# -- what a submission may hold ------------------------------------------------------------------

def _hostile_dir(d: Path) -> None:
    """One student's directory with every kind of file the grader refuses,
    and one good notebook (07)."""
    d.mkdir(parents=True)
    for name in ("00-welcome.ipynb", "00-copy.ipynb"):
        _write(d / name, _nb("00"))
    (d / "01-link.ipynb").symlink_to(INSTRUCTOR_00)
    os.mkfifo(d / "02-fifo.ipynb")
    _write(d / "03-original.ipynb", _nb("03"))
    os.link(d / "03-original.ipynb", d / "04-hardlink.ipynb")
    (d / "05-dir.ipynb").mkdir()
    with open(d / "06-huge.ipynb", "wb") as f:
        f.truncate(intake.MAX_BYTES + 1)           # sparse: no disk used, and never read
    os.mknod(d / "08-device.ipynb", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    _write(d / "07-capstone.ipynb", _nb("07"))


def test_duplicates_links_and_special_files_are_refused_for_that_notebook_alone(tmp_path):
    _root()
    _hostile_dir(tmp_path / "mallory")
    _write(tmp_path / "alice" / NB00.name, _nb("00"))
    got = {(e.student, e.number): e for e in intake.entries([tmp_path / "mallory", tmp_path / "alice"])}
    why = {n: e.refused for (s, n), e in got.items() if s == "mallory"}
    assert "2 files for notebook 00 (00-copy.ipynb, 00-welcome.ipynb)" in why["00"] and "submit exactly one" in why["00"]
    assert why["01"] == "01-link.ipynb is a symbolic link: submit the notebook itself, as a regular file"
    assert "is a FIFO" in why["02"] and "is a directory" in why["05"] and "is a device" in why["08"]
    assert "hard link" in why["03"] and "hard link" in why["04"]       # both names of the one file
    assert "more than the 32 MiB" in why["06"]
    assert why["07"] == "" and got[("alice", "00")].refused == ""
    assert summative.submissions([tmp_path / "alice"]) == [("alice", tmp_path / "alice" / NB00.name)]


def test_reading_never_follows_a_link_nor_blocks_on_a_fifo(tmp_path):
    good = _write(tmp_path / NB00.name, _nb("00"))
    assert intake.read(good) == good.read_bytes()
    (tmp_path / "link.ipynb").symlink_to(INSTRUCTOR_00)
    os.mkfifo(tmp_path / "fifo.ipynb")
    t0 = time.monotonic()
    for name, said in (("link.ipynb", "symbolic link"), ("fifo.ipynb", "FIFO")):
        with pytest.raises(intake.Refused, match=said):
            intake.read(tmp_path / name)
    assert time.monotonic() - t0 < 5


@pytest.fixture
def no_guests(monkeypatch):
    """grade_notebook without guests: the guest part records what it was given."""
    seen = []

    def fake(g, nb, exercises, tmp, opts, deadline):
        seen.append(SimpleNamespace(g=g, nb=nb))
        g.exercises = [ExerciseResult(e.id, e.title, e.points, e.points, True, "right") for e in exercises]
    monkeypatch.setattr(summative, "_grade_in_guests", fake)
    return seen


def test_a_refused_file_is_never_read_or_run_and_its_hash_is_empty(tmp_path, no_guests):
    _root()
    _hostile_dir(tmp_path / "mallory")
    for e in intake.entries([tmp_path / "mallory"]):
        g = summative.grade_notebook(e.student, e.path, summative.Options(), e.refused)
        if e.number == "07":
            assert g.sha256 == hashlib.sha256(e.path.read_bytes()).hexdigest() and not g.reason
            continue
        assert g.sha256 == "" and g.reason == f"refused: {e.refused}" and g.score == 0, g
        assert all(x.message == f"not graded: refused: {e.refused}" for x in g.exercises)
    assert [s.g.notebook for s in no_guests] == ["07"]


def test_the_recorded_hash_is_of_the_bytes_graded(tmp_path, monkeypatch):
    """The file is swapped while it is graded: the hash and the notebook
    graded are both of the bytes read first."""
    path = _write(tmp_path / "alice" / NB00.name, _nb("00"))
    first = path.read_bytes()
    graded = []

    def swap_then_grade(g, nb, exercises, tmp, opts, deadline):
        _write(path, _nb("00", lambda nb: nb.cells.append(nbformat.v4.new_code_cell("print('swapped')"))))
        graded.append(nb)
    monkeypatch.setattr(summative, "_grade_in_guests", swap_then_grade)
    g = summative.grade_notebook("alice", path, summative.Options())
    assert g.sha256 == hashlib.sha256(first).hexdigest() != hashlib.sha256(path.read_bytes()).hexdigest()
    assert not any("swapped" in c.source for c in graded[0].cells)


def test_a_notebook_under_another_notebooks_name_is_refused(tmp_path, no_guests):
    nb = _nb("03")
    path = _write(tmp_path / "alice" / "00-welcome.ipynb", nb)       # notebook 03's cells, metadata "03"
    g = summative.grade_notebook("alice", path, summative.Options())
    assert g.reason.startswith("refused: 00-welcome.ipynb says it is notebook 03") and not no_guests


# -- one notebook's trouble is its own --------------------------------------------------------------

def _malformed_top(nb) -> None:
    nb.metadata["labkit"] = 1


def _malformed_tags(nb) -> None:
    first, second = [c for c in nb.cells if c.cell_type == "code"][:2]
    first.metadata["tags"] = 5
    second.metadata["tags"] = ["exercise", 7, None]


def test_malformed_metadata_is_read_as_absent():
    for edit in (_malformed_top, _malformed_tags):
        nb = _nb("00", edit)
        assert grading.notebook_number(NB00, nb) == "00"
        assert set(grading.answers(nb)) == {"ex0.1"}
        grading.prepare_for_execution(nb)
        assert grading.cell_errors(nb) == []
        assert all(isinstance(c.metadata.get("tags", []), list) for c in nb.cells)
    cell = nbformat.v4.new_code_cell("answer = 1")
    for tags in (5, "exercise ex0.1", [5, None, "exercise", {"a": 1}], None):
        cell.metadata["tags"] = tags
        assert grading.exercise_id(cell) is None
    cell.metadata = 7
    assert grading.exercise_id(cell) is None


def test_one_bad_notebook_never_costs_the_class_its_grades(tmp_path, monkeypatch):
    """A class where one notebook has ``"labkit": 1``, one a cell with
    ``"tags": 5``, one is not JSON and one makes the grader itself fail: every
    student's file is written, the honest one with full marks, each bad one
    with its own reason."""
    subs = tmp_path / "subs"
    _write(subs / "alice" / NB00.name, _nb("00"))
    _write(subs / "meta" / NB00.name, _nb("00", _malformed_top))
    _write(subs / "tags" / NB00.name, _nb("00", _malformed_tags))
    (subs / "junk").mkdir()
    (subs / "junk" / NB00.name).write_bytes(b"\xff{not json")
    _write(subs / "bug" / NB00.name, _nb("00"))

    def fake(g, nb, exercises, tmp, opts, deadline):
        if g.student == "bug":
            raise RuntimeError("a bug in the grader")
        g.exercises = [ExerciseResult(e.id, e.title, e.points, e.points, True, "right") for e in exercises]
    monkeypatch.setattr(summative, "_grade_in_guests", fake)
    monkeypatch.setattr(summative, "_prepare", lambda work, opts, progress: opts)
    out = tmp_path / "out"
    students = ["alice", "meta", "tags", "junk", "bug"]
    results = summative.grade_all([subs / s for s in students], summative.Options(), jobs=2, out=out)
    files = {s: json.loads((out / f"{s}.json").read_text())["notebooks"][0] for s in students}
    assert {s: (nb["score"], nb["max"]) for s, nb in files.items()} == {
        "alice": (1, 1), "meta": (1, 1), "tags": (1, 1), "junk": (0, 1), "bug": (0, 1)}
    assert "NotebookError" in files["junk"]["reason"] and "not a Jupyter notebook" in files["junk"]["reason"]
    assert files["bug"]["reason"].startswith("the grader failed on this notebook (RuntimeError: a bug")
    assert files["bug"]["exercises"][0]["feedback"].startswith("not graded: the grader failed")
    assert sorted(r["student"] for r in csv.DictReader((out / "grades.csv").open())) == sorted(students)
    assert set(results) == set(students)


def test_an_interrupted_run_keeps_what_it_graded(tmp_path, monkeypatch):
    subs = tmp_path / "subs"
    for s in ("alice", "bob"):
        _write(subs / s / NB00.name, _nb("00"))
    out = tmp_path / "out"

    def fake(g, nb, exercises, tmp, opts, deadline):
        if g.student == "bob":      # alice's result reaches the disk while bob's notebook is still graded
            deadline = Deadline(10)
            while not (out / "grades.csv").exists() and not deadline.expired:
                time.sleep(0.05)
            raise KeyboardInterrupt
        g.exercises = [ExerciseResult(e.id, e.title, e.points, e.points, True, "right") for e in exercises]
    monkeypatch.setattr(summative, "_grade_in_guests", fake)
    monkeypatch.setattr(summative, "_prepare", lambda work, opts, progress: opts)
    with pytest.raises(KeyboardInterrupt):
        summative.grade_all([subs / "alice", subs / "bob"], summative.Options(), jobs=1, out=out)
    assert json.loads((out / "alice.json").read_text())["score"] == 1 and not (out / "bob.json").exists()
    assert [r["student"] for r in csv.DictReader((out / "grades.csv").open())] == ["alice"]
    assert not list(out.glob("*.tmp"))


# -- limits that bound ---------------------------------------------------------------------------

class _Flood:
    """A VM whose every command sends 1 MiB chunks until told to stop (by an exception)."""

    name, kernel, accel, ssh = "judge", "6.1", None, None

    def __init__(self) -> None:
        self.sent = 0
        self.timeouts: list[float] = []

    def run(self, cmd, timeout=60.0, check=False, stdin=None, on_stdout=None, on_stderr=None):
        self.timeouts.append(timeout)
        chunk = "x" * 2**20
        while True:                       # like SSHChannel.run: the callback sees every chunk
            self.sent += len(chunk)
            (on_stderr if self.sent % (2 * 2**20) else on_stdout)(chunk)


def test_guest_output_read_by_a_check_is_capped():
    vm = _Flood()
    bounded = judging.Bounded(vm, Deadline(60))
    with pytest.raises(judging.OutputTooLarge, match="more than 16 MiB"):
        bounded.run(["python3", "/run/labkit/pinprobe.pyz", "learner-buffer"])
    assert vm.sent <= judging.OUTPUT_CAP + 2**20       # stopped at the cap, not at the guest's will

    class Stream:
        finished = False

        def read_available(self):
            return b"y" * 2**20, b""

        def wait_readable(self, timeout):
            return True
    shell = judging.Bounded(SimpleNamespace(ssh=SimpleNamespace(start=lambda cmd, timeout: Stream())),
                            Deadline(60)).ssh
    stream = shell.start("dmesg --follow-new")
    with pytest.raises(judging.OutputTooLarge):
        for _ in range(judging.OUTPUT_CAP // 2**20 + 2):
            stream.read_available()


def test_every_guest_wait_of_the_checks_ends_at_the_notebooks_deadline():
    vm = _Flood()
    vm.run = lambda cmd, timeout=60.0, **kw: (vm.timeouts.append(timeout),  # type: ignore[method-assign]
                                              CommandResult(str(cmd), 0, "", "", 0.0))[1]
    deadline = Deadline(2.0)
    judging.Bounded(vm, deadline).run("sleep 58", timeout=60)
    assert vm.timeouts[-1] <= 2.0
    expired = judging.Bounded(vm, Deadline(0))
    calls = len(vm.timeouts)
    with pytest.raises(judging.TimeUp, match="--timeout 0 s, checks included"):
        expired.run("uname -r")
    with pytest.raises(judging.TimeUp):
        expired.ssh.start("dmesg")
    assert len(vm.timeouts) == calls            # nothing reached the guest


class _HangingLab:
    """A judging guest whose commands hang until the guest is killed."""

    def __init__(self) -> None:
        self.killed = threading.Event()

    def sh(self, script, timeout=60.0, check=True):
        if script == "true":
            return CommandResult(script, 0, "", "", 0.0)
        self.killed.wait(120)
        raise GuestDied("QEMU was killed")


def test_the_checks_run_inside_timeout(monkeypatch):
    """A check that would wait on the guest for a minute ends when the
    notebook's time is up: the judging guest is killed at the deadline and
    the feedback says the time limit, not a guest failure."""
    lab = _HangingLab()
    given = {"ex0.1": {"id": "ex0.1", "blank": False, "value": 6}}     # read, then asked of the guest
    deadline = Deadline(0.4)
    t0 = time.monotonic()
    with judging.kill_at(deadline, lab.killed.set, "the judging guest") as fired:
        out = judge(for_notebook("00"), given, lab, contain=True, deadline=deadline).results
    assert fired.is_set() and time.monotonic() - t0 < 10
    assert out[0].points == 0 and out[0].message == ("not graded: the notebook's time limit (--timeout 0 s, checks "
                                                      "included) ran out")
    assert runner.judge_reserve(900) == 180 and runner.judge_reserve(40) == 20 and runner.judge_reserve(20) == 10
    budget = runner.Budget(300, Deadline(300))
    assert 224 < budget.cells_s <= 225


def test_the_kernels_outputs_are_capped_and_the_answers_kept():
    """A real kernel prints 20 MiB (many lines, then one huge string) in a
    notebook with a cell tagged ``5`` (nbclient itself raised TypeError on it,
    and the run ended there): the grader's tidied copy runs to the end, keeps
    16 MiB of output with a note, and the answer recorded after it all."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("for i in range(12):\n    print('x' * 2**20)"),
                nbformat.v4.new_code_cell("print('y' * 8 * 2**20)"),
                nbformat.v4.new_code_cell("answer = '6.1.0-x'\nfrom labkit.grading import record\nrecord('ex0.1', answer)")]
    nb.cells[0].metadata["tags"] = 5
    nb.cells[2].metadata["tags"] = ["exercise", "ex0.1", 7]
    marker = grading.prepare_for_execution(nb)
    assert nb.cells[0].metadata["tags"] == [] and nb.cells[2].metadata["tags"] == ["exercise", "ex0.1"]
    client = runner.capped_client(nb, timeout=120, kernel_name="python3", allow_errors=True,
                                  store_widget_state=False)
    client.execute()
    kept = sum(len(o.get("text", "")) for c in nb.cells for o in c.outputs)
    assert runner.OUTPUT_CAP <= kept <= runner.OUTPUT_CAP + 2**10
    assert client.dropped >= 4 * 2**20 and "the rest were not kept" in nb.cells[1].outputs[-1]["text"]
    assert grading.cell_errors(nb) == [] and grading.answers(nb, marker)["ex0.1"]["value"] == "6.1.0-x"


# -- the sandbox: no user namespaces ----------------------------------------------------------------


def _in_sandbox(tmp_path: Path, disable: bool) -> str:
    run = tmp_path / ("run-on" if disable else "run-off")
    run.mkdir()
    os.chown(run, 62960, 62960)
    sb = sandbox.Sandbox(uid=62960, run_dir=run, vm_state=tmp_path / "state", vm_view=tmp_path / "view",
                         state_root=tmp_path / "state-root", vm_name="grade", ssh_port=40022, disable_userns=disable)
    (tmp_path / "view").mkdir(exist_ok=True)
    bwrap = sandbox.require_bwrap()
    inner = sandbox.drop_argv(sb.uid) + (sandbox.no_userns_argv(bwrap) if disable else [])
    argv = sandbox.bwrap_argv(sb, inner + [sb.python, "-c", USERNS_TRY], bwrap)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()


def test_user_namespaces_are_off_inside_the_sandbox(tmp_path):
    """The grader's own bwrap command line and uid switch, with and without
    the inner layer: a user namespace is made without it (the control), not
    with it."""
    _root()
    assert sandbox.userns_problem(sandbox.require_bwrap()) == "", "this host cannot switch them off"
    assert _in_sandbox(tmp_path, disable=False) == "made"
    assert _in_sandbox(tmp_path, disable=True) == "No space left on device"
    sb = sandbox.Sandbox(uid=62001, run_dir=tmp_path / "r", vm_state=tmp_path / "s", vm_view=tmp_path / "v",
                         state_root=tmp_path, vm_name="grade", ssh_port=40022, disable_userns=True)
    k = sandbox.kernel_argv(sb, "/usr/bin/bwrap")
    at = k.index("--no-new-privs")
    assert k[at + 2:at + 10] == sandbox.no_userns_argv("/usr/bin/bwrap")


def test_the_run_directory_the_kernel_shares_with_the_grader_is_small(tmp_path):
    """The kernel's one writable directory on the host side is a tmpfs of
    ``run_mb`` owned by its uid: filling it fails there, never the host's disk."""
    _root()
    run = tmp_path / "run"
    with sandbox.run_dir_mount(run, 62950, sandbox.KernelLimits(run_mb=8)):
        assert os.path.ismount(run) and run.stat().st_uid == 62950
        with pytest.raises(OSError) as e, open(run / "fill", "wb") as f:
            for _ in range(16):
                f.write(b"z" * 2**20)
                f.flush()
        assert e.value.errno == 28           # ENOSPC
    assert not os.path.ismount(run)


# -- judging: learner code last, and a tainted guest refused ------------------------------------------

def test_code_exercises_are_judged_last_and_a_taint_refuses_them(monkeypatch):
    order = []

    def one_check(ex, ans, live):
        order.append(ex.id)
        return ExerciseResult(ex.id, ex.title, ex.points, ex.points, True, "right")
    monkeypatch.setattr(judge_module, "_result", one_check)
    lab = SimpleNamespace(sh=lambda script, **kw: CommandResult(script, 0, "", "", 0.0))
    exs = [BY_ID[i] for i in ("ex3.1", "ex3.8", "ex3.9")]
    given = {e.id: {"id": e.id, "blank": False, "value": "x"} for e in exs}
    problem = judging.Integrity(1 << 12 | 1 << 13, ("labkit_no_longterm_check",)).problem_since(judging.Integrity(0, ()))
    out = judge(exs, given, lab, contain=True, guard=lambda: problem).results
    assert order == ["ex3.1", "ex3.9", "ex3.8"]          # the learner's code ran after every other check
    got = {e.id: e for e in out}
    assert [e.id for e in out] == ["ex3.1", "ex3.8", "ex3.9"]
    assert got["ex3.1"].points == 1 and got["ex3.9"].points == 0
    assert got["ex3.8"].points == 0 and got["ex3.8"].message == (
        "not graded: while your code ran in the judging guest, its kernel became tainted (O (out-of-tree "
        "module), E (unsigned module)) and a labkit module is loaded (labkit_no_longterm_check): its answers are "
        "not believed")


def test_integrity_is_read_from_the_kernel():
    vm = SimpleNamespace(run=lambda cmd, timeout, check: CommandResult(
        str(cmd), 0, "12288\n@@\nlabkit_no_longterm_check 16384 0 - Live 0x0 (OE)\nrdma_rxe 1 0 - Live 0x0\n", "", 0))
    got = judging.read_integrity(vm)
    assert got == judging.Integrity(12288, ("labkit_no_longterm_check",))
    assert got.problem_since(got) == "a labkit module is loaded (labkit_no_longterm_check)"
    assert judging.Integrity(0, ()).problem_since(None) == ""
    assert judging.Integrity(1 << 9, ()).problem_since(judging.Integrity(1 << 9, ())) == ""
    bad = SimpleNamespace(run=lambda *a, **k: CommandResult("", 0, "fake\n@@\n", "", 0))
    with pytest.raises(LabError, match="unreadable"):
        judging.read_integrity(bad)


# -- integration: one hostile class, one run, and a second grader beside it ----------------------------

USERNS_TRY = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "rc = libc.unshare(0x10000000)\nprint('made' if rc == 0 else os.strerror(ctypes.get_errno()))")
KERNEL, TIMEOUT = "6.1", 300
CONNECT = "import labkit\nfrom labkit.grading import record\nvm = labkit.connect()"

# Inside a sandboxed kernel: the kernels of other students (every other
# ipykernel process of this test's graders, whatever its uid: at 386a62d two
# graders gave two kernels one uid) and the `labkit course grade` process
# each one runs under.
FIND_KERNELS = r'''
import ctypes, json, os, time

def grader_of(pid):
    for _ in range(40):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"course" in argv and b"grade" in argv:
                return pid
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0
        if pid <= 1:
            return 0
    return 0

def ours(grader):
    """A grader of this test (other suites on the host may run graders too)."""
    try:
        with open(f"/proc/{grader}/cmdline", "rb") as f:
            return b"hostile-class" in f.read()
    except OSError:
        return False

def kernels():
    found = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            # the kernel itself (python -m ipykernel_launcher), not the sandbox layers whose
            # command lines end with it; any uid, the same one too
            if argv[1:3] == [b"-m", b"ipykernel_launcher"] and int(d) != os.getpid() and ours(grader_of(int(d))):
                found.append((int(d), argv))
        except (OSError, ValueError):
            pass
    return found

def other_graders_kernels(wait):
    mine, deadline = grader_of(os.getpid()), time.monotonic() + wait
    while True:
        others = [(p, a) for p, a in kernels() if grader_of(p) not in (0, mine)]
        if others or time.monotonic() > deadline:
            return others
        time.sleep(0.5)
'''

# The attacks of issue 29 item 3 (and 5's user namespaces), from one kernel:
# every attempt that works is counted; the report lands in the cell's error.
# (unshare() needs a single-threaded process: the kernel has threads.)
SNOOP = FIND_KERNELS + f"\nUSERNS_TRY = {USERNS_TRY!r}\n" + r'''
import subprocess, sys
userns = subprocess.run([sys.executable, "-c", USERNS_TRY], capture_output=True, text=True).stdout.strip()
others = other_graders_kernels(150)
got = {"seen": len(kernels()), "other_grader": len(others), "environ": 0, "conn": 0, "mem": 0, "signal": 0}
for pid, argv in kernels():
    conn = argv[argv.index(b"-f") + 1].decode() if b"-f" in argv else "/nonexistent"
    for key, attempt in (("environ", lambda: open(f"/proc/{pid}/environ", "rb").read()),
                         ("conn", lambda: open(conn).read()),
                         ("conn", lambda: open(f"/proc/{pid}/root{conn}").read()),
                         ("mem", lambda: open(f"/proc/{pid}/mem", "rb").read(1)),
                         ("signal", lambda: os.kill(pid, 0))):
        try:
            attempt()
            got[key] += 1
        except OSError:
            pass
got["uid_dir"] = int(os.path.exists("/run/labkit/grade-uids"))
mine = open("/proc/self/cmdline", "rb").read().split(b"\0")
run_dir, written = os.path.dirname(mine[mine.index(b"-f") + 1].decode()), 0
try:                                   # the one directory the grader sees: fill it (300 MiB at most)
    for n in range(3):
        with open(f"{run_dir}/fill-{n}", "wb") as f:
            for _ in range(100):
                f.write(b"z" * 2**20)
                f.flush()
                written += 1
except OSError:
    pass
finally:
    for n in range(3):
        try:
            os.unlink(f"{run_dir}/fill-{n}")
        except OSError:
            pass
got["run_dir_mb"] = written
raise RuntimeError("snoop " + json.dumps(got, separators=(",", ":")) + " userns=" + userns)
'''

VICTIM_WAITS = FIND_KERNELS + "\nother_graders_kernels(150)\ntime.sleep(20)   # long enough to be found"

FAKE_UNAME = r'''
for name, says in (("uname", "6.6.6-pwned"), ("nproc", "64")):      # the release, and what ex0.1's check asks
    script = f"#!/bin/sh\nsleep 58\necho {says}\n"
    vm.run(["sh", "-c", f'printf "%s" "$1" > /root/{name} && chmod 755 /root/{name} && mount --bind /root/{name} /usr/bin/{name}',
            "sh", script], timeout=60, check=True)
'''

SHARED = '''
import mmap, os

def buffer(path, size):
    fd = os.open(path, os.O_RDWR)
    return mmap.mmap(fd, size)
'''

SMUGGLED = '''
import mmap, os, subprocess

def buffer(path, size):
    subprocess.run(["modprobe", "labkit_no_longterm_check"], check=False)
    fd = os.open(path, os.O_RDWR)
    return mmap.mmap(fd, size)
'''

FLOODING = '''
import mmap, os

def buffer(path, size):
    for _ in range(300):
        os.write(2, b"z" * 2**20)
    fd = os.open(path, os.O_RDWR)
    return mmap.mmap(fd, size)
'''

KERNEL_FLOOD = "for _ in range(150):\n    print('x' * 2**21, flush=True)"


def _small(number: str, *cells: str, answers: dict[str, str] | None = None, edit=None) -> nbformat.NotebookNode:
    """The student notebook ``number`` cut down to a connect cell, ``cells``
    and its exercise cells (answered from ``answers``: exercise id -> source)."""
    nb = _nb(number)
    exercise_cells = [c for c in nb.cells if grading.exercise_id(c)]
    for c in exercise_cells:
        if grading.exercise_id(c) in (answers or {}):
            c.source = answers[grading.exercise_id(c)]
    nb.cells = [nbformat.v4.new_code_cell(CONNECT), *(nbformat.v4.new_code_cell(s) for s in cells), *exercise_cells]
    if edit:
        edit(nb)
    return nb


def _answer(ex: str, code: str) -> str:
    return f"answer = {code!r}\nrecord({ex!r}, answer)"


def _snoop_metadata(nb) -> None:
    nb.metadata["labkit"] = 1                  # issue 29 item 2: AttributeError at 386a62d
    nb.cells[0].metadata["tags"] = 5


# student -> (what it tries, how it is built); the honest ones are alice and carol
STUDENTS = {
    "snoop": "kernels of the other grader process: environ, connection file, memory, signals; a user "
             "namespace; the uid leases; 300 MiB into the run directory; malformed metadata (\"labkit\": 1, "
             "\"tags\": 5)",
    "alice": "honest: notebook 00, the reference solution",
    "mallory": "uname and nproc (what ex0.1's check asks) bind-mounted to scripts that sleep 58 s and print a "
               "chosen release and count; the count answered",
    "carol": "honest: notebook 03's code exercise 3.8, the reference solution",
    "loader": "labkit_no_longterm_check loaded by the notebook, then a MAP_SHARED buffer for 3.8",
    "smuggler": "3.8's buffer() tries to load labkit_no_longterm_check itself, in the judging guest",
    "flood": "300 MiB printed by the kernel; 3.8's buffer() writes 300 MiB to stderr in the judging guest",
    "dup": "two copies of notebook 00",
    "linker": "00 a symbolic link to the instructor's source; 03 a FIFO",
}


def _class(base: Path) -> None:
    ex01 = SOLUTIONS["ex0.1"]
    _write(base / "snoop" / NB00.name, _small("00", SNOOP, answers={"ex0.1": ex01}, edit=_snoop_metadata))
    _write(base / "alice" / NB00.name, _small("00", answers={"ex0.1": ex01}))
    _write(base / "mallory" / NB00.name, _small("00", FAKE_UNAME, answers={"ex0.1": _answer("ex0.1", 64)}))
    _write(base / "carol" / NB03.name, _small("03", answers={"ex3.8": SOLUTIONS["ex3.8"]}))
    _write(base / "loader" / NB03.name, _small("03", 'vm.run(["modprobe", "labkit_no_longterm_check"], timeout=60, '
                                                    'check=True)', answers={"ex3.8": _answer("ex3.8", SHARED)}))
    _write(base / "smuggler" / NB03.name, _small("03", answers={"ex3.8": _answer("ex3.8", SMUGGLED)}))
    _write(base / "flood" / NB03.name, _small("03", KERNEL_FLOOD, answers={"ex3.8": _answer("ex3.8", FLOODING)}))
    for name in (NB00.name, "00-copy.ipynb"):
        _write(base / "dup" / name, _small("00", answers={"ex0.1": ex01}))
    (base / "linker").mkdir()
    (base / "linker" / NB00.name).symlink_to(INSTRUCTOR_00)
    os.mkfifo(base / "linker" / NB03.name)
    _write(base / "victim" / NB00.name, _small("00", VICTIM_WAITS, answers={"ex0.1": ex01}))


def _grade(students: list[Path], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "labkit", "course", "grade", *map(str, students), "--out", str(out),
                             "--jobs", "2", "--timeout", str(TIMEOUT), "--kernel", KERNEL],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _peak_rss(proc: subprocess.Popen, peak: list[int]) -> None:
    """The grader process's largest resident size while it runs."""
    import psutil
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak[0] = max(peak[0], p.memory_info().rss)
            time.sleep(0.25)
    except psutil.Error:
        pass


@pytest.fixture(scope="module")
def hostile_class(tmp_path_factory):
    """One `labkit course grade` of the whole class (snoop first, so it runs
    at once) and, started at the same moment, a second grader process for the
    victim; both with --jobs 2."""
    from conftest import ARTIFACTS, require_image
    _root()
    require_image(KERNEL)
    base = tmp_path_factory.mktemp("hostile-class")
    _class(base / "subs")
    t0 = time.monotonic()
    a = _grade([base / "subs" / s for s in STUDENTS], base / "out")
    b = _grade([base / "subs" / "victim"], base / "out-b")
    peak = [0]
    sampler = threading.Thread(target=_peak_rss, args=(a, peak), daemon=True)
    sampler.start()
    try:
        log_a, _ = a.communicate(timeout=1500)
        log_b, _ = b.communicate(timeout=600)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=60)
    sampler.join(timeout=5)
    seconds = time.monotonic() - t0
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "grader-hostile.log").write_text(log_a + "\n--- second grader ---\n" + log_b)
    (ARTIFACTS / "grader-hostile.seconds").write_text(f"{seconds:.1f}\n")
    (ARTIFACTS / "grader-hostile.peak-rss-mb").write_text(f"{peak[0] / 2**20:.0f}\n")
    assert a.returncode == 0 and b.returncode == 0, log_a[-4000:] + log_b[-2000:]
    got = {s: {nb["notebook"]: nb for nb in json.loads((base / "out" / f"{s}.json").read_text())["notebooks"]}
           for s in STUDENTS}
    got["victim"] = {nb["notebook"]: nb for nb in
                     json.loads((base / "out-b" / "victim.json").read_text())["notebooks"]}
    (ARTIFACTS / "grader-hostile.json").write_text(json.dumps(got, indent=1))
    return SimpleNamespace(base=base, got=got, peak_rss=peak[0], seconds=seconds, log=log_a)


def _ex(nb: dict, ex: str) -> dict:
    return next(e for e in nb["exercises"] if e["id"] == ex)


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1800)
def test_the_honest_students_keep_their_marks(hostile_class):
    alice, carol = hostile_class.got["alice"]["00"], hostile_class.got["carol"]["03"]
    assert (alice["score"], alice["max"]) == (1, 1) and not alice["reason"] and not alice["cell_errors"], alice
    assert _ex(carol, "ex3.8")["points"] == 3 and _ex(carol, "ex3.8")["feedback"] == "right", carol
    assert not carol["reason"] and not carol["cell_errors"], carol
    victim = hostile_class.got["victim"]["00"]
    assert victim["score"] == 1 and not victim["reason"] and not victim["cell_errors"], victim
    for nb in (alice, carol, victim):
        assert nb["sha256"] and re.fullmatch(r"\d+\.\d+\.\d+-\S+", nb["kernel_release"]), nb
    assert "tainted from the start" not in hostile_class.log     # a fresh guest of this image is clean


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1800)
def test_the_guest_the_student_was_root_in_judges_nothing(hostile_class):
    """Item 1: a faked uname, a module loaded by the notebook, a module loaded
    by the learner's code in the judging guest: each fails for its own reason."""
    got = hostile_class.got
    mallory = got["mallory"]["00"]
    assert mallory["score"] == 0 and _ex(mallory, "ex0.1")["feedback"].startswith("not right"), mallory
    assert not mallory["cell_errors"], mallory                # the bind mount itself worked
    assert "pwned" not in mallory["kernel_release"] and mallory["duration_s"] < TIMEOUT / 2, mallory
    loader = _ex(got["loader"]["03"], "ex3.8")
    assert not got["loader"]["03"]["cell_errors"], got["loader"]["03"]      # the module did load in its guest
    assert loader["points"] == 0 and loader["feedback"].startswith(
        "not right: the kernel refused to register it: in a shared mapping"), loader
    # the learner's code runs unprivileged in the judging guest (issue 28): its modprobe is refused, so the
    # kernel's rule still refuses the shared mapping (a taint it caused would be "not graded", see
    # test_code_exercises_are_judged_last_and_a_taint_refuses_them)
    smuggler = _ex(got["smuggler"]["03"], "ex3.8")
    assert smuggler["points"] == 0 and smuggler["feedback"].startswith(
        "not right: the kernel refused to register it: in a shared mapping"), smuggler


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1800)
def test_no_kernel_reaches_another_and_user_namespaces_are_off(hostile_class):
    """Items 2, 3 and 5: the snoop's malformed notebook is graded (its honest
    answer counts); from its kernel the other grader's kernels were found and
    nothing of them was readable or signallable; no user namespace; every
    kernel of both graders had its own uid, and none outlived the run."""
    snoop = hostile_class.got["snoop"]["00"]
    assert snoop["score"] == 1, snoop
    report = next(e for e in snoop["cell_errors"] if "snoop {" in e)
    found = json.loads(report.split("snoop ", 1)[1].split(" userns=")[0])
    assert found["other_grader"] >= 1 and found["seen"] >= found["other_grader"], report
    assert {k: found[k] for k in ("environ", "conn", "mem", "signal", "uid_dir")} == dict.fromkeys(
        ("environ", "conn", "mem", "signal", "uid_dir"), 0), report
    assert report.endswith("userns=No space left on device"), report
    assert found["run_dir_mb"] < sandbox.KernelLimits().run_mb, report
    ran = [nb for s, nbs in hostile_class.got.items() for nb in nbs.values() if nb["sandbox_uid"]]
    assert len(ran) == 8 and len({nb["sandbox_uid"] for nb in ran}) == 8, [nb["sandbox_uid"] for nb in ran]
    assert all(not uids._has_processes(nb["sandbox_uid"]) for nb in ran)
    assert not list(Path("/sys/fs/cgroup/pids").glob("labkit-grade/*/cgroup.procs"))


@pytest.mark.integration
@pytest.mark.fresh_guest("the grader boots a fresh guest per notebook, and one to judge it")
@pytest.mark.timeout(1800)
def test_refused_files_and_bounded_outputs(hostile_class):
    """Items 4 and 5: duplicates, a link and a FIFO are refused with what to
    do; 300 MiB from the kernel and 300 MiB from the judging guest are capped,
    and the grader stayed small."""
    got = hostile_class.got
    dup = got["dup"]["00"]
    assert dup["score"] == 0 and dup["reason"].startswith("refused: 2 files for notebook 00") and not dup["sha256"]
    link, fifo = got["linker"]["00"], got["linker"]["03"]
    assert link["reason"] == f"refused: {NB00.name} is a symbolic link: submit the notebook itself, as a regular file"
    assert not link["sha256"] and link["score"] == 0 and "is a FIFO" in fifo["reason"], (link, fifo)
    flood = got["flood"]["03"]
    # what the learner's process writes goes to /dev/null in the judging guest (issue 28): never to the grader
    assert _ex(flood, "ex3.8")["feedback"].startswith("not right: the kernel refused to register it"), flood
    assert any("outputs passed 16 MiB" in e for e in flood["cell_errors"]), flood
    assert hostile_class.peak_rss < 1024 * 2**20, hostile_class.peak_rss
