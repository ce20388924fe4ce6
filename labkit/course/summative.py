"""``labkit course grade``: summative grading an instructor can trust.

Each submitted notebook is re-executed from the top (saved outputs ignored,
record cells in the file dropped, the grader's hidden record cells added) in
a fresh throwaway guest of its own (warm start from the snapshot, fresh
persistent memory), by a Jupyter kernel in the sandbox of
:mod:`labkit.course.sandbox` under a uid no other kernel on the host has
(:mod:`labkit.course.uids`). The notebook is root in that guest, so its
exercises are *not* judged there: once it is gone, a second fresh guest is
restored from the snapshot, one the student's notebook never reached, and
the checks measure what they need on it (:mod:`labkit.course.judging`: taint
and labkit modules read before and after any learner code runs there, a
guest tainted by foreign code or with a labkit module loaded refused with
the reason said, output capped, everything within ``--timeout``; the code
exercises run the learner's code there unprivileged, in a process of its
own, and read the verdict from the kernel). The one exception is an
answer that *is* state the learner made in their own guest (``ON_LEARNER_GUEST``:
ex7.1, a mount of their own), read there before it is stopped, and refused if
its kernel got tainted or a labkit module was loaded.

A notebook that compares two kernels (``labkit.course.exercises.COMPANIONS``)
gets its companion VM started next to its guest (the sandbox cannot boot
one). Notebooks are graded independently and in parallel (``--jobs``); what
goes wrong with one (a refused file, a malformed notebook, a time limit, a
panicked guest, a bug of the grader's) is that notebook's feedback, and every
result is written as soon as it is graded. Results:
:mod:`labkit.course.gradebook`; what is accepted as a submission:
:mod:`labkit.course.intake`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from labkit.course import gradebook, grading, intake, judging, runner, sandbox, sandbox_mode, uids
from labkit.course.intake import NOTEBOOK_RE, STUDENT_RE  # noqa: F401 - part of this module's interface
from labkit.course.judge import ExerciseResult, answered, judge
from labkit.errors import LabError
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

# What one grading job holds: the guest's 1 GiB of RAM, QEMU itself and the
# kernel with labkit (about 0.5 GiB together, measured with `labkit bench`'s
# qemu_rss_mb and ps on the lab machine). Used for the default --jobs. The
# judging guest starts only after the notebook's guest is stopped.
JOB_MEMORY_MB = 1600
# Exercises whose answer is state the learner made in their own guest: read
# there (nothing else has it), after the integrity check.
ON_LEARNER_GUEST = frozenset({"ex7.1"})


@dataclass
class NotebookGrade:
    student: str
    path: str
    notebook: str
    sha256: str                           # of the bytes graded ("" when none were read)
    labkit_version: str
    started_at: str
    kernel_release: str = ""
    duration_s: float = 0.0
    reason: str = ""                      # why it stopped early or was refused ("" if it ran to the end)
    cell_errors: list[str] = field(default_factory=list)
    exercises: list[ExerciseResult] = field(default_factory=list)
    sandbox_uid: int = 0                  # the kernel's throwaway uid (0: no kernel ran)

    @property
    def score(self) -> int:
        return sum(e.points for e in self.exercises)

    @property
    def max(self) -> int:
        return sum(e.max for e in self.exercises)


@dataclass(frozen=True)
class Options:
    timeout: float = 900.0        # per notebook: execution and checks
    kernel: str | None = None     # guest kernel variant (default: labkit's default)
    limits: sandbox.KernelLimits = field(default_factory=sandbox.KernelLimits)
    disable_userns: bool = False  # the sandbox's inner bwrap (grade_all sets it when the host allows)
    rootless: bool = False        # the grader is not root: the unprivileged sandbox (sandbox_mode.ROOTLESS)


# -- what is being graded --------------------------------------------------------------

def submissions(dirs: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(student, notebook path) of every notebook that will be graded (the
    refused ones: :func:`labkit.course.intake.entries`)."""
    return [(e.student, e.path) for e in intake.entries(dirs) if not e.refused]


