"""The lab guest: a QEMU process with NVDIMMs, driven through three channels
(serial console via pexpect, SSH via paramiko, QMP via qemu.qmp), with an
explicit lifecycle and a state directory of its own.

This is the facade: the state dir's files (``statedir``), the QEMU process
(``process``), the lifecycle lock (``locks``), disks (``disks``), cold and warm
starts and attaching (``start``, ``boot``, ``warm``) and fault detection
(``watch``, ``health``) live in their own modules.

What a running guest is (its QEMU, record, boot, accelerator, channels) is
one ``Running`` object: a start or an attach returns it whole and the VM
swaps it in whole (``_running``); ``info``, ``boot``, ``accel``, ``proc`` and
``ssh_channel`` read it. ``state`` is this process's ``VMState``.

A VM is a context manager. Shutdown is layered: polite (sync over SSH, QMP
``quit``), then SIGTERM/SIGKILL, then cleanup in ``finally``. A *persistent* VM
keeps running after the Python side exits and can be re-attached from another
process (``VM.attach``); a throwaway VM lives in a temporary directory and
dies with its owner. A QEMU left behind by a dead process is found through
its pidfile (and its identity checked) and reaped on the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from labkit.command import CommandResult
from labkit.errors import ChannelError, GuestDied, GuestHung, GuestTimeout, StateError
from labkit.image import DEFAULT_KERNEL, Image
from labkit.machine import disks, process, start
from labkit.machine.accel import AccelChoice
from labkit.machine.boot import StartSpec
from labkit.machine.channels.console import BootInfo, ConsoleChannel
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.config import check_name, check_sizes
from labkit.machine.locks import LifecycleLock
from labkit.machine.running import Running, kill_qemu, qemu_alive
from labkit.machine.shutdown import polite_quit
from labkit.machine.state import VMState, recorded_state
from labkit.machine.statedir import StateDir, VMInfo, sweep_stale_throwaways
from labkit.machine.watch import Watch
from labkit.settings import Settings, resolve

log = logging.getLogger(__name__)


class VM:
    """One lab guest. ``with VM() as vm: vm.run("uname -r")``."""

    def __init__(self, name: str = "default", kernel: str = DEFAULT_KERNEL, *, persistent: bool = False,
                 state_dir: Path | None = None, memory_mb: int = 1024, smp: int | None = None,
                 nvdimms: Sequence[int] = (512, 512, 512), accel: str | None = None,
                 boot_timeout: float | None = None, warm: bool = True, tcg_cache_mb: int | None = None,
                 on_console_line: Callable[[str], None] | None = None, settings: Settings | None = None) -> None:
        # The facade is an edge (``labkit.VM``): settings not given are
        # resolved here, once; everything below takes them from the VM.
        self.settings = resolve(settings)
        self.name = check_name(name)
        self.nvdimms = check_sizes(memory_mb, nvdimms)   # validated before anything is created on disk
        self.tcg_cache_mb = self.settings.tcg_cache_mb if tcg_cache_mb is None else tcg_cache_mb
        # LABKIT_WARM_START=0: no snapshot is made or restored (a host whose QEMU cannot save one)
        self.kernel, self.persistent, self.memory_mb = kernel, persistent, memory_mb
        self.warm = warm and self.settings.warm_start
        self.smp = smp or min(2, os.cpu_count() or 1)
        self.accel_forced, self.boot_timeout, self.on_console_line = accel, boot_timeout, on_console_line
        self._tmpdir: str | None = None
        if state_dir is None and not persistent:
            sweep_stale_throwaways()
            self._tmpdir = tempfile.mkdtemp(prefix=f"labkit-{name}-{os.getpid()}-")
            state_dir = Path(self._tmpdir)
            process.THROWAWAYS.add(self)
        self.sd = StateDir(Path(state_dir or self.settings.state_dir / "vms" / name).absolute())
        self.lock_timeout = 30.0     # how long start/stop wait for another process's start/stop
        self._lock = LifecycleLock(self.sd.lock, self.name)
        self.state = VMState.STOPPED
        self._running: Running | None = None    # the guest this object started or attached (the last one)
        self.watch = Watch()

    # -- the running guest (the last one, closed, once it stopped or died) -------
    @property
    def info(self) -> VMInfo | None:
        return self._running.info if self._running else None

    @property
    def image(self) -> Image | None:
        return self._running.image if self._running else None

    @property
    def accel(self) -> AccelChoice | None:
        return self._running.accel if self._running else None

    @property
    def boot(self) -> BootInfo | None:
        return self._running.boot if self._running else None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._running.proc if self._running else None

    @property
    def ssh_channel(self) -> SSHChannel | None:
        return self._running.ssh if self._running else None

    def _swap_in(self, guest: Running) -> None:
        """Make ``guest`` this VM's running guest; the one before is closed."""
        old, self._running = self._running, guest
        if old is not None and old is not guest:
            old.close()
        self.kernel = guest.info.kernel
        self.state = VMState.RUNNING

    # -- files ---------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.sd.path

    @property
    def info_path(self) -> Path:
        return self.sd.info

    @property
    def key_path(self) -> Path:
        return self.sd.key

    @property
    def console_log(self) -> Path:
        return self.sd.console_log

    @property
    def qemu_log(self) -> Path:
        return self.sd.qemu_log

    @property
    def record(self) -> VMInfo:
        """What is recorded about the started or attached VM (StateError before that)."""
        if self.info is None:
            raise StateError(self.state, "started or attached", self.name)
        return self.info

    @property
    def release(self) -> str:
        """The guest kernel's release (``uname -r``) of the started or attached VM."""
        return self.record.kernel_release

    def progress(self, line: str) -> None:
        if self.on_console_line:
            self.on_console_line(line)

    @contextmanager
    def lifecycle(self, timeout: float | None = None) -> Iterator[None]:
        """Hold this VM's lifecycle lock (re-entrant within this object)."""
        with self._lock.hold(self.lock_timeout if timeout is None else timeout):
            yield

    # -- status --------------------------------------------------------------
    def qemu_alive(self) -> bool:
        """True if this VM's own QEMU runs (identity checked, not just a PID)."""
        return qemu_alive(self.sd, self.info, self.proc)

    def status(self) -> VMState:
        """The VM's state as recorded on disk and checked against the process table."""
        info = self.sd.load_info()
        pid = self.sd.read_pid() or (info.pid if info else 0)
        alive = process.is_qemu_of(pid, self.sd.pidfile, info.qemu_started if info and info.pid == pid else 0.0)
        starting_here = self._lock.held and self.state is VMState.STARTING
        return recorded_state(info.lifecycle if info else None, alive,
                              starting_here or self._lock.busy_elsewhere())

    def describe(self) -> dict[str, Any]:
        """What ``labkit vm status --json`` prints."""
        info = self.sd.load_info()
        return {"name": self.name, "state": str(self.status()), "state_dir": str(self.sd.path),
                **(info.described() if info else {})}

    # -- start ---------------------------------------------------------------
    def start(self) -> VM:
        """Boot the guest (warm start when possible) and open SSH; return when it works."""
        if self.state not in (VMState.STOPPED, VMState.DEAD):
            raise StateError(self.state, "stopped or dead", self.name)
        self.sd.check_writable()
        with self.lifecycle():
            current = self.status()
            if current is VMState.RUNNING:
                raise StateError("already running", "stopped", self.name)
            if current is VMState.INCOMPLETE:
                self.progress("labkit: an earlier start of this VM was interrupted; discarding its guest")
            self.state = VMState.STARTING
            try:
                guest = start.start(self._spec())
            except BaseException:
                self.state = VMState.DEAD
                self.kill()
                self.sd.record_stopped()
                raise
            self._swap_in(guest)
        return self

    def _spec(self) -> StartSpec:
        return StartSpec(name=self.name, kernel=self.kernel, sd=self.sd, persistent=self.persistent,
                         memory_mb=self.memory_mb, smp=self.smp, nvdimms=self.nvdimms, settings=self.settings,
                         accel_forced=self.accel_forced, boot_timeout=self.boot_timeout, warm=self.warm,
                         tcg_cache_mb=self.tcg_cache_mb, on_console_line=self.on_console_line)

    def _is_ours(self, pid: int) -> bool:
        return process.is_qemu_of(pid, self.sd.pidfile)

    @classmethod
    def attach(cls, name: str = "default", state_dir: Path | None = None, timeout: float | None = None,
               settings: Settings | None = None) -> VM:
        """Connect to a persistent VM started by another process (``timeout``: by
        default 10 s, longer where LABKIT_BOOT_TIMEOUT says guests are slow here)."""
        vm = cls(name, persistent=True, state_dir=state_dir, settings=settings)
        if timeout is None:
            timeout = start.attach_timeout(vm.settings.boot_timeout)
        vm._swap_in(start.attach(vm.sd, vm.name, vm.status(), timeout))
        return vm

    # -- channels -------------------------------------------------------------
    def _live(self) -> Running:
        """The running guest; StateError unless this VM is running."""
        if self.state is not VMState.RUNNING or self._running is None:
            raise StateError(self.state, "running", self.name)
        return self._running

    @property
    def ssh(self) -> SSHChannel:
        ssh = self._live().ssh
        if not ssh.is_open:
            ssh.connect(timeout=10)
        return ssh

    @property
    def qmp(self) -> QMPChannel:
        if self.state not in (VMState.RUNNING, VMState.STOPPING) or self._running is None:
            raise StateError(self.state, "running", self.name)
        return self._running.open_qmp()

    def console(self) -> ConsoleChannel:
        """A new pexpect console connection (the caller closes it)."""
        if self.state is not VMState.RUNNING:
            raise StateError(self.state, "running", self.name)
        return ConsoleChannel(self.sd.console_socket).connect()

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None, on_stdout: Callable[[str], None] | None = None,
            on_stderr: Callable[[str], None] | None = None) -> CommandResult:
        """Run a guest command over SSH. A list is quoted word by word.

        A dead QEMU raises GuestDied (GuestPanic after a kernel panic) at once;
        a guest that stops answering during the command raises GuestHung
        instead of waiting for ``timeout``."""
        with self._watched() as guest:
            return self.ssh.run(cmd, timeout=timeout, check=check, stdin=stdin, on_stdout=on_stdout,
                                on_stderr=on_stderr, watchdog=lambda quiet: self.watch.on_quiet(guest, quiet))

    def run_passthrough(self, cmd: Sequence[str], stdin: BinaryIO | None = None) -> int:
        """Like ``ssh host cmd`` with this process's stdin/stdout/stderr; the
        same fault detection as ``run``. Returns the command's exit code."""
        with self._watched() as guest:
            return self.ssh.run_passthrough(cmd, stdin=stdin,
                                            watchdog=lambda quiet: self.watch.on_quiet(guest, quiet))

    @contextmanager
    def _watched(self) -> Iterator[Running]:
        """Around a guest command: check the guest first (following a restart
        another process made); turn a channel error or timeout into what really
        happened (QEMU gone, panic, paused, starved). A dead guest marks this VM dead."""
        guest = self._live()
        try:
            successor = self.watch.begin_command(guest)
            if successor is not guest:
                self._swap_in(guest := successor)
            t0 = time.monotonic()
            try:
                yield guest
            except GuestHung:
                raise
            except (ChannelError, GuestTimeout) as exc:
                self.watch.explain(guest, exc, waited=time.monotonic() - t0)
                raise
        except GuestDied:
            self.mark_dead()
            raise

    # -- stop ------------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> bool:
        """Polite shutdown, then SIGTERM/SIGKILL; always leaves the VM stopped.
        Returns True if the polite path failed and QEMU had to be killed. A VM
        another process owns (``settings.managed_vms``) is left to it: this only
        drops our connections."""
        if self.state is VMState.STOPPED and self.status() is VMState.STOPPED:
            return False
        if self.name in self.settings.managed_vms:
            log.info("%s is stopped by the process that started it; dropping our connections", self.name)
            self.close_channels()
            self.state = VMState.STOPPED
            return False
        with self.lifecycle():
            self.state = VMState.STOPPING
            pid = self.sd.read_pid()
            killed = False
            try:
                if self._is_ours(pid):
                    log.debug("stopping %s: polite quit of QEMU %d", self.name, pid)
                    guest = self._running
                    polite_quit(guest.ssh if guest else None,
                                guest.take_qmp() if guest else QMPChannel(self.sd.qmp_socket), timeout)
                    process.wait_gone(pid, timeout)
                    log.debug("QEMU %d gone", pid)
            finally:
                killed = self.kill()
                self.close_channels()
                self.sd.record_stopped()
                self.sd.clear_sockets()
                self.state = VMState.STOPPED
            if killed:
                log.warning("QEMU of %s did not quit politely within %.0f s and was killed", self.name, timeout)
            return killed

    def reset(self, pmem: bool = False, timeout: float = 30.0) -> VM:
        """Back to the prepared state: this guest is discarded and a new one is
        restored from the warm-start snapshot (a cold boot if ``warm=False``).
        The persistent memory is *kept*; ``pmem=True`` erases it as well."""
        with self.lifecycle():     # one lifecycle change: no other process slips in between
            self.stop(timeout=min(5.0, timeout))
            if pmem:
                self.erase_pmem()
            return self.start()

    def erase_pmem(self) -> None:
        """Zero the VM's persistent memory (only while stopped; explicit only)."""
        if self.status() is not VMState.STOPPED and self.qemu_alive():
            raise StateError(self.status(), "stopped", self.name)
        disks.erase_pmem(self.sd)

    def kill(self) -> bool:
        """Hard stop of whatever QEMU is this VM's; True if one was killed."""
        if self._running is not None:
            return self._running.kill()
        return kill_qemu(self.sd, None)

    def mark_dead(self) -> None:
        self.state = VMState.DEAD
        try:
            self.close_channels()
        except Exception:   # noqa: BLE001 - closing sockets of a dead QEMU must not hide why it died
            pass

    def close_channels(self) -> None:
        if self._running is not None:
            self._running.close()

    def close(self) -> None:
        """Drop this process's connections; a persistent VM keeps running."""
        self.close_channels()

    def delete(self) -> None:
        """Stop and erase the VM's state dir (disk overlay *and* pmem files)."""
        self.stop()
        shutil.rmtree(self.sd.path, ignore_errors=True)

    # -- context manager ---------------------------------------------------------
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
            on_console_line: Callable[[str], None] | None = None, settings: Settings | None = None) -> VM:
    """The lab VM for a notebook: attach to it if it runs (a kernel restart
    does not lose the guest), else start it as a persistent VM. ``name``
    defaults to the settings' ``vm_name`` (``LABKIT_VM``); ``labkit.connect``
    is an edge, so settings not given are resolved here."""
    settings = resolve(settings)
    name = name or settings.vm_name
    vm = VM(name, kernel=kernel, persistent=True, on_console_line=on_console_line, settings=settings)
    if vm.status() is VMState.RUNNING:
        return VM.attach(name, settings=settings)
    vm.start()
    return vm
