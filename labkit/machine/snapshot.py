"""Warm starts: a prepared guest saved once with QEMU's own migration, and
restored in about a second instead of a cold boot.

The snapshot is a QEMU migration stream (``migrate`` to ``exec:cat > FILE``,
restored with ``-incoming defer`` + ``migrate-incoming``) plus a copy of the
root-disk overlay taken while the source was paused, so RAM and disk agree.

Persistent memory never travels in a snapshot:

* the ``x-ignore-shared`` migration capability leaves the NVDIMMs' shared,
  file-backed RAM blocks out of the stream, so a restore cannot overwrite
  the learner's pmem files with older contents;
* the snapshot guest booted with ``labkit.pmem=defer`` and never loaded
  ``nfit``, so its kernel holds no cached view of the NVDIMMs (namespaces,
  superblocks). After a restore, ``modprobe nfit`` discovers the NVDIMMs
  from what the pmem files hold *now*.

A snapshot is shared by all VMs with the same machine (kernel image, QEMU
version, accelerator, memory, CPUs, NVDIMM sizes) and is identified by a
hash of exactly those things plus this module's preparation script, so any
change to them makes a new snapshot rather than restoring a wrong one.
Per-VM secrets are not in it: QEMU hands each VM's own public key to the
guest through fw_cfg, and the restored guest's sshd reads it from there.

Where snapshots live: on a host shared by a class, an instructor makes the
host-wide directory (``Settings.shared_cache_dir/snapshots``, created by hand:
its existence is the opt-in) and starts each kernel's VM once; the snapshots
are written there world-readable. Learners only read that directory; a
machine it has no snapshot for gets one in the learner's own cache. Each
learner's disk overlay, pmem files and key stay in their own state dir.

A snapshot is restored only if it is trusted (``labkit.machine.trust``): it
and every directory above it belong to root or to this user and no one else
can write them, and its content matches the SHA-256 sums its ``meta.json``
recorded when it was made (the small disk is checked before QEMU starts, the
RAM stream while QEMU loads it). A snapshot planted in a directory others can
write is refused, with the reason, and the VM makes its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import ChannelError, GuestTimeout, LaunchError
from labkit.image.build import Image
from labkit.machine import trust
from labkit.machine.argv import build_qemu_argv
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.config import VMConfig
from labkit.settings import Settings
from labkit.timeout import Deadline, flock_before

log = logging.getLogger(__name__)

FORMAT = 2          # 2: meta.json carries the files' SHA-256 (the manifest)

# Run over SSH in the snapshot guest before it is saved: everything the
# course starts from that lives in RAM (modules, soft-RoCE, vivid), and the
# files the first lab steps read pulled into the page cache.
PREPARE_SCRIPT = r"""
set -e
modprobe -a rdma_rxe ib_uverbs vivid virtio_balloon
test -e /sys/class/infiniband/rxe0 || rdma link add rxe0 type rxe netdev eth0
i=0; while ! ls /dev/video* >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
for m in nfit nd_pmem dax_pmem device_dax xfs; do cat "$(modinfo -n $m)" > /dev/null; done
cat /usr/bin/ndctl /usr/bin/daxctl /sbin/mkfs.xfs /sbin/mkfs.ext4 /sbin/blkid > /dev/null 2>&1 || true
python3 -c 'import pyverbs.device, pyverbs.pd, pyverbs.mr, json, mmap, ctypes, fcntl' 2>/dev/null || true
sync
"""

# Sent to the serial console (root's shell there) as soon as the restore
# begins; the guest reads it when it runs. It starts nfit (see above) and sets
# the clock (whole seconds, as before); the SSH key needs no installing
# (fw_cfg, see images/guest/sshd_config). When the NVDIMM drivers are loaded
# it prints PMEM_READY_RE on the console: the host reads that while SSH
# connects, so a started VM always has its NVDIMMs without a first SSH command
# (each exec costs about 0.1 s under TCG right after a restore). The marker's
# status is computed by the guest (``$?``), so the typed line, which the
# console echoes, never matches it.
#
# It also gives the guest an SSH host key of its own: every guest restored
# from one snapshot would otherwise answer with the snapshot's key, which any
# learner who can read the snapshot holds, so anything listening on the port
# labkit connects to could pass as the learner's guest. The new key is made in
# the guest, sshd re-executes on SIGHUP to load it, and the public half comes
# back on the console (a socket in the VM's 0700 state dir): the host pins it
# before its first SSH connection (NEW_HOSTKEY_RE; typed split, so the echo
# never matches).
#
# Before that key is made, the host's random bytes (``seed``: 32 from
# os.urandom, new for every start) go into the guest kernel's entropy pool,
# credited (RNDADDENTROPY), and its random generator is reseeded at once
# (RNDRESEEDCRNG): every guest restored from one snapshot resumes with the
# generator's state of the moment it was saved, and the kernel reseeds it only
# every minute or so, so two guests restored from one snapshot could make the
# same "new" host key (seen once in CI: two learners' guests with one key).
# Without the reseed no key is made (and the host times out on it, with the
# console's tail). Both ioctls exist in every kernel the lab runs (since 4.17).
RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207
SEED_BYTES = 32
RESUME_SCRIPT = ("(modprobe -a nfit nd_pmem dax_pmem device_dax >/dev/null 2>&1; "
                 "rc=$?; : > /run/labkit/pmem-ready; echo \"labkit: pmem ready rc=$rc\") & "
                 "date -s @{now} >/dev/null; "
                 "k=/etc/ssh/ssh_host_ed25519_key; p=$(cat /run/sshd.pid); rm -f $k $k.pub /run/sshd.pid; "
                 "python3 -c \"import fcntl,struct;s=bytes.fromhex('{seed}');f=open('/dev/random','wb');"
                 f"fcntl.ioctl(f,{RNDADDENTROPY},struct.pack('ii',8*len(s),len(s))+s);fcntl.ioctl(f,{RNDRESEEDCRNG})\" && "
                 "ssh-keygen -q -t ed25519 -N '' -f $k </dev/null >/dev/null && kill -HUP $p; "
                 "i=0; while [ ! -s /run/sshd.pid ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; "
                 "read -r t h _ < $k.pub; echo \"labkit: new host\"\"key $t $h\"")
def resume_script(now: float | None = None, seed: bytes | None = None) -> str:
    """The line typed on a restored guest's console: this moment's clock and
    fresh random bytes from the host (see RESUME_SCRIPT)."""
    seed = os.urandom(SEED_BYTES) if seed is None else seed
    return RESUME_SCRIPT.format(now=int(time.time() if now is None else now), seed=seed.hex())


PMEM_READY_RE = r"labkit: pmem ready rc=(\d+)"
NEW_HOSTKEY_RE = r"labkit: new hostkey (ssh-\S+) ([A-Za-z0-9+/=]+)\r?\n"     # whole line: expect() matches on partial reads


@functools.cache
def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot run {binary} --version: {exc}") from exc
    return r.stdout.splitlines()[0].strip() if r.stdout else "unknown"


def machine_key(cfg: VMConfig, image: Image) -> str:
    """The identity of a snapshot: what must match for a restore to be valid."""
    generic = cfg.with_(name="snapshot", state_dir=Path("/S"), ssh_port=0, ssh_pubkey="",
                        kernel_image=Path("/K"), initrd=Path("/I"), extra_args=(), cmdline_extra=())
    arts = image.manifest.get("artifacts", {})
    ident = {
        "format": FORMAT,
        "argv": build_qemu_argv(generic),
        "qemu": qemu_version(cfg.qemu_binary),
        "kernel_release": image.manifest.get("kernel_release"),
        "artifacts": {k: v.get("sha256") for k, v in sorted(arts.items())},
        "prepare": PREPARE_SCRIPT,
        "resume": RESUME_SCRIPT,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def shared_snapshots_dir(settings: Settings) -> Path | None:
    """The host-wide snapshot directory (None when turned off)."""
    shared = settings.shared_cache_dir
    return shared / "snapshots" if shared else None


def snapshots_dir(settings: Settings) -> Path:
    """Where this process writes snapshots: the host-wide directory when it
    exists, this user may write it (the instructor) and no one else can (a
    directory anyone can write is no place for what others will restore),
    else the user's own cache."""
    shared = shared_snapshots_dir(settings)
    if (shared is not None and shared.is_dir() and os.access(shared, os.W_OK | os.X_OK)
            and not trust.untrusted(shared)):
        return shared
    return settings.cache_dir / "snapshots"


