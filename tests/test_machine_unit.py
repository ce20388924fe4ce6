"""The machine layer without a guest: process identity, the state rule, the
health table, vm.json records, and the sweeping of what killed processes
left behind. Fake QEMUs are real processes whose argv[0] says qemu-system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.errors import GuestDied, GuestHung, GuestPanic
from labkit.machine import process, snapshot
from labkit.machine.accel import AccelChoice
from labkit.machine.channels.console import BootInfo
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.health import HUNG_AFTER, Evidence, diagnose
from labkit.machine.running import Running, qemu_alive
from labkit.machine.state import VMState, recorded_state
from labkit.machine.statedir import StateDir, VMInfo, sweep_stale_throwaways
from labkit.machine.vm import VM
from labkit.settings import Settings, from_environment

LABKIT = [sys.executable, "-m", "labkit"]


def fake_qemu(pidfile: Path) -> subprocess.Popen:
    """A process that looks like QEMU to ``ps``: argv[0] qemu-system-x86_64 and a -pidfile."""
    p = subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(120)", "-pidfile", str(pidfile)],
                         executable=sys.executable)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{p.pid}\n")
    return p


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_identity_needs_qemu_and_the_exact_pidfile(tmp_path, procs):
    c1 = fake_qemu(tmp_path / "c1" / "qemu.pid")
    procs.append(c1)
    assert process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid")
    # VM "c" is a prefix of "c1": its pidfile path is a substring of c1's argv, but not c1's pidfile.
    assert not process.is_qemu_of(c1.pid, tmp_path / "c" / "qemu.pid")
    tail = subprocess.Popen(["tail", "-f", str(tmp_path / "c1" / "qemu.pid")])
    procs.append(tail)
    assert not process.is_qemu_of(tail.pid, tmp_path / "c1" / "qemu.pid")   # not QEMU at all
    started = process.start_time(c1.pid)
    assert process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid", started)
    assert not process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid", started - 100)   # PID reused


def test_identity_survives_a_step_of_the_wall_clock(tmp_path, procs, monkeypatch):
    """The host's clock stepped (or the host was paused and resumed) after QEMU
    started: /proc/stat's btime moves, and with it psutil's create_time. The
    recorded start is in ticks since boot, so the running QEMU is still ours
    (a CI run declared a healthy guest dead this way)."""
    import psutil._pslinux as pslinux
    c1 = fake_qemu(tmp_path / "c1" / "qemu.pid")
    procs.append(c1)
    started = process.start_time(c1.pid)
    assert abs(started - time.clock_gettime(time.CLOCK_BOOTTIME)) < 5.0     # seconds since boot
    real = pslinux.boot_time
    monkeypatch.setattr(pslinux, "boot_time", lambda: real() + 7.0)          # the clock stepped by 7 s
    assert process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid", started)
    assert not process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid", started - 0.5)   # another process


def test_a_start_time_recorded_by_an_older_labkit_still_identifies(tmp_path, procs):
    """Older state dirs recorded psutil's wall-clock create_time."""
    import psutil
    c1 = fake_qemu(tmp_path / "c1" / "qemu.pid")
    procs.append(c1)
    wall = psutil.Process(c1.pid).create_time()
    assert process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid", wall)
    assert not process.is_qemu_of(c1.pid, tmp_path / "c1" / "qemu.pid", wall - 100)


def test_start_time_of_a_command_name_with_spaces_and_parentheses(tmp_path, procs):
    odd = subprocess.Popen(["x", "-c", "import ctypes, time; ctypes.CDLL(None).prctl(15, b'a) b (c'); "
                                       "print(flush=True); time.sleep(30)"],
                           executable=sys.executable, stdout=subprocess.PIPE)
    procs.append(odd)
    assert odd.stdout is not None
    odd.stdout.readline()                             # PR_SET_NAME done
    assert Path(f"/proc/{odd.pid}/comm").read_text().strip() == "a) b (c"
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert 0 < now - process.start_time(odd.pid) < 5.0
    assert process.start_time(10**7) == 0.0          # no such process


