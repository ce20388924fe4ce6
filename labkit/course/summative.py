"""``labkit course grade``: summative grading an instructor can trust.

Each submitted notebook is re-executed from the top (saved outputs ignored,
record cells in the file dropped, the grader's hidden record cells added) in
a fresh throwaway guest of its own (warm start from the snapshot, fresh
persistent memory) that the student never touched, by a Jupyter kernel in
the sandbox of :mod:`labkit.course.sandbox`; then its exercises are checked
against that same guest by the grader. A notebook that compares two kernels
(``labkit.course.exercises.COMPANIONS``) gets its companion VM started next
to its guest, the same way (the sandbox cannot boot one). Notebooks are
graded independently and in parallel (``--jobs``). A notebook that runs past ``--timeout``, hangs
or panics its guest is graded as far as it got, with the reason, and never
blocks the others. Results: :mod:`labkit.course.gradebook`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from labkit.course import grading, sandbox
from labkit.errors import ConfigError, LabError

log = logging.getLogger(__name__)

STUDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
NOTEBOOK_RE = re.compile(r"\d\d-[A-Za-z0-9._-]+\.ipynb")
# What one grading job holds: the guest's 1 GiB of RAM, QEMU itself and the
# kernel with labkit (about 0.5 GiB together, measured with `labkit bench`'s
# qemu_rss_mb and ps on the lab machine). Used for the default --jobs.
JOB_MEMORY_MB = 1600
UID_BASE = 62000
_uids = itertools.count()
_uid_lock = threading.Lock()


@dataclass
class ExerciseGrade:
    id: str
    title: str
    points: int
    max: int
    feedback: str


@dataclass
class NotebookGrade:
    student: str
    path: str
    notebook: str
    sha256: str
    labkit_version: str
    started_at: str
    kernel_release: str = ""
    duration_s: float = 0.0
    reason: str = ""                      # why it stopped early ("" if it ran to the end)
    cell_errors: list[str] = field(default_factory=list)
    exercises: list[ExerciseGrade] = field(default_factory=list)

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
    limits: sandbox.Limits = field(default_factory=sandbox.Limits)


# -- what is being graded --------------------------------------------------------------

def submissions(dirs: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(student, notebook path) for every notebook of every submission
    directory (named after the student id), validated before any guest starts."""
    jobs = []
    seen: set[str] = set()
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ConfigError(f"{d}: not a submission directory",
                              hint="give one directory per student, named after the student id, "
                                   "holding that student's notebooks (alice/03-rdma-long-term-pins.ipynb)")
        student = d.resolve().name
        if not STUDENT_RE.fullmatch(student):
            raise ConfigError(f"{d}: {student!r} is not a usable student id",
                              hint="name the directory after the student id: letters, digits, . _ @ + -")
        if student in seen:
            raise ConfigError(f"{d}: student {student!r} given twice", hint="give each submission once")
        seen.add(student)
        notebooks = sorted(p for p in d.iterdir() if p.is_file() and NOTEBOOK_RE.fullmatch(p.name))
        if not notebooks:
            raise ConfigError(f"{d}: no course notebooks (NN-title.ipynb) in it",
                              hint="the submission holds the student's notebooks, e.g. 00-welcome.ipynb")
        jobs += [(student, p) for p in notebooks]
    return jobs


