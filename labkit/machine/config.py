"""The VM's configuration: a frozen value that fully determines QEMU's command
line (see ``labkit.machine.argv.build_qemu_argv``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from labkit.errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
ACCELS = ("kvm", "tcg")


def check_name(name: str) -> str:
    """VM names become directory names and QEMU ids: keep them boring."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):   # fullmatch: no trailing newline
        raise ConfigError(f"invalid VM name {name!r}",
                          hint="use 1-32 characters: lower-case letters, digits, '-' and '_', "
                               "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Nvdimm:
    """One emulated NVDIMM backed by a (sparse) file in the VM's state dir."""

    size_mb: int = 512
    align_mb: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.size_mb, int) or self.size_mb < 128 or self.size_mb > 65536:
            raise ConfigError(f"NVDIMM size {self.size_mb!r} MiB is out of range",
                              hint="use 128..65536 MiB (XFS needs at least 300 MiB)")
        if self.size_mb % self.align_mb:
            raise ConfigError(f"NVDIMM size {self.size_mb} MiB is not a multiple of the "
                              f"{self.align_mb} MiB alignment")


@dataclass(frozen=True)
class VMConfig:
    """Everything QEMU needs to start one lab guest."""

    name: str
    state_dir: Path
    kernel_image: Path
    initrd: Path
    accel: str = "tcg"
    memory_mb: int = 1024
    slots: int = 4
    maxmem_gb: int = 8
    smp: int = 2
    nvdimms: tuple[Nvdimm, ...] = (Nvdimm(), Nvdimm(), Nvdimm())
    ssh_port: int = 0
    ssh_pubkey: str = ""
    qemu_binary: str = "qemu-system-x86_64"
    tcg_cache_mb: int | None = None      # TCG translation cache; None: QEMU's default
    # virtio-balloon with free page reporting: guest RAM the guest frees goes
    # back to the host (per-learner memory on a class host, see docs/performance.md)
    free_page_reporting: bool = True
    cmdline_extra: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.accel not in ACCELS:
            raise ConfigError(f"unknown accelerator {self.accel!r}", hint="use kvm or tcg")
        if not 256 <= self.memory_mb <= 65536:
            raise ConfigError(f"guest memory {self.memory_mb} MiB is out of range", hint="use 256..65536")
        if not 1 <= self.smp <= 64:
            raise ConfigError(f"CPU count {self.smp} is out of range", hint="use 1..64")
        if not 1 <= len(self.nvdimms) <= self.slots:
            raise ConfigError(f"{len(self.nvdimms)} NVDIMMs do not fit in {self.slots} memory slots")
        total_mb = self.memory_mb + sum(d.size_mb for d in self.nvdimms)
        if total_mb > self.maxmem_gb * 1024:
            raise ConfigError(f"RAM plus NVDIMMs ({total_mb} MiB) exceed maxmem ({self.maxmem_gb} GiB)")
        if self.tcg_cache_mb is not None and not 16 <= self.tcg_cache_mb <= 4096:
            raise ConfigError(f"TCG translation cache {self.tcg_cache_mb} MiB is out of range", hint="use 16..4096")
        if not 0 <= self.ssh_port <= 65535:
            raise ConfigError(f"SSH port {self.ssh_port} is out of range")

    @property
    def root_overlay(self) -> Path:
        return self.state_dir / "root.qcow2"

    def pmem_file(self, index: int) -> Path:
        return self.state_dir / f"pmem{index}.img"

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def watch_socket(self) -> Path:
        return self.state_dir / "watch.sock"

    @property
    def console_socket(self) -> Path:
        return self.state_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "qemu.pid"

    def with_(self, **changes) -> VMConfig:
        return replace(self, **changes)


def check_sizes(memory_mb: object, nvdimms: Sequence[object]) -> tuple[Nvdimm, ...]:
    if not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or not 256 <= memory_mb <= 65536:
        raise ConfigError(f"guest memory {memory_mb!r} MiB is out of range", hint="use 256..65536")
    if any(not isinstance(n, int) or isinstance(n, bool) for n in nvdimms):
        raise ConfigError(f"NVDIMM sizes {nvdimms!r} must be whole MiB", hint="e.g. nvdimms=(512, 512, 512)")
    return tuple(Nvdimm(n) for n in nvdimms)  # type: ignore[arg-type]