def test_our_own_running_child_is_alive_whatever_its_recorded_start(tmp_path, procs):
    """The QEMU this process started and has not reaped cannot be a stranger
    (its PID cannot be reused), so a wrong recorded start never declares it dead;
    once it exits it is dead."""
    sd = StateDir(tmp_path / "c")
    child = fake_qemu(sd.pidfile)
    procs.append(child)
    info = VMInfo("c", "6.1", state="running", pid=child.pid, qemu_started=process.start_time(child.pid) - 50)
    guest = Running(sd, info, BootInfo("6.1.0-test", 1.0, None), AccelChoice("tcg", "test"),
                    SSHChannel(0, sd.key, ("ssh-ed25519", "AAAA")), proc=child)
    assert guest.alive() and qemu_alive(sd, info, child)
    assert not qemu_alive(sd, info, None)      # without the child, the wrong recorded start says "not ours"
    child.kill()
    child.wait()
    assert not guest.alive()


def test_stop_never_kills_another_vms_qemu_or_a_tail(tmp_path, procs):
    other = fake_qemu(tmp_path / "c1" / "qemu.pid")
    procs.append(other)
    tail = subprocess.Popen(["tail", "-f", "/dev/null", str(tmp_path / "c" / "console.log")])
    procs.append(tail)
    for stale in (other.pid, tail.pid):
        vm = VM("c", persistent=True, state_dir=tmp_path / "c")
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / "qemu.pid").write_text(f"{stale}\n")
        VMInfo("c", "6.1", state="running", pid=stale).save(vm.info_path)
        assert vm.status() is VMState.DEAD
        vm.stop()
        assert process.pid_alive(stale), "stop killed a process that is not this VM's QEMU"
    assert other.poll() is None and tail.poll() is None


def test_stop_kills_its_own_qemu_even_with_a_corrupt_record(tmp_path, procs):
    mine = fake_qemu(tmp_path / "v" / "qemu.pid")
    procs.append(mine)
    vm = VM("v", persistent=True, state_dir=tmp_path / "v")
    vm.info_path.write_text("[]")
    assert vm.status() is VMState.RUNNING      # the pidfile and the process say so
    vm.stop()
    assert mine.wait(timeout=10) is not None


@pytest.mark.parametrize("record", ["{}", "[]", "null", '"x"', "not json {", '{"name": "v", "kernel": 6.1}',
                                    '{"name": "v", "kernel": "6.1", "pid": "12"}'])
def test_corrupt_vm_json_locks_nothing_out(tmp_path, record):
    sd = tmp_path / "vms" / "v"
    sd.mkdir(parents=True)
    (sd / "vm.json").write_text(record)
    env = dict(os.environ, LABKIT_STATE_DIR=str(tmp_path))
    for argv in (["vm", "status", "--name", "v"], ["vm", "stop", "--name", "v"],
                 ["vm", "delete", "--name", "v", "--yes"]):
        r = subprocess.run(LABKIT + argv, capture_output=True, text=True, env=env, timeout=60)
        assert "Traceback" not in r.stderr, (argv, r.stderr)
        assert r.returncode in (0, 3), (argv, r.returncode, r.stderr)
    assert not sd.exists()


def test_vminfo_round_trip_and_rejects_wrong_types(tmp_path):
    info = VMInfo("v", "6.1", state="running", pid=42, host_key=["ssh-ed25519", "AAAA"], phases={"a": 0.1})
    info.save(tmp_path / "vm.json")
    assert VMInfo.load(tmp_path / "vm.json") == info
    assert VMInfo.from_json({"name": "v", "kernel": "6.1", "host_key": "ssh-ed25519 AAAA"}) is None
    assert VMInfo.from_json({"name": "v", "kernel": "6.1", "persistent": 1}) is None
    assert VMInfo.from_json({"name": "v", "kernel": "6.1", "unknown": 1}) == VMInfo("v", "6.1")


@pytest.mark.parametrize("state, alive, busy, expect", [
    (None, False, False, VMState.STOPPED),
    (None, True, False, VMState.RUNNING),
    ("stopped", False, False, VMState.STOPPED),
    ("running", True, False, VMState.RUNNING),
    ("running", False, False, VMState.DEAD),
    ("starting", True, True, VMState.STARTING),
    ("starting", False, True, VMState.STARTING),
    ("starting", True, False, VMState.INCOMPLETE),   # the start was interrupted: QEMU runs, guest not ready
    ("starting", False, False, VMState.DEAD),
])
def test_state_rule(state, alive, busy, expect):
    info = VMInfo("v", "6.1", state=state) if state else None
    assert recorded_state(info.lifecycle if info else None, alive, busy) is expect


