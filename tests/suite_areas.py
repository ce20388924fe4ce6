"""The suite's areas (one pytest marker each), the kernel selection and the
time-per-area summary CI prints. Every test file belongs to exactly one area:
a new file that is not in ``FILES`` fails collection with the line to add.

    pytest -m lab --kernel 6.1        # the lab's tests, kernel-parametrised ones on 6.1 only
    LABKIT_TEST_KERNELS=6.12 make unit
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from labkit import image

AREAS = {
    "machine": "one QEMU guest: argv, boot, warm start, channels, snapshots, the images",
    "lab": "the subject measured in guests: pmem, mounts, pins, traces, the matrix, ODP, counterfactuals",
    "course": "notebooks, exercises and their checks (labkit check), dashboards, the browser",
    "grading": "summative grading: labkit course grade, its sandbox, nbgrader",
    "class": "a class on shared infrastructure: the hub, Slurm, Kubernetes values",
    "faults": "what goes wrong: killed QEMU, full disks, hostile input, security boundaries",
    "tools": "the command line, doctor and bench",
}

FILES = {
    "machine": ["test_guest.py", "test_machine_unit.py", "test_qemu_argv.py", "test_initramfs.py",
                "test_settings.py", "test_image_kernels.py", "test_snapshot.py", "test_pmem_data.py",
                "test_pace_unit.py"],
    "lab": ["test_lab.py", "test_lab_unit.py", "test_observe.py", "test_odp.py", "test_odp_unit.py",
            "test_pinprobe.py", "test_kernel_matrix.py", "test_kernel_73.py", "test_kernel_510.py", "test_counterfactual.py",
            "test_counterfactual_unit.py", "test_source_unit.py"],
    "course": ["test_notebooks.py", "test_check.py", "test_exercises.py", "test_buffer_exercise.py",
               "test_truncate_exercise.py", "test_predictions.py", "test_facts.py", "test_points.py", "test_release.py",
               "test_dashboard.py", "test_dashboard_render.py", "test_browser.py"],
    "grading": ["test_summative.py", "test_sandbox.py", "test_nbgrader.py", "test_grading_integrity.py",
                "test_grader_hostile.py"],
    "class": ["test_hub.py", "test_hub_load.py", "test_hub_unit.py", "test_cgroups_unit.py", "test_slurm.py", "test_k8s_values.py",
              "test_class_status_unit.py", "test_install_unit.py", "test_server_guest.py"],
    "faults": ["test_faults.py", "test_faults_lifecycle.py", "test_hostile.py", "test_security.py",
               "test_watchdog_qmp.py", "test_two_users.py", "test_two_users_unit.py"],
    "tools": ["test_bench.py", "test_cli.py", "test_commands_unit.py", "test_suite_areas.py", "test_layers.py",
              "test_container.py", "test_install.py", "test_bench_concurrent.py", "test_bench_reliability.py",
              "test_bench_reliability_unit.py"],
}
_BY_FILE = {f: area for area, files in FILES.items() for f in files}

# `make test` runs the suite on two pytest-xdist workers. A group's tests run one after
# another on one worker; groups run side by side. A test file is its own group, except where
# files share what must not run twice at once: the summative grader's runs (its companion
# VMs and sandbox uids are host-wide), the class tests (root-owned users, cgroups, one shared
# venv) and the fault tests (tmpfs state dirs, killed QEMUs); and the two runs of the course
# by `labkit check` (blank; with the reference solutions), five to six minutes each, are groups
# of their own so that they can run side by side on the two workers, each with its own lab VM. (Graders running at once are safe since
# each takes its sandbox uids from a host-wide lease; test_sandbox and test_grader_hostile still
# share a group because they look at every process of the graders' uid range.) (pytest-xdist's own `loadgroup` reads
# `xdist_group` marks through a node-id suffix that pytest 9.2 no longer takes, so the suite
# has its scheduler, `GroupScheduling` in tests/conftest.py, ask `group_of` instead.)
GROUPS = {
    "grading": ["test_summative.py", "test_sandbox.py", "test_grader_hostile.py"],
    "class": ["test_hub.py", "test_hub_load.py", "test_slurm.py"],
    "faults": ["test_faults.py", "test_faults_lifecycle.py"],
}
_GROUP = {f: g for g, files in GROUPS.items() for f in files}
TEST_GROUPS = {
    "test_check.py::test_blank_notebooks_score_zero": "check-blank",
    "test_check.py::test_reference_solutions_score_full_marks": "check-reference",
    # test_check's other tests on a guest share the reference run's lab VM (a module fixture), not boot one more
    "test_check.py::test_graded_from_saved_outputs_without_rerun": "check-reference",
    "test_check.py::test_vmpin_kb_of_a_held_registration": "check-reference",
}
# Files whose tests run once per kernel on the `guest` fixture: a group per file and kernel,
# so that the kernels of one file can run on different workers (each sets up its own).
PER_KERNEL = {"test_lab.py", "test_odp.py", "test_observe.py", "test_dashboard.py", "test_guest.py"}
# Groups that take longest come first, so that neither worker is left with a long one at the
# end (from the time per area of earlier runs; everything else follows in file order).
LONGEST_FIRST = ["test_server_guest", "grading", "check-reference", "class", "check-blank", "test_lab-7.3",
                 "test_lab-6.12", "test_lab-6.1", "faults", "test_nbgrader"]


def group_of(nodeid: str) -> str:
    """The group of the test ``nodeid`` (``tests/test_x.py::test_y[param]``)."""
    path, _, rest = nodeid.partition("::")
    filename = path.rsplit("/", 1)[-1]
    name, _, params = rest.partition("[")
    test = f"{filename}::{name}"
    group = TEST_GROUPS.get(test) or _GROUP.get(filename) or filename.removesuffix(".py")
    kernels = [k for k in params.rstrip("]").split("-") if k in image.KERNELS]
    if filename in PER_KERNEL and kernels:
        group = f"{group}-{kernels[0]}"
    return group


def run_order(group: str) -> int:
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)


# where a guest start is put down when no test can be named for it
OUTSIDE = "(started outside the tests' environment: a hub's learner, a Slurm job)"
# the QEMU -name of the pool's shared guests (tests/conftest.py: GuestPool)
POOL_PREFIX = "labkit-pool-"
# the names under which a test is parametrised by kernel
KERNEL_PARAMS = ("guest", "kernel")


def area_of(filename: str) -> str:
    try:
        return _BY_FILE[filename]
    except KeyError:
        raise pytest.UsageError(f"tests/{filename} belongs to no area: add it to FILES in tests/suite_areas.py "
                                f"(areas: {', '.join(AREAS)})") from None


# 5.10 is the lab's kernel from before v5.11 (notebook 10), not a fourth kernel for every test of the
# subject: the files below, which measure the subject on the modern kernels, run on it only when it is
# asked for (`--kernel 5.10`). A whole run measures 5.10 in tests/test_kernel_510.py (refusal sites,
# warnings, pins, O_DIRECT, io_uring, truncate, the live judge of exercise 10.1), the four-kernel
# matrix of test_kernel_73.py, and every other kernel-parametrised file (guest, dashboard, CLI, grading).
OLD_KERNELS = {"5.10"}
MODERN_SUBJECT_FILES = {"test_lab.py", "test_observe.py", "test_odp.py"}


def left_out(filename: str, kernels: set[str], wanted: set[str]) -> bool:
    """Whether a whole run leaves this kernel-parametrised test out (see OLD_KERNELS)."""
    return not wanted and filename in MODERN_SUBJECT_FILES and bool(kernels & OLD_KERNELS)


def selected_kernels(options: list[str], env: str) -> set[str]:
    """The kernels asked for with ``--kernel`` (or ``$LABKIT_TEST_KERNELS``); empty means all."""
    names = {k.strip() for opt in (options or [env]) for k in opt.split(",") if k.strip()}
    unknown = names - set(image.KERNELS)
    if unknown:
        raise pytest.UsageError(f"--kernel {', '.join(sorted(unknown))}: no such kernel "
                                f"(the lab's kernels: {', '.join(image.KERNELS)})")
    return names


def kernels_of_item(item) -> set[str]:
    """The kernels a test is parametrised with (empty: not kernel-parametrised)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return {v for k, v in params.items() if k in KERNEL_PARAMS and isinstance(v, str) and v in image.KERNELS}


