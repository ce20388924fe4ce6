"""Warm starts: snapshot identity and invalidation, the fallback to a cold
boot, per-VM keys in a shared snapshot, and the persistent-memory rule (a
warm start or reset never brings back older pmem contents; only an explicit
``reset(pmem=True)`` erases them) — on real guests."""

from __future__ import annotations

import time
from pathlib import Path

import paramiko
import pytest

from labkit.machine import snapshot
from labkit.machine.config import Nvdimm, VMConfig
from labkit.errors import GuestTimeout
from labkit.lab import Lab
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.vm import VM
from labkit.settings import from_environment

from conftest import require_image


class FakeImage:
    def __init__(self, sha: str = "a" * 64, release: str = "6.1.0-test") -> None:
        self.manifest = {"kernel_release": release,
                         "artifacts": {"root.ext4": {"sha256": sha}, "vmlinux": {"sha256": "b" * 64}}}


def cfg(**kw) -> VMConfig:
    base = dict(name="x", state_dir=Path("/s"), kernel_image=Path("/k"), initrd=Path("/i"))
    base.update(kw)
    return VMConfig(**base)


# -- identity (pure) ----------------------------------------------------------
def test_key_ignores_what_differs_between_vms_of_one_machine():
    k = snapshot.machine_key(cfg(), FakeImage())
    assert snapshot.machine_key(cfg(name="other", state_dir=Path("/elsewhere"), ssh_port=2222,
                                    ssh_pubkey="AAAAKEY"), FakeImage()) == k


@pytest.mark.parametrize("change", [
    dict(memory_mb=2048), dict(smp=1), dict(accel="kvm"), dict(nvdimms=(Nvdimm(512), Nvdimm(512))),
    dict(nvdimms=(Nvdimm(1024), Nvdimm(512), Nvdimm(512))), dict(tcg_cache_mb=128),
    dict(free_page_reporting=False),
])
def test_key_changes_with_the_machine(change):
    assert snapshot.machine_key(cfg(**change), FakeImage()) != snapshot.machine_key(cfg(), FakeImage())


def test_key_changes_with_the_image_and_qemu(monkeypatch):
    k = snapshot.machine_key(cfg(), FakeImage())
    assert snapshot.machine_key(cfg(), FakeImage(sha="c" * 64)) != k
    assert snapshot.machine_key(cfg(), FakeImage(release="6.1.0-other")) != k
    monkeypatch.setattr(snapshot, "qemu_version", lambda binary="": "QEMU emulator version 99.0")
    assert snapshot.machine_key(cfg(), FakeImage()) != k


def test_the_pmem_ready_marker_is_never_the_echo_of_the_typed_line():
    import re
    typed = snapshot.RESUME_SCRIPT.format(now=1796149844)
    assert re.search(snapshot.PMEM_READY_RE, typed) is None       # the console echoes what we type
    assert re.search(snapshot.PMEM_READY_RE, "labkit: pmem ready rc=0").group(1) == "0"
    assert "{" not in typed and "modprobe -a nfit" in typed