PANIC_TEXT = "[ 1.0] boot\n[ 2.0] Kernel panic - not syncing: sysrq triggered crash\n[ 2.1] ---[ end"


@pytest.mark.parametrize("ev, kind, words", [
    (Evidence("v", qemu_alive=True, qmp_status="running"), None, ""),
    (Evidence("v", qemu_alive=True, qmp_status=None), None, ""),
    (Evidence("v", qemu_alive=False, exit_code=-9), GuestDied, "killed by SIGKILL"),
    (Evidence("v", qemu_alive=False, exit_code=1, qemu_log="qemu: boom"), GuestDied, "exited with status 1"),
    (Evidence("v", qemu_alive=False), GuestDied, "killed or crashed"),
    (Evidence("v", qemu_alive=False, console_text=PANIC_TEXT), GuestPanic, "sysrq"),
    (Evidence("v", qemu_alive=True, qmp_status="guest-panicked", console_text=PANIC_TEXT), GuestPanic, "sysrq"),
    (Evidence("v", qemu_alive=True, qmp_status="paused"), GuestHung, "paused"),
    (Evidence("v", qemu_alive=True, qmp_status="io-error", state_dir="/s"), GuestHung, "full"),
    (Evidence("v", qemu_alive=True, qmp_status="inmigrate"), GuestHung, "interrupted"),
    (Evidence("v", qemu_alive=True, qmp_status="postmigrate"), GuestHung, "interrupted"),
    (Evidence("v", qemu_alive=True, qmp_status="running", sshd_silent_for=HUNG_AFTER - 1), None, ""),
    (Evidence("v", qemu_alive=True, qmp_status="running", sshd_silent_for=HUNG_AFTER + 1), GuestHung, "starves"),
])
def test_diagnose_table(ev, kind, words):
    err = diagnose(ev)
    if kind is None:
        assert err is None
        return
    assert type(err) is kind
    assert words in str(err)


def test_half_written_snapshots_of_dead_writers_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = snapshot.snapshots_dir(from_environment()) / f".tmp-6.1-abc-{dead.pid}"
    live = snapshot.snapshots_dir(from_environment()) / f".tmp-6.1-abc-{os.getpid()}"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "state.mig").write_bytes(b"x" * 100)
        (d / "state.mig").chmod(0o400)
    assert snapshot.sweep_stale_tmp(from_environment()) == [stale]
    assert not stale.exists() and live.exists()
    # the writer's PID now belongs to a process that started after the file was last written
    reused = subprocess.Popen(["sleep", "30"])
    try:
        taken = snapshot.snapshots_dir(from_environment()) / f".tmp-6.1-abd-{reused.pid}"
        taken.mkdir()
        os.utime(taken, (time.time() - 60, time.time() - 60))
        assert snapshot.sweep_stale_tmp(from_environment()) == [taken] and live.exists()
    finally:
        reused.kill()
        reused.wait()


def test_disk_full_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "free_mb", lambda path: 12)
    msg = snapshot._disk_full(tmp_path)
    assert "disk full at" in msg and str(tmp_path) in msg and "12 MiB free" in msg
    monkeypatch.setattr(snapshot, "free_mb", lambda path: 100000)
    assert snapshot._disk_full(tmp_path) == ""


def test_throwaway_state_left_by_a_killed_process_is_swept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"labkit-run-6-1-{dead.pid}-abcd1234"
    left.mkdir()
    (left / "id_ed25519").write_text("secret")
    mine = tmp_path / f"labkit-run-6-1-{os.getpid()}-abcd1234"
    mine.mkdir()
    other = tmp_path / "labkit-notes"
    other.mkdir()
    assert sweep_stale_throwaways() == [left]
    assert mine.exists() and other.exists()


def test_status_into_a_closed_pipe_is_quiet(tmp_path):
    env = dict(os.environ, LABKIT_STATE_DIR=str(tmp_path))
    r, w = os.pipe()
    os.close(r)            # the reader is gone before labkit writes: like `| head -1` that already exited
    try:
        res = subprocess.run(LABKIT + ["vm", "status", "--name", "nope"], stdout=w, stderr=subprocess.PIPE,
                             text=True, env=env, timeout=60)
    finally:
        os.close(w)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


