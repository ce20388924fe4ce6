"""Faults in the lifecycle itself, on real guests: a start, reset or snapshot
save killed half-way must never leave a guest that reads "running"; a full
cache disk must not block starting; `vm ssh` / `run` must say when the guest
died or stopped under a command; a killed `labkit run` leaves no key behind.

A child process is stopped at an exact point of a start (a patched step
prints READY and waits) and SIGKILLed there, so no timing guess decides
what is being tested."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from labkit.errors import StateError
from labkit.machine import snapshot
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.vm import VM, VMState

from conftest import mount_tmpfs, persistent_vm, require_image, umount

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("it kills starts and snapshot saves half-way")]

KERNEL = "6.1"
LABKIT = [sys.executable, "-m", "labkit"]

# Runs VM.start() with one step replaced by "say READY, then wait to be killed".
CHILD = r"""
import sys, time
from labkit.machine import snapshot, warm
from labkit.machine.vm import VM
name, where = sys.argv[1], sys.argv[2]

def stop_here(*args, **kw):
    print("READY", flush=True)
    time.sleep(600)

if where == "restore":                       # QEMU waits in 'inmigrate'
    snapshot.restore = stop_here
elif where == "pmem":                        # restored, NVDIMM drivers not yet confirmed
    warm._wait_pmem = stop_here
elif where == "save":                        # snapshot migrated, source paused, files half-written
    real = snapshot.wait_migration
    def after_migration(*args, **kw):
        real(*args, **kw)
        stop_here()
    snapshot.wait_migration = after_migration
VM(name, kernel=sys.argv[3], persistent=True).start()
print("FINISHED", flush=True)
"""


def start_and_kill_at(name: str, where: str, env: dict | None = None, timeout: float = 180.0) -> int:
    """Start VM ``name`` in a child, SIGKILL the child at ``where``; its PID."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, name, where, KERNEL], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    line = ""
    while time.monotonic() - t0 < timeout:
        line = p.stdout.readline()
        if line.strip() in ("READY", "FINISHED") or not line:
            break
    assert line.strip() == "READY", f"child did not reach {where}: {line!r} {p.stderr.read()[-2000:]}"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    return p.pid


def regions(vm: VM) -> int:
    r = vm.run(["sh", "-c", "ls /sys/bus/nd/devices | grep -c '^region' || true"], timeout=30)
    return int(r.stdout.strip() or 0)