# -- on real guests -------------------------------------------------------------
@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Tests that damage snapshots get a snapshot cache of their own."""
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# device-dax is a character device that only mmap reaches
DAX_WRITE = ("import mmap,os,sys;d=open('/tmp/marker-dev','wb');b=os.urandom(4096);d.write(b);d.close();"
             "f=os.open(sys.argv[1],os.O_RDWR);m=mmap.mmap(f,2<<20);m[:4096]=b;m.close()")
DAX_READ = ("import mmap,os,sys,hashlib;f=os.open(sys.argv[1],os.O_RDONLY);"
            "m=mmap.mmap(f,2<<20,prot=mmap.PROT_READ);print(hashlib.sha256(m[:4096]).hexdigest())")


def guest_sha(vm: VM, path: str) -> str:
    return vm.run(["sha256sum", path], check=True).stdout.split()[0]


@pytest.mark.integration
@pytest.mark.fresh_guest("it makes and restores warm-start snapshots")
def test_warm_start_restores_a_working_guest_with_its_nvdimms(tmp_path):
    require_image("6.1")
    with VM("warm-a", kernel="6.1", state_dir=tmp_path / "a") as a:
        first_kind = a.info.start_kind
    with VM("warm-b", kernel="6.1", state_dir=tmp_path / "b") as b:
        assert b.info.start_kind == "warm", b.info.warm_error
        assert first_kind == "warm"            # the first start made the snapshot, then restored it
        assert b.run("uname -r", check=True).stdout.strip() == b.boot.kernel_release
        assert len(Lab(b).namespaces()) == 3   # nfit loaded after the restore
        # the guest clock was set on restore, not left at the snapshot's time
        assert abs(int(b.run("date +%s", check=True).stdout) - time.time()) < 30
        # the restored rxe0 and vivid are ready
        assert b.run("test -e /sys/class/infiniband/rxe0 && ls /dev/video0", check=True).rc == 0


@pytest.mark.integration
@pytest.mark.fresh_guest("it makes and restores warm-start snapshots")
def test_a_restored_guest_trusts_only_its_own_vms_key(tmp_path):
    """One snapshot serves every VM; SSH trusts the key QEMU passes now (fw_cfg)."""
    require_image("6.1")
    with VM("key-a", kernel="6.1", state_dir=tmp_path / "a") as a, \
            VM("key-b", kernel="6.1", state_dir=tmp_path / "b") as b:
        assert a.info.start_kind == b.info.start_kind == "warm"
        assert a.info.snapshot == b.info.snapshot
        with pytest.raises((GuestTimeout, paramiko.AuthenticationException)):
            SSHChannel(b.info.ssh_port, a.key_path, tuple(b.info.host_key)).connect(timeout=3)
        b.run("true", check=True)


@pytest.mark.integration
@pytest.mark.fresh_guest("it makes and restores warm-start snapshots")
def test_pmem_written_after_the_snapshot_survives_warm_starts_and_resets(tmp_path):
    require_image("6.1")
    state = tmp_path / "vm"
    with VM("pmem-safe", kernel="6.1", state_dir=state) as vm:
        lab = Lab(vm)
        lab.prepare_mounts()
        vm.run("head -c 3000000 /dev/urandom > /mnt/fsdax-xfs/marker && "
               "head -c 1000000 /dev/urandom > /mnt/fsdax-ext4/marker && sync", check=True)
        want = {p: guest_sha(vm, p) for p in ("/mnt/fsdax-xfs/marker", "/mnt/fsdax-ext4/marker")}
        dax = "/dev/" + lab.prepare_pmem()["devdax"].chardev
        vm.run(["python3", "-c", DAX_WRITE, dax], check=True)
        dev_sha = guest_sha(vm, "/tmp/marker-dev")
    # a new warm start (the snapshot predates every byte written above)
    with VM("pmem-safe", kernel="6.1", state_dir=state) as vm:
        assert vm.info.start_kind == "warm"
        # (The host files are not byte-identical to before: with the default
        # map=dev the kernel keeps its struct pages on the NVDIMM and rewrites
        # them at every probe. The learner's data is what must not change.)
        lab = Lab(vm)
        assert [n.mode for n in lab.namespaces()] == ["fsdax", "fsdax", "devdax"]
        lab.prepare_mounts()
        assert {p: guest_sha(vm, p) for p in want} == want
        got = vm.run(["python3", "-c", DAX_READ, dax], check=True).stdout.strip()
        assert got == dev_sha
        # reset: a new guest from the snapshot, the persistent memory as it was
        vm.reset()
        assert vm.info.start_kind == "warm"
        lab = Lab(vm)
        lab.prepare_mounts()
        assert {p: guest_sha(vm, p) for p in want} == want
        # only the explicit request erases it
        vm.reset(pmem=True)
        assert [n.mode for n in Lab(vm).namespaces()] == ["raw", "raw", "raw"]
    assert all(f.stat().st_blocks == 0 for f in state.glob("pmem*.img"))


@pytest.mark.integration
@pytest.mark.fresh_guest("it makes and restores warm-start snapshots")
def test_a_damaged_snapshot_is_never_restored(tmp_path, private_cache):
    require_image("6.1")
    with VM("dmg", kernel="6.1", state_dir=tmp_path / "a") as vm:
        key = vm.info.snapshot
    snap = snapshot.find(from_environment(), key, "6.1")
    assert snap is not None
    # truncated: noticed before QEMU is even started, and a new snapshot is made
    snap.state_file.chmod(0o600)
    with open(snap.state_file, "r+b") as fh:
        fh.truncate(1000)
    assert snapshot.find(from_environment(), key, "6.1") is None
    with VM("dmg", kernel="6.1", state_dir=tmp_path / "a") as vm:
        assert vm.info.start_kind == "warm" and vm.info.snapshot == key
    # same size but garbage: QEMU refuses it; the VM boots cold and says why
    snap = snapshot.find(from_environment(), key, "6.1")
    snap.state_file.chmod(0o600)
    size = snap.state_file.stat().st_size
    snap.state_file.write_bytes(b"\0garbage" * (size // 8) + b"\0" * (size % 8))
    with VM("dmg", kernel="6.1", state_dir=tmp_path / "a") as vm:
        assert vm.info.start_kind == "cold"
        assert vm.info.warm_error
        vm.run("true", check=True)
    assert snapshot.find(from_environment(), key, "6.1") is None      # thrown away, the next start makes a new one


@pytest.mark.integration
@pytest.mark.fresh_guest("it makes and restores warm-start snapshots")
def test_cold_start_on_request(tmp_path):
    require_image("6.1")
    with VM("cold", kernel="6.1", state_dir=tmp_path / "c", warm=False) as vm:
        assert vm.info.start_kind == "cold"
        assert len(Lab(vm).namespaces()) == 3
