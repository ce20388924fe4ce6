"""Warm starts: snapshot identity and invalidation, the fallback to a cold
boot, per-VM keys in a shared snapshot, and the persistent-memory rule (a
warm start or reset never brings back older pmem contents; only an explicit
``reset(pmem=True)`` erases them) — on real guests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from labkit.machine import snapshot, trust
from labkit.machine.config import Nvdimm, VMConfig
from labkit.errors import GuestTimeout, HostKeyMismatch
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
    typed = snapshot.resume_script(now=1796149844)
    assert re.search(snapshot.PMEM_READY_RE, typed) is None       # the console echoes what we type
    assert re.search(snapshot.PMEM_READY_RE, "labkit: pmem ready rc=0").group(1) == "0"
    assert "{" not in typed and "modprobe -a nfit" in typed
    assert re.search(snapshot.NEW_HOSTKEY_RE, typed) is None
    assert re.search(snapshot.NEW_HOSTKEY_RE, "labkit: new hostkey ssh-ed25519 AAAAC3Nz\r\n").groups() == \
        ("ssh-ed25519", "AAAAC3Nz")


def test_every_restored_guest_is_typed_new_random_bytes_before_its_host_key_is_made():
    """Guests restored from one snapshot resume with one random-generator state:
    the host's bytes, credited and reseeded, come before ssh-keygen, which only
    runs if that worked."""
    import re
    a, b = snapshot.resume_script(), snapshot.resume_script()
    seeds = [re.search(r"bytes\.fromhex\('([0-9a-f]+)'\)", t).group(1) for t in (a, b)]
    assert seeds[0] != seeds[1] and all(len(s) == 2 * snapshot.SEED_BYTES for s in seeds)
    assert snapshot.resume_script(now=1, seed=b"\x01" * 32) == snapshot.resume_script(now=1, seed=b"\x01" * 32)
    seeding = a.index(f"fcntl.ioctl(f,{snapshot.RNDRESEEDCRNG})")
    assert a.index(f"fcntl.ioctl(f,{snapshot.RNDADDENTROPY},") < seeding < a.index("ssh-keygen")
    assert f'fcntl.ioctl(f,{snapshot.RNDRESEEDCRNG})" && ssh-keygen' in a


# -- trust (pure: the file system's owners and modes) -------------------------
def test_a_path_only_root_or_i_can_change_is_trusted(tmp_path):
    d = tmp_path / "snaps"
    d.mkdir(mode=0o700)
    assert trust.untrusted(d) == ""
    d.chmod(0o777)
    assert "writable by others (mode 0777)" in trust.untrusted(d)
    d.chmod(0o770)
    assert "writable by its group" in trust.untrusted(d)
    assert "cannot inspect" in trust.untrusted(d / "missing")
    d.chmod(0o755)
    os.chown(d, 65534, 65534)
    assert "belongs to uid 65534" in trust.untrusted(d)
    assert trust.untrusted(d, uid=65534) == ""
    # a root-owned sticky directory (/tmp) is safe: others cannot replace what is in it
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "mine").mkdir(mode=0o700)
    assert trust.untrusted(sticky / "mine") == ""
    # but a sticky directory someone else owns is theirs to change
    os.chown(sticky, 65534, 65534)
    assert "belongs to uid 65534" in trust.untrusted(sticky / "mine")


def _verifying_cat(path: Path, sha: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-I", "-S", "-c", trust.VERIFYING_CAT, str(path), sha]
    return subprocess.run(argv, capture_output=True, timeout=60)


@pytest.mark.parametrize("size", [1000, (3 << 20) + 17, (20 << 20) + 17, 20 << 20])
def test_the_restore_stream_never_ends_unless_it_matches_its_manifest(tmp_path, size):
    f = tmp_path / "state.mig"
    data = os.urandom(size)
    f.write_bytes(data)
    good = _verifying_cat(f, hashlib.sha256(data).hexdigest())
    assert good.returncode == 0 and good.stdout == data
    bad = _verifying_cat(f, "0" * 64)
    assert bad.returncode == 3 and b"does not match its manifest" in bad.stderr
    assert len(bad.stdout) < size and data.startswith(bad.stdout)     # the end is withheld:
    # at least its last 8 MiB (or all of it), never just a last partial read that QEMU may not need
    assert len(bad.stdout) <= max(0, size - (8 << 20)), (size, len(bad.stdout))
    # and the URI QEMU runs is that program with every word quoted
    snap = snapshot.Snapshot(tmp_path, {"sha256": {"state.mig": "f" * 64}})
    uri = snapshot.restore_uri(snap)
    assert uri.startswith("exec:") and "-I -S -c" in uri and str(f) in uri


def _plant(root: Path, key: str, kernel: str = "6.1") -> Path:
    """A snapshot directory whose files match its manifest (fake contents)."""
    d = root / f"{kernel}-{key}"
    d.mkdir(parents=True)
    state, disk = os.urandom(5000), os.urandom(3000)
    (d / "state.mig").write_bytes(state)
    (d / "disk.qcow2").write_bytes(disk)
    (d / "meta.json").write_text(json.dumps({
        "key": key, "format": snapshot.FORMAT, "kernel": kernel, "state_bytes": len(state),
        "disk_bytes": len(disk), "host_key": ["ssh-ed25519", "AAAA"],
        "sha256": {"state.mig": hashlib.sha256(state).hexdigest(),
                   "disk.qcow2": hashlib.sha256(disk).hexdigest()}}))
    for f in d.iterdir():
        f.chmod(0o444)
    return d


def test_a_snapshot_planted_where_others_can_write_is_refused_with_the_reason(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv("LABKIT_SHARED_CACHE_DIR", str(shared))
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "own"))
    planted = _plant(shared / "snapshots", "k1")
    for d in (shared, shared / "snapshots", planted):
        d.chmod(0o755)
    settings = from_environment()
    assert snapshot.find(settings, "k1", "6.1").path == planted       # root-owned, 0755: trusted
    (shared / "snapshots").chmod(0o777)                               # anyone could have put it there
    refused: list[str] = []
    assert snapshot.find(from_environment(), "k1", "6.1", refused) is None
    assert len(refused) == 1 and "writable by others" in refused[0] and str(shared / "snapshots") in refused[0]
    assert planted.exists()                                           # not ours to delete
    # and nothing of ours is written into such a directory
    assert snapshot.snapshots_dir(from_environment()) == tmp_path / "own" / "snapshots"
    (shared / "snapshots").chmod(0o755)
    os.chown(planted / "state.mig", 65534, 65534)                     # a file of another user's
    refused = []
    assert snapshot.find(from_environment(), "k1", "6.1", refused) is None
    assert "belongs to uid 65534" in refused[0]


def test_a_snapshot_whose_disk_changed_is_not_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_SHARED_CACHE_DIR", "")
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "own"))
    d = _plant(tmp_path / "own" / "snapshots", "k2")
    assert snapshot.find(from_environment(), "k2", "6.1") is not None
    disk = d / "disk.qcow2"
    disk.chmod(0o600)
    data = bytearray(disk.read_bytes())
    data[100] ^= 1                                                    # same size, one bit
    disk.write_bytes(bytes(data))
    assert snapshot.find(from_environment(), "k2", "6.1") is None
    assert not d.exists()                                             # our own broken one is removed


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
        # each restored guest has an SSH host key of its own, not the snapshot's (which
        # every learner who can read the snapshot holds): the client pins the new one
        snap = snapshot.find(from_environment(), a.info.snapshot, "6.1")
        keys = {tuple(a.info.host_key), tuple(b.info.host_key), snap.host_key}
        assert len(keys) == 3
        with pytest.raises((GuestTimeout, HostKeyMismatch, paramiko.SSHException)):
            SSHChannel(b.info.ssh_port, b.key_path, snap.host_key).connect(timeout=3)
        got = b.run("cat /etc/ssh/ssh_host_ed25519_key.pub", check=True).stdout.split()[:2]
        assert got == b.info.host_key


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
@pytest.mark.fresh_guest("it makes, changes and plants warm-start snapshots")
def test_a_changed_or_planted_snapshot_is_never_restored(tmp_path, private_cache, monkeypatch):
    """One bit changed in RAM (QEMU would load it: a guest that is not the one
    made) is refused by its manifest; a copy planted in a shared directory
    anyone can write is refused by its place; each says why and boots anyway."""
    require_image("6.1")
    with VM("chg", kernel="6.1", state_dir=tmp_path / "a") as vm:
        key = vm.info.snapshot
    snap = snapshot.find(from_environment(), key, "6.1")
    good = tmp_path / "good"
    shutil.copytree(snap.path, good)
    snap.state_file.chmod(0o600)
    with open(snap.state_file, "r+b") as fh:        # a byte in the middle of the RAM stream
        fh.seek(snap.state_file.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x80]))
    assert snapshot.find(from_environment(), key, "6.1") is not None     # sizes and disk still match
    with VM("chg", kernel="6.1", state_dir=tmp_path / "a") as vm:
        assert vm.info.start_kind == "cold"
        assert "does not match the SHA-256 its manifest recorded" in vm.info.warm_error
        vm.run("true", check=True)
    # the intact snapshot, offered from a host-wide cache that anyone can write
    shared = tmp_path / "shared"
    (shared / "snapshots").mkdir(parents=True)
    for d in (shared, shared / "snapshots"):
        d.chmod(0o777)
    shutil.copytree(good, shared / "snapshots" / snap.path.name)
    for d in (private_cache / "snapshots").glob("6.1-*"):
        snapshot.discard(d)
    monkeypatch.setenv("LABKIT_SHARED_CACHE_DIR", str(shared))
    with VM("chg", kernel="6.1", state_dir=tmp_path / "a") as vm:
        assert "writable by others" in vm.info.snapshot_refused
        assert vm.info.start_kind == "warm"          # from a snapshot of its own, made now
        made = snapshot.find(from_environment(), key, "6.1")
        assert made is not None and made.path.parent == private_cache / "snapshots"
        vm.run("true", check=True)


@pytest.mark.integration
@pytest.mark.fresh_guest("it makes and restores warm-start snapshots")
def test_cold_start_on_request(tmp_path):
    require_image("6.1")
    with VM("cold", kernel="6.1", state_dir=tmp_path / "c", warm=False) as vm:
        assert vm.info.start_kind == "cold"
        assert len(Lab(vm).namespaces()) == 3
