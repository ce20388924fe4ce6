"""The lab guest: a QEMU process with two or more NVDIMMs, driven through
three channels (serial console via pexpect, SSH via paramiko, QMP via
qemu.qmp), with an explicit lifecycle and a state directory of its own.

A VM is a context manager. Shutdown is layered: polite (sync over SSH, QMP
``quit``), then SIGTERM/SIGKILL after a timeout, then cleanup in ``finally``.
A *persistent* VM keeps running after the Python side exits and can be
re-attached from another process (``VM.attach``); a throwaway VM lives in a
temporary directory and dies with its owner (PR_SET_PDEATHSIG), so a crash of
the Python side leaves no orphan QEMU. Any QEMU left behind by a dead process
is found through the pidfile and reaped on the next start.
"""

from __future__ import annotations

import atexit
import ctypes
import enum
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from labkit import paths
from labkit.machine import snapshot
from labkit.machine.accel import AccelChoice, choose_accel
from labkit.machine.config import Nvdimm, VMConfig, check_name
from labkit.machine.channels.console import BootInfo, ConsoleChannel
from labkit.errors import (ChannelError, ConfigError, GuestDied, GuestHung, GuestPanic, GuestTimeout, HostKeyMismatch,
                     LabError, LaunchError, StateDirError, StateError, VMInUse)
from labkit.image.build import DEFAULT_KERNEL, Image, ensure_image
from labkit.machine.channels.keys import ensure_client_key
from labkit.machine.argv import build_qemu_argv
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import CommandResult, SSHChannel
from labkit.timeout import Deadline, flock_before

BOOT_TIMEOUT = {"tcg": 120.0, "kvm": 60.0}
MIN_FREE_MB = 256          # room for the disk overlay's growth and the logs
# A command that prints nothing for PROBE_AFTER s has the guest's sshd probed;
# HUNG_AFTER s of unanswered probes (with QEMU reporting running CPUs) is a hang.
PROBE_AFTER, HUNG_AFTER = 5.0, 15.0


class VMState(enum.Enum):
    """Lifecycle of a VM as seen from the host."""

    STOPPED = "stopped"      # no QEMU; state dir may hold a disk and pmem files
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    DEAD = "dead"            # QEMU went away without being stopped (crash, kill, panic)

    def __str__(self) -> str:
        return self.value