def search_dirs(settings: Settings) -> list[Path]:
    """Where snapshots are looked for: the writable directory first (its
    broken snapshots can be removed), then the host-wide read-only one."""
    dirs = [snapshots_dir(settings)]
    shared = shared_snapshots_dir(settings)
    if shared is not None and shared != dirs[0] and shared.is_dir():
        dirs.append(shared)
    return dirs


def _is_shared(settings: Settings, d: Path) -> bool:
    shared = shared_snapshots_dir(settings)
    return shared is not None and d.parent == shared


@dataclass(frozen=True)
class Snapshot:
    """A saved, prepared guest: ``state.mig`` (RAM and devices) + ``disk.qcow2``."""

    path: Path
    meta: dict

    @property
    def state_file(self) -> Path:
        return self.path / "state.mig"

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def host_key(self) -> tuple[str, str]:
        key = self.meta["host_key"]
        return (str(key[0]), str(key[1]))

    @property
    def key(self) -> str:
        return self.meta["key"]


def find(settings: Settings, key: str, kernel: str, refused: list[str] | None = None) -> Snapshot | None:
    """The valid, trusted snapshot for ``key``, or None. A snapshot whose
    files do not match its own record (truncated, half-written, changed) is
    removed, never used; one that is not trusted (someone else could have put
    it there) is left alone and the reason appended to ``refused``."""
    writable = snapshots_dir(settings)
    for root in search_dirs(settings):
        d = root / f"{kernel}-{key}"
        reason = untrusted_reason(d) if d.exists() else ""
        if reason:
            log.warning("not restoring the warm-start snapshot %s: %s", d, reason)
            if refused is not None:
                refused.append(f"the warm-start snapshot in {root} is not trusted ({reason})")
            continue
        snap = _valid(d, key)
        if snap is not None:
            return snap
        if root == writable:
            discard(root / f"{kernel}-{key}")
        elif (root / f"{kernel}-{key}").exists():
            log.warning("the shared snapshot %s is broken or unreadable; ignoring it", root / f"{kernel}-{key}")
    return None


