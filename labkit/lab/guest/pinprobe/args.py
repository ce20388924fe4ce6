"""Option groups several subcommands share: the buffer to pin (``--memory``,
``--path``, ``--mapping``, ``--size``) and the DAX mount a file must be on."""

from __future__ import annotations

import argparse

from ..vocab import FILESYSTEMS, MAPPINGS
from .buffer import BUFFER_KINDS
from .common import DEFAULT_SIZE


def byte_size(text: str) -> int:
    """An argparse type: a byte count (decimal or 0x...)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer byte count: {text!r}") from None


def dax_target_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dax-fs", choices=FILESYSTEMS, default=None,
                    help="refuse unless the file is on a DAX-active mount of this filesystem")
    sp.add_argument("--dax-device", default=None, help="... mounted from this device")


def memory_args(sp: argparse.ArgumentParser, sized: bool = True) -> None:
    sp.add_argument("--memory", choices=BUFFER_KINDS, default="anon",
                    help="anon, file (page cache or fs-dax, via --path) or devdax")
    sp.add_argument("--path", help="file for --memory file, /dev/daxX.Y for devdax")
    sp.add_argument("--mapping", choices=MAPPINGS, default="shared")
    sp.add_argument("--touch", choices=("write", "none"), default="write",
                    help="write every page before pinning (default), or leave them untouched")
    dax_target_args(sp)
    if sized:
        sp.add_argument("--size", type=byte_size, default=DEFAULT_SIZE,
                        help="buffer bytes, multiple of 4096 (default 2 MiB)")


def rdma_device_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", help="RDMA device (default: first, e.g. rxe0)")