@dataclass
class VMInfo:
    """What is recorded about a VM in ``vm.json`` (shared between processes)."""

    name: str
    kernel: str
    state: str = "stopped"
    pid: int = 0
    ssh_port: int = 0
    accel: str = ""
    accel_reason: str = ""
    kernel_release: str = ""
    host_key: list[str] = field(default_factory=list)
    base_sha256: str = ""
    nvdimm_mb: list[int] = field(default_factory=list)
    started_at: float = 0.0
    boot_seconds: float = 0.0
    guest_uptime_s: float = 0.0
    persistent: bool = True
    qemu_argv: list[str] = field(default_factory=list)
    start_kind: str = ""           # "cold" or "warm" (restored from a snapshot)
    snapshot: str = ""             # the snapshot's key, for a warm start
    warm_error: str = ""           # why the last warm start fell back to a cold boot
    phases: dict = field(default_factory=dict)   # seconds per start-up phase

    @classmethod
    def load(cls, path: Path) -> VMInfo | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        tmp.replace(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pid_is_our_qemu(pid: int, state_dir: Path) -> bool:
    """True if ``pid`` is a QEMU using this state dir (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return pid_alive(pid) and any(str(state_dir).encode() in a for a in cmdline)


def _set_pdeathsig() -> None:   # runs in the child between fork and exec
    # The kernel sends the signal when the *thread* that forked dies, not the
    # process: a VM started from a short-lived thread would be killed when the
    # thread ends. Only forks from the main thread use it; the others are
    # killed at interpreter exit (_kill_throwaways).
    # (After the fork Python renames the forking thread "main", so compare
    # with the real main thread's id, taken at import: pthread_self() is kept.)
    if threading.get_ident() != _MAIN_THREAD:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


_MAIN_THREAD = threading.main_thread().ident
_THROWAWAY: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_throwaways() -> None:
    for vm in list(_THROWAWAY):
        try:
            vm._kill()
        except Exception:   # interpreter shutdown: do what can be done
            pass


class VM:
    """One lab guest. ``with VM() as vm: vm.run("uname -r")``."""

    def __init__(self, name: str = "default", kernel: str = DEFAULT_KERNEL, *, persistent: bool = False,
                 state_dir: Path | None = None, memory_mb: int = 1024, smp: int | None = None,
                 nvdimms: Sequence[int] = (512, 512, 512), accel: str | None = None,
                 boot_timeout: float | None = None, warm: bool = True, tcg_cache_mb: int | None = None,
                 on_console_line: Callable[[str], None] | None = None) -> None:
        self.name = check_name(name)
        # Validate before anything is created on disk.
        if not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or not 256 <= memory_mb <= 65536:
            raise ConfigError(f"guest memory {memory_mb!r} MiB is out of range", hint="use 256..65536")
        if any(not isinstance(n, int) or isinstance(n, bool) for n in nvdimms):
            raise ConfigError(f"NVDIMM sizes {nvdimms!r} must be whole MiB", hint="e.g. nvdimms=(512, 512, 512)")
        self.nvdimms = tuple(Nvdimm(n) for n in nvdimms)
        self.kernel = kernel
        self.persistent = persistent
        self._tmpdir = None
        if state_dir is None and not persistent:
            self._tmpdir = tempfile.mkdtemp(prefix=f"labkit-{name}-")
            state_dir = Path(self._tmpdir)
        self.state_dir = Path(state_dir or paths.state_root() / "vms" / name).absolute()
        self.memory_mb = memory_mb
        self.lock_timeout = 30.0     # how long start/stop wait for another process's start/stop
        self._unanswered_since: float | None = None
        self._last_probe = 0.0
        if not persistent:
            _THROWAWAY.add(self)
        self.smp = smp or min(2, os.cpu_count() or 1)
        self._accel_forced = accel
        self.boot_timeout = boot_timeout
        self.on_console_line = on_console_line
        self.warm = warm
        env_tb = os.environ.get("LABKIT_TCG_CACHE_MB", "")
        if tcg_cache_mb is None and env_tb:
            if not env_tb.isdigit():
                raise ConfigError(f"LABKIT_TCG_CACHE_MB={env_tb!r} is not a number of MiB",
                                  hint="e.g. LABKIT_TCG_CACHE_MB=128, or unset it for QEMU's default")
            tcg_cache_mb = int(env_tb)
        self.tcg_cache_mb = tcg_cache_mb
        self.state = VMState.STOPPED
        self.info: VMInfo | None = None
        self.image: Image | None = None
        self.accel: AccelChoice | None = None
        self.boot: BootInfo | None = None
        self._proc: subprocess.Popen | None = None
        self._ssh: SSHChannel | None = None
        self._qmp: QMPChannel | None = None
        self._console: ConsoleChannel | None = None
        self._lock_held = False

    # -- files -------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.state_dir / "vm.json"

    @property
    def key_path(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.state_dir / "qemu.log"

    def _require(self, *states: VMState) -> None:
        if self.state not in states:
            raise StateError(self.state, " or ".join(str(s) for s in states), self.name)

    @contextmanager
    def _lock(self, timeout: float | None = None):
        """Serialise lifecycle changes (start, stop, reset, delete) of one VM
        between processes. Commands do not take it: any number of processes
        may attach and run commands at the same time. Re-entrant within this
        VM object, so a reset holds it across its stop and start."""
        if self._lock_held:
            yield
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateDirError(self.state_dir, f"cannot be written ({exc.strerror})") from exc
        deadline = Deadline(self.lock_timeout if timeout is None else timeout)
        try:
            if not flock_before(fd, deadline):
                holder = os.pread(fd, 32, 0).decode().strip() or "?"
                raise VMInUse(self.name, int(holder) if holder.isdigit() else -1, deadline.elapsed)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_held = True
            try:
                yield
            finally:
                self._lock_held = False
        finally:
            os.close(fd)

    # -- status ------------------------------------------------------------
    def _read_pid(self) -> int:
        try:
            return int((self.state_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return self.info.pid if self.info else 0

    def status(self) -> VMState:
        """running, stopped or dead (QEMU gone without a stop), read from disk."""
        info = VMInfo.load(self.info_path)
        if info is None:
            return VMState.STOPPED
        pid = self._read_pid() or info.pid
        alive = pid_is_our_qemu(pid, self.state_dir)
        if info.state in ("running", "starting"):
            return VMState.RUNNING if alive else VMState.DEAD
        return VMState.RUNNING if alive else VMState.STOPPED

    def describe(self) -> dict:
        info = VMInfo.load(self.info_path)
        d = {"name": self.name, "state": str(self.status()), "state_dir": str(self.state_dir)}
        if info:
            d.update(kernel=info.kernel, kernel_release=info.kernel_release, accel=info.accel,
                     accel_reason=info.accel_reason, ssh_port=info.ssh_port, pid=info.pid,
                     boot_seconds=info.boot_seconds, nvdimm_mb=info.nvdimm_mb, start_kind=info.start_kind,
                     snapshot=info.snapshot, warm_error=info.warm_error, phases=info.phases)
        return d

    # -- start -------------------------------------------------------------
    def start(self) -> VM:
        """Boot the guest and open its channels; return when SSH works."""
        self._require(VMState.STOPPED, VMState.DEAD)
        self._check_state_dir()
        with self._lock():
            current = self.status()
            if current is VMState.RUNNING:
                raise StateError("already running", "stopped", self.name)
            self._reap_stale()
            self.state = VMState.STARTING
            try:
                self._launch()
            except BaseException:
                self.state = VMState.DEAD
                self._kill()
                self._close_channels()
                if self.info:
                    self.info.state = "stopped"
                    self.info.save(self.info_path)
                raise
        self.state = VMState.RUNNING
        return self

    def _check_state_dir(self) -> None:
        """Refuse to start with a state dir that cannot be written or is
        nearly full: a clear error now instead of a QEMU that dies later."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.state_dir / ".write-test"
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
            st = os.statvfs(self.state_dir)
        except OSError as exc:
            raise StateDirError(self.state_dir, f"cannot be written ({exc.strerror})") from exc
        free_mb = st.f_bavail * st.f_frsize // 2**20
        if free_mb < MIN_FREE_MB:
            raise StateDirError(self.state_dir, f"has only {free_mb} MiB free; the VM needs at least "
                                                f"{MIN_FREE_MB} MiB for its disk overlay and logs")

    def _reap_stale(self) -> None:
        """Kill a QEMU left behind by a crashed owner and clear stale files."""
        info = VMInfo.load(self.info_path)
        pid = self._read_pid() or (info.pid if info else 0)
        if pid and pid_is_our_qemu(pid, self.state_dir):
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.05)
        for f in ("qemu.pid", "qmp.sock", "console.sock"):
            (self.state_dir / f).unlink(missing_ok=True)
        # The next boot starts console.log afresh: keep the last one (it may
        # hold a kernel panic the learner has not read yet).
        if self.console_log.exists() and self.console_log.stat().st_size:
            self.console_log.replace(self.state_dir / "console.prev.log")

    def _prepare_disks(self, image: Image, info: VMInfo) -> None:
        base_sha = image.manifest["artifacts"]["root.ext4"]["sha256"]
        overlay = self.state_dir / "root.qcow2"
        if not overlay.exists() or info.base_sha256 != base_sha:
            # A new base image makes the old overlay meaningless; pmem files stay.
            overlay.unlink(missing_ok=True)
            (self.state_dir / "host_key").unlink(missing_ok=True)
            info.host_key = []
            self._create_overlay(image.root, "raw")
            info.base_sha256 = base_sha

    def _create_overlay(self, backing: Path, backing_format: str) -> None:
        """A new root.qcow2 over a read-only ``backing`` disk."""
        overlay = self.state_dir / "root.qcow2"
        overlay.unlink(missing_ok=True)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b",
                            str(backing), str(overlay)], capture_output=True, text=True)
        if r.returncode != 0:
            raise LaunchError("qemu-img could not create the disk overlay",
                              ["qemu-img", "create", str(overlay)], r.returncode, r.stderr)

    def _prepare_pmem(self, info: VMInfo) -> None:
        """Create missing pmem files (sparse); never resize or erase existing ones."""
        for i, dimm in enumerate(self.nvdimms):
            f = self.state_dir / f"pmem{i}.img"
            want = dimm.size_mb * 2**20
            if f.exists():
                if f.stat().st_size != want:
                    raise ConfigError(
                        f"{f} holds {f.stat().st_size // 2**20} MiB of persistent memory, "
                        f"but this VM asks for {dimm.size_mb} MiB",
                        hint="use the same NVDIMM sizes as before, or `labkit vm delete` the VM "
                             "(this erases its pmem) and start it again")
            else:
                with open(f, "wb") as fh:
                    fh.truncate(want)      # sparse: costs no disk until written
                f.chmod(0o600)
        info.nvdimm_mb = [d.size_mb for d in self.nvdimms]

    def _launch(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        # A kernel whose image was never built is built now, with progress
        # lines (LABKIT_AUTO_BUILD=0 refuses, as the test suite does).
        self.image = ensure_image(self.kernel)
        self.accel = AccelChoice(self._accel_forced, "requested") if self._accel_forced else choose_accel()
        info = VMInfo.load(self.info_path) or VMInfo(self.name, self.kernel)
        if info.kernel != self.kernel and (self.state_dir / "root.qcow2").exists():
            info.base_sha256 = ""      # another kernel's image: start the disk afresh
        info.kernel = self.kernel
        info.persistent = self.persistent
        self._prepare_pmem(info)
        pubkey = ensure_client_key(self.key_path)
        timeout = self.boot_timeout or BOOT_TIMEOUT[self.accel.accel]
        if self.warm:
            snap = self._snapshot_for(info, pubkey, timeout)
            try:
                self._warm_start(snap, info, pubkey, timeout)
                return
            except HostKeyMismatch as exc:
                # Our own snapshot's guest is not the one it recorded: never
                # talk to it. Throw the snapshot away; the next start makes one.
                self._kill()
                self._close_channels()
                snapshot.discard(snap.path)
                exc.hint = ("the warm-start snapshot in the cache was not the guest it claimed to be and has "
                            "been discarded; start the VM again to make a new one")
                raise
            except (LaunchError, GuestTimeout, ChannelError) as exc:
                # A snapshot that does not come back is thrown away, never retried.
                info.warm_error = str(exc).splitlines()[0]
                self._kill()
                self._close_channels()
                snapshot.discard(snap.path)
                self._progress(f"labkit: warm start failed ({info.warm_error}); booting cold")
        self._cold_start(info, pubkey, timeout)

    def _config(self, info: VMInfo, pubkey: str, **kw) -> VMConfig:
        assert self.image is not None and self.accel is not None
        return VMConfig(name=self.name, state_dir=self.state_dir, kernel_image=self.image.boot_kernel,
                        initrd=self.image.initrd, accel=self.accel.accel, memory_mb=self.memory_mb,
                        smp=self.smp, nvdimms=self.nvdimms, ssh_port=free_port(), ssh_pubkey=pubkey,
                        tcg_cache_mb=self.tcg_cache_mb if self.accel.accel == "tcg" else None, **kw)

    def _spawn_retrying(self, info: VMInfo, pubkey: str, timeout: float, **kw) -> VMConfig:
        """Start QEMU; a new port if the forwarded one was taken between probe and bind."""
        last_error: LaunchError | None = None
        for _attempt in range(3):
            cfg = self._config(info, pubkey, **kw)
            try:
                self._spawn(cfg, info, timeout)
                return cfg
            except LaunchError as exc:
                if "host forwarding" not in exc.output:
                    raise
                last_error = exc
        raise last_error or LaunchError("could not start QEMU")

    def _progress(self, line: str) -> None:
        if self.on_console_line:
            self.on_console_line(line)

    def _cold_start(self, info: VMInfo, pubkey: str, timeout: float, cmdline_extra: tuple[str, ...] = ()) -> VMConfig:
        """Boot the kernel from scratch; return when SSH works."""
        assert self.image is not None
        self._prepare_disks(self.image, info)
        pinned = info.host_key
        cfg = self._spawn_retrying(info, pubkey, timeout, cmdline_extra=cmdline_extra)
        self._wait_console_boot(cfg, info, timeout)
        assert self.boot is not None
        if pinned and self.boot.host_key and list(self.boot.host_key) != pinned:
            raise HostKeyMismatch(" ".join(pinned), " ".join(self.boot.host_key))
        host_key = tuple(pinned) if pinned else self.boot.host_key
        if not host_key:
            raise LaunchError("the guest did not announce its SSH host key on the console",
                              output=self.console_log.read_text(errors="replace")[-3000:])
        info.host_key = list(host_key)
        t_ssh = time.time()
        self._ssh = SSHChannel(cfg.ssh_port, self.key_path, tuple(host_key)).connect(
            timeout=max(5.0, timeout - (time.time() - info.started_at)))
        info.phases = {"boot to ready marker": round(t_ssh - info.started_at, 3),
                       "ssh connect": round(time.time() - t_ssh, 3)}
        self._ready(info, "cold", "")
        return cfg

    def _ready(self, info: VMInfo, kind: str, snap_key: str) -> None:
        info.boot_seconds = round(time.time() - info.started_at, 2)
        info.start_kind, info.snapshot = kind, snap_key
        info.state = "running"
        info.save(self.info_path)
        self.info = info

    # -- warm start ----------------------------------------------------------
    def _snapshot_for(self, info: VMInfo, pubkey: str, timeout: float) -> snapshot.Snapshot:
        """The valid snapshot for this machine, created now if there is none."""
        key = snapshot.machine_key(self._config(info, ""), self.image)
        snap = snapshot.find(key, self.kernel)
        if snap is not None:
            return snap
        with snapshot.creation_lock(key):
            snap = snapshot.find(key, self.kernel)     # another process may have made it
            if snap is None:
                snap = self._create_snapshot(key, info, pubkey, timeout)
        return snap

    def _create_snapshot(self, key: str, info: VMInfo, pubkey: str, timeout: float) -> snapshot.Snapshot:
        """Cold boot a guest that has never seen the NVDIMMs, prepare it, save
        it. Its fresh root disk (and host key) become the snapshot's."""
        self._progress("labkit: first start of this machine: cold boot, then a warm-start snapshot "
                       "for every later start")
        info.base_sha256, info.host_key = "", []
        (self.state_dir / "root.qcow2").unlink(missing_ok=True)
        cfg = self._cold_start(info, pubkey, timeout, cmdline_extra=("labkit.pmem=defer",))
        try:
            assert self._ssh is not None and self.boot is not None
            self._ssh.run(["sh", "-c", snapshot.PREPARE_SCRIPT], timeout=60, check=True)
            self._ssh.close()
            self._ssh = None
            self._qmp = QMPChannel(cfg.qmp_socket).connect(timeout=5)
            self._progress("labkit: saving the warm-start snapshot")
            snap = snapshot.save(self._qmp, cfg.root_overlay, key, self.kernel, {
                "host_key": list(info.host_key), "kernel_release": self.boot.kernel_release,
                "cold_boot_seconds": info.boot_seconds, "qemu": snapshot.qemu_version(),
                "accel": cfg.accel, "memory_mb": cfg.memory_mb, "smp": cfg.smp,
                "nvdimm_mb": [d.size_mb for d in cfg.nvdimms]})
        finally:
            self._kill()
            self._close_channels()
        return snap

    def _warm_start(self, snap: snapshot.Snapshot, info: VMInfo, pubkey: str, timeout: float) -> None:
        """Restore ``snap`` into a new QEMU, hand the guest this VM's key, load nfit."""
        t0 = time.monotonic()
        phases: dict[str, float] = {}
        self._progress("labkit: warm start: restoring the prepared guest from its snapshot")

        def phase(name: str) -> None:
            phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 3)

        self._create_overlay(snap.disk, "qcow2")
        info.base_sha256 = "snapshot:" + snap.key   # a later cold boot starts the disk afresh
        info.host_key = list(snap.host_key)         # the snapshot's guest identity, from our own cache
        phase("disk overlay")
        deadline = Deadline(timeout)
        cfg = self._spawn_retrying(info, pubkey, timeout, extra_args=("-incoming", "defer"))
        # Queued on the console before the guest runs; it reads it on resume.
        console = ConsoleChannel(cfg.console_socket).connect(timeout=5)
        try:
            assert console.child is not None
            console.child.sendline(snapshot.RESUME_SCRIPT)
            while not cfg.qmp_socket.exists() and not deadline.expired:
                time.sleep(0.005)
            self._qmp = QMPChannel(cfg.qmp_socket).connect(timeout=5)
            phase("qemu start")
            snapshot.restore(self._qmp, snap, timeout=deadline.remaining)
            # QEMU's monitor serves one client at a time: do not keep it from
            # other processes (a `labkit vm reset` in a terminal, a watchdog).
            self._qmp.close()
            self._qmp = None
            phase("restore")
            self.boot = BootInfo(snap.meta["kernel_release"], 0.0, snap.host_key)
            info.kernel_release = snap.meta["kernel_release"]
            self._ssh = SSHChannel(cfg.ssh_port, self.key_path, snap.host_key).connect(
                timeout=max(5.0, deadline.remaining))
            phase("ssh connect")
            r = self._ssh.run(["sh", "-c", snapshot.PMEM_WAIT.format(now=int(time.time()))],
                              timeout=max(5.0, min(20.0, deadline.remaining)))
            if r.rc != 0:
                raise GuestTimeout("the restored guest to load its NVDIMM drivers", 10.0,
                                   self.console_log.read_text(errors="replace")[-2000:])
            phase("nvdimms ready")
        finally:
            console.close()
        info.phases = phases
        info.warm_error = ""
        self._ready(info, "warm", snap.key)
        self._progress(f"labkit: ready {info.kernel_release} (warm start in {info.boot_seconds:.1f} s)")

    def _spawn(self, cfg: VMConfig, info: VMInfo, timeout: float) -> None:
        """Start QEMU and wait until its console socket exists."""
        argv = build_qemu_argv(cfg)
        for f in ("qemu.pid", "qmp.sock", "console.sock"):
            (self.state_dir / f).unlink(missing_ok=True)
        self.console_log.write_bytes(b"")
        log = open(self.qemu_log, "wb")
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=None if self.persistent else _set_pdeathsig)
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]}: {exc}", argv) from exc
        finally:
            log.close()
        info.pid = self._proc.pid
        info.started_at = time.time()
        info.ssh_port = cfg.ssh_port
        info.accel, info.accel_reason = self.accel.accel, self.accel.reason
        info.qemu_argv = argv
        info.state = "starting"
        info.save(self.info_path)
        deadline = Deadline(timeout)
        while not cfg.console_socket.exists():
            if self._proc.poll() is not None:
                raise LaunchError("QEMU exited during start-up", argv, self._proc.returncode,
                                  self.qemu_log.read_text(errors="replace"))
            if deadline.expired:
                raise GuestTimeout("QEMU to create its console socket", timeout)
            time.sleep(0.01)

    def _wait_console_boot(self, cfg: VMConfig, info: VMInfo, timeout: float) -> None:
        """Follow a cold boot on the console up to the init's readiness marker."""
        argv = info.qemu_argv
        deadline = Deadline(max(1.0, timeout - (time.time() - info.started_at)))
        self._console = ConsoleChannel(cfg.console_socket).connect(timeout=5)
        try:
            self.boot = self._console.wait_boot(deadline.remaining, on_line=self.on_console_line)
        except LaunchError as exc:
            self._proc.poll()
            raise LaunchError(str(exc).split("\n")[0], argv, self._proc.returncode,
                              self.qemu_log.read_text(errors="replace") + "\n" + exc.output) from exc
        finally:
            self._console.close()
            self._console = None
        info.kernel_release = self.boot.kernel_release
        info.guest_uptime_s = self.boot.guest_uptime_s

    # -- attach ------------------------------------------------------------
    @classmethod
    def attach(cls, name: str = "default", state_dir: Path | None = None, timeout: float = 10.0) -> VM:
        """Connect to a persistent VM started by another process."""
        vm = cls(name, persistent=True, state_dir=state_dir)
        st = vm.status()
        if st is not VMState.RUNNING:
            raise StateError(st, "running", name)
        info = VMInfo.load(vm.info_path)
        assert info is not None
        vm.info, vm.kernel = info, info.kernel
        vm.accel = AccelChoice(info.accel, info.accel_reason)
        vm.boot = BootInfo(info.kernel_release, info.guest_uptime_s, tuple(info.host_key))
        vm._ssh = SSHChannel(info.ssh_port, vm.key_path, tuple(info.host_key)).connect(timeout=timeout)
        vm.state = VMState.RUNNING
        return vm

    # -- channels ----------------------------------------------------------
    @property
    def ssh(self) -> SSHChannel:
        self._require(VMState.RUNNING)
        assert self._ssh is not None
        if not self._ssh.is_open:
            self._ssh.connect(timeout=10)
        return self._ssh

    @property
    def qmp(self) -> QMPChannel:
        self._require(VMState.RUNNING, VMState.STOPPING)
        if self._qmp is None:
            self._qmp = QMPChannel(self.state_dir / "qmp.sock").connect()
        return self._qmp

    def console(self) -> ConsoleChannel:
        """A new pexpect console connection (the caller closes it)."""
        self._require(VMState.RUNNING)
        return ConsoleChannel(self.state_dir / "console.sock").connect()

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None, on_stdout: Callable[[str], None] | None = None,
            on_stderr: Callable[[str], None] | None = None) -> CommandResult:
        """Run a guest command over SSH. A list is quoted word by word.

        A dead QEMU raises GuestDied (GuestPanic after a kernel panic) at once;
        a guest that stops answering during the command raises GuestHung
        (paused CPUs within ~2 s, a starved sshd within ~PROBE_AFTER+HUNG_AFTER s)
        instead of waiting for ``timeout``."""
        self._check_alive()
        self._unanswered_since = None
        try:
            return self.ssh.run(cmd, timeout=timeout, check=check, stdin=stdin, on_stdout=on_stdout,
                                on_stderr=on_stderr, watchdog=self._watchdog)
        except GuestHung:
            raise
        except (ChannelError, GuestTimeout) as exc:
            self._explain_failure(exc)
            raise

    # -- fault detection -----------------------------------------------------
    def _qemu_alive(self) -> bool:
        if self._proc is not None:
            self._proc.poll()       # reap our own child so it does not linger as a zombie
        return pid_is_our_qemu(self._read_pid() or (self.info.pid if self.info else 0), self.state_dir)

    def _check_alive(self) -> None:
        """GuestDied/GuestPanic if QEMU is gone; adopt a restart done by another process."""
        if self.state is not VMState.RUNNING:
            return
        if not self._qemu_alive():
            raise self._death_error()
        info = VMInfo.load(self.info_path)
        if self.info and info and info.state == "running" and info.pid != self.info.pid:
            # Another process restarted this VM (e.g. `labkit vm reset`): follow it.
            if self._ssh is not None:
                self._ssh.close()
            self.info = info
            self.boot = BootInfo(info.kernel_release, info.guest_uptime_s, tuple(info.host_key))
            self._ssh = SSHChannel(info.ssh_port, self.key_path, tuple(info.host_key))

    def _death_error(self) -> GuestDied:
        """What happened to a QEMU that is gone: a panic (with the console text
        around it) or a kill/crash (with the exit status when it was our child)."""
        pid = (self.info.pid if self.info else 0) or self._read_pid()
        self.state = VMState.DEAD
        self._close_channels_quietly()
        text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
        at = text.rfind("Kernel panic")
        if at >= 0:
            return GuestPanic(text[max(0, at - 2500):at + 2500], pid)
        how = "killed or crashed"
        rc = self._proc.returncode if self._proc is not None else None
        if rc is not None and rc < 0:
            how = f"killed by {signal.Signals(-rc).name}"
        elif rc is not None:
            how = f"exited with status {rc}"
        qlog = self.qemu_log.read_text(errors="replace").strip()[-1000:] if self.qemu_log.exists() else ""
        return GuestDied(f"QEMU (PID {pid}) of VM {self.name!r} is no longer running ({how}); the guest is gone"
                         + (f"\n--- qemu.log ---\n{qlog}" if qlog else ""), pid, text[-3000:])

    def _close_channels_quietly(self) -> None:
        try:
            self._close_channels()
        except Exception:   # closing sockets of a dead QEMU must not hide why it died
            pass

    def _qmp_status(self, timeout: float = 2.0) -> str | None:
        """QEMU's run state ('running', 'paused', 'io-error', …), or None if QMP
        does not answer. A short-lived connection unless this VM holds one:
        the monitor serves one client at a time and other processes may need it."""
        try:
            if self._qmp is not None:
                return self._qmp.status()
            with QMPChannel(self.state_dir / "qmp.sock").connect(timeout=timeout) as q:
                return q.status()
        except LabError:
            return None

    def _hung_error(self, status: str, seconds: float) -> GuestHung | GuestPanic:
        if status == "paused":
            return GuestHung("QEMU reports the guest's CPUs are paused (QMP status 'paused', e.g. after a "
                             "QMP 'stop')", seconds, status)
        if status == "io-error":
            return GuestHung("QEMU paused the guest after a disk write failed (QMP status 'io-error'): the "
                             f"disk holding {self.state_dir} is probably full", seconds, status)
        if status == "guest-panicked":
            return GuestPanic(self.console_log.read_text(errors="replace")[-5000:], self._read_pid())
        return GuestHung(f"QEMU reports its state as {status!r}", seconds, status)

    def _watchdog(self, quiet: float) -> None:
        """Called while a command is silent: end the wait early when QEMU died,
        the CPUs are paused, or sshd stopped answering although the CPUs run."""
        if not self._qemu_alive():
            raise self._death_error()
        status = self._qmp_status()
        if status not in (None, "running"):
            raise self._hung_error(status, quiet)
        now = time.monotonic()
        if quiet < PROBE_AFTER or self._ssh is None or now - self._last_probe < 3.0:
            return
        self._last_probe = now
        if self._ssh.responsive(timeout=5.0):
            self._unanswered_since = None
            return
        if self._unanswered_since is None:
            self._unanswered_since = now
        elif time.monotonic() - self._unanswered_since >= HUNG_AFTER:
            raise GuestHung(f"QEMU reports the CPUs running, but the guest's sshd has not answered for "
                            f"{time.monotonic() - self._unanswered_since:.0f} s: something in the guest "
                            "(a busy loop at real-time priority, a kernel hang) starves it", quiet, "running")

    def _explain_failure(self, exc: LabError) -> None:
        """After a channel error or timeout: say what really happened to the
        guest (QEMU gone, kernel panic, CPUs paused, sshd starved), if anything."""
        if self.state is VMState.RUNNING and self._qemu_alive() is False or \
                self.status() is VMState.DEAD:
            raise self._death_error() from exc
        status = self._qmp_status()
        if status is None:
            # QMP silent and the connection gone: QEMU may be exiting right now
            # (its sockets close before the process is reaped), e.g. after a panic.
            deadline = Deadline(3.0)
            while not deadline.expired:
                if not self._qemu_alive():
                    raise self._death_error() from exc
                time.sleep(0.05)
        if status not in (None, "running"):
            raise self._hung_error(status, getattr(exc, "seconds", 0.0)) from exc
        if status == "running" and isinstance(exc, ChannelError) and self._ssh is not None \
                and self._ssh.is_open and not self._ssh.responsive(timeout=5.0):
            raise GuestHung("QEMU reports the CPUs running, but the guest's sshd does not answer: "
                            "something in the guest starves it", 5.0, "running") from exc

    # -- stop --------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> None:
        """Polite shutdown, then SIGTERM/SIGKILL; always leaves the VM stopped."""
        if self.state is VMState.STOPPED and self.status() is VMState.STOPPED:
            return
        with self._lock():
            self.state = VMState.STOPPING
            pid = self._read_pid()
            try:
                if pid_is_our_qemu(pid, self.state_dir):
                    self._polite_quit(timeout)
                    self._wait_exit(pid, timeout)
            finally:
                self._kill()
                self._close_channels()
                info = VMInfo.load(self.info_path)
                if info:
                    info.state, info.pid = "stopped", 0
                    info.save(self.info_path)
                for f in ("qemu.pid", "qmp.sock", "console.sock"):
                    (self.state_dir / f).unlink(missing_ok=True)
                self.state = VMState.STOPPED

    def reset(self, pmem: bool = False, timeout: float = 30.0) -> VM:
        """Back to the prepared state: this guest is discarded and a new one is
        restored from the warm-start snapshot (a cold boot if ``warm=False``).

        The persistent memory is *kept* (the restored guest finds it as it
        was); ``pmem=True`` is the explicit request to erase it as well."""
        with self._lock():     # one lifecycle change: no other process slips in between
            self.stop(timeout=min(5.0, timeout))
            if pmem:
                self.erase_pmem()
            return self.start()

    def erase_pmem(self) -> None:
        """Zero the VM's persistent memory (only while stopped; explicit only)."""
        if self.status() is VMState.RUNNING:
            raise StateError("running", "stopped", self.name)
        for f in sorted(self.state_dir.glob("pmem*.img")):
            size = f.stat().st_size
            with open(f, "r+b") as fh:
                fh.truncate(0)         # frees the blocks; the file stays sparse
                fh.truncate(size)

    def _polite_quit(self, timeout: float) -> None:
        try:
            if self._ssh is not None and self._ssh.is_open:
                self._ssh.run("sync", timeout=min(5.0, timeout))
        except LabError:
            pass
        try:
            if self._qmp is None:
                self._qmp = QMPChannel(self.state_dir / "qmp.sock").connect(timeout=2.0)
            self._qmp.quit()
        except LabError:
            pass

    def _wait_exit(self, pid: int, timeout: float) -> None:
        deadline = Deadline(timeout)
        while pid_alive(pid) and not deadline.expired:
            if self._proc is not None:
                self._proc.poll()
            time.sleep(0.05)

    def _kill(self) -> None:
        """Hard stop: SIGTERM, then SIGKILL, for whatever QEMU is ours."""
        pids = {self._read_pid()}
        if self._proc is not None:
            pids.add(self._proc.pid)
        for pid in pids:
            if not pid or not pid_is_our_qemu(pid, self.state_dir):
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                for _ in range(40):
                    if self._proc is not None:
                        self._proc.poll()
                    if not pid_alive(pid):
                        break
                    time.sleep(0.05)
                if not pid_alive(pid):
                    break
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None

    def _close_channels(self) -> None:
        for ch in (self._ssh, self._qmp, self._console):
            if ch is not None:
                ch.close()
        self._ssh = self._qmp = self._console = None

    def close(self) -> None:
        """Drop this process's connections; a persistent VM keeps running."""
        self._close_channels()

    def delete(self) -> None:
        """Stop and erase the VM's state dir (disk overlay *and* pmem files)."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> VM:
        if self.state is not VMState.RUNNING:
            try:
                self.start()
            except BaseException:
                self._remove_tmpdir()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        """Done with this VM: a persistent one keeps running (channels are
        closed); a throwaway one is stopped and its temporary state removed."""
        try:
            if self.persistent:
                self.close()
            else:
                self.stop()
        finally:
            self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __repr__(self) -> str:
        return f"<VM {self.name} kernel={self.kernel} state={self.state}>"


def connect(name: str | None = None, kernel: str = DEFAULT_KERNEL,
            on_console_line: Callable[[str], None] | None = None) -> VM:
    """The lab VM for a notebook: attach to it if it runs (a kernel restart
    does not lose the guest), else start it as a persistent VM."""
    name = name or os.environ.get("LABKIT_VM", "default")
    vm = VM(name, kernel=kernel, persistent=True, on_console_line=on_console_line)
    if vm.status() is VMState.RUNNING:
        return VM.attach(name)
    return vm.start()
