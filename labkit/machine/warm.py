"""Warm starts: restore the prepared guest from its snapshot (making the
snapshot on the first start of a machine), hand it this VM's key, load nfit.

Any failure to make or restore a snapshot falls back to a cold boot with the
reason recorded (``vm status`` shows it); a snapshot that does not come back
is discarded. Only a host-key mismatch is fatal: never talk to a guest that
is not the one the snapshot recorded.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import pexpect

from labkit.errors import ChannelError, GuestTimeout, HostKeyMismatch, LaunchError
from labkit.machine import snapshot
from labkit.machine.channels.console import BootInfo, ConsoleChannel
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.disks import create_overlay
from labkit.machine.statedir import VMInfo
from labkit.timeout import Deadline

if TYPE_CHECKING:
    from labkit.machine.boot import Starter

log = logging.getLogger(__name__)

FAILURES = (LaunchError, GuestTimeout, ChannelError, OSError)


def try_warm_start(st: Starter, info: VMInfo, pubkey: str, timeout: float) -> bool:
    """True if the VM came up from a snapshot; False to boot cold instead."""
    try:
        snap = snapshot_for(st, info, pubkey, timeout)
    except FAILURES as exc:
        st.vm.kill()
        st.vm.close_channels()
        info.warm_error = f"could not make the warm-start snapshot: {_first_line(exc)}"
        st.vm.progress(f"labkit: {info.warm_error}; booting cold")
        return False
    try:
        restore_into(st, snap, info, pubkey, timeout)
        return True
    except HostKeyMismatch as exc:
        st.fail_snapshot(snap, exc)
        exc.hint = ("the warm-start snapshot in the cache was not the guest it claimed to be and has "
                    "been discarded; start the VM again to make a new one")
        raise
    except FAILURES as exc:
        info.warm_error = _first_line(exc)
        st.fail_snapshot(snap, exc)
        st.vm.progress(f"labkit: warm start failed ({info.warm_error}); booting cold")
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def snapshot_for(st: Starter, info: VMInfo, pubkey: str, timeout: float) -> snapshot.Snapshot:
    """The valid snapshot for this machine, created now if there is none."""
    assert st.vm.image is not None
    key = snapshot.machine_key(st.config(info, ""), st.vm.image)
    snap = snapshot.find(st.vm.settings, key, st.vm.kernel)
    if snap is not None:
        return snap
    with snapshot.creation_lock(st.vm.settings, key):
        snap = snapshot.find(st.vm.settings, key, st.vm.kernel)     # another process may have made it
        if snap is None:
            snap = create_snapshot(st, key, info, pubkey, timeout)
    return snap


def create_snapshot(st: Starter, key: str, info: VMInfo, pubkey: str, timeout: float) -> snapshot.Snapshot:
    """Cold boot a guest that has never seen the NVDIMMs, prepare it, save
    it. Its fresh root disk (and host key) become the snapshot's."""
    vm = st.vm
    vm.progress("labkit: first start of this machine: cold boot, then a warm-start snapshot for every later start")
    info.base_sha256, info.host_key = "", []
    st.sd.overlay.unlink(missing_ok=True)
    cfg = st.cold(info, pubkey, timeout, cmdline_extra=("labkit.pmem=defer",))
    try:
        assert vm.ssh_channel is not None and vm.boot is not None
        vm.ssh_channel.run(["sh", "-c", snapshot.PREPARE_SCRIPT], timeout=60, check=True)
        vm.ssh_channel.close()
        vm.ssh_channel = None
        vm.progress("labkit: saving the warm-start snapshot")
        with QMPChannel(cfg.qmp_socket).connect(timeout=5) as qmp:
            return snapshot.save(vm.settings, qmp, cfg.root_overlay, key, vm.kernel, {
                "host_key": list(info.host_key), "kernel_release": vm.boot.kernel_release,
                "cold_boot_seconds": info.boot_seconds, "qemu": snapshot.qemu_version(),
                "accel": cfg.accel, "memory_mb": cfg.memory_mb, "smp": cfg.smp,
                "nvdimm_mb": [d.size_mb for d in cfg.nvdimms]})
    finally:
        vm.kill()
        vm.close_channels()


