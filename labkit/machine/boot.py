"""Bringing up one QEMU: spawn it, follow a cold boot on the console,
connect SSH — and hand the result over whole as a ``Running``.

A ``Launch`` is one start in progress. It owns the QEMU it spawned, the
record it writes (``state="starting"`` with the starter's PID until the very
end, so an interrupted start is never mistaken for a running guest), what
the boot announced and the SSH channel, until ``running()`` hands them over
or ``abort()`` kills the QEMU. The warm start (``warm``) uses the same
Launch; the choice between them is ``start``'s. Nothing here knows the ``VM``
facade.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from labkit.errors import GuestPanic, GuestTimeout, HostKeyMismatch, LaunchError
from labkit.image import Image
from labkit.machine import disks
from labkit.machine.accel import AccelChoice
from labkit.machine.argv import build_qemu_argv
from labkit.machine.channels.console import BootInfo, ConsoleChannel
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.config import Nvdimm, VMConfig
from labkit.machine.process import forward_taken, free_port, listens_on, spawn, start_time
from labkit.machine.running import Running, kill_qemu
from labkit.machine.state import VMState
from labkit.machine.statedir import StateDir, VMInfo
from labkit.settings import Settings
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

# Ports tried per start before giving up: a port is taken between probe and
# bind only by a race (or by someone doing it on purpose, who cannot guess the
# next random one), so a few are plenty.
PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class StartSpec:
    """What to start: the facade's settings, copied once per start."""

    name: str
    kernel: str
    sd: StateDir
    persistent: bool
    memory_mb: int
    smp: int
    nvdimms: tuple[Nvdimm, ...]
    settings: Settings               # resolved once, at the edge that made the VM
    accel_forced: str | None = None
    boot_timeout: float | None = None
    warm: bool = True
    tcg_cache_mb: int | None = None
    on_console_line: Callable[[str], None] | None = None

    def progress(self, line: str) -> None:
        if self.on_console_line:
            self.on_console_line(line)


