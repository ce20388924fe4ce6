"""Starting a VM: choose a warm start (restore the prepared guest from its
snapshot) or a cold boot, spawn QEMU, follow the boot, connect SSH.

``Starter`` works on the VM facade's runtime fields (process, channels,
record); the VM only calls ``Starter(vm).run()`` under its lifecycle lock.
A start records ``state="starting"`` with the starter's PID until the very
end, so an interrupted start is never mistaken for a running guest.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from labkit.errors import ChannelError, GuestPanic, GuestTimeout, HostKeyMismatch, LaunchError, StateError
from labkit.image import ensure_image
from labkit.machine import disks, snapshot, warm
from labkit.machine.accel import AccelChoice, choose_accel
from labkit.machine.argv import build_qemu_argv
from labkit.machine.channels.console import BootInfo, ConsoleChannel
from labkit.machine.channels.keys import ensure_client_key
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.config import VMConfig
from labkit.machine.process import free_port, is_qemu_of, spawn, start_time, terminate
from labkit.machine.state import VMState
from labkit.machine.statedir import VMInfo
from labkit.timeout import Deadline

if TYPE_CHECKING:
    from labkit.machine.vm import VM

log = logging.getLogger(__name__)

BOOT_TIMEOUT = {"tcg": 120.0, "kvm": 60.0}


class Starter:
    """One start of one VM."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.sd = vm.sd

    def run(self) -> None:
        """Reap what an earlier start left, launch, and record the VM running."""
        self.reap_stale()
        log.debug("starting %s (%s, warm=%s)", self.vm.name, self.vm.kernel, self.vm.warm)
        self.launch()
        info = self.vm.info
        assert info is not None
        info.state, info.starter_pid = "running", 0
        info.save(self.sd.info)
        log.debug("%s running (%s start, %.2f s)", self.vm.name, info.start_kind, info.boot_seconds)

    def reap_stale(self) -> None:
        """Kill a QEMU of this VM left behind by a crashed owner; clear stale files."""
        info = self.sd.load_info()
        if terminate([self.sd.read_pid(), info.pid if info else 0],
                     lambda pid: is_qemu_of(pid, self.sd.pidfile), grace=0.5):
            log.debug("reaped a stale QEMU of %s", self.vm.name)
        self.sd.clear_sockets()
        self.sd.keep_last_console_log()

    def launch(self) -> None:
        vm = self.vm
        self.sd.create()
        # A kernel whose image was never built is built now, with progress
        # (settings.auto_build false, LABKIT_AUTO_BUILD=0, refuses, as the test suite does).
        vm.image = ensure_image(vm.kernel, settings=vm.settings, progress=vm.progress if vm.on_console_line else None)
        vm.accel = AccelChoice(vm.accel_forced, "requested") if vm.accel_forced else choose_accel(vm.settings)
        info = self.sd.load_info() or VMInfo(vm.name, vm.kernel)
        if info.kernel != vm.kernel and self.sd.overlay.exists():
            info.base_sha256 = ""      # another kernel's image: start the disk afresh
        info.kernel, info.persistent = vm.kernel, vm.persistent
        info.nvdimm_mb = disks.prepare_pmem(self.sd, vm.nvdimms)
        pubkey = ensure_client_key(self.sd.key)
        timeout = vm.boot_timeout or BOOT_TIMEOUT[vm.accel.accel]
        if vm.warm and warm.try_warm_start(self, info, pubkey, timeout):
            return
        self.cold(info, pubkey, timeout)

    # -- QEMU ------------------------------------------------------------------
    def config(self, info: VMInfo, pubkey: str, **kw: object) -> VMConfig:
        vm = self.vm
        assert vm.image is not None and vm.accel is not None
        return VMConfig(name=vm.name, state_dir=self.sd.path, kernel_image=vm.image.boot_kernel,
                        initrd=vm.image.initrd, accel=vm.accel.accel, memory_mb=vm.memory_mb,
                        smp=vm.smp, nvdimms=vm.nvdimms, ssh_port=free_port(), ssh_pubkey=pubkey,
                        tcg_cache_mb=vm.tcg_cache_mb if vm.accel.accel == "tcg" else None,
                        free_page_reporting=vm.settings.free_page_reporting,
                        **kw)  # type: ignore[arg-type]

    def spawn_retrying(self, info: VMInfo, pubkey: str, timeout: float, **kw: object) -> VMConfig:
        """Start QEMU; a new port if the forwarded one was taken between probe and bind."""
        last_error: LaunchError | None = None
        for _attempt in range(3):
            cfg = self.config(info, pubkey, **kw)
            try:
                self.spawn(cfg, info, timeout)
                return cfg
            except LaunchError as exc:
                if "host forwarding" not in exc.output:
                    raise
                log.debug("SSH port %d taken; retrying with another", cfg.ssh_port)
                self.vm.kill()
                last_error = exc
        raise last_error or LaunchError("could not start QEMU")

    def spawn(self, cfg: VMConfig, info: VMInfo, timeout: float) -> None:
        """Start QEMU, record it as *starting*, wait until its console socket exists."""
        vm = self.vm
        assert vm.accel is not None
        argv = build_qemu_argv(cfg)
        self.sd.clear_sockets()
        self.sd.console_log.write_bytes(b"")
        vm.proc = proc = spawn(argv, self.sd.qemu_log, die_with_parent=not vm.persistent,
                               owner_pid=vm.settings.lifetime_pid)
        info.pid, info.qemu_started = proc.pid, start_time(proc.pid)
        info.starter_pid, info.state = os.getpid(), "starting"
        info.started_at = time.time()
        info.ssh_port = cfg.ssh_port
        info.accel, info.accel_reason = vm.accel.accel, vm.accel.reason
        info.qemu_argv = argv
        info.save(self.sd.info)
        vm.info = info
        deadline = Deadline(timeout)
        while not cfg.console_socket.exists():
            if proc.poll() is not None:
                raise LaunchError("QEMU exited during start-up", argv, proc.returncode,
                                  self.sd.qemu_log.read_text(errors="replace"))
            if deadline.expired:
                raise GuestTimeout("QEMU to create its console socket", timeout)
            time.sleep(0.01)
        log.debug("QEMU %d up (console socket after %.2f s)", proc.pid, deadline.elapsed)

    # -- cold boot -----------------------------------------------------------------
    def cold(self, info: VMInfo, pubkey: str, timeout: float, cmdline_extra: tuple[str, ...] = ()) -> VMConfig:
        """Boot the kernel from scratch; return when SSH works."""
        vm = self.vm
        assert vm.image is not None
        disks.prepare_root(self.sd, info, vm.image.root, vm.image.manifest["artifacts"]["root.ext4"]["sha256"])
        pinned = info.host_key
        for attempt in (1, 2):
            cfg = self.spawn_retrying(info, pubkey, timeout, cmdline_extra=cmdline_extra)
            try:
                self.wait_console_boot(cfg, info, timeout)
                break
            except GuestPanic as exc:
                if attempt == 2 or not tcg_code_patching_oops(cfg.accel, exc.console_tail):
                    raise
                # Multi-threaded TCG occasionally lets a vCPU run a stale
                # translation of kernel text that another vCPU is live-patching
                # (text_poke's int3); the kernel then dies in early boot. It is
                # QEMU's emulation, not the guest kernel: boot once more.
                vm.progress("labkit: the guest kernel stopped on an int3 while patching its own code under "
                            "TCG emulation (a known emulation race, not a kernel bug); booting again")
                log.warning("%s: TCG code-patching oops during boot; booting again", vm.name)
                vm.kill()
        assert vm.boot is not None
        if pinned and vm.boot.host_key and list(vm.boot.host_key) != pinned:
            raise HostKeyMismatch(" ".join(pinned), " ".join(vm.boot.host_key))
        host_key = tuple(pinned) if pinned else vm.boot.host_key
        if not host_key:
            raise LaunchError("the guest did not announce its SSH host key on the console",
                              output=self.sd.console_tail())
        info.host_key = list(host_key)
        t_ssh = time.time()
        vm.ssh_channel = SSHChannel(cfg.ssh_port, self.sd.key, (host_key[0], host_key[1])).connect(
            timeout=max(5.0, timeout - (time.time() - info.started_at)))
        info.phases = {"boot to ready marker": round(t_ssh - info.started_at, 3),
                       "ssh connect": round(time.time() - t_ssh, 3)}
        self.booted(info, "cold", "")
        return cfg

    def wait_console_boot(self, cfg: VMConfig, info: VMInfo, timeout: float) -> None:
        """Follow a cold boot on the console up to the init's readiness marker."""
        vm = self.vm
        assert vm.proc is not None
        deadline = Deadline(max(1.0, timeout - (time.time() - info.started_at)))
        console = ConsoleChannel(cfg.console_socket).connect(timeout=5)
        try:
            vm.boot = console.wait_boot(deadline.remaining, on_line=vm.on_console_line)
        except LaunchError as exc:
            vm.proc.poll()
            raise LaunchError(str(exc).split("\n")[0], info.qemu_argv, vm.proc.returncode,
                              self.sd.qemu_log.read_text(errors="replace") + "\n" + exc.output) from exc
        finally:
            console.close()
        info.kernel_release = vm.boot.kernel_release
        info.guest_uptime_s = vm.boot.guest_uptime_s
        log.debug("%s booted %s in %.1f s", vm.name, info.kernel_release, time.time() - info.started_at)

    def booted(self, info: VMInfo, kind: str, snap_key: str) -> None:
        """Record how the guest came up; it is not *running* until the VM says so."""
        info.boot_seconds = round(time.time() - info.started_at, 2)
        info.start_kind, info.snapshot = kind, snap_key
        info.save(self.sd.info)
        self.vm.info = info

    def fail_snapshot(self, snap: snapshot.Snapshot, exc: Exception) -> None:
        """A snapshot that does not come back is thrown away, never retried."""
        self.vm.kill()
        self.vm.close_channels()
        snapshot.discard(snap.path)
        log.debug("snapshot %s discarded: %s", snap.path, exc)