def default_jobs() -> int:
    """As many guests at a time as the cores and the free memory hold: one
    per core (TCG keeps a core busy per guest), and JOB_MEMORY_MB each."""
    import psutil
    by_mem = int(psutil.virtual_memory().available / 2**20 // JOB_MEMORY_MB)
    return max(1, min(os.cpu_count() or 1, by_mem))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- one notebook ----------------------------------------------------------------------

def grade_notebook(student: str, path: Path, opts: Options) -> NotebookGrade:
    """Grade one notebook in a fresh guest and a sandboxed kernel; never raises
    for a submission's fault (the reason is recorded instead)."""
    from labkit.version import __version__
    t0 = time.monotonic()
    g = NotebookGrade(student, path.name, path.name[:2], sha256(path), __version__, _now())
    try:
        nb = grading.load(path)
        g.notebook = grading.notebook_number(path, nb)
        exercises = _exercises(g.notebook)
        with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
            _grade_in_guest(g, nb, exercises, Path(tmp), opts, t0)
    except LabError as exc:
        g.reason = g.reason or f"{type(exc).__name__}: {exc}"
    if not g.exercises:
        g.exercises = [ExerciseGrade(e.id, e.title, 0, e.points, f"not graded: {g.reason}")
                       for e in _exercises(g.notebook)]
    g.duration_s = round(time.monotonic() - t0, 1)
    return g


def _exercises(number: str) -> list:
    from labkit.course.exercises import for_notebook
    return for_notebook(number)


def _grade_in_guest(g: NotebookGrade, nb: Any, exercises: list, tmp: Path, opts: Options, t0: float) -> None:
    from labkit.image import DEFAULT_KERNEL
    from labkit.lab import Lab
    state_root = tmp / "state"
    with _guests(state_root, opts.kernel or DEFAULT_KERNEL, g.notebook) as (vm, *others):
        g.kernel_release = vm.run(["uname", "-r"], timeout=30, check=True).stdout.strip()
        marker = _execute(g, nb, vm, others, state_root, tmp, opts, t0)
        given = grading.answers(nb, marker)
        g.exercises = judge(exercises, given, Lab(vm), g)


def companion_vms(notebook: str, kernel: str) -> list[tuple[str, str]]:
    """(name, kernel) of the guests grading ``notebook`` needs: "grade", then
    the companion VMs its cells attach to (``labkit.lab.companion``, declared
    in ``labkit.course.exercises.COMPANIONS``)."""
    from labkit.course.exercises import companions_for
    from labkit.lab.companion import companion
    others = [companion(kind, "grade", kernel) for kind in companions_for(notebook)]
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


def _execute(g: NotebookGrade, nb: Any, vm: Any, others: list[Any], state_root: Path, tmp: Path,
             opts: Options, t0: float) -> str:
    """Run the notebook in the sandbox until it ends or the time is up; the
    marker of its hidden record cells is returned (answers so far count)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    with _uid_lock:
        uid = UID_BASE + next(_uids) % 1000
    run_dir = tmp / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, uid, uid)
    sandbox.make_vm_view(vm.state_dir, tmp / "vmview", uid)
    companions = []
    for other in others:         # exposed exactly like the main guest
        sandbox.make_vm_view(other.state_dir, tmp / f"vmview-{other.name}", uid)
        companions.append(sandbox.Companion(other.name, other.state_dir, tmp / f"vmview-{other.name}",
                                            other.record.ssh_port))
    sb = sandbox.Sandbox(uid=uid, run_dir=run_dir, vm_state=vm.state_dir, vm_view=tmp / "vmview",
                         state_root=state_root, vm_name=vm.name, ssh_port=vm.record.ssh_port, limits=opts.limits,
                         kernel_source=_kernel_source(vm, nb), companions=tuple(companions))
    marker = grading.prepare_for_execution(nb)
    with sandbox.cgroups(f"{os.getpid()}-{uid}", opts.limits) as groups:
        sb = dataclasses.replace(sb, cgroups=groups)
        name = sandbox.write_kernelspec(sb, tmp / "kernels", sandbox.require_bwrap())
        # The async manager: with a blocking client nbclient's waits block its event loop, so a
        # kernel killed at the time limit was never noticed (the grader hung on the iopub channel).
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]),
                           transport="ipc", ip=str(run_dir / "k"), connection_file=str(run_dir / "kernel.json"))
        km.write_connection_file()
        os.chown(run_dir / "kernel.json", uid, uid)
        remaining = max(10.0, opts.timeout - (time.monotonic() - t0))
        expired = threading.Event()

        def time_is_up() -> None:
            expired.set()
            sandbox.kill_cgroups(groups)
        timer = threading.Timer(remaining, time_is_up)
        client = NotebookClient(nb, km=km, timeout=int(remaining) + 1, startup_timeout=120, allow_errors=True,
                                kernel_name=name, resources={"metadata": {"path": str(run_dir)}})
        try:
            with sandbox.ssh_gate(sb):
                timer.start()
                client.execute()
        except CellTimeoutError:
            g.reason = f"a cell ran past the time limit (--timeout {opts.timeout:.0f} s); graded as far as it got"
        except DeadKernelError:
            g.reason = (f"stopped at the time limit (--timeout {opts.timeout:.0f} s); graded as far as it got"
                        if expired.is_set() else "the notebook's kernel died (killed by a limit of the sandbox, "
                                                 "or it exited); graded as far as it got")
        except Exception as exc:      # noqa: BLE001 - nbclient/zmq failures must not stop the other notebooks
            g.reason = f"the notebook could not be run to the end ({type(exc).__name__}: {str(exc)[:200]})"
        finally:
            timer.cancel()
            atexit.unregister(client._cleanup_kernel)     # nbclient's own exit hook; we shut the kernel down here
            if km.has_kernel:
                run_sync(km.shutdown_kernel)(now=True)
    g.cell_errors = grading.cell_errors(nb)
    return marker


def _kernel_source(vm: Any, nb: Any) -> Path | None:
    """The guest kernel's source files, fetched by the grader (the sandbox has no
    network) when the notebook reads them (labkit.course.source); else None."""
    if not any("labkit.course import source" in c.source or "course.source" in c.source
               for c in nb.cells if c.cell_type == "code"):
        return None
    from labkit.image import build, kernelsrc
    img = build.load_image(vm.kernel, verify=False)
    return kernelsrc.fetch(vm.kernel, img.manifest)


def judge(exercises: list, given: dict[str, dict], lab: Any, g: NotebookGrade) -> list[ExerciseGrade]:
    """Each exercise's points and feedback, measured on the notebook's own
    guest. When the guest stops answering (panic, hang), the exercises that
    need it get 0 with the reason; the others are still judged."""
    from labkit.course.exercises import Live
    live = Live(lab)
    live.wanted = {n for e in exercises if grading._answered(given.get(e.id)) for n in e.needs}
    out = []
    broken = ""
    try:
        lab.sh("true")
    except LabError as exc:
        broken = f"the guest did not answer after the notebook ran ({type(exc).__name__}: {exc})"
    for ex in exercises:
        if broken and ex.guest and grading._answered(given.get(ex.id)):
            out.append(ExerciseGrade(ex.id, ex.title, 0, ex.points, f"not graded: {broken}"))
            continue
        try:
            r = grading._one_check(ex, given.get(ex.id), live)
        except LabError as exc:
            broken = f"the guest failed during the checks ({type(exc).__name__}: {exc})"
            out.append(ExerciseGrade(ex.id, ex.title, 0, ex.points, f"not graded: {broken}"))
            continue
        out.append(ExerciseGrade(r.id, r.title, r.points, r.max, r.message))
    if broken and not g.reason:
        g.reason = broken
    return out


# -- a class ------------------------------------------------------------------------------

def grade_all(dirs: list[str | os.PathLike], opts: Options, jobs: int,
              progress: Callable[[str], None] = lambda s: None) -> dict[str, list[NotebookGrade]]:
    """Grade every notebook of every submission, ``jobs`` at a time; returns
    student -> grades (in notebook order). Progress: "N of M, ETA"."""
    work = submissions(dirs)
    sandbox.require_bwrap()
    from labkit import image
    kernel = opts.kernel or image.DEFAULT_KERNEL
    for k in sorted({k for _, p in work for _, k in companion_vms(p.name[:2], kernel)}):
        image.ensure_image(k)         # build (once) before the guests start, the companions' kernels too
    results: dict[str, list[NotebookGrade]] = {s: [] for s, _ in work}
    t0 = time.monotonic()
    progress(f"grading {len(work)} notebooks of {len(results)} submissions, {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(grade_notebook, s, p, opts): (s, p) for s, p in work}
        for done, fut in enumerate(as_completed(futures), 1):
            s, p = futures[fut]
            g = fut.result()
            results[s].append(g)
            left = (time.monotonic() - t0) / done * (len(work) - done)
            progress(f"{done} of {len(work)}, ETA {left:.0f} s: {s}/{p.name} {g.score}/{g.max} "
                     f"in {g.duration_s:.0f} s{' (' + g.reason + ')' if g.reason else ''}")
    for grades in results.values():
        grades.sort(key=lambda x: x.path)
    return results