def untrusted_reason(d: Path) -> str:
    """'' if the snapshot directory ``d`` and its files can have been made
    and changed only by root or this user, else why not."""
    for p in (d, *(d / n for n in ("meta.json", "state.mig", "disk.qcow2"))):
        reason = trust.untrusted(p) if p.exists() else ""
        if reason:
            return reason
    return ""


def _valid(d: Path, key: str) -> Snapshot | None:
    """The snapshot in ``d`` if its files match its record (sizes, and the
    disk's hash: it is small; the RAM stream's is checked as QEMU loads it)
    and this user can read them."""
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    snap = Snapshot(d, meta)
    try:
        ok = (meta.get("key") == key and meta.get("format") == FORMAT
              and snap.state_file.stat().st_size == meta["state_bytes"]
              and snap.disk.stat().st_size == meta["disk_bytes"]
              and os.access(snap.state_file, os.R_OK) and os.access(snap.disk, os.R_OK)
              and len(str(meta["sha256"]["state.mig"])) == 64
              and trust.sha256_file(snap.disk) == meta["sha256"]["disk.qcow2"])
    except (OSError, KeyError, TypeError):
        ok = False
    return snap if ok else None


def discard(path: Path) -> None:
    """Remove a snapshot directory (its files are read-only by design)."""
    if path.exists():
        for f in path.iterdir():
            try:
                f.chmod(0o600)
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


def list_snapshots(settings: Settings, roots: list[Path] | None = None) -> list[Snapshot]:
    """The snapshots in ``roots`` (default: every directory searched)."""
    out = []
    for d in sorted(d for root in (search_dirs(settings) if roots is None else roots) for d in root.glob("*-*")):
        try:
            out.append(Snapshot(d, json.loads((d / "meta.json").read_text())))
        except (OSError, ValueError):
            continue
    return out