def tcg_code_patching_oops(accel: str, console: str) -> bool:
    """Did a boot under TCG die on a stray int3 (a vCPU running kernel text
    another vCPU was live-patching)? Only that panic is worth a second boot."""
    return accel == "tcg" and "Oops: int3" in console


def attach_running(vm: VM, timeout: float) -> None:
    """Make ``vm`` (a fresh object) the handle of its running guest: read its
    record, check its key, connect SSH; StateError if it is not ready."""
    st = vm.status()
    if st is VMState.INCOMPLETE:
        raise StateError("incomplete (the start that launched it was interrupted, so its guest is not ready)",
                         "running", vm.name).with_hint(
            f"`labkit vm start --name {vm.name}` discards it and starts the VM again (pmem is kept)")
    info = vm.sd.load_info()
    if st is not VMState.RUNNING or info is None:
        raise StateError(st, "running", vm.name)
    if not vm.sd.key.exists():
        raise StateError("missing its SSH key", "running with its key", vm.name).with_hint(
            f"{vm.sd.key} was removed; `labkit vm reset --name {vm.name}` makes a new one")
    vm.info, vm.kernel = info, info.kernel
    vm.accel = AccelChoice(info.accel, info.accel_reason)
    host_key = (info.host_key[0], info.host_key[1])
    vm.boot = BootInfo(info.kernel_release, info.guest_uptime_s, host_key)
    vm.state = VMState.RUNNING
    try:
        vm.ssh_channel = SSHChannel(info.ssh_port, vm.sd.key, host_key).connect(timeout=timeout)
    except (ChannelError, GuestTimeout) as exc:
        vm.watch.explain(exc)      # paused, dead or starved: say that instead of "timed out"
        raise
