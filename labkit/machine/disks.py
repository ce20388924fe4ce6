"""A VM's disks: the qcow2 root overlay over a read-only base, and the
NVDIMMs' backing files (persistent memory), which are created sparse, never
resized and erased only on an explicit request."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from labkit.errors import ConfigError, LaunchError
from labkit.machine.config import Nvdimm
from labkit.machine.statedir import StateDir, VMInfo

log = logging.getLogger(__name__)


def create_overlay(overlay: Path, backing: Path, backing_format: str) -> None:
    """A new qcow2 ``overlay`` over a read-only ``backing`` disk."""
    overlay.unlink(missing_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(overlay)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"qemu-img could not create the disk overlay: {exc}", argv) from exc
    if r.returncode != 0:
        raise LaunchError("qemu-img could not create the disk overlay", argv, r.returncode, r.stderr)
    log.debug("overlay %s over %s (%s)", overlay, backing, backing_format)


def prepare_root(sd: StateDir, info: VMInfo, base: Path, base_sha: str) -> None:
    """Keep the root overlay if it belongs to this base image, else start it
    afresh (a new base makes the old overlay meaningless; pmem files stay)."""
    if sd.overlay.exists() and info.base_sha256 == base_sha:
        return
    sd.overlay.unlink(missing_ok=True)
    (sd / "host_key").unlink(missing_ok=True)
    info.host_key = []
    create_overlay(sd.overlay, base, "raw")
    info.base_sha256 = base_sha


def prepare_pmem(sd: StateDir, nvdimms: Sequence[Nvdimm]) -> list[int]:
    """Create missing pmem files (sparse); never resize or erase existing ones.
    Returns the sizes in MiB."""
    for i, dimm in enumerate(nvdimms):
        f = sd.pmem(i)
        want = dimm.size_mb * 2**20
        if f.exists():
            have = f.stat().st_size
            if have != want:
                raise ConfigError(
                    f"{f} holds {have // 2**20} MiB of persistent memory, but this VM asks for {dimm.size_mb} MiB",
                    hint="use the same NVDIMM sizes as before, or `labkit vm delete` the VM (this erases its "
                         "pmem) and start it again")
            continue
        with open(f, "wb") as fh:
            fh.truncate(want)      # sparse: costs no disk until written
        f.chmod(0o600)
    return [d.size_mb for d in nvdimms]


def erase_pmem(sd: StateDir) -> None:
    """Zero every pmem file of the VM (the caller makes sure it is stopped)."""
    for f in sd.pmem_files():
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(0)         # frees the blocks; the file stays sparse
            fh.truncate(size)