@contextmanager
def creation_lock(settings: Settings, key: str, timeout: float = 300.0):
    """One creator per snapshot key across processes; others wait, then reuse."""
    root = snapshots_dir(settings)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not flock_before(fd, Deadline(timeout), poll=0.2):
            raise GuestTimeout("another process to finish creating the warm-start snapshot", timeout)
        yield
    finally:
        os.close(fd)


def save(settings: Settings, qmp: QMPChannel, overlay: Path, key: str, kernel: str, meta: dict,
         timeout: float = 120.0) -> Snapshot:
    """Migrate the running guest into a new snapshot directory. The source is
    left paused (postmigrate); the caller stops it. Nothing is left behind
    when it fails; a full disk is named as such. (What a killed save left is
    swept by every start, ``start.sweep_half_written``, before it gets here.)"""
    final = snapshots_dir(settings) / f"{kernel}-{key}"
    tmp = snapshots_dir(settings) / f".tmp-{kernel}-{key}-{os.getpid()}"
    shared = _is_shared(settings, final)
    discard(tmp)
    tmp.mkdir(parents=True, mode=0o700)
    try:
        meta = _write(qmp, overlay, tmp, dict(meta, key=key, format=FORMAT, kernel=kernel), timeout, shared)
    except (LaunchError, GuestTimeout, ChannelError, OSError) as exc:
        discard(tmp)
        full = _disk_full(snapshots_dir(settings))
        if full:
            raise LaunchError(full) from exc
        raise
    if shared:
        tmp.chmod(0o755)        # learners read it; only its creator writes
    discard(final)
    os.rename(tmp, final)
    prune(settings, kernel, keep=KEEP_PER_KERNEL)
    return Snapshot(final, meta)


def _write(qmp: QMPChannel, overlay: Path, tmp: Path, meta: dict, timeout: float, shared: bool) -> dict:
    state = tmp / "state.mig"
    t0 = time.monotonic()
    qmp.command("migrate-set-capabilities", capabilities=CAPABILITIES)
    # exec: runs through /bin/sh; the path is ours (cache dir) and quoted.
    qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
    wait_migration(qmp, "query-migrate", timeout)
    # Paused after migration with the disk flushed: the overlay matches RAM.
    shutil.copyfile(overlay, tmp / "disk.qcow2")
    meta = dict(meta, created_at=time.time(), save_seconds=round(time.monotonic() - t0, 2),
                state_bytes=state.stat().st_size, disk_bytes=(tmp / "disk.qcow2").stat().st_size,
                sha256={n: trust.sha256_file(tmp / n) for n in ("state.mig", "disk.qcow2")})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    mode = 0o444 if shared else 0o400
    for f in tmp.iterdir():
        f.chmod(mode)
    return meta


NEEDS_MB = 300     # a snapshot is about 130-150 MiB; keep room for the disk copy as well


def free_mb(path: Path) -> int:
    """Free MiB on the filesystem holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // 2**20


def _disk_full(where: Path) -> str:
    """A learner-readable message if ``where`` has no room for a snapshot, else ''."""
    try:
        free = free_mb(where)
    except OSError:
        return ""
    if free >= NEEDS_MB:
        return ""
    return (f"disk full at {where}: {free} MiB free, a warm-start snapshot needs about {NEEDS_MB} MiB "
            "(free some space or point LABKIT_CACHE_DIR elsewhere; the VM boots cold meanwhile)")


def sweep_stale_tmp(settings: Settings) -> list[Path]:
    """Remove half-written snapshots (``.tmp-<kernel>-<key>-<pid>``) whose
    writer is gone (killed during a save)."""
    removed = []
    for d in snapshots_dir(settings).glob(".tmp-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _writer_alive(int(pid), d):
            discard(d)
            removed.append(d)
    return removed


def _writer_alive(pid: int, tmp: Path) -> bool:
    """Whether the process that writes ``tmp`` still runs: ``pid`` runs, is
    not a zombie, and started before ``tmp`` was last written (PIDs are
    reused: a suite or a class host wraps a 32768 pid_max within the hour)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= tmp.stat().st_mtime + 1.0
    except (psutil.Error, OSError):
        return False