def summary_lines(times: list[tuple[str, float]]) -> list[str]:
    """Seconds per area (setup, call and teardown of each test), largest first."""
    per: dict[str, float] = defaultdict(float)
    tests: dict[str, set[str]] = defaultdict(set)
    for nodeid, seconds in times:
        a = _BY_FILE.get(nodeid.split("::")[0].rsplit("/", 1)[-1], "?")
        per[a] += seconds
        tests[a].add(nodeid)
    total = sum(per.values()) or 1.0
    lines = [f"{'area':10s} {'tests':>6s} {'seconds':>9s} {'share':>6s}"]
    for a, s in sorted(per.items(), key=lambda kv: -kv[1]):
        lines.append(f"{a:10s} {len(tests[a]):6d} {s:9.1f} {s / total:6.1%}")
    lines.append(f"{'all':10s} {sum(len(t) for t in tests.values()):6d} {total:9.1f}")
    return lines


def cpu_jiffies(stat_text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs, from the first line of /proc/stat (idle and
    iowait count as not busy; guest time is already inside user time)."""
    fields = [int(x) for x in stat_text.split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def cpu_busy_line(before: tuple[int, int], after: tuple[int, int], cpus: int, hz: int = 100) -> str:
    """How busy the host's CPUs were between two :func:`cpu_jiffies` readings (``hz``: the
    kernel's USER_HZ): more workers only help a run whose CPUs were often idle."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return "host CPU during the run: not measured"
    return (f"host CPU during the run: {busy / total:.0%} busy on {cpus} CPUs "
            f"({(total - busy) / hz / 60:.1f} CPU-minutes idle)")


class GuestStarts:
    """Counts the QEMU guests started during the run, on the whole host (in this process
    or any other: labkit check, the grader, the hub's learners), by polling /proc. A
    command line with ``-incoming`` is a warm start (a snapshot restore), any other guest
    with a state directory a cold boot; the KVM probe (no state directory) is counted
    apart. Each start is put down to the test named by ``PYTEST_CURRENT_TEST`` in the
    QEMU's environment (inherited from the test through labkit), else to the test this
    process is running."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading
        self.current = "(between tests)"
        self.single_process = True        # False under pytest-xdist: the controller runs no test
        self.starts: list[dict] = []
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, name="guest-starts", daemon=True)

    def start(self) -> None:
        self._seen = set(self._pids())
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    @staticmethod
    def _pids() -> list[int]:
        import os
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]

    @staticmethod
    def _read(pid: int, what: str) -> list[str]:
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                return [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            return []

    def _poll(self) -> None:
        for pid in self._pids():
            if pid in self._seen:
                continue
            self._seen.add(pid)
            argv = self._read(pid, "cmdline")
            if not argv or "qemu-system" not in argv[0]:
                continue
            kind = "warm" if "-incoming" in argv else "cold" if any("/vms/" in a or "labkit-" in a for a in argv) \
                else "probe"
            env = dict(e.split("=", 1) for e in self._read(pid, "environ") if "=" in e)
            # a QEMU started with an environment of its own (a hub's learner, a Slurm job, the
            # instructor's snapshot step) names no test; "current" is only sure in one process
            test = env.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0] or \
                (self.current if self.single_process else OUTSIDE)
            name = argv[argv.index("-name") + 1] if "-name" in argv[:-1] else ""
            self.starts.append({"test": test, "kind": kind, "pool": name.startswith(POOL_PREFIX)})

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._poll()

    def summary(self, fresh: set[str]) -> list[str]:
        """Totals, and the tests that started a guest of their own without saying why
        (``fresh_guest``): they should take the pool's."""
        by_kind: dict[str, int] = defaultdict(int)
        tests: set[str] = set()
        unexplained: set[str] = set()
        for s in self.starts:
            by_kind[s["kind"]] += 1
            if s["kind"] == "probe":
                continue
            tests.add(s["test"])
            base = s["test"].split("@")[0]
            if not s["pool"] and base not in fresh and s["test"] not in fresh and "::" in base \
                    and s["test"] != OUTSIDE:
                unexplained.add(base)
        pool = sum(1 for s in self.starts if s["pool"])
        lines = [f"guest starts on this host during the run: {by_kind['cold']} cold boots, {by_kind['warm']} warm "
                 f"starts ({pool} of them the pool's shared guests), {by_kind['probe']} KVM probes; "
                 f"started while {len(tests)} tests ran"]
        if unexplained:
            lines.append(f"{len(unexplained)} tests started a guest of their own without a fresh_guest marker "
                         "saying why (use the `pool` fixture, or mark them):")
            lines += [f"  {t}" for t in sorted(unexplained)]
        return lines
