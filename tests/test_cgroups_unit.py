"""labkit.cgroups without a real hierarchy: the limits each version is given,
the v2 (unified) logic against a fake cgroupfs in tmp_path, the kill-and-wait
loop against real processes listed in a fake group.

The hosts the suite runs on mount cgroup v1 (FACTS.md), so v2 cannot run for
real here: these tests check what labkit writes and reads on v2, and the real
v1 groups are covered by the sandbox's and the hub's integration tests
(tests/test_sandbox.py, tests/test_hub.py). The v1 fake-tree tests of the
hub's groups are in tests/test_hub_unit.py.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from labkit import cgroups

LIMITS = cgroups.Limits(memory_bytes=1536 << 20, cpus=1.5, pids=256, cpu_weight=50)


def _v2_root(tmp_path: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> Path:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    (tmp_path / "cgroup.procs").write_text("1\n")
    return tmp_path


def test_the_version_is_read_from_the_hierarchy(tmp_path):
    assert cgroups.version(tmp_path) == 1
    assert cgroups.version(_v2_root(tmp_path)) == 2


def test_one_set_of_units_becomes_each_versions_files():
    assert cgroups.settings(LIMITS, 1) == [
        ("memory", "memory.limit_in_bytes", str(1536 << 20)), ("memory", "memory.memsw.limit_in_bytes", str(1536 << 20)),
        ("cpu", "cpu.shares", "512"), ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "150000"),
        ("pids", "pids.max", "256")]
    assert cgroups.settings(LIMITS, 2) == [
        ("memory", "memory.max", str(1536 << 20)), ("memory", "memory.swap.max", "0"), ("cpu", "cpu.weight", "50"),
        ("cpu", "cpu.max", "150000 100000"), ("pids", "pids.max", "256")]
    no_quota = cgroups.Limits(memory_bytes=1 << 30, cpus=0)
    assert ("cpu", "cpu.max", "max 100000") in cgroups.settings(no_quota, 2)
    assert ("cpu", "cpu.cfs_quota_us", "-1") in cgroups.settings(no_quota, 1)
    assert ("cpu", "cpu.shares", "1024") in cgroups.settings(no_quota, 1)      # weight 100 = v1's default


@pytest.mark.parametrize("bad", [dict(memory_bytes=0), dict(memory_bytes=1, pids=0), dict(memory_bytes=1, cpus=-1),
                                 dict(memory_bytes=1, cpu_weight=0), dict(memory_bytes=1, cpu_weight=10001)])
def test_impossible_limits_are_refused_with_the_ranges(bad):
    with pytest.raises(cgroups.CgroupError) as err:
        cgroups.Limits(**bad)
    assert "cpu_weight 1..10000" in err.value.hint


def test_a_v2_group_is_one_directory_with_its_limits_and_delegated_controllers(tmp_path):
    root = _v2_root(tmp_path)
    g = cgroups.Group("ada-default", parent="labkit-hub", root=root)
    assert g.version == 2 and g.dirs() == [root / "labkit-hub" / "ada-default"]
    (root / "labkit-hub" / "ada-default").mkdir(parents=True)
    (root / "labkit-hub" / "ada-default" / "memory.swap.max").write_text("max\n")   # the kernel has swap accounting
    assert g.create(LIMITS) == [root / "labkit-hub" / "ada-default"]
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"     # cpu was on already
    assert (root / "labkit-hub" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert g.read("memory", "memory.max") == str(1536 << 20) and g.read("memory", "memory.swap.max") == "0"
    assert g.read("cpu", "cpu.max") == "150000 100000" and g.read("cpu", "cpu.weight") == "50"
    assert g.read("pids", "pids.max") == "256"
    assert not (root / "memory").exists()                # nothing of v1's layout
    g.add(4242)
    assert (g.dir("") / "cgroup.procs").read_text() == "4242"


def test_a_v2_host_without_a_controller_is_an_actionable_error_unless_optional(tmp_path):
    root = _v2_root(tmp_path, "cpu memory")
    assert cgroups.missing_controllers(root) == ["pids"]
    with pytest.raises(cgroups.CgroupError) as err:
        cgroups.Group("ada-default", root=root).create(LIMITS)
    assert "pids" in str(err.value) and "delegated" in err.value.hint
    g = cgroups.Group("k-1", parent="labkit-grade", root=root)
    g.create(LIMITS, require=False)                      # the sandbox: what the host has
    assert g.read("memory", "memory.max") == str(1536 << 20) and not (g.dir("pids") / "pids.max").exists()


def test_v2_oom_kills_and_peak_are_read_from_its_files(tmp_path):
    root = _v2_root(tmp_path)
    g = cgroups.Group("ada-default", root=root)
    g.create(LIMITS)
    (g.dir("memory") / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    (g.dir("memory") / "memory.peak").write_text("734003200\n")
    assert g.oom_kills() == 2 and g.memory_peak() == 734003200


def test_proc_cgroup_of_either_version_names_each_controllers_group():
    v2 = cgroups.parse_proc_cgroup("0::/labkit-hub/ada-default\n")
    assert v2 == {c: "/labkit-hub/ada-default" for c in cgroups.CONTROLLERS}
    v1 = cgroups.parse_proc_cgroup("12:pids:/labkit-hub/ada\n5:cpu,cpuacct:/labkit-hub/ada\n"
                                   "4:memory:/labkit-hub/ada\n1:name=systemd:/\n0::/\n")
    assert v1["memory"] == v1["cpu"] == v1["pids"] == "/labkit-hub/ada" and v1["cpuacct"] == "/labkit-hub/ada"


def test_the_peak_of_a_pid_is_its_learners_group_only(tmp_path, monkeypatch):
    root = _v2_root(tmp_path)
    g = cgroups.Group("ada-default", parent="labkit-hub", root=root)
    g.create(LIMITS)
    (g.dir("memory") / "memory.peak").write_text(str(700 << 20))
    monkeypatch.setattr(cgroups, "group_of", lambda pid: cgroups.parse_proc_cgroup("0::/labkit-hub/ada-default"))
    assert cgroups.peak_of(1, "labkit-hub", root=root) == 700 << 20
    monkeypatch.setattr(cgroups, "group_of", lambda pid: cgroups.parse_proc_cgroup("0::/user.slice/session-3.scope"))
    assert cgroups.peak_of(1, "labkit-hub", root=root) is None


# -- the kill and the wait, on real processes in a fake group -------------------------------

def _alive_only(monkeypatch):
    """The fake's cgroup.procs keeps what was written; the kernel drops a process
    that exited. Read it as the kernel would show it."""
    real = cgroups.members

    def members(dirs):
        out = set()
        for pid in real(dirs):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.add(pid)
            except psutil.NoSuchProcess:
                pass
        return out
    monkeypatch.setattr(cgroups, "members", members)


def _unfake(g: cgroups.Group) -> None:
    """A real cgroupfs removes a group's directory with its files; the fake's go first."""
    for f in [*g.dir("").iterdir(), g.dir("").parent / "cgroup.subtree_control"]:
        f.unlink(missing_ok=True)


def _sleepers(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["sleep", "60"]) for _ in range(n)]


def test_v2_kill_freezes_signals_every_member_waits_and_thaws(tmp_path, monkeypatch):
    _alive_only(monkeypatch)
    g = cgroups.Group("ada-default", root=_v2_root(tmp_path))
    g.create(LIMITS)
    procs = _sleepers(3)
    try:
        (g.dir("") / "cgroup.procs").write_text("\n".join(str(p.pid) for p in procs))
        t0 = time.monotonic()
        assert g.kill(timeout=10) == 3
        assert time.monotonic() - t0 < 5                  # woken by the pidfds, not by the timeout
        assert all(p.wait(5) == -9 for p in procs)
        assert (g.dir("") / "cgroup.freeze").read_text() == "0"    # thawed again
        _unfake(g)
        g.remove()
        assert not (tmp_path / "labkit-hub").exists()      # the last group takes its parent
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_v2_kill_uses_cgroup_kill_where_the_kernel_has_it(tmp_path, monkeypatch):
    _alive_only(monkeypatch)
    g = cgroups.Group("ada-default", root=_v2_root(tmp_path))
    g.create(LIMITS)
    (g.dir("") / "cgroup.kill").write_text("")
    procs = _sleepers(2)
    (g.dir("") / "cgroup.procs").write_text("\n".join(str(p.pid) for p in procs))

    def kernel() -> None:                 # what the kernel does on a write of "1" to cgroup.kill
        for _ in range(500):
            if (g.dir("") / "cgroup.kill").read_text() == "1":
                for p in procs:
                    p.kill()
                return
            time.sleep(0.01)
    t = threading.Thread(target=kernel)
    t.start()
    try:
        assert g.kill(timeout=10) == 2
        assert not (g.dir("") / "cgroup.freeze").exists()     # no freeze needed: the kernel does it at once
    finally:
        t.join()
        for p in procs:
            p.kill()
            p.wait()


def test_a_member_that_survives_the_deadline_is_an_error_naming_it(tmp_path, monkeypatch):
    g = cgroups.Group("ada-default", root=_v2_root(tmp_path))
    g.create(LIMITS)
    (g.dir("") / "cgroup.procs").write_text("999999999")   # never goes away from the fake's file
    with pytest.raises(cgroups.CgroupError) as err:
        g.kill(timeout=0.3)
    assert "999999999" in str(err.value) and "survived SIGKILL" in str(err.value)


def test_removing_one_group_keeps_the_parent_of_the_others(tmp_path):
    root = _v2_root(tmp_path)
    a, b = (cgroups.Group(n, root=root) for n in ("ada-default", "bob-default"))
    a.create(LIMITS)
    b.create(LIMITS)
    _unfake(a)
    _unfake(b)
    a.remove()
    assert not a.exists() and b.exists()
    b.remove()
    assert not (root / "labkit-hub").exists()


# -- what this process may use (the grader's --jobs) ----------------------------------------------

def _v2_tree(tmp_path, cpu_max: str, memory_max: str, current: str = "0"):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    job = tmp_path / "system.slice" / "slurmstepd.scope" / "job_7"
    job.mkdir(parents=True)
    (job / "cpu.max").write_text(cpu_max + "\n")
    (job / "memory.max").write_text(memory_max + "\n")
    (job / "memory.current").write_text(current + "\n")
    (tmp_path / "system.slice" / "cpu.max").write_text("max 100000\n")
    return {c: "/system.slice/slurmstepd.scope/job_7" for c in cgroups.CONTROLLERS}


def test_allocation_is_the_host_when_nothing_limits(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    a = cgroups.allocation(root=tmp_path, groups={"cpu": "/", "memory": "/"}, env={},
                           host_cpus=32, host_available=64 * 2**30)
    assert (a.cpus, a.memory_bytes, a.cpus_from) == (32, 64 * 2**30, "the host")


def test_allocation_follows_the_cgroup_v2_quota_and_memory_left(tmp_path):
    groups = _v2_tree(tmp_path, "150000 100000", str(3 * 2**30), current=str(2**30))
    a = cgroups.allocation(root=tmp_path, groups=groups, env={}, host_cpus=32, host_available=64 * 2**30)
    assert a.cpus == 1 and a.cpus_from == "the cgroup's CPU quota"          # 1.5 cores: one guest
    assert a.memory_bytes == 2 * 2**30 and a.memory_from == "the cgroup's memory limit"


def test_allocation_follows_cgroup_v1_files(tmp_path):
    for c in ("cpu", "memory"):
        (tmp_path / c / "slurm" / "job_7").mkdir(parents=True)
    (tmp_path / "cpu" / "slurm" / "job_7" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "slurm" / "job_7" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "memory" / "slurm" / "job_7" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    a = cgroups.allocation(root=tmp_path, groups={"cpu": "/slurm/job_7", "memory": "/slurm/job_7"}, env={},
                           host_cpus=32, host_available=8 * 2**30)
    assert a.cpus == 4 and a.memory_bytes == 8 * 2**30 and a.memory_from == "the host's available memory"


def test_allocation_of_a_slurm_task_without_cgroup_enforcement(tmp_path):
    """One CPU and 3 GiB asked of a 32-core node: the task sizes itself from its request."""
    (tmp_path / "cgroup.controllers").write_text("")
    env = {"SLURM_JOB_ID": "12", "SLURM_CPUS_PER_TASK": "1", "SLURM_MEM_PER_NODE": "3072"}
    a = cgroups.allocation(root=tmp_path, groups={}, env=env, host_cpus=32, host_available=120 * 2**30)
    assert (a.cpus, a.memory_bytes) == (1, 3 * 2**30)
    assert a.cpus_from == "the Slurm job's CPUs" and a.memory_from == "the Slurm job's memory"
    per_cpu = cgroups.allocation(root=tmp_path, groups={}, env={"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "2",
                                                                "SLURM_MEM_PER_CPU": "1000"},
                                 host_cpus=32, host_available=120 * 2**30)
    assert (per_cpu.cpus, per_cpu.memory_bytes) == (2, 2000 * 2**20)


def test_allocation_of_this_process_is_sane():
    a = cgroups.allocation()
    assert 1 <= a.cpus <= (os.cpu_count() or 1) and a.memory_bytes > 0
