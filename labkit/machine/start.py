"""The ways to get a running guest, each returning it whole as a ``Running``
(or raising, with nothing of it left running): ``start`` (reap what an
earlier start left, then a warm start when possible, else a cold boot) and
``attach`` (the guest another process started).

The ``VM`` facade calls these under its lifecycle lock and swaps the result
in; nothing here knows the facade.
"""

from __future__ import annotations

import logging

from labkit.errors import ChannelError, GuestTimeout, StateError
from labkit.image import ensure_image
from labkit.machine import disks, pace, snapshot, warm
from labkit.machine.accel import AccelChoice, choose_accel
from labkit.machine.boot import Launch, StartSpec
from labkit.machine.channels.keys import ensure_client_key
from labkit.machine.process import is_qemu_of, terminate
from labkit.machine.running import Running
from labkit.machine.state import VMState
from labkit.machine.statedir import StateDir, VMInfo
from labkit.machine.watch import Watch

log = logging.getLogger(__name__)

BOOT_TIMEOUT = {"tcg": 120.0, "kvm": 60.0}
ATTACH_TIMEOUT = 10.0       # s for SSH to a running guest, on a host that boots it in BOOT_TIMEOUT


def attach_timeout(boot_timeout: float | None) -> float:
    """How long attaching to a running guest may take: ATTACH_TIMEOUT, stretched as
    far as whoever runs this host stretched the boot timeout (LABKIT_BOOT_TIMEOUT: a
    guest nested under emulation answers SSH in tens of seconds, seen on a class
    server under load)."""
    if not boot_timeout:
        return ATTACH_TIMEOUT
    return ATTACH_TIMEOUT * max(1.0, boot_timeout / BOOT_TIMEOUT["tcg"])


def start(spec: StartSpec) -> Running:
    """Reap what an earlier start left, launch, and record the guest running."""
    sd = spec.sd
    reap_stale(sd, spec.name)
    sweep_half_written(spec)
    log.debug("starting %s (%s, warm=%s)", spec.name, spec.kernel, spec.warm)
    sd.create()
    # A kernel whose image was never built is built now, with progress
    # (LABKIT_AUTO_BUILD=0 refuses, as the test suite does).
    image = ensure_image(spec.kernel, settings=spec.settings, progress=spec.progress if spec.on_console_line else None)
    accel = AccelChoice(spec.accel_forced, "requested") if spec.accel_forced else choose_accel(spec.settings)
    launch = Launch(spec, image, accel, prepare_record(spec))
    try:
        pubkey = ensure_client_key(sd.key)
        timeout = spec.boot_timeout or spec.settings.boot_timeout or BOOT_TIMEOUT[accel.accel]
        # Only the restore or boot waits for the host's start queue, and its
        # timeout counts from its turn: a wait in line never eats into it.
        with pace.turn(spec.settings, spec.memory_mb, spec.progress) as turn:
            if not (spec.warm and warm.try_warm_start(launch, pubkey, timeout)):
                launch.cold(pubkey, timeout)
        if turn.first_place:
            launch.info.phases = {"start queue": turn.waited_s, **launch.info.phases}
        guest = launch.running()
    except BaseException:
        launch.abort()
        raise
    info = guest.info
    info.lifecycle, info.starter_pid = VMState.RUNNING, 0
    info.save(sd.info)
    log.debug("%s running (%s start, %.2f s)", spec.name, info.start_kind, info.boot_seconds)
    return guest


def reap_stale(sd: StateDir, name: str) -> None:
    """Kill a QEMU of this VM left behind by a crashed owner; clear stale files."""
    info = sd.load_info()
    if terminate([sd.read_pid(), info.pid if info else 0], lambda pid: is_qemu_of(pid, sd.pidfile), grace=0.5):
        log.debug("reaped a stale QEMU of %s", name)
    sd.clear_sockets()
    sd.keep_last_console_log()


def sweep_half_written(spec: StartSpec) -> None:
    """Remove the half-written snapshots of writers that are gone (a start
    killed during its save). Done at every start, not only before the next
    save: a start that boots cold (no warm start, or a snapshot that cannot
    be made now) must not leave them either."""
    try:
        for d in snapshot.sweep_stale_tmp(spec.settings):
            log.debug("removed a half-written snapshot: %s", d)
    except OSError as exc:
        log.debug("could not sweep half-written snapshots: %s", exc)


def prepare_record(spec: StartSpec) -> VMInfo:
    """The record this start writes: the last one (its disk's base, its pinned
    host key) updated to this start's kernel and NVDIMMs."""
    sd = spec.sd
    info = sd.load_info() or VMInfo(spec.name, spec.kernel)
    if info.kernel != spec.kernel and sd.overlay.exists():
        info.base_sha256 = ""      # another kernel's image: start the disk afresh
    info.kernel, info.persistent = spec.kernel, spec.persistent
    info.nvdimm_mb = disks.prepare_pmem(sd, spec.nvdimms)
    return info


def attach(sd: StateDir, name: str, status: VMState, timeout: float) -> Running:
    """The running guest of ``sd`` (``status`` is the VM's, as ``VM.status``
    reads it), with SSH connected; StateError if it is not ready."""
    if status is VMState.INCOMPLETE:
        raise StateError("incomplete (the start that launched it was interrupted, so its guest is not ready)",
                         "running", name).with_hint(
            f"`labkit vm start --name {name}` discards it and starts the VM again (pmem is kept)")
    info = sd.load_info()
    if status is not VMState.RUNNING or info is None:
        raise StateError(status, "running", name)
    if not sd.key.exists():
        raise StateError("missing its SSH key", "running with its key", name).with_hint(
            f"{sd.key} was removed; `labkit vm reset --name {name}` makes a new one")
    guest = Running.from_record(sd, info)
    try:
        guest.ssh.connect(timeout=timeout)
    except (ChannelError, GuestTimeout) as exc:
        Watch().explain(guest, exc)      # paused, dead or starved: say that instead of "timed out"
        raise
    return guest