def restore_into(st: Starter, snap: snapshot.Snapshot, info: VMInfo, pubkey: str, timeout: float) -> None:
    """Restore ``snap`` into a new QEMU, hand the guest this VM's key, load nfit."""
    vm = st.vm
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    vm.progress("labkit: warm start: restoring the prepared guest from its snapshot")

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 3)

    create_overlay(st.sd.overlay, snap.disk, "qcow2")
    info.base_sha256 = "snapshot:" + snap.key   # a later cold boot starts the disk afresh
    info.host_key = list(snap.host_key)         # the snapshot's guest identity, from our own cache
    phase("disk overlay")
    deadline = Deadline(timeout)
    cfg = st.spawn_retrying(info, pubkey, timeout, extra_args=("-incoming", "defer"))
    # Queued on the console before the guest runs; it reads it on resume.
    console = ConsoleChannel(cfg.console_socket).connect(timeout=5)
    try:
        # The restored UART loses the first byte it is sent (seen on QEMU 7.2:
        # "(modprobe" arrived as "modprobe"): an empty line takes that loss.
        console.sendline("")
        console.sendline(snapshot.RESUME_SCRIPT.format(now=int(time.time())))
        _wait_for(cfg.qmp_socket.exists, deadline, "QEMU to create its QMP socket")
        # QEMU's monitor serves one client at a time: do not keep it from
        # other processes (a `labkit vm reset` in a terminal, a learner's vm.qmp).
        with QMPChannel(cfg.qmp_socket).connect(timeout=5) as qmp:
            phase("qemu start")
            snapshot.restore(qmp, snap, timeout=deadline.remaining)
        phase("restore")
        _connect_restored(st, snap, info, deadline)
        phase("ssh connect")
        _wait_pmem(st, console, deadline)
        phase("nvdimms ready")
    finally:
        console.close()
    info.phases = phases
    info.warm_error = ""
    st.booted(info, "warm", snap.key)
    vm.progress(f"labkit: ready {info.kernel_release} (warm start in {info.boot_seconds:.1f} s)")


def _wait_for(cond: object, deadline: Deadline, what: str) -> None:
    while not cond():  # type: ignore[operator]
        if deadline.expired:
            raise GuestTimeout(what, deadline.seconds)
        time.sleep(0.005)


def _connect_restored(st: Starter, snap: snapshot.Snapshot, info: VMInfo, deadline: Deadline) -> None:
    vm = st.vm
    vm.boot = BootInfo(snap.meta["kernel_release"], 0.0, snap.host_key)
    info.kernel_release = snap.meta["kernel_release"]
    vm.ssh_channel = SSHChannel(info.ssh_port, st.sd.key, snap.host_key).connect(
        timeout=max(5.0, deadline.remaining))


def _wait_pmem(st: Starter, console: ConsoleChannel, deadline: Deadline) -> None:
    """The guest's own word on the console that its NVDIMM drivers loaded
    (usually already there once SSH is up)."""
    timeout = max(5.0, min(20.0, deadline.remaining))
    try:
        console.expect([snapshot.PMEM_READY_RE], timeout=timeout)
    except (pexpect.TIMEOUT, pexpect.EOF, OSError) as exc:
        raise GuestTimeout("the restored guest to load its NVDIMM drivers", timeout,
                           st.sd.console_tail(2000)) from exc
    assert console.child is not None and console.child.match is not None
    rc = console.child.match.group(1)
    if rc != "0":
        raise LaunchError(f"the restored guest could not load its NVDIMM drivers (modprobe exit {rc})",
                          output=st.sd.console_tail(2000))