def test_wait_gone_counts_a_zombie_as_gone():
    p = subprocess.Popen(["true"])
    time.sleep(0.3)                      # exited, not reaped (no poll/wait yet): a zombie
    t0 = time.monotonic()
    assert process.wait_gone(p.pid, timeout=5.0)
    assert time.monotonic() - t0 < 3.0
    p.wait()


def test_state_files_are_named_once(tmp_path):
    vm = VM("names", persistent=True, state_dir=tmp_path)
    assert vm.info_path == tmp_path / "vm.json" and vm.key_path == tmp_path / "id_ed25519"
    assert json.loads(json.dumps(vm.describe()))["state"] == "stopped"


@pytest.mark.parametrize("line, words", [
    ("", "printed nothing"),
    ("qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == n' failed.",
     "crashed setting up a guest"),
    ("qemu-system-x86_64: failed to initialize kvm: Permission denied", "could not run under it"),
])
def test_why_kvm_is_not_used_is_said_in_plain_words(line, words):
    from labkit.machine.accel import kvm_failure_words
    text = kvm_failure_words(line)
    assert words in text and "software emulation" in text


@pytest.mark.parametrize("printed, accel, words", [
    # this host's kind: the firmware and the kernel's real-mode setup run under KVM, long mode never starts
    ("Probing EDD (edd=off to disable)... ok", "tcg", "64-bit kernel under it stopped"),
    ("Probing EDD (edd=off to disable)... ok\n[    0.000000] Linux version 6.1.0-test", "kvm",
     "booted a kernel to 64-bit mode"),
])
def test_the_kvm_probe_needs_a_kernel_in_long_mode_not_only_the_firmware(tmp_path, monkeypatch, printed, accel,
                                                                          words):
    from labkit.machine import accel as accel_mod
    qemu = tmp_path / "qemu"
    qemu.write_text(f"#!/bin/sh\nprintf '%s\\n' '{printed}'\nexec sleep 30\n")
    qemu.chmod(0o755)
    monkeypatch.setattr(accel_mod.os.path, "exists", lambda p: True)
    monkeypatch.setattr(accel_mod.os, "access", lambda p, mode: True)
    choice = accel_mod.probe_kvm(str(qemu), seconds=1.5, kernel=tmp_path / "vmlinuz")
    assert choice.accel == accel and words in choice.reason
    argv = accel_mod.probe_argv("q", tmp_path / "vmlinuz")
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinuz") and "-accel" in argv


def test_a_kvm_verdict_from_the_firmware_alone_is_probed_again_once_a_kernel_is_built(tmp_path, monkeypatch):
    from labkit.machine import accel as accel_mod
    from labkit.settings import Settings
    settings = Settings.from_env({"LABKIT_CACHE_DIR": str(tmp_path / "cache"),
                                  "LABKIT_IMAGES_DIR": str(tmp_path / "images")})
    probes: list[object] = []

    def probe(qemu, seconds=6.0, kernel=None):
        probes.append(kernel)
        return accel_mod.AccelChoice("kvm", "probe")

    monkeypatch.setattr(accel_mod, "probe_kvm", probe)
    accel_mod.choose_accel(settings)
    accel_mod.choose_accel(settings)                       # cached
    (tmp_path / "images" / "6.1").mkdir(parents=True)
    (tmp_path / "images" / "6.1" / "vmlinuz").write_bytes(b"k")
    accel_mod.choose_accel(settings)                       # a kernel now: probed again, with it
    assert probes == [None, tmp_path / "images" / "6.1" / "vmlinuz"]


def _fake_image(root: Path, kernel: str = "6.1") -> Path:
    from labkit.image.build import ARTIFACTS, sha256_file
    d = root / kernel
    d.mkdir(parents=True)
    for name in ARTIFACTS:
        (d / name).write_bytes(name.encode() * 1000)
    arts = {n: {"sha256": sha256_file(d / n), "bytes": (d / n).stat().st_size} for n in ARTIFACTS}
    (d / "manifest.json").write_text(json.dumps({"kernel_release": "6.1.0-test", "artifacts": arts}))
    return d


