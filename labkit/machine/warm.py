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
from collections.abc import Callable

import pexpect

from labkit.errors import ChannelError, GuestTimeout, HostKeyMismatch, LaunchError
from labkit.machine import snapshot
from labkit.machine.boot import Launch
from labkit.machine.channels.console import BootInfo, ConsoleChannel
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.disks import create_overlay
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

FAILURES = (LaunchError, GuestTimeout, ChannelError, OSError)


def try_warm_start(launch: Launch, pubkey: str, timeout: float) -> bool:
    """True if ``launch`` brought the guest up from a snapshot; False to boot
    cold instead (the reason is in its record's ``warm_error``)."""
    info, progress = launch.info, launch.spec.progress
    try:
        snap = snapshot_for(launch, pubkey, timeout)
    except FAILURES as exc:
        launch.abort()
        info.warm_error = f"could not make the warm-start snapshot: {_first_line(exc)}"
        progress(f"labkit: {info.warm_error}; booting cold")
        return False
    try:
        restore_into(launch, snap, pubkey, timeout)
        return True
    except HostKeyMismatch as exc:
        fail_snapshot(launch, snap, exc)
        exc.hint = ("the warm-start snapshot in the cache was not the guest it claimed to be and has "
                    "been discarded; start the VM again to make a new one")
        raise
    except FAILURES as exc:
        info.warm_error = _first_line(exc)
        fail_snapshot(launch, snap, exc)
        progress(f"labkit: warm start failed ({info.warm_error}); booting cold")
        return False


def fail_snapshot(launch: Launch, snap: snapshot.Snapshot, exc: Exception) -> None:
    """A snapshot that does not come back is thrown away, never retried."""
    launch.abort()
    snapshot.discard(snap.path)
    log.debug("snapshot %s discarded: %s", snap.path, exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def snapshot_for(launch: Launch, pubkey: str, timeout: float) -> snapshot.Snapshot:
    """The valid snapshot for this machine, created now if there is none."""
    kernel = launch.spec.kernel
    key = snapshot.machine_key(launch.config(""), launch.image)
    refused: list[str] = []
    snap = snapshot.find(launch.spec.settings, key, kernel, refused)
    launch.info.snapshot_refused = "; ".join(refused)
    for why in refused:
        launch.spec.progress(f"labkit: {why}; not restoring it")
    if snap is not None:
        return snap
    with snapshot.creation_lock(launch.spec.settings, key):
        snap = snapshot.find(launch.spec.settings, key, kernel)     # another process may have made it
        if snap is None:
            snap = create_snapshot(launch, key, pubkey, timeout)
    return snap


def create_snapshot(launch: Launch, key: str, pubkey: str, timeout: float) -> snapshot.Snapshot:
    """Cold boot a guest that has never seen the NVDIMMs, prepare it, save
    it. Its fresh root disk (and host key) become the snapshot's."""
    info, progress = launch.info, launch.spec.progress
    progress("labkit: first start of this machine: cold boot, then a warm-start snapshot for every later start")
    info.base_sha256, info.host_key = "", []
    launch.sd.overlay.unlink(missing_ok=True)
    cfg = launch.cold(pubkey, timeout, cmdline_extra=("labkit.pmem=defer",))
    try:
        assert launch.ssh is not None and launch.boot is not None
        # loading the lab's modules and warming the page cache: 60 s, or more where booting may take
        # longer (LABKIT_BOOT_TIMEOUT on a host that emulates slowly)
        launch.ssh.run(["sh", "-c", snapshot.PREPARE_SCRIPT], timeout=max(60.0, timeout / 2), check=True)
        launch.close_ssh()
        progress("labkit: saving the warm-start snapshot")
        with QMPChannel(cfg.qmp_socket).connect(timeout=5) as qmp:
            return snapshot.save(launch.spec.settings, qmp, cfg.root_overlay, key, launch.spec.kernel, {
                "host_key": list(info.host_key), "kernel_release": launch.boot.kernel_release,
                "cold_boot_seconds": info.boot_seconds, "qemu": snapshot.qemu_version(),
                "accel": cfg.accel, "memory_mb": cfg.memory_mb, "smp": cfg.smp,
                "nvdimm_mb": [d.size_mb for d in cfg.nvdimms]}, timeout=max(120.0, timeout))
    finally:
        launch.abort()     # the snapshot's guest is never the one handed over


def restore_into(launch: Launch, snap: snapshot.Snapshot, pubkey: str, timeout: float) -> None:
    """Restore ``snap`` into a new QEMU, hand the guest this VM's key, load nfit."""
    info, progress = launch.info, launch.spec.progress
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    progress("labkit: warm start: restoring the prepared guest from its snapshot")

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 3)

    create_overlay(launch.sd.overlay, snap.disk, "qcow2")
    info.base_sha256 = "snapshot:" + snap.key   # a later cold boot starts the disk afresh
    phase("disk overlay")
    deadline = Deadline(timeout)
    cfg = launch.spawn_retrying(pubkey, timeout, extra_args=("-incoming", "defer"))
    # Queued on the console before the guest runs; it reads it on resume.
    console = ConsoleChannel(cfg.console_socket).connect(timeout=5)
    try:
        # The restored UART loses the first byte it is sent (seen on QEMU 7.2:
        # "(modprobe" arrived as "modprobe"): an empty line takes that loss.
        console.sendline("")
        console.sendline(snapshot.resume_script())
        _wait_for(cfg.qmp_socket.exists, deadline, "QEMU to create its QMP socket")
        # QEMU's monitor serves one client at a time: do not keep it from
        # other processes (a `labkit vm reset` in a terminal, a learner's vm.qmp).
        with QMPChannel(cfg.qmp_socket).connect(timeout=5) as qmp:
            phase("qemu start")
            snapshot.restore(qmp, snap, timeout=deadline.remaining)
        phase("restore")
        seen = _wait_console(launch, console, deadline, (snapshot.NEW_HOSTKEY_RE,), "its new SSH host key")
        key_type, key = seen[snapshot.NEW_HOSTKEY_RE]
        host_key = (key_type, key)
        info.host_key = list(host_key)              # this guest's own, pinned from the console
        phase("host key")
        _connect_restored(launch, snap, host_key, deadline)
        phase("ssh connect")
        _wait_pmem(launch, console, deadline, seen)
        phase("nvdimms ready")
    finally:
        console.close()
    info.phases = phases
    info.warm_error = ""
    launch.booted("warm", snap.key)
    progress(f"labkit: ready {info.kernel_release} (warm start in {info.boot_seconds:.1f} s)")