class Launch:
    """One start of one VM in progress (see the module's docstring)."""

    def __init__(self, spec: StartSpec, image: Image, accel: AccelChoice, info: VMInfo) -> None:
        self.spec, self.sd = spec, spec.sd
        self.image, self.accel, self.info = image, accel, info
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot: BootInfo | None = None
        self.ssh: SSHChannel | None = None

    def running(self) -> Running:
        """The guest this launch brought up, handed over whole."""
        assert self.boot is not None and self.ssh is not None, "running() before the guest came up"
        return Running(self.sd, self.info, self.boot, self.accel, self.ssh, self.proc, self.image)

    def kill(self) -> bool:
        """Kill the QEMU this launch spawned (and any of this VM's by its pidfile)."""
        killed = kill_qemu(self.sd, self.proc)
        self.proc = None
        return killed

    def close_ssh(self) -> None:
        if self.ssh is not None:
            self.ssh.close()
        self.ssh = None

    def abort(self) -> None:
        """The start failed: nothing of it stays running."""
        self.kill()
        self.close_ssh()

    # -- QEMU ------------------------------------------------------------------
    def config(self, pubkey: str, **kw: object) -> VMConfig:
        spec = self.spec
        return VMConfig(name=spec.name, state_dir=self.sd.path, kernel_image=self.image.boot_kernel,
                        initrd=self.image.initrd, accel=self.accel.accel, memory_mb=spec.memory_mb,
                        smp=spec.smp, nvdimms=spec.nvdimms, ssh_port=free_port(), ssh_pubkey=pubkey,
                        tcg_cache_mb=spec.tcg_cache_mb if self.accel.accel == "tcg" else None,
                        free_page_reporting=self.spec.settings.free_page_reporting,
                        **kw)  # type: ignore[arg-type]

    def spawn_retrying(self, pubkey: str, timeout: float, **kw: object) -> VMConfig:
        """Start QEMU on a fresh SSH port; another one if the port was taken
        between ``free_port``'s probe and QEMU's bind (by chance, or by another
        user of this host binding it on purpose to make this guest fail). Used
        by the cold boot and the warm start alike; at most PORT_ATTEMPTS ports."""
        taken: list[int] = []
        for _attempt in range(PORT_ATTEMPTS):
            cfg = self.config(pubkey, **kw)
            try:
                self.spawn(cfg, timeout)
                return cfg
            except LaunchError as exc:
                if not forward_taken(exc.output):
                    raise
                self.kill()
                taken.append(cfg.ssh_port)
                log.info("%s: SSH port %d was taken before QEMU could bind it; trying another",
                         self.spec.name, cfg.ssh_port)
                self.spec.progress(f"labkit: the guest's SSH port {cfg.ssh_port} was taken by another process; "
                                   "trying another")
        raise LaunchError(f"QEMU could not bind its SSH port {PORT_ATTEMPTS} times in a row (ports "
                          f"{', '.join(map(str, taken))}): each was taken by another process between labkit "
                          "choosing it and QEMU binding it").with_hint(
            "another program (or user) on this host is taking loopback ports as they are freed; start the VM "
            "again, and if it keeps happening ask the host's administrator who is binding them "
            "(ss -ltnp 'sport >= 1024')")

    def spawn(self, cfg: VMConfig, timeout: float) -> None:
        """Start QEMU, record it as *starting*, wait until its console socket exists."""
        info = self.info
        argv = build_qemu_argv(cfg)
        self.sd.clear_sockets()
        self.sd.console_log.write_bytes(b"")
        self.proc = proc = spawn(argv, self.sd.qemu_log, die_with_parent=not self.spec.persistent,
                                 owner_pid=self.spec.settings.lifetime_pid)
        info.pid, info.qemu_started = proc.pid, start_time(proc.pid)
        info.starter_pid, info.lifecycle = os.getpid(), VMState.STARTING
        info.started_at = time.time()
        info.ssh_port = cfg.ssh_port
        info.accel, info.accel_reason = self.accel.accel, self.accel.reason
        info.qemu_argv = argv
        info.save(self.sd.info)
        deadline = Deadline(timeout)
        # Up once QEMU has its console socket *and* its SSH forward: it makes
        # the chardev sockets before the network, so a taken port shows only after.
        while not (cfg.console_socket.exists() and listens_on(proc.pid, cfg.ssh_port)):
            if proc.poll() is not None:
                raise LaunchError("QEMU exited during start-up", argv, proc.returncode,
                                  self.sd.qemu_log.read_text(errors="replace"))
            if deadline.expired:
                raise GuestTimeout("QEMU to create its console socket and SSH forward", timeout)
            time.sleep(0.01)
        log.debug("QEMU %d up (console socket and SSH forward after %.2f s)", proc.pid, deadline.elapsed)

    # -- cold boot -----------------------------------------------------------------
    def cold(self, pubkey: str, timeout: float, cmdline_extra: tuple[str, ...] = ()) -> VMConfig:
        """Boot the kernel from scratch; return when SSH works."""
        info = self.info
        disks.prepare_root(self.sd, info, self.image.root, self.image.manifest["artifacts"]["root.ext4"]["sha256"])
        pinned = info.host_key
        cfg = self.boot_console(pubkey, timeout, cmdline_extra)
        assert self.boot is not None
        if pinned and self.boot.host_key and list(self.boot.host_key) != pinned:
            raise HostKeyMismatch(" ".join(pinned), " ".join(self.boot.host_key))
        host_key = tuple(pinned) if pinned else self.boot.host_key
        if not host_key:
            raise LaunchError("the guest did not announce its SSH host key on the console",
                              output=self.sd.console_tail())
        info.host_key = list(host_key)
        t_ssh = time.time()
        self.ssh = SSHChannel(cfg.ssh_port, self.sd.key, (host_key[0], host_key[1])).connect(
            timeout=max(5.0, timeout - (time.time() - info.started_at)))
        info.phases = {"boot to ready marker": round(t_ssh - info.started_at, 3),
                       "ssh connect": round(time.time() - t_ssh, 3)}
        self.booted("cold", "")
        return cfg

    def boot_console(self, pubkey: str, timeout: float, cmdline_extra: tuple[str, ...]) -> VMConfig:
        """Spawn QEMU and follow the boot to the init's readiness marker; once
        more after a TCG code-patching oops (see ``tcg_code_patching_oops``)."""
        for attempt in (1, 2):
            cfg = self.spawn_retrying(pubkey, timeout, cmdline_extra=cmdline_extra)
            try:
                self.wait_console_boot(cfg, timeout)
                return cfg
            except GuestPanic as exc:
                if attempt == 2 or not tcg_code_patching_oops(cfg.accel, exc.console_tail):
                    raise
                # Multi-threaded TCG occasionally lets a vCPU run a stale
                # translation of kernel text that another vCPU is live-patching
                # (text_poke's int3); the kernel then dies in early boot. It is
                # QEMU's emulation, not the guest kernel: boot once more.
                self.spec.progress("labkit: the guest kernel stopped on an int3 while patching its own code "
                                   "under TCG emulation (a known emulation race, not a kernel bug); booting again")
                log.warning("%s: TCG code-patching oops during boot; booting again", self.spec.name)
                self.kill()
        raise AssertionError("unreachable: the second attempt returns or raises")

    def wait_console_boot(self, cfg: VMConfig, timeout: float) -> None:
        """Follow a cold boot on the console up to the init's readiness marker."""
        info, proc = self.info, self.proc
        assert proc is not None
        deadline = Deadline(max(1.0, timeout - (time.time() - info.started_at)))
        console = ConsoleChannel(cfg.console_socket).connect(timeout=5)
        try:
            self.boot = boot = console.wait_boot(deadline.remaining, on_line=self.spec.on_console_line)
        except LaunchError as exc:
            proc.poll()
            raise LaunchError(str(exc).split("\n")[0], info.qemu_argv, proc.returncode,
                              self.sd.qemu_log.read_text(errors="replace") + "\n" + exc.output) from exc
        finally:
            console.close()
        info.kernel_release = boot.kernel_release
        info.guest_uptime_s = boot.guest_uptime_s
        log.debug("%s booted %s in %.1f s", self.spec.name, info.kernel_release, time.time() - info.started_at)

    def booted(self, kind: str, snap_key: str) -> None:
        """Record how the guest came up; it is not *running* until the start says so."""
        info = self.info
        info.boot_seconds = round(time.time() - info.started_at, 2)
        info.start_kind, info.snapshot = kind, snap_key
        info.save(self.sd.info)


def tcg_code_patching_oops(accel: str, console: str) -> bool:
    """Did a boot under TCG die on a stray int3 (a vCPU running kernel text
    another vCPU was live-patching)? Only that panic is worth a second boot."""
    return accel == "tcg" and "Oops: int3" in console