def default_jobs() -> int:
    """As many guests at a time as this process's allocation holds: one per
    CPU it may use (TCG keeps a core busy per guest), and JOB_MEMORY_MB each.
    The allocation, not the node: a Slurm task given one CPU of a 32-core
    node grades one notebook at a time (:func:`labkit.cgroups.allocation`)."""
    from labkit.cgroups import allocation
    alloc = allocation()
    by_mem = int(alloc.memory_bytes / 2**20 // JOB_MEMORY_MB)
    return max(1, min(alloc.cpus, by_mem))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- one notebook ----------------------------------------------------------------------

def grade_notebook(student: str, path: Path, opts: Options, refused: str = "") -> NotebookGrade:
    """Grade one notebook in fresh guests and a sandboxed kernel. Never
    raises: whatever goes wrong is this notebook's reason and feedback."""
    from labkit.version import __version__
    deadline = Deadline(opts.timeout)
    g = NotebookGrade(student, path.name, path.name[:2], "", __version__, _now())
    try:
        if refused:
            raise intake.Refused(refused)
        data = intake.read(path)
        g.sha256 = hashlib.sha256(data).hexdigest()
        nb = grading.loads(data, path)
        _check_number(path, nb)
        with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
            _grade_in_guests(g, nb, _exercises(g.notebook), Path(tmp), opts, deadline)
    except intake.Refused as exc:
        g.reason = f"refused: {exc.problem}"
    except LabError as exc:
        g.reason = g.reason or f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one notebook's failure is its own feedback, never the class's
        log.exception("grading %s/%s failed", student, path.name)
        g.reason = g.reason or (f"the grader failed on this notebook ({type(exc).__name__}: {str(exc)[:200]}); "
                                "tell your instructor")
    _complete(g)
    g.duration_s = round(deadline.elapsed, 1)
    return g


def _check_number(path: Path, nb: Any) -> None:
    said = grading.notebook_number(path, nb)
    if said != path.name[:2]:
        raise intake.Refused(f"{path.name} says it is notebook {said} (its metadata): submit each notebook "
                             "under its own name")


def _complete(g: NotebookGrade) -> None:
    """Every exercise of the notebook has a row, in course order: the ones
    never judged get 0 with the reason."""
    have = {e.id: e for e in g.exercises}
    g.exercises = [have.get(e.id) or ExerciseResult(e.id, e.title, 0, e.points, False, f"not graded: {g.reason}")
                   for e in _exercises(g.notebook)]


def _exercises(number: str) -> list:
    from labkit.course.exercises import for_notebook
    return for_notebook(number)


def _grade_in_guests(g: NotebookGrade, nb: Any, exercises: list, tmp: Path, opts: Options,
                     deadline: Deadline) -> None:
    """Run the notebook against its guest, read what only that guest has,
    stop it; then judge everything else on a fresh one."""
    from labkit.image import DEFAULT_KERNEL
    kernel = opts.kernel or DEFAULT_KERNEL
    state_root = tmp / "state"
    with _guests(state_root, kernel, g.notebook) as (vm, *others):
        g.kernel_release = vm.release           # measured by the grader at the start, before any learner code
        before = judging.read_integrity(judging.Bounded(vm, deadline))
        run = runner.execute(f"{g.student}/{g.path}", nb, vm, others, state_root, tmp,
                             runner.Budget(opts.timeout, deadline), opts.limits, opts.disable_userns,
                             opts.rootless)
        g.sandbox_uid, g.cell_errors, g.reason = run.uid, run.cell_errors, run.reason
        marker = run.marker
        given = grading.answers(nb, marker)
        g.exercises = _judge_on_learner_guest(exercises, given, vm, before, deadline, g)
    rest = [e for e in exercises if e.id not in ON_LEARNER_GUEST]
    g.exercises += _judge_on_fresh_guest(rest, given, tmp / "judge", kernel, deadline, g, before)


def _judge_on_learner_guest(exercises: list, given: dict[str, dict], vm: Any, before: judging.Integrity,
                            deadline: Deadline, g: NotebookGrade) -> list[ExerciseResult]:
    todo = [e for e in exercises if e.id in ON_LEARNER_GUEST]
    if not todo:
        return []
    from labkit.lab import Lab
    machine = judging.Bounded(vm, deadline)
    try:
        problem = judging.read_integrity(machine).problem_since(before)
        if problem:
            problem = (f"in your guest, which this exercise reads, {problem}; what it reports is not believed "
                       "(load no module in this notebook)")
    except LabError as exc:
        problem = f"the guest did not answer after the notebook ran ({type(exc).__name__}: {exc})"
    return _judged(todo, given, Lab(machine), g, broken=problem, deadline=deadline)


def _judge_on_fresh_guest(exercises: list, given: dict[str, dict], root: Path, kernel: str, deadline: Deadline,
                          g: NotebookGrade, start: judging.Integrity) -> list[ExerciseResult]:
    """The checks on a guest restored from the snapshot for them alone. No
    guest is started when no answer needs one. ``start``: the notebook's own
    guest as it came from the same snapshot, before any student code (the
    taint a restore of this image has; a fresh guest must not have more)."""
    if not any(e.guest and answered(given.get(e.id)) for e in exercises):
        return _judged(exercises, given, None, g)
    if deadline.expired:
        return _judged(exercises, given, None, g, broken=str(judging.TimeUp(deadline.seconds)))
    from labkit.machine.vm import VM
    jvm = VM("judge", kernel=kernel, state_dir=root / "vms" / "judge")
    with judging.kill_at(deadline, jvm.kill, f"the judging guest of {g.student}/{g.path}"):
        try:
            jvm.start()
            return judge_on_guest(jvm, exercises, given, g, start, deadline)
        except LabError as exc:
            why = str(judging.TimeUp(deadline.seconds)) if deadline.expired else \
                f"the judging guest did not start ({type(exc).__name__}: {exc})"
            return _judged(exercises, given, None, g, broken=why)
        finally:
            jvm.finish()


def judge_on_guest(vm: Any, exercises: list, given: dict[str, dict], g: NotebookGrade,
                   start: judging.Integrity, deadline: Deadline) -> list[ExerciseResult]:
    """The checks on ``vm``, a started judging guest: refused, every answer
    that needs the guest "not graded" and the reason said, when its kernel is
    tainted by foreign code or a labkit module is loaded (whatever ``start``,
    the notebook's own guest before any student code, had), or when it got
    tainted while the learner's code ran there."""
    from labkit.lab import Lab
    machine = judging.Bounded(vm, deadline)
    fresh = judging.read_integrity(machine)
    if start.taint:
        log.warning("guests restored from the %s snapshot are tainted from the start (%s)", vm.kernel,
                    judging.decode_taint(start.taint))
    problem = fresh.problem_since(start) or fresh.foreign()
    if problem:
        log.warning("the fresh judging guest of %s/%s: %s", g.student, g.path, problem)
        problem = f"the judging guest, fresh from the snapshot, is not clean: {problem} (tell your instructor)"

    def guard() -> str:
        return judging.read_integrity(machine).problem_since(fresh)
    return _judged(exercises, given, Lab(machine), g, broken=problem, guard=guard, deadline=deadline)


def companion_vms(notebook: str, kernel: str) -> list[tuple[str, str]]:
    """(name, kernel) of the guests grading ``notebook`` needs: "grade", then
    the companion VMs its cells attach to (``labkit.lab.companion``, declared
    in ``labkit.course.exercises.COMPANIONS``)."""
    from labkit.course.exercises import companions_for
    from labkit.lab.companion import companion, needed
    others = [companion(kind, "grade", kernel) for kind in companions_for(notebook) if needed(kind, kernel)]
    return [("grade", kernel)] + [(c.name, c.kernel) for c in others]


@contextlib.contextmanager
def _guests(state_root: Path, kernel: str, notebook: str) -> Iterator[list[Any]]:
    """The notebook's fresh throwaway guests (``companion_vms``), started at
    the same time; every one is stopped on the way out, whatever happened."""
    from labkit.machine.vm import VM
    vms = [VM(name, kernel=k, state_dir=state_root / "vms" / name) for name, k in companion_vms(notebook, kernel)]
    # A throwaway QEMU gets its parent-death signal when the *thread* that spawned it ends:
    # the companions start in this pool's threads, which live until the guests are stopped.
    pool = ThreadPoolExecutor(max_workers=max(1, len(vms) - 1), thread_name_prefix="labkit-grade-companion")
    starts = [pool.submit(v.start) for v in vms[1:]]
    try:
        vms[0].start()
        for f in starts:
            f.result()
        log.debug("guests of notebook %s up: %s", notebook, ", ".join(v.name for v in vms))
        yield vms
    finally:
        wait(starts)            # a start still running would race its stop
        failed: BaseException | None = None
        for v in vms:
            try:
                v.finish()
            except Exception as exc:    # noqa: BLE001 - stop the others first, then say what failed
                log.warning("stopping %s: %s", v.name, exc)
                failed = failed or exc
        pool.shutdown(wait=True)
        if failed is not None:
            raise failed


def _judged(exercises: list, given: dict[str, dict], lab: Any, g: NotebookGrade, broken: str = "",
            guard: Callable[[], str] | None = None, deadline: Deadline | None = None) -> list[ExerciseResult]:
    """The grader's judgement (:func:`labkit.course.judge.judge` with its
    containment: a broken guest is "not graded: why", never an exception);
    what broke the guest becomes the notebook's reason if it has none."""
    verdict = judge(exercises, given, lab, contain=True, broken=broken, guard=guard, deadline=deadline)
    g.reason = g.reason or verdict.problem
    return verdict.results


# -- a class ------------------------------------------------------------------------------

def grade_all(dirs: list[str | os.PathLike], opts: Options, jobs: int,
              progress: Callable[[str], None] = lambda s: None,
              out: Path | None = None) -> dict[str, list[NotebookGrade]]:
    """Grade every notebook of every submission, ``jobs`` at a time; returns
    student -> grades (in notebook order). With ``out``, each student's file
    and the CSV are written as soon as one of their notebooks is graded (an
    interrupted run keeps what it graded). Progress: "N of M, ETA"."""
    work = intake.entries(dirs)
    opts = _prepare(work, opts, progress)
    results: dict[str, list[NotebookGrade]] = {e.student: [] for e in work}
    t0 = time.monotonic()
    progress(f"grading {len(work)} notebooks of {len(results)} submissions, {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(grade_notebook, e.student, e.path, opts, e.refused): e for e in work}
        for done, fut in enumerate(as_completed(futures), 1):
            e = futures[fut]
            g = fut.result()         # grade_notebook never raises for a notebook's sake
            results[e.student].append(g)
            results[e.student].sort(key=lambda x: x.path)
            if out is not None:
                _write(out, e.student, results)
            left = (time.monotonic() - t0) / done * (len(work) - done)
            progress(f"{done} of {len(work)}, ETA {left:.0f} s: {e.student}/{e.name} {g.score}/{g.max} "
                     f"in {g.duration_s:.0f} s{' (' + g.reason + ')' if g.reason else ''}")
    return results


def _prepare(work: list[intake.Entry], opts: Options, progress: Callable[[str], None]) -> Options:
    """The host checks before any guest starts: bwrap and root, the images,
    whether user namespaces can be switched off in the sandbox here."""
    bwrap = sandbox.require_bwrap()
    rootless = sandbox_mode.grading_mode(bwrap) == sandbox_mode.ROOTLESS
    if rootless:
        progress("labkit: not root: each submission runs in an unprivileged sandbox as this user, in namespaces "
                 "of its own (docs/grading.md, 'Grading without root')")
    else:
        uids.lock_dir()
    from labkit import image
    kernel = opts.kernel or image.DEFAULT_KERNEL
    for k in sorted({k for e in work if not e.refused for _, k in companion_vms(e.number, kernel)}):
        image.ensure_image(k)         # build (once) before the guests start, the companions' kernels too
    problem = sandbox.userns_problem(bwrap)
    if problem:
        progress(f"warning: user namespaces stay available inside the sandbox on this host ({problem})")
    return dataclasses.replace(opts, disable_userns=not problem, rootless=rootless)


def _write(out: Path, student: str, results: dict[str, list[NotebookGrade]]) -> None:
    gradebook.write_student(out, student, results[student])
    rows = [r for s, grades in results.items() if grades for r in gradebook.rows(gradebook.student_json(s, grades))]
    gradebook.write_csv(out / "grades.csv", rows)