def cli(*argv: str, env: dict | None = None, timeout: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run(LABKIT + list(argv), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def warm_snapshot():
    """The suite's warm-start snapshot for KERNEL exists (made by a first start)."""
    require_image(KERNEL)
    with VM("lc-warm", kernel=KERNEL) as vm:
        assert vm.info.start_kind in ("warm", "cold")


@pytest.mark.parametrize("where", ["restore", "pmem"])
def test_a_start_killed_half_way_is_incomplete_not_running(where, warm_snapshot):
    name = f"lc-{where}"
    start_and_kill_at(name, where)
    vm = VM(name, persistent=True)
    assert vm.status() is VMState.INCOMPLETE
    st = cli("vm", "status", "--name", name)
    assert st.returncode == 5 and "interrupted" in st.stdout, st.stdout + st.stderr
    with pytest.raises(StateError) as e:
        VM.attach(name, timeout=5)
    assert "interrupted" in str(e.value) and "vm start" in str(e.value)
    r = cli("vm", "start", "--name", name, "--quiet")
    assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr
    vm = VM.attach(name)
    try:
        assert regions(vm) == 3, "the restarted guest must see all three NVDIMMs"
    finally:
        vm.stop()


def test_a_snapshot_save_killed_half_way_leaves_nothing_behind(tmp_path):
    """A fresh cache: the first start makes the snapshot; kill it after the
    migration, while the source is paused and the files are half-written."""
    require_image(KERNEL)
    env = dict(os.environ, LABKIT_CACHE_DIR=str(tmp_path / "cache"))
    child = start_and_kill_at("lc-save", "save", env=env, timeout=300)
    snaps = tmp_path / "cache" / "snapshots"
    assert list(snaps.glob(f".tmp-*-{child}")), "the kill must have interrupted a save"
    vm = VM("lc-save", persistent=True)
    assert vm.status() is VMState.INCOMPLETE
    paused_pid = vm.sd.read_pid()
    with QMPChannel(vm.sd.qmp_socket).connect(timeout=5) as q:
        assert q.status() == "postmigrate"
    r = cli("vm", "start", "--name", "lc-save", "--quiet", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        assert not list(snaps.glob(".tmp-*")), "the half-written snapshot must be swept"
        assert not os.path.exists(f"/proc/{paused_pid}") or paused_pid == VM("lc-save", persistent=True).sd.read_pid()
        assert len(list(snaps.glob(f"{KERNEL}-*"))) == 1
    finally:
        cli("vm", "stop", "--name", "lc-save", env=env)


def test_a_full_cache_disk_falls_back_to_a_cold_boot(tmp_path, as_root):
    require_image(KERNEL)
    cache = tmp_path / "smallcache"
    mount_tmpfs(cache, "size=48m")
    env = dict(os.environ, LABKIT_CACHE_DIR=str(cache))
    try:
        r = cli("vm", "start", "--name", "lc-full", "--quiet", env=env, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "cold boot" in r.stdout and "disk full at" in r.stdout, r.stdout
        st = cli("vm", "status", "--name", "lc-full", "--json", env=env)
        d = json.loads(st.stdout)
        assert d["state"] == "running" and d["start_kind"] == "cold" and "disk full at" in d["warm_error"]
        assert not list((cache / "snapshots").glob(".tmp-*")), "a failed save must not leak its files"
        doc = cli("doctor", env=env)
        assert "snapshot" in doc.stdout and "MiB free" in doc.stdout and "[FAIL]" in doc.stdout, doc.stdout
    finally:
        cli("vm", "stop", "--name", "lc-full", env=env)
        umount(cache)


@pytest.fixture(scope="module")
def svm(warm_snapshot):
    with persistent_vm("lc-cli", KERNEL) as vm:
        yield vm


def running(vm: VM) -> VM:
    if vm.status() is not VMState.RUNNING:
        vm.stop()
        vm.start()
    return vm


def test_vm_ssh_says_when_qemu_dies_under_the_command(svm):
    vm = running(svm)
    p = subprocess.Popen(LABKIT + ["vm", "ssh", "--name", "lc-cli", "--", "sleep", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    os.kill(vm.sd.read_pid(), signal.SIGKILL)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 125 and "no longer running" in err, (p.returncode, err)
    vm.stop()


def test_vm_ssh_and_run_say_when_the_guest_is_paused(svm):
    vm = running(svm)
    p = subprocess.Popen(LABKIT + ["vm", "ssh", "--name", "lc-cli", "--", "sleep", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    with QMPChannel(vm.sd.qmp_socket).connect(timeout=5) as q:
        q.command("stop")
    t0 = time.monotonic()
    try:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 125 and "paused" in err, (p.returncode, err)
        assert time.monotonic() - t0 < 10
        r = cli("run", "--name", "lc-cli", "--", "true", timeout=60)
        assert r.returncode != 0 and "paused" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        with QMPChannel(vm.sd.qmp_socket).connect(timeout=5) as q:
            q.command("cont")
    assert vm.run("echo up").stdout == "up\n"


def test_vm_ssh_without_the_key_file_is_a_clear_error(svm):
    vm = running(svm)
    aside = vm.key_path.with_name("id_ed25519.aside")
    vm.key_path.replace(aside)
    try:
        r = cli("vm", "ssh", "--name", "lc-cli", "--", "true")
        assert r.returncode == 2 and "SSH key" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        aside.replace(vm.key_path)


def test_a_terminated_labkit_run_leaves_no_key_behind(warm_snapshot):
    p = subprocess.Popen(LABKIT + ["run", "--quiet", "--name", "nothing-running", "--", "sleep", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pattern = f"labkit-run-{KERNEL.replace('.', '-')}-{p.pid}-*"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        dirs = list(Path(tempfile.gettempdir()).glob(pattern))
        if dirs and (dirs[0] / "vm.json").exists() and json.loads((dirs[0] / "vm.json").read_text())["state"] == "running":
            break
        time.sleep(0.2)
    else:
        pytest.fail("labkit run did not start its throwaway VM")
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == 130
    assert not list(Path(tempfile.gettempdir()).glob(pattern)), "the throwaway state (with its key) was left"