def _wait_for(cond: Callable[[], bool], deadline: Deadline, what: str) -> None:
    while not cond():
        if deadline.expired:
            raise GuestTimeout(what, deadline.seconds)
        time.sleep(0.005)


def _connect_restored(launch: Launch, snap: snapshot.Snapshot, host_key: tuple[str, str],
                      deadline: Deadline) -> None:
    info = launch.info
    launch.boot = BootInfo(snap.meta["kernel_release"], 0.0, host_key)
    info.kernel_release = snap.meta["kernel_release"]
    launch.ssh = SSHChannel(info.ssh_port, launch.sd.key, host_key).connect(
        timeout=max(5.0, deadline.remaining))


def _wait_console(launch: Launch, console: ConsoleChannel, deadline: Deadline, patterns: tuple[str, ...],
                  what: str, seen: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """Read the console until every pattern has matched once; the groups of
    each (patterns seen earlier are kept in ``seen``: the guest prints its
    markers in either order)."""
    seen = {} if seen is None else seen
    timeout = max(5.0, min(20.0, deadline.remaining))
    wait = Deadline(timeout)
    while not all(p in seen for p in patterns):
        try:
            i = console.expect([snapshot.NEW_HOSTKEY_RE, snapshot.PMEM_READY_RE], timeout=max(0.01, wait.remaining))
        except (pexpect.TIMEOUT, pexpect.EOF, OSError) as exc:
            raise GuestTimeout(f"the restored guest to report {what}", timeout,
                               launch.sd.console_tail(2000)) from exc
        assert console.child is not None and console.child.match is not None
        seen[(snapshot.NEW_HOSTKEY_RE, snapshot.PMEM_READY_RE)[i]] = console.child.match.groups()
    return seen


def _wait_pmem(launch: Launch, console: ConsoleChannel, deadline: Deadline,
               seen: dict[str, tuple[str, ...]]) -> None:
    """The guest's own word on the console that its NVDIMM drivers loaded
    (usually already there once SSH is up)."""
    seen = _wait_console(launch, console, deadline, (snapshot.PMEM_READY_RE,), "its NVDIMM drivers loaded", seen)
    (rc,) = seen[snapshot.PMEM_READY_RE]
    if rc != "0":
        raise LaunchError(f"the restored guest could not load its NVDIMM drivers (modprobe exit {rc})",
                          output=launch.sd.console_tail(2000))
