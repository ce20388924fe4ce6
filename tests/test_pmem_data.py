"""Persistent memory keeps the learner's data: files written and fsync'ed on
fs-dax mounts survive a clean restart and a SIGKILL of QEMU (the NVDIMM backing
files are mapped share=on), checked with sha256 in the guest and by finding the
bytes in the host's pmem files. No lifecycle operation short of an explicit
delete removes the state dir or the pmem files.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal

import pytest

from labkit.lab import Lab
from labkit.machine.process import pid_alive
from labkit.machine.vm import VM, VMState

from conftest import ARTIFACTS, require_image

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("it restarts and SIGKILLs its guest")]

KERNEL = "6.1"
SIZE = 16 * 2**20       # per file
WRITE = r"""
import hashlib, os, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
block = hashlib.sha256(seed.encode()).digest() * 2048          # 64 KiB, distinct per file
data = block + os.urandom(size - len(block))      # a findable head, then random bytes
with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
print(hashlib.sha256(data).hexdigest())
"""


def files_state(vm: VM) -> dict[str, tuple[int, int]]:
    """(inode, size) of the pmem files: the same values mean nothing was
    recreated. (The root-disk overlay is, by design: every warm start gives the
    guest the snapshot's disk.)"""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in sorted(vm.state_dir.glob("pmem*.img"))}


def sums(vm: VM, paths: list[str]) -> list[str]:
    r = vm.run(["sha256sum", *paths], timeout=60, check=True)
    return [ln.split()[0] for ln in r.stdout.splitlines()]


def remount(vm: VM) -> None:
    mounts = Lab(vm).prepare_mounts()
    assert all(m.ok and m.dax_active for m in mounts), mounts


def host_has(pmem_files: list, needle: bytes) -> bool:
    for p in pmem_files:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(needle) >= 0:
                return True
    return False


def test_dax_data_survives_clean_restart_and_sigkill():
    require_image(KERNEL)
    vm = VM("pmemdata", kernel=KERNEL, persistent=True)
    vm.start()
    verified = 0
    try:
        remount(vm)
        paths = [f"/mnt/fsdax-{fs}/learner.dat" for fs in ("xfs", "ext4")]
        want = []
        for i, p in enumerate(paths):
            want.append(vm.run(["python3", "-c", WRITE, p, str(SIZE), f"seed{i}"], timeout=120,
                               check=True).stdout.strip())
        assert sums(vm, paths) == want
        before = files_state(vm)
        needles = [hashlib.sha256(f"seed{i}".encode()).digest() * 128 for i in range(2)]   # 4 KiB each
        # The bytes are in the host's pmem files already (share=on, DAX: no page cache in between).
        pmem = sorted(vm.state_dir.glob("pmem*.img"))
        assert all(host_has(pmem, n) for n in needles)

        # 1. clean restart
        vm.stop()
        assert files_state(vm) == before
        vm.start()
        remount(vm)
        assert sums(vm, paths) == want
        verified += len(paths) * SIZE

        # 2. SIGKILL of QEMU, then start (which reaps the stale pidfile)
        pid = vm.info.pid
        os.kill(pid, signal.SIGKILL)
        vm.proc.wait(timeout=10)
        assert not pid_alive(pid) and VM("pmemdata", persistent=True).status() is VMState.DEAD
        assert files_state(vm) == before
        assert all(host_has(pmem, n) for n in needles)
        vm.state = VMState.DEAD
        vm.start()
        assert files_state(vm) == before
        remount(vm)
        assert sums(vm, paths) == want
        verified += len(paths) * SIZE

        # 3. a reset and a persistent VM's finish() keep everything too
        vm.reset()
        vm.finish()
        assert VM("pmemdata", persistent=True).status() is VMState.RUNNING
        vm = VM.attach("pmemdata")
        remount(vm)
        assert sums(vm, paths) == want
        verified += len(paths) * SIZE
        assert files_state(vm) == before
    finally:
        vm.stop()
    assert files_state(vm) == before
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pmem-figures.json").write_text(json.dumps({"bytes_verified": verified,
                                                             "files": len(paths), "file_bytes": SIZE}) + "\n")
    print(f"\npmem bytes verified after restart, SIGKILL and reset: {verified}")
    # Only an explicit delete erases them.
    vm.delete()
    assert not vm.state_dir.exists()
