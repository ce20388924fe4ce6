"""The class-sized figures of ``labkit bench``: memory per learner, the
three-kernel matrix against one kernel, grading throughput.

Each is one small function that starts real guests (or a real ``make``) and
returns a dict of figures; ``labkit.tools.bench`` merges them into its result.
They are opt-in (``--learners N``, ``--matrix-ratio``, ``--grade``) because
each takes a minute or more on a small host.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from labkit.errors import LabError
from labkit.image import build as image
from labkit.machine.vm import VM
from labkit.timeout import Deadline

log = logging.getLogger(__name__)
Say = Callable[[str], None]
MB = 2**20


# -- memory per learner -----------------------------------------------------------

def smaps_mb(pid: int) -> dict[str, float]:
    """PSS, USS (private clean + dirty) and RSS of a process in MB, from
    /proc/PID/smaps_rollup (PSS shares each shared page among its mappers,
    so the sum over processes is the memory they use together)."""
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                kb[key] = int(parts[0])
    return {"pss": kb["Pss"] / 1024, "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024,
            "rss": kb["Rss"] / 1024}


KSM = Path("/sys/kernel/mm/ksm")


def _ksm(name: str) -> int | None:
    try:
        return int((KSM / name).read_text())
    except (OSError, ValueError):
        return None


def qemu_memory_split(smaps: str, guest_mb: int) -> dict[str, float]:
    """Where a QEMU's resident memory is, from the text of /proc/PID/smaps:
    guest RAM (the anonymous mapping of exactly the guest's size), TCG's
    translation cache (the anonymous executable mappings) and the rest
    (NVDIMM files, binaries, heaps)."""
    out = {"guest_ram": 0.0, "tcg_cache": 0.0, "other": 0.0}
    kind = "other"
    for line in smaps.splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            size_mb, anon = (hi - lo) / MB, len(head) == 5
            # TCG's buffer is split into per-thread regions by guard pages: every anonymous executable vma
            kind = ("tcg_cache" if anon and "x" in head[1] else
                    "guest_ram" if anon and size_mb == guest_mb else "other")
        elif head and head[0] == "Rss:":
            out[kind] += int(head[1]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def ksm_state() -> dict[str, Any]:
    """Whether the host's KSM runs and how much it saves now (all processes)."""
    run, sharing = _ksm("run"), _ksm("pages_sharing")
    if run is None or sharing is None:
        return {"ksm_run": None}
    return {"ksm_run": run, "ksm_saved_mb": round(sharing * os.sysconf("SC_PAGE_SIZE") / MB, 1)}


def ksm_settle(timeout: float = 180.0) -> None:
    """If KSM runs, let it finish two full scans (a page is merged on the scan
    after the one that first saw it), so what it saves is in the figures.
    Bounded: a slow ksmd gives figures with less merged, never a hang."""
    start = _ksm("full_scans")
    if _ksm("run") != 1 or start is None:
        return
    deadline = Deadline(timeout)
    while (_ksm("full_scans") or 0) < start + 2 and not deadline.expired:
        time.sleep(1.0)     # ksmd offers no event to wait on; its counter moves every few seconds


def course_slice(vm: VM) -> None:
    """What each learner's guest runs before it is measured: the pin matrix on
    fresh pmem (namespaces, mkfs, mounts, every mechanism), a representative
    slice of the course."""
    from labkit.lab import Lab
    Lab(vm).matrix()


def learners(kernel: str, n: int, say: Say, work: Callable[[VM], None] = course_slice) -> dict[str, Any]:
    """``n`` learners' VMs restored from one snapshot, each after ``work``;
    then one more: its marginal cost is the growth of the summed PSS of all
    their QEMUs (and its own USS/PSS)."""
    vms: list[VM] = []
    try:
        for i in range(n + 1):
            if i == n:
                ksm_settle()
                before = sum(smaps_mb(v.record.pid)["pss"] for v in vms)
            say(f"learner {i + 1}/{n + 1}: warm start and the course slice")
            vm = VM(f"bench-learner{i}", kernel=kernel).start()
            vms.append(vm)
            work(vm)
        ksm_settle()
        after = [smaps_mb(v.record.pid) for v in vms]
        split = qemu_memory_split(Path(f"/proc/{vms[-1].record.pid}/smaps").read_text(), vms[-1].memory_mb)
        return {"learners": n, **guest_memory(vms[-1]), **{f"learner_rss_{k}_mb": v for k, v in split.items()},
                "learner_marginal_mb": round(sum(s["pss"] for s in after) - before, 1),
                "learner_pss_mb": round(after[-1]["pss"], 1), "learner_uss_mb": round(after[-1]["uss"], 1),
                "learners_total_pss_mb": round(sum(s["pss"] for s in after), 1), **ksm_state()}
    finally:
        for vm in vms:
            vm.finish()


def guest_memory(vm: VM) -> dict[str, float]:
    """What the guest itself uses (MemTotal - MemAvailable) and holds as page
    cache: how much guest RAM the course actually needs."""
    info = {}
    for line in vm.run(["cat", "/proc/meminfo"], timeout=30, check=True).stdout.splitlines():
        key, _, rest = line.partition(":")
        if rest.split():
            info[key] = int(rest.split()[0]) / 1024
    return {"learner_guest_used_mb": round(info["MemTotal"] - info["MemAvailable"], 1),
            "learner_guest_cache_mb": round(info.get("Cached", 0.0), 1),
            "learner_guest_ram_mb": round(info["MemTotal"], 1)}


# -- the three-kernel matrix ---------------------------------------------------------

def _matrix_on(kernel: str) -> dict[str, Any]:
    from labkit.lab import Lab
    with VM(f"bench-mx-{kernel.replace('.', '-')}", kernel=kernel) as vm:
        return Lab(vm).matrix().to_dict()


def matrix_ratio(kernel: str, say: Say, jobs: int = 2) -> dict[str, Any]:
    """Wall time of the matrix on every kernel (``jobs`` guests at a time,
    as ``labkit matrix --kernel all``) over the matrix on ``kernel`` alone,
    each including its warm start. Snapshots are made first, not timed."""
    from labkit.tools import kernel_matrix
    kernels = list(image.KERNELS)
    for k in kernels:
        image.ensure_image(k)
        say(f"making sure the warm-start snapshot for {k} exists (not timed)")
        with VM("bench-prime", kernel=k):
            pass
    say(f"matrix on {kernel} alone")
    t = time.monotonic()
    _matrix_on(kernel)
    one = time.monotonic() - t
    say(f"matrix on {', '.join(kernels)}, {jobs} at a time")
    t = time.monotonic()
    kernel_matrix.measure(kernels, _matrix_on, jobs=jobs)
    every = time.monotonic() - t
    return {"matrix_one_s": round(one, 2), "matrix_all_s": round(every, 2), "matrix_kernels": len(kernels),
            "matrix_all_over_one": round(every / one, 2)}


# -- grading throughput ----------------------------------------------------------------

def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grade_command(notebooks: Sequence[str]) -> list[str]:
    """How submissions are graded today (``labkit check``; one place to change
    when the course's own grader takes over)."""
    return [sys.executable, "-m", "labkit", "check", "--json", *notebooks]


def grade_throughput(kernel: str, notebooks: Sequence[str], say: Say) -> dict[str, Any]:
    """Grade ``notebooks`` against one running lab VM; submissions per hour of
    one core, from the CPU the grader *and* the guest's QEMU used."""
    name = "bench-grade"
    vm = VM(name, kernel=kernel, persistent=True)
    try:
        say("grading: starting the grader's VM (not timed)")
        vm.start()
        q0, c0 = _cpu_s(vm.record.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        say(f"grading {len(notebooks)} notebook(s) with {' '.join(grade_command([])[2:4])}")
        t = time.monotonic()
        r = subprocess.run(grade_command(notebooks), capture_output=True, text=True, timeout=1800,
                           env=dict(os.environ, LABKIT_VM=name))
        wall = time.monotonic() - t
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode not in (0, 1):          # 1: some checks failed, which is grading working
            raise LabError(f"grading failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        cpu = (_cpu_s(vm.record.pid) - q0) + (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    finally:
        vm.delete()
    return {"grade_notebooks": len(notebooks), "grade_s": round(wall, 2), "grade_cpu_s": round(cpu, 2),
            "grade_per_core_hour": round(len(notebooks) * 3600 / cpu, 1)}


def default_grade_set() -> list[str]:
    """Two short course notebooks (pmem namespaces; DAX mounts), graded as
    submissions without outputs: executed headless, then checked."""
    from labkit.course.grading import default_notebooks
    return [str(p) for p in default_notebooks() if p.name[:2] in ("01", "02")]