KEEP_PER_KERNEL = 3


def prune(settings: Settings, kernel: str, keep: int) -> None:
    """Old snapshots of a kernel (older images, other machine sizes) are
    ~150 MB each: keep the newest few."""
    mine = [s for s in list_snapshots(settings, [snapshots_dir(settings)]) if s.meta.get("kernel") == kernel]
    mine.sort(key=lambda s: s.meta.get("created_at", 0), reverse=True)
    for old in mine[keep:]:
        discard(old.path)
        (snapshots_dir(settings) / f".{old.meta.get('key')}.lock").unlink(missing_ok=True)


CAPABILITIES = [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]
DONE = ("completed", "failed", "cancelled")


def wait_migration(qmp: QMPChannel, query: str, timeout: float) -> dict:
    """Wait for QEMU's MIGRATION event to say the migration ended (no
    polling); errors name QEMU's reason."""
    deadline = Deadline(timeout)
    st = qmp.command(query)
    while st.get("status") not in DONE:
        try:
            # in slices: a QEMU that dies sends no event, and the query after the slice says so at once
            qmp.wait_event(("MIGRATION",), timeout=max(0.1, min(5.0, deadline.remaining)))
        except ChannelError as exc:
            if deadline.expired:
                raise GuestTimeout(f"QEMU's migration to finish (status {st.get('status')})", timeout) from exc
        try:
            st = qmp.command(query)
        except ChannelError as exc:
            raise LaunchError(f"QEMU exited during the migration (status was {st.get('status')}): see its "
                              "log (qemu.log in the VM's state directory)") from exc
    if st["status"] != "completed":
        raise LaunchError(f"QEMU migration {st['status']}: {st.get('error-desc', 'no reason given')}")
    return st


def restore_uri(snap: Snapshot) -> str:
    """QEMU's ``exec:`` source for the RAM stream: the verifying copy of
    ``trust.VERIFYING_CAT`` (runs through /bin/sh; every word quoted)."""
    argv = [sys.executable, "-I", "-S", "-c", trust.VERIFYING_CAT,
            str(snap.state_file), str(snap.meta["sha256"]["state.mig"])]
    return "exec:" + shlex.join(argv)


def restore(qmp: QMPChannel, snap: Snapshot, timeout: float = 60.0) -> None:
    """Feed the snapshot to a QEMU started with ``-incoming defer`` and wait
    for its RESUME event (the guest runs again). A stream that does not match
    its manifest never ends in QEMU, so the guest never runs; that is named."""
    try:
        _restore(qmp, snap, timeout)
    except LaunchError as exc:
        if trust.sha256_file(snap.state_file) != snap.meta["sha256"]["state.mig"]:
            raise LaunchError(f"the warm-start snapshot {snap.path} does not match the SHA-256 its "
                              "manifest recorded (changed after it was made); it was not loaded") from exc
        raise


def _restore(qmp: QMPChannel, snap: Snapshot, timeout: float) -> None:
    qmp.command("migrate-set-capabilities", capabilities=CAPABILITIES)
    qmp.command("migrate-incoming", uri=restore_uri(snap))
    deadline = Deadline(timeout)
    status = qmp.status()
    while status != "running":
        if status not in ("inmigrate", "paused", "prelaunch", "restore-vm", "postmigrate"):
            raise LaunchError(f"restoring the snapshot left QEMU in state {status!r}")
        try:
            ev = qmp.wait_event(("RESUME", "MIGRATION"), timeout=max(0.1, deadline.remaining))
        except ChannelError as exc:
            if deadline.expired:
                raise GuestTimeout("QEMU to load the warm-start snapshot", timeout) from exc
            raise LaunchError(f"QEMU stopped answering while restoring the snapshot: {exc}") from exc
        if ev["event"] == "MIGRATION" and ev["data"].get("status") in ("failed", "cancelled"):
            raise LaunchError(f"QEMU could not load the warm-start snapshot (migration {ev['data']['status']})")
        status = qmp.status()
