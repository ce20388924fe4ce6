"""Shared fixtures. Integration tests boot real guests from the built images;
`make test` builds them first. When an image is missing the test fails with the
command that builds it (a missing image is a broken setup, not a skip)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from suite_areas import (
    AREAS,
    GuestStarts,
    area_of,
    cpu_busy_line,
    cpu_jiffies,
    group_of,
    kernels_of_item,
    left_out,
    run_order,
    selected_kernels,
    summary_lines,
)

from labkit import image
from labkit.errors import LabError
from labkit.machine.vm import VM, VMState

ARTIFACTS = Path(__file__).parent / "artifacts"


# -- areas, kernels and where the time went (see tests/suite_areas.py) ------------

def pytest_addoption(parser):
    parser.addoption("--kernel", action="append", default=[], metavar="K",
                     help="run kernel-parametrised tests on kernel K only (repeat, or comma-separate; "
                          "default: every kernel, or $LABKIT_TEST_KERNELS)")


def pytest_configure(config):
    for area, what in AREAS.items():
        config.addinivalue_line("markers", f"{area}: {what}")
    config.addinivalue_line("markers", "fresh_guest(why): boots a guest of its own instead of the pool's shared "
                                       "one, and says why (it kills QEMU, times a boot, loads a module, ...)")


def pytest_collection_modifyitems(config, items):
    wanted = selected_kernels(config.getoption("--kernel"), os.environ.get("LABKIT_TEST_KERNELS", ""))
    keep, drop = [], []
    for item in items:
        item.add_marker(getattr(pytest.mark, area_of(item.path.name)))
        ks = kernels_of_item(item)
        dropped = (wanted and ks and not ks <= wanted) or left_out(item.path.name, ks, wanted)
        (drop if dropped else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    keep.sort(key=lambda item: run_order(group_of(item.nodeid)))       # stable: file order within a rank
    items[:] = keep


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist with --dist loadgroup (`make test`): whole groups to a worker,
    the groups of tests/suite_areas.py (longest first, in collection order)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)
    return GroupScheduling(config, log)


_TIMES: list[tuple[str, float]] = []        # (nodeid, seconds) of every setup, call and teardown


_STARTS = GuestStarts()


_CPU: list[tuple[int, int]] = []        # the host's CPU ticks when the run started (in the controller)


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):    # one counter per run (pytest-xdist: in the controller)
        _STARTS.single_process = not session.config.getoption("numprocesses", None)
        _STARTS.start()
        _CPU.append(cpu_jiffies(Path("/proc/stat").read_text()))


def pytest_runtest_logstart(nodeid, location):
    _STARTS.current = nodeid


_FRESH: set[str] = set()       # tests marked fresh_guest: they boot a guest of their own, on purpose


def pytest_runtest_logreport(report):
    _TIMES.append((report.nodeid, report.duration))
    if "fresh_guest" in report.keywords:
        _FRESH.add(report.nodeid.split("@")[0])


def pytest_terminal_summary(terminalreporter):
    """At the end of every run (CI prints it): the time per area; with --durations
    (on by default) pytest then lists the 30 slowest tests."""
    if not _TIMES:
        return
    terminalreporter.write_sep("=", "time per area (setup + call + teardown)")
    for line in summary_lines(_TIMES):
        terminalreporter.write_line(line)
    ARTIFACTS.mkdir(exist_ok=True)          # every test's time (setup + call + teardown), slowest first
    per_test: dict[str, float] = {}
    for nodeid, seconds in _TIMES:
        per_test[nodeid] = per_test.get(nodeid, 0.0) + seconds
    (ARTIFACTS / "durations.json").write_text(json.dumps(
        {k: round(v, 2) for k, v in sorted(per_test.items(), key=lambda kv: -kv[1])}, indent=1))
    if _CPU:
        terminalreporter.write_line(cpu_busy_line(_CPU[0], cpu_jiffies(Path("/proc/stat").read_text()),
                                                  os.cpu_count() or 1, os.sysconf("SC_CLK_TCK")))
    if _STARTS.running:
        _STARTS.stop()
        for line in _STARTS.summary(_FRESH):
            terminalreporter.write_line(line)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "guest-starts.json").write_text(json.dumps(_STARTS.starts, indent=1))


@pytest.fixture(scope="session", autouse=True)
def _private_state(tmp_path_factory):
    """Tests never touch the user's own VMs or caches (warm-start snapshots
    included: the suite makes its own, once per kernel), and never build an
    image on demand (a missing image is a broken setup: `make test` builds them).
    Under pytest-xdist each worker has its own state directory, and the workers of
    one run share one cache (the KVM probe's answer and one snapshot per kernel,
    made under labkit's own creation lock by whichever worker needs it first)."""
    root = tmp_path_factory.mktemp("labkit-state")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "labkit-cache"     # the run's, beside each worker's
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("labkit-cache")
    old = {k: os.environ.get(k) for k in ("LABKIT_STATE_DIR", "LABKIT_CACHE_DIR", "LABKIT_AUTO_BUILD",
                                          "LABKIT_SHARED_CACHE_DIR", "LABKIT_LIFETIME_PID")}
    os.environ["LABKIT_AUTO_BUILD"] = "0"
    os.environ["LABKIT_SHARED_CACHE_DIR"] = ""     # nor the host-wide snapshot cache of a class
    os.environ["LABKIT_LIFETIME_PID"] = "0"        # nor a hub's server that happens to run pytest
    os.environ["LABKIT_STATE_DIR"] = str(root)
    os.environ["LABKIT_CACHE_DIR"] = str(cache)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def require_image(kernel: str) -> image.Image:
    try:
        return image.load_image(kernel)
    except Exception as exc:   # fail loudly: the suite must boot real guests
        pytest.fail(f"image {kernel} unavailable ({exc}); run `labkit image build --kernel {kernel}`")


@contextmanager
def persistent_vm(name: str, kernel: str) -> Iterator[VM]:
    """A started persistent VM (child processes can attach to it by name), stopped afterwards."""
    require_image(kernel)
    vm = VM(name, kernel=kernel, persistent=True)
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


class GuestPool:
    """The run's shared guests: one throwaway guest per kernel, warm-started on first
    use and kept until the run ends. Tests that only measure share it (``guest``,
    ``pool.get(kernel)``); a test that leaves the guest changed (a module loaded, a
    kprobe, a filled disk) takes ``pool.fresh(kernel)``, a guest restored from the
    snapshot for it alone (persistent memory kept), or boots a VM of its own and says
    why (the fault tests that kill QEMU, the cold-boot tests)."""

    def __init__(self) -> None:
        self.vms: dict[str, VM] = {}

    def get(self, kernel: str) -> VM:
        vm = self.vms.get(kernel)
        if vm is not None and self._healthy(vm):
            return vm
        if vm is not None:          # killed or hung by an earlier test: replace it
            vm.finish()
        require_image(kernel)
        vm = VM(f"pool-{kernel.replace('.', '-')}", kernel=kernel)
        vm.__enter__()
        self.vms[kernel] = vm
        return vm

    @staticmethod
    def _healthy(vm: VM) -> bool:
        try:
            return vm.status() is VMState.RUNNING and vm.run("true", timeout=20).ok
        except LabError:
            return False

    def fresh(self, kernel: str) -> VM:
        """The kernel's shared guest, discarded and restored from the snapshot."""
        return self.get(kernel).reset()

    def close(self) -> None:
        for vm in self.vms.values():
            vm.finish()
        self.vms.clear()


@pytest.fixture(scope="session")
def pool() -> Iterator[GuestPool]:
    p = GuestPool()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session", params=list(image.KERNELS))
def guest(request, pool):
    """The shared guest of each kernel (from the pool), for tests that only measure."""
    return pool.get(request.param)


@pytest.fixture(scope="session")
def class_tools():
    """The learners' venv (Debian's python3, JupyterHub, the idle culler, batchspawner,
    labkit) and configurable-http-proxy, made once per run for the hub and Slurm tests,
    in a directory every user can read."""
    from hubsetup import make_class_tools
    base = Path(tempfile.mkdtemp(prefix="labkit-classtools-"))
    base.chmod(0o755)
    try:
        yield make_class_tools(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "labkit-test", str(path)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.fail("these fault tests mount a small tmpfs as the state dir and need root "
                    "(CI runs as root)")
