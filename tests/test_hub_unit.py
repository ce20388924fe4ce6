"""Offline tests of the multi-user parts: the host-wide snapshot cache and
its per-user fallback, tying a persistent VM to its learner's server, the
cgroup-v1 groups of the hub's spawner (on a fake cgroup tree) and the
capacity estimate. The real hub, users and guests are in tests/test_hub.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from labkit.machine import process, snapshot
from labkit.settings import Settings, from_environment

# -- the shared snapshot cache ----------------------------------------------------


def _fake_snapshot(root: Path, kernel: str, key: str, mode: int = 0o444) -> Path:
    d = root / f"{kernel}-{key}"
    d.mkdir(parents=True)
    (d / "state.mig").write_bytes(b"s" * 10)
    (d / "disk.qcow2").write_bytes(b"d" * 20)
    (d / "meta.json").write_text(json.dumps({"key": key, "format": snapshot.FORMAT, "kernel": kernel,
                                             "state_bytes": 10, "disk_bytes": 20,
                                             "sha256": {"state.mig": hashlib.sha256(b"s" * 10).hexdigest(),
                                                        "disk.qcow2": hashlib.sha256(b"d" * 20).hexdigest()}}))
    for f in d.iterdir():
        f.chmod(mode)
    return d


@pytest.fixture
def caches(tmp_path, monkeypatch):
    user, shared = tmp_path / "user", tmp_path / "shared"
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(user))
    monkeypatch.setenv("LABKIT_SHARED_CACHE_DIR", str(shared))
    return user / "snapshots", shared / "snapshots"


def test_without_a_host_wide_directory_snapshots_go_to_the_users_cache(caches):
    user, _shared = caches
    assert snapshot.snapshots_dir(from_environment()) == user
    assert snapshot.search_dirs(from_environment()) == [user]


def test_an_empty_setting_turns_the_host_wide_cache_off(caches, monkeypatch):
    monkeypatch.setenv("LABKIT_SHARED_CACHE_DIR", "")
    assert snapshot.shared_snapshots_dir(from_environment()) is None
    assert snapshot.snapshots_dir(from_environment()) == caches[0]


def test_the_instructor_writes_the_host_wide_directory(caches):
    _user, shared = caches
    shared.mkdir(parents=True)           # the instructor's opt-in
    assert snapshot.snapshots_dir(from_environment()) == shared
    assert snapshot._is_shared(from_environment(), shared / "6.1-abc")


def test_a_learner_reads_the_host_wide_snapshot_and_writes_only_their_own(caches, monkeypatch):
    user, shared = caches
    d = _fake_snapshot(shared, "6.1", "k1")
    real_access = os.access
    monkeypatch.setattr(snapshot.os, "access",      # as a learner: the host-wide directory is read-only
                        lambda p, m: real_access(p, m) and not (m & os.W_OK and Path(p) == shared))
    assert snapshot.snapshots_dir(from_environment()) == user
    assert snapshot.search_dirs(from_environment()) == [user, shared]
    found = snapshot.find(from_environment(), "k1", "6.1")
    assert found is not None and found.path == d
    assert snapshot.find(from_environment(), "other", "6.1") is None


def test_a_broken_host_wide_snapshot_is_ignored_not_deleted(caches, monkeypatch):
    _user, shared = caches
    d = _fake_snapshot(shared, "6.1", "k1")
    (d / "disk.qcow2").chmod(0o644)
    (d / "disk.qcow2").write_bytes(b"short")
    real_access = os.access
    monkeypatch.setattr(snapshot.os, "access",
                        lambda p, m: real_access(p, m) and not (m & os.W_OK and Path(p) == shared))
    assert snapshot.find(from_environment(), "k1", "6.1") is None
    assert d.exists()


def test_a_broken_own_snapshot_is_removed(caches):
    user, _shared = caches
    mine = _fake_snapshot(user, "6.1", "k1", mode=0o600)
    (mine / "state.mig").write_bytes(b"x")
    assert snapshot.find(from_environment(), "k1", "6.1") is None
    assert not mine.exists()


def test_prune_never_touches_the_host_wide_directory(caches, monkeypatch):
    user, shared = caches
    kept = [_fake_snapshot(shared, "6.1", f"s{i}") for i in range(4)]
    real_access = os.access
    monkeypatch.setattr(snapshot.os, "access",
                        lambda p, m: real_access(p, m) and not (m & os.W_OK and Path(p) == shared))
    user.mkdir(parents=True)
    snapshot.prune(from_environment(), "6.1", keep=1)
    assert all(d.exists() for d in kept)


# -- a persistent VM ends with its learner's server ----------------------------------


def test_lifetime_pid_from_the_environment():
    def pid(**env):
        return Settings.from_env(env).lifetime_pid
    assert pid(JPY_PARENT_PID="4242") == 0         # a kernel outside a hub: the VM is the learner's own
    assert pid(JPY_PARENT_PID="4242", JUPYTERHUB_USER="ada") == 4242   # a hub's server's kernel: ends with it
    assert pid(JPY_PARENT_PID="4242", JUPYTERHUB_USER="ada", LABKIT_LIFETIME_PID="77") == 77  # the hub's wins
    assert pid(JUPYTERHUB_USER="ada", JPY_PARENT_PID="4242", LABKIT_LIFETIME_PID="0") == 0    # turned off
    assert pid(LABKIT_LIFETIME_PID="not-a-pid") == 0


def _gone_within(pid: int, timeout: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_a_persistent_vm_dies_with_its_owner_not_with_its_starter(tmp_path, monkeypatch):
    """Real processes: a 'server' (sleep), a persistent 'QEMU' (sleep) spawned
    by labkit tied to it; the starter's end keeps the VM, the server's ends it."""
    server = subprocess.Popen(["sleep", "300"])
    owner = Settings.from_env({"LABKIT_LIFETIME_PID": str(server.pid)}).lifetime_pid
    vm = process.spawn(["sleep", "300"], tmp_path / "qemu.log", die_with_parent=False, owner_pid=owner)
    try:
        assert not _gone_within(vm.pid, 1.0)       # the watcher does not kill it by itself
        server.kill()
        server.wait()
        vm.wait(timeout=10)                        # the watcher ended it (SIGTERM)
        assert vm.returncode == -signal.SIGTERM
    finally:
        for p in (server, vm):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_vm_whose_owner_is_already_gone_is_stopped_at_once(tmp_path, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = Settings.from_env({"LABKIT_LIFETIME_PID": str(dead.pid)}).lifetime_pid
    vm = process.spawn(["sleep", "300"], tmp_path / "qemu.log", die_with_parent=False, owner_pid=owner)
    try:
        vm.wait(timeout=10)
        assert vm.returncode == -signal.SIGKILL
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()


def test_the_watcher_ends_with_the_vm(tmp_path):
    owner = subprocess.Popen(["sleep", "300"])
    vm = subprocess.Popen(["sleep", "300"])
    try:
        watcher = process.tie_to(vm.pid, owner.pid)
        assert watcher is not None
        vm.kill()
        vm.wait()
        watcher.wait(timeout=10)
        assert owner.poll() is None                # the owner is never touched
    finally:
        for p in (owner, vm):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_the_watcher_is_small():
    """Started with -S -E and stdlib only: a few MiB per learner, not a labkit import."""
    owner = subprocess.Popen(["sleep", "300"])
    vm = subprocess.Popen(["sleep", "300"])
    try:
        watcher = process.tie_to(vm.pid, owner.pid)
        assert watcher is not None
        time.sleep(0.5)       # let it reach its select()
        rss_mb = psutil.Process(watcher.pid).memory_info().rss / 2**20
        assert rss_mb < 40, f"the watcher uses {rss_mb:.0f} MiB"
        assert sys.executable in psutil.Process(watcher.pid).cmdline()[0]
    finally:
        for p in (owner, vm):
            p.kill()
            p.wait()


# -- cgroup-v1 groups -------------------------------------------------------------------

from labkit import cgroups  # noqa: E402
from labkit.tools import capacity as cap  # noqa: E402


def _fake_cgroup_root(tmp_path: Path) -> Path:
    for c in cgroups.CONTROLLERS:
        (tmp_path / c).mkdir()
        (tmp_path / c / "cgroup.procs").write_text("")
    return tmp_path


def test_a_group_gets_its_limits_in_every_controller(tmp_path):
    root = _fake_cgroup_root(tmp_path)
    g = cgroups.Group("ada-default", parent="labkit-hub", root=root)
    g.create(cgroups.Limits(memory_bytes=1536 << 20, cpus=1.5, pids=256, cpu_weight=50))
    assert g.read("memory", "memory.limit_in_bytes") == str(1536 << 20)
    assert g.read("cpu", "cpu.cfs_quota_us") == "150000" and g.read("cpu", "cpu.cfs_period_us") == "100000"
    assert g.read("cpu", "cpu.shares") == "512" and g.read("pids", "pids.max") == "256"
    g.create(cgroups.Limits(memory_bytes=1 << 30, cpus=0))     # idempotent; 0 cores = no quota
    assert g.read("cpu", "cpu.cfs_quota_us") == "-1"


def test_a_host_without_the_v1_controllers_gets_an_actionable_error(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "cgroup.procs").write_text("")
    assert cgroups.missing_controllers(tmp_path) == ["cpu", "pids", "freezer"]
    with pytest.raises(cgroups.CgroupError) as err:
        cgroups.Group("ada-default", root=tmp_path).create(cgroups.Limits(memory_bytes=1 << 30))
    assert "SystemdSpawner" in str(err.value)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "x" * 101, "ada;rm"])
def test_a_group_name_cannot_escape_its_parent(name):
    with pytest.raises(cgroups.CgroupError):
        cgroups.Group(name)


def test_oom_kills_are_read_from_oom_control(tmp_path):
    root = _fake_cgroup_root(tmp_path)
    g = cgroups.Group("ada-default", root=root)
    g.create(cgroups.Limits(memory_bytes=1 << 30))
    (g.dir("memory") / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert g.oom_kills() == 3


# -- capacity ------------------------------------------------------------------------------


def test_capacity_from_memory_and_the_measured_cost():
    c = cap.Capacity(cores=8, memory_mb=32768, per_learner_mb=700, source="test", idle_cpu_cores=0.02)
    assert c.by_memory == int((32768 - cap.HOST_RESERVE_MB) // (700 * cap.SAFETY))
    assert c.working_at_once == 8
    text = c.text()
    assert f"{c.by_memory} logged-in learners" in text and "700 MiB (test)" in text


def test_capacity_uses_the_largest_running_learner():
    small = cap.VMSample(1, "labkit-a", rss_mb=300, uss_mb=280, cpu_cores=0.01, cgroup_peak_mb=None)
    big = cap.VMSample(2, "labkit-b", rss_mb=300, uss_mb=280, cpu_cores=0.03, cgroup_peak_mb=900)
    c = cap.capacity([small, big])
    assert c.per_learner_mb == 900 and "cgroup peak" in c.source
    assert c.idle_cpu_cores == pytest.approx(0.02)
    assert cap.capacity([small]).per_learner_mb == 300 + cap.SERVER_OVERHEAD_MB
    assert cap.capacity([]).source == cap.REFERENCE_SOURCE
