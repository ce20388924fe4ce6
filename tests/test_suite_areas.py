"""The suite's own bookkeeping (tests/suite_areas.py): every test file has an area,
--kernel selects kernels, the time per area and the guest-start summary add up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import suite_areas as sa

from labkit import image

TESTS = Path(__file__).parent


def test_every_test_file_has_exactly_one_area():
    files = {p.name for p in TESTS.glob("test_*.py")}
    listed = [f for fs in sa.FILES.values() for f in fs]
    assert len(listed) == len(set(listed)), "a file is listed in two areas"
    assert files - set(listed) == set(), "files without an area"
    assert set(sa.FILES) == set(sa.AREAS)


def test_an_unlisted_file_is_a_usage_error_that_says_what_to_add():
    with pytest.raises(pytest.UsageError, match="add it to FILES in tests/suite_areas.py"):
        sa.area_of("test_new_thing.py")


def test_kernel_selection():
    assert sa.selected_kernels([], "") == set()
    assert sa.selected_kernels(["6.1,7.3"], "") == {"6.1", "7.3"}
    assert sa.selected_kernels([], "6.12") == {"6.12"}
    assert sa.selected_kernels(["6.1"], "6.12") == {"6.1"}          # the option wins over the environment
    with pytest.raises(pytest.UsageError, match="no such kernel"):
        sa.selected_kernels(["5.4"], "")


def test_kernels_of_a_parametrised_item():
    item = SimpleNamespace(callspec=SimpleNamespace(params={"guest": "6.12", "mechanism": "rdma"}))
    assert sa.kernels_of_item(item) == {"6.12"}
    assert sa.kernels_of_item(SimpleNamespace(callspec=SimpleNamespace(params={"kernel": "7.3"}))) == {"7.3"}
    assert sa.kernels_of_item(SimpleNamespace()) == set()
    assert sa.kernels_of_item(SimpleNamespace(callspec=SimpleNamespace(params={"how": "6.1"}))) == set()
    assert set(image.KERNELS) >= {"6.1", "6.12", "7.3"}


def test_groups_and_their_order():
    assert sa.group_of("tests/test_hub.py::test_a") == sa.group_of("tests/test_slurm.py::test_b[x]") == "class"
    assert sa.group_of("tests/test_lab.py::test_mount_warning_depends_on_kernel_and_fs[6.12]") == "test_lab-6.12"
    assert sa.group_of("tests/test_lab.py::test_longterm_pins_refused_on_fsdax[rdma-6.1]") == "test_lab-6.1"
    assert sa.group_of("tests/test_cli.py::test_run_prints_the_kernel_release[7.3]") == "test_cli"
    assert sa.group_of("tests/test_check.py::test_reference_solutions_score_full_marks") == "check-reference"
    assert sa.group_of("tests/test_check.py::test_bad_input_is_a_clear_error[missing]") == "test_check"
    order = sorted(["test_cli", "test_lab-6.1", "check-blank", "grading", "check-reference"], key=sa.run_order)
    assert order == ["grading", "check-reference", "check-blank", "test_lab-6.1", "test_cli"]


def test_the_suites_scheduler_keeps_each_group_on_one_worker(tmp_path):
    """Two files of one group and a file of its own, on two workers: each group's tests all
    ran on one worker (pytest-xdist's own loadgroup does not group under pytest 9.2)."""
    import subprocess
    import sys
    (tmp_path / "conftest.py").write_text(
        "import os, pytest\n"
        "def pytest_xdist_make_scheduler(config, log):\n"
        "    from xdist.scheduler import LoadScopeScheduling\n"
        "    class G(LoadScopeScheduling):\n"
        "        def _split_scope(self, nodeid):\n"
        "            return 'ab' if 'test_a' in nodeid or 'test_b' in nodeid else 'c'\n"
        "    return G(config, log)\n")
    for name in "abc":
        (tmp_path / f"test_{name}.py").write_text(
            "import os, pytest\n@pytest.mark.parametrize('i', range(4))\n"
            f"def test_{name}(i):\n    open(os.path.join(os.path.dirname(__file__), 'ran'), 'a').write("
            f"'{name} ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                        "loadgroup", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ran = [line.split() for line in (tmp_path / "ran").read_text().splitlines()]
    assert len(ran) == 12
    workers = {name: {w for n, w in ran if n == name} for name in "abc"}
    assert len(workers["a"] | workers["b"]) == 1 and len(workers["c"]) == 1


def test_time_per_area_adds_up():
    times = [("tests/test_lab.py::a[6.1]", 2.0), ("tests/test_lab.py::a[6.1]", 1.0),
             ("tests/test_hub.py::b@class", 4.0), ("tests/test_qemu_argv.py::c", 0.5)]
    lines = sa.summary_lines(times)
    assert lines[1].split()[:3] == ["class", "1", "4.0"]
    assert lines[2].split()[:3] == ["lab", "1", "3.0"]
    assert lines[-1].split() == ["all", "3", "7.5"]


def test_guest_starts_name_tests_that_boot_their_own_guest_without_saying_why():
    gs = sa.GuestStarts()
    gs.starts = [{"test": "tests/test_lab.py::a[6.1]", "kind": "warm", "pool": True},
                 {"test": "tests/test_faults.py::b@faults", "kind": "cold", "pool": False},
                 {"test": "tests/test_x.py::c", "kind": "warm", "pool": False},
                 {"test": "(between tests)", "kind": "probe", "pool": False},
                 {"test": sa.OUTSIDE, "kind": "cold", "pool": False}]
    lines = gs.summary(fresh={"tests/test_faults.py::b"})
    assert "2 cold boots, 2 warm starts (1 of them the pool's shared guests), 1 KVM probes" in lines[0]
    assert lines[1].startswith("1 tests started a guest of their own") and lines[2] == "  tests/test_x.py::c"
    assert gs.summary(fresh={"tests/test_faults.py::b", "tests/test_x.py::c"})[1:] == []


def test_a_whole_run_leaves_5_10_out_of_the_modern_subject_files_only():
    from suite_areas import left_out
    assert left_out("test_lab.py", {"5.10"}, set())
    assert not left_out("test_lab.py", {"5.10"}, {"5.10"})          # asked for: it runs
    assert not left_out("test_lab.py", {"6.1"}, set())
    assert not left_out("test_guest.py", {"5.10"}, set())


def test_the_host_cpu_line_says_how_busy_the_run_kept_the_cpus():
    before = sa.cpu_jiffies("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n")
    assert before == (200, 1000)
    after = (before[0] + 9000, before[1] + 12000)         # 2 CPUs, 60 s at USER_HZ 100
    assert sa.cpu_busy_line(before, after, 2) == \
        "host CPU during the run: 75% busy on 2 CPUs (0.5 CPU-minutes idle)"
    assert "not measured" in sa.cpu_busy_line(before, before, 2)