def test_an_image_changed_in_place_with_its_mtime_restored_is_caught(tmp_path, monkeypatch):
    from labkit.errors import ImageMissing
    from labkit.image import load_image
    monkeypatch.setenv("LABKIT_IMAGES_DIR", str(tmp_path))
    d = _fake_image(tmp_path)
    load_image("6.1")                                    # hashes once and remembers
    root = d / "root.ext4"
    st = root.stat()
    with open(root, "r+b") as f:                         # one byte, same size
        f.seek(100)
        f.write(b"X")
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back, as `touch -d` would
    with pytest.raises(ImageMissing) as e:
        load_image("6.1")
    assert "root.ext4 is corrupt" in str(e.value)
    env = dict(os.environ, LABKIT_IMAGES_DIR=str(tmp_path))
    r = subprocess.run(LABKIT + ["image", "verify", "--kernel", "6.1"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_image_verify_hashes_even_when_the_stamp_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_IMAGES_DIR", str(tmp_path))
    _fake_image(tmp_path)
    env = dict(os.environ, LABKIT_IMAGES_DIR=str(tmp_path))
    r = subprocess.run(LABKIT + ["image", "verify", "--kernel", "6.1"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "3 files match" in r.stdout, r.stdout + r.stderr


INT3_OOPS = ("[    1.073024] Oops: int3: 0000 [#2] SMP NOPTI\n"
             "[    1.069754] Kernel panic - not syncing: Fatal exception in interrupt\n")


@pytest.mark.parametrize("accel, console, again", [
    ("tcg", INT3_OOPS, True),
    ("kvm", INT3_OOPS, False),          # real hardware: an int3 oops is the kernel's, report it
    ("tcg", "Kernel panic - not syncing: VFS: Unable to mount root fs\n", False),
])
def test_only_a_tcg_code_patching_oops_earns_a_second_boot(accel, console, again):
    from labkit.machine.boot import tcg_code_patching_oops
    assert tcg_code_patching_oops(accel, console) is again


def _cold_starter(tmp_path, monkeypatch, panics: list[str]):
    """A Launch whose QEMU spawns and console boots are stand-ins: each boot
    panics with the next console text of ``panics`` until they run out."""
    from types import SimpleNamespace

    from labkit.machine import boot
    from labkit.machine.config import Nvdimm
    image = SimpleNamespace(root=tmp_path / "root.ext4", manifest={"artifacts": {"root.ext4": {"sha256": "x"}}})
    spec = boot.StartSpec(name="cold", kernel="6.1", sd=StateDir(tmp_path / "cold"), persistent=False,
                          memory_mb=1024, smp=1, nvdimms=(Nvdimm(),), settings=Settings())
    st = boot.Launch(spec, image, AccelChoice("tcg", "test"), VMInfo("cold", "6.1"))  # type: ignore[arg-type]
    boots, kills = [], []
    monkeypatch.setattr(boot.disks, "prepare_root", lambda *a, **k: None)
    monkeypatch.setattr(st, "spawn_retrying", lambda *a, **k: SimpleNamespace(accel="tcg", ssh_port=0))
    monkeypatch.setattr(st, "kill", lambda: kills.append(1) or True)

    def wait_console_boot(cfg, timeout):
        boots.append(1)
        if panics:
            raise GuestPanic(panics.pop(0))
        st.boot = BootInfo("6.1.0-test", 1.0, None)

    monkeypatch.setattr(st, "wait_console_boot", wait_console_boot)
    return st, boots, kills


def test_a_tcg_int3_oops_in_early_boot_boots_once_more(tmp_path, monkeypatch):
    st, boots, kills = _cold_starter(tmp_path, monkeypatch, [INT3_OOPS])
    with pytest.raises(Exception) as e:   # past the panic: the stand-in boot announces no host key
        st.cold("ssh-ed25519 AAAA", 30)
    assert not isinstance(e.value, GuestPanic) and "host key" in str(e.value)
    assert (len(boots), len(kills)) == (2, 1)


def test_a_second_int3_oops_or_another_panic_is_reported(tmp_path, monkeypatch):
    st, boots, _ = _cold_starter(tmp_path, monkeypatch, [INT3_OOPS, INT3_OOPS])
    with pytest.raises(GuestPanic):
        st.cold("ssh-ed25519 AAAA", 30)
    assert len(boots) == 2
    st, boots, _ = _cold_starter(tmp_path, monkeypatch, ["Kernel panic - not syncing: VFS: Unable to mount root fs"])
    with pytest.raises(GuestPanic):
        st.cold("ssh-ed25519 AAAA", 30)
    assert len(boots) == 1


def test_location_variables_that_are_empty_or_relative(monkeypatch, tmp_path):
    """An empty LABKIT_IMAGES_DIR is unset (it once reached mmdebstrap as a
    relative path it read as a mirror); a relative one is made absolute."""
    monkeypatch.setenv("LABKIT_IMAGES_DIR", "")
    s = from_environment()
    assert s.images_dir == s.recipe_dir / "build" and s.images_dir.is_absolute()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LABKIT_STATE_DIR", "rel/state")
    assert from_environment().state_dir == tmp_path / "rel" / "state"


def test_the_record_holds_only_recorded_states():
    """vm.json's `state` is a VMState (stopped, starting, running), spelled in one place."""
    info = VMInfo("v", "6.1")
    assert info.lifecycle is VMState.STOPPED
    info.lifecycle = VMState.STARTING
    assert info.state == "starting" and info.lifecycle is VMState.STARTING
    with pytest.raises(ValueError, match="dead"):
        info.lifecycle = VMState.DEAD           # read from the facts, never recorded
    assert VMInfo("v", "6.1", state="bogus").lifecycle is VMState.STOPPED


def _guest(sd: StateDir, pid: int, port: int = 2222) -> Running:
    info = VMInfo("v", "6.1", state="running", pid=pid, ssh_port=port, accel="tcg", accel_reason="test",
                  kernel_release="6.1.0-test", host_key=["ssh-ed25519", "AAAA"])
    return Running.from_record(sd, info)


def test_the_vm_swaps_a_running_guest_in_whole(tmp_path, monkeypatch):
    """What a VM says about its guest (record, boot, accelerator, channel)
    comes from one Running; a new one replaces all of it and closes the old one."""
    vm = VM("v", state_dir=tmp_path / "v")
    assert (vm.info, vm.boot, vm.accel, vm.proc, vm.ssh_channel) == (None, None, None, None, None)
    first, second = _guest(vm.sd, 11, 2222), _guest(vm.sd, 12, 2223)
    closed: list[Running] = []
    monkeypatch.setattr(Running, "close", lambda self: closed.append(self))
    vm._swap_in(first)
    assert vm.state is VMState.RUNNING and vm.info is first.info and vm.ssh_channel is first.ssh
    assert vm.boot == BootInfo("6.1.0-test", 0.0, ("ssh-ed25519", "AAAA")) and vm.accel == AccelChoice("tcg", "test")
    vm._swap_in(second)
    assert closed == [first] and vm.info is second.info and vm.ssh_channel is second.ssh


def test_a_restart_by_another_process_is_a_new_running_guest(tmp_path):
    sd = StateDir(tmp_path / "v")
    sd.create()
    guest = _guest(sd, 11)
    guest.info.save(sd.info)
    assert guest.successor() is None                       # the record names this guest
    _guest(sd, 12, 2223).info.save(sd.info)
    nxt = guest.successor()
    assert nxt is not None and nxt.info.pid == 12 and nxt.ssh is not guest.ssh
    VMInfo("v", "6.1", state="stopped", pid=0).save(sd.info)
    assert guest.successor() is None                       # stopped elsewhere: nothing to follow


def test_nothing_below_the_facade_imports_it():
    """The strategies (start, boot, warm), the watch and the Running guest
    never reach into the VM facade: no module of machine/ but vm.py imports it,
    except the command line's policy for a persistent VM (``persistent.py``),
    which sits above the facade and drives it."""
    import ast
    root = Path(__file__).resolve().parents[1] / "labkit" / "machine"
    importers = []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""] \
                if isinstance(node, ast.ImportFrom) else []
            if any(n in ("labkit.machine.vm", "labkit.machine.vm.VM") for n in names):
                importers.append(f.relative_to(root).as_posix())
    assert set(importers) <= {"__init__.py", "persistent.py"}, importers


def test_attaching_waits_as_much_longer_as_the_host_said_guests_boot_slower():
    """10 s for SSH to a running guest by default; a class server that set
    LABKIT_BOOT_TIMEOUT=1500 (nested emulation) gives an attach 125 s (a learner's
    next cell after a hub restart timed out at 10 s there)."""
    from labkit.machine import start
    assert start.attach_timeout(None) == start.ATTACH_TIMEOUT == 10.0
    assert start.attach_timeout(60) == 10.0                  # a shorter boot timeout never shortens it
    assert start.attach_timeout(1500) == 125.0
