"""Filesystems and DAX mounts on the persistent memory: mkfs, mount (with the
kernel log it caused and the statx DAX state of a new file), umount, and where
a path really lives (/proc/self/mountinfo, read in the guest by the helper)."""

from __future__ import annotations

import logging

from labkit.command import CommandResult
from labkit.errors import ConfigError
from labkit.lab.guest.vocab import FILESYSTEMS, fsdax_kind, mountpoint_for
from labkit.lab.helper import GuestHelper, answer
from labkit.lab.pmem import Pmem
from labkit.lab.protocols import Machine
from labkit.lab.results import MountInfo, MountResult
from labkit.lab.tracing import Tracer
from labkit.lab.validate import (
    check_block_size,
    check_device,
    check_mount_options,
    check_mountpoint,
    check_mountpoint_for,
    choose,
)

log = logging.getLogger(__name__)

EXPERIMENTAL = "DAX enabled. Warning: EXPERIMENTAL"


def explain_mount(log_lines: list[str]) -> str:
    """Turn the kernel's terse mount refusals into something a learner can act on."""
    text = "\n".join(log_lines)
    if "unsupported blocksize for DAX" in text or "blocksize" in text and "DAX" in text:
        return ("\n  explanation: ext4 chose a block size other than the page size (mkfs.ext4 picks 1 KiB "
                "blocks on small devices); DAX needs 4 KiB blocks: mkfs.ext4 -b 4096")
    if "DAX unsupported by block device" in text:
        return ("\n  explanation: this block device cannot do DAX; on QEMU's NVDIMMs a 'raw' namespace has "
                "no DAX: convert it with ndctl create-namespace -m fsdax")
    return ""


# mkfs.xfs makes reflink filesystems by default, and an XFS that refuses DAX on
# them ("DAX and reflink cannot be used together!", measured on 5.10; the test was
# relaxed in the v6.0 cycle) fails the dax mount: older kernels get reflink=0.
# 6.1 is the first lab kernel measured to mount a reflink XFS with -o dax.
XFS_DAX_WITH_REFLINK = (6, 1)


def mkfs_argv(fs: str, device: str, block_size: int | None, reflink: bool = True) -> list[str]:
    """The mkfs command line (pure)."""
    if fs == "ext4":
        return ["mkfs.ext4", "-q", "-F", *(["-b", str(block_size)] if block_size else []), device]
    return ["mkfs.xfs", "-q", "-f", *([] if reflink else ["-m", "reflink=0"]), device]


class Mounts:
    """mkfs, mount and umount in one guest."""

    def __init__(self, vm: Machine, helper: GuestHelper, tracer: Tracer, pmem: Pmem) -> None:
        self.vm, self.helper, self.tracer, self.pmem = vm, helper, tracer, pmem

    def fs_type(self, device: str) -> str:
        """The filesystem on ``device`` per blkid ("" for none)."""
        return self.vm.run(["blkid", "-o", "value", "-s", "TYPE", check_device(device)]).stdout.strip()

    def mkfs(self, fs: str, device: str, block_size: int | None = 4096, force: bool = False) -> CommandResult:
        """Make a filesystem. Refuses to overwrite one that exists unless ``force``."""
        choose(fs, FILESYSTEMS, "filesystem")
        check_device(device)
        block_size = check_block_size(block_size)
        if not force:
            have = self.fs_type(device)
            if have:
                raise ConfigError(f"{device} already holds a {have} filesystem", hint="pass force=True to erase it")
        log.debug("mkfs %s on %s (block size %s)", fs, device, block_size)
        reflink = self.tracer.kernel_version() >= XFS_DAX_WITH_REFLINK
        return self.vm.run(mkfs_argv(fs, device, block_size, reflink=reflink), check=True)

    def mount(self, fs: str, device: str, mountpoint: str | None = None, options: str = "dax") -> MountResult:
        """Mount ``device`` (umounting whatever is on the mount point first) and
        report what the kernel did: the log lines, and whether DAX is active."""
        choose(fs, FILESYSTEMS, "filesystem")
        check_device(device)
        check_mount_options(options)
        mp = check_mountpoint_for(fs, check_mountpoint(mountpoint_for(fs) if mountpoint is None else mountpoint))
        log.debug("mount -t %s -o %s %s %s", fs, options, device, mp)
        obs = self.tracer.observe(self.helper.argv("mount", "--fs", fs, "--device", device, "--mountpoint", mp,
                                                   "--options", options))
        data = answer(obs.result, f"mounting {device} on {mp}")
        info = MountInfo.from_probe(data.get("mount") or {})
        ok = bool(data.get("ok"))
        return MountResult(fs=fs, device=device, mountpoint=mp, options=options, ok=ok,
                           dax_active=ok and info.dax_active,
                           experimental_warning=any(EXPERIMENTAL in ln for ln in obs.kernel_log),
                           kernel_log=obs.kernel_log,
                           error="" if ok else str(data.get("mount_error", "")).strip() + explain_mount(obs.kernel_log),
                           proc_mounts=info.proc_mounts)

    def info(self, path: str) -> MountInfo:
        """The mount that holds ``path`` (a mount point under /mnt) and its DAX state."""
        check_mountpoint(path)
        return MountInfo.from_probe(self.helper.call(["mountinfo", "--path", path], f"inspecting {path}"))

    def umount(self, mountpoint: str) -> None:
        check_mountpoint(mountpoint)
        log.debug("umount %s", mountpoint)
        self.vm.run(["umount", mountpoint])

    def other_mounts(self, device: str, mountpoint: str) -> list[tuple[str, str, str]]:
        """Other mounts of ``device`` under /mnt (a capstone's second mount, say):
        (mount point, filesystem, options as /proc/mounts shows them), innermost last."""
        text = self.vm.run(["cat", "/proc/mounts"], timeout=30).stdout
        out = []
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 4 and f[0] == device and f[1] != mountpoint:
                try:
                    check_mountpoint(f[1])      # only mount points the lab could have made (under /mnt)
                except ConfigError:
                    continue
                out.append((f[1], f[2], f[3]))
        return out

    def prepare(self, options: str = "dax") -> list[MountResult]:
        """Both fs-dax namespaces formatted (only if empty) and mounted with ``options``.
        Other mounts of the same device are taken down first and put back after: while
        one of them holds the filesystem, a new mount reuses its superblock and the
        kernel prints nothing (no EXPERIMENTAL warning to measure)."""
        check_mount_options(options)
        roles = self.pmem.prepare()
        results = []
        for fs in FILESYSTEMS:
            dev = f"/dev/{roles[fsdax_kind(fs)].blockdev}"
            if self.fs_type(dev) != fs:
                self.mkfs(fs, dev, force=True)
            mp = mountpoint_for(fs)
            others = self.other_mounts(dev, mp)
            for other_mp, _, _ in reversed(others):
                self.umount(other_mp)
            self.umount(mp)
            results.append(self.mount(fs, dev, options=options))
            for other_mp, other_fs, other_opts in others:
                back = self.vm.run(["mount", "-t", other_fs, "-o", other_opts, dev, other_mp], timeout=60)
                if back.rc != 0:
                    log.warning("could not put back %s on %s: %s", dev, other_mp, back.stderr.strip())
        return results
