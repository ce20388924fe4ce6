"""Integration: real QEMU guests of every kernel variant, driven over SSH, the
serial console and QMP."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest

from labkit import image
from labkit.errors import CommandFailed, GuestTimeout
from labkit.machine.vm import VM, VMInfo, VMState

pytestmark = pytest.mark.integration


@pytest.fixture
def any_guest(pool):
    """The channels (SSH, QMP, the state dir) do not depend on the guest's kernel: their
    tests run once, on the default kernel's shared guest; what the kernel or its image
    decides (release, NVDIMMs, mounts, console, kernel messages) runs on every kernel."""
    return pool.get(image.DEFAULT_KERNEL)


def test_boots_the_requested_kernel(guest):
    want = image.load_image(guest.kernel).kernel_release
    assert guest.boot.kernel_release == want
    assert guest.run("uname -r").stdout.strip() == want
    assert guest.accel.accel in ("kvm", "tcg")


def test_exit_codes_and_streams(any_guest):
    r = any_guest.run("echo out; echo err >&2; exit 7")
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err\n")
    with pytest.raises(CommandFailed) as e:
        any_guest.run("false", check=True)
    assert e.value.rc == 1


def test_list_arguments_are_not_interpreted_by_the_shell(any_guest):
    r = any_guest.run(["echo", "$(touch /tmp/canary); `id`"])
    assert r.stdout == "$(touch /tmp/canary); `id`\n"
    assert any_guest.run("test -e /tmp/canary").rc == 1


def test_stdin_and_upload(any_guest):
    assert any_guest.run("python3 -", stdin="print(6*7)\n").stdout == "42\n"
    any_guest.ssh.upload(b"hello\n", "/tmp/up.txt", mode=0o600)
    assert any_guest.run("stat -c %a /tmp/up.txt; cat /tmp/up.txt").stdout == "600\nhello\n"


def test_streaming_output(any_guest):
    chunks = []
    any_guest.ssh.run("for i in 1 2 3; do echo $i; sleep 0.2; done", on_stdout=chunks.append)
    assert "".join(chunks) == "1\n2\n3\n"
    assert len(chunks) >= 2


def test_command_timeout_is_enforced(any_guest):
    with pytest.raises(GuestTimeout):
        any_guest.run("sleep 30", timeout=1.5)
    assert any_guest.run("true").ok   # the channel is still usable


def test_nvdimms_are_present(guest):
    r = guest.run("ndctl list -R", check=True)
    regions = re.findall(r'"dev":"(region\d+)"', r.stdout.replace(" ", ""))
    assert len(regions) == len(guest.nvdimms) >= 2


def test_kernel_messages_stay_off_the_command_channel(guest):
    guest.run("echo labkit-kmsg-probe > /dev/kmsg", check=True)
    r = guest.run("sleep 0.3; echo done")
    assert r.stdout == "done\n" and "labkit-kmsg-probe" not in r.stdout + r.stderr
    assert "labkit-kmsg-probe" in guest.run("dmesg").stdout


def test_pseudo_filesystems_mounted(guest):
    mounts = guest.run("cat /proc/mounts").stdout
    for fs in ("proc", "sysfs", "devtmpfs", "tracefs", "debugfs"):
        assert f" {fs} " in mounts


def test_console_is_a_shell(guest):
    with guest.console() as con:
        con.child.sendline("echo con$((40+2))")
        con.expect([r"con42"], timeout=20)


def test_qmp_status(any_guest):
    assert any_guest.qmp.status() == "running"


def test_base_image_is_never_written(guest):
    img = image.load_image(guest.kernel)
    before = img.root.stat().st_mtime_ns
    guest.run("echo x > /root/scribble; sync", check=True)
    assert img.root.stat().st_mtime_ns == before
    assert stat.S_IMODE(img.root.stat().st_mode) & 0o222 == 0   # built read-only
    assert (guest.state_dir / "root.qcow2").exists()


def test_state_dir_is_private(any_guest):
    assert stat.S_IMODE(any_guest.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(any_guest.key_path.stat().st_mode) == 0o600


@pytest.mark.fresh_guest("it starts, kills and restarts a persistent VM")
def test_persistent_vm_lifecycle_and_reattach(tmp_path):
    """Start in one process, attach and run from another, stop; a killed QEMU reads as dead."""
    env = dict(os.environ, LABKIT_STATE_DIR=str(tmp_path))
    cli = [sys.executable, "-m", "labkit"]
    r = subprocess.run(cli + ["vm", "start", "--name", "p1", "--quiet"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "accelerator" in r.stdout
    try:
        r = subprocess.run(cli + ["vm", "ssh", "--name", "p1", "--", "sh", "-c", "exit 5"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 5
        r = subprocess.run(cli + ["vm", "status", "--name", "p1"], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "running" in r.stdout
        os.environ["LABKIT_STATE_DIR"], saved = str(tmp_path), os.environ["LABKIT_STATE_DIR"]
        try:
            vm = VM.attach("p1")
            assert vm.run("cat /proc/sys/kernel/hostname").stdout.strip() == "labkit"
            info = VMInfo.load(vm.info_path)
            os.kill(info.pid, 9)
            vm.close()
            for _ in range(50):
                if VM("p1", persistent=True).status() is VMState.DEAD:
                    break
                import time
                time.sleep(0.1)
            assert VM("p1", persistent=True).status() is VMState.DEAD
        finally:
            os.environ["LABKIT_STATE_DIR"] = saved
        r = subprocess.run(cli + ["vm", "status", "--name", "p1"], env=env, capture_output=True, text=True)
        assert r.returncode == 4 and "dead" in r.stdout
        # A restart after the crash works and keeps the pinned host key.
        r = subprocess.run(cli + ["vm", "start", "--name", "p1", "--quiet"], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(cli + ["vm", "stop", "--name", "p1"], env=env, capture_output=True, timeout=120)
    r = subprocess.run(cli + ["vm", "status", "--name", "p1"], env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "stopped" in r.stdout
    assert not (tmp_path / "vms/p1/qemu.pid").exists()
