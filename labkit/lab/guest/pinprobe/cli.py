"""The helper's command line: one subcommand per probe, one JSON object out."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, NoReturn

from ..vocab import FILESYSTEMS, MAPPINGS
from .batch import cmd_batch
from .buffer import MEMORY_KINDS
from .common import DEFAULT_SIZE, SetupError, emit, fail
from .io_uring import cmd_io_uring
from .learner_buffer import cmd_learner_buffer
from .learner_hold import cmd_learner_hold
from .measure import read_foll_pins, read_vmpin_kb
from .odirect import cmd_odirect
from .odp_revoke import cmd_odp_revoke
from .rdma import cmd_rdma
from .rdma_odp import cmd_rdma_odp
from .target import cmd_mount, cmd_mountinfo
from .truncate import cmd_truncate_wait
from .v4l2 import cmd_v4l2


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    pid = args.pid if args.pid is not None else os.getpid()
    return {"pid": pid, "alive": os.path.exists(f"/proc/{pid}"), "vmpin_kb": read_vmpin_kb(pid),
            **read_foll_pins()}


class JSONArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as the one JSON object (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(self.format_usage().rstrip(), file=sys.stderr)
        fail(f"{self.prog}: {message}", 2)


def _size(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer byte count: {text!r}") from None


def _dax_target_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dax-fs", choices=FILESYSTEMS, default=None,
                    help="refuse unless the file is on a DAX-active mount of this filesystem")
    sp.add_argument("--dax-device", default=None, help="... mounted from this device")


def _memory_args(sp: argparse.ArgumentParser, size: bool = True) -> None:
    sp.add_argument("--memory", choices=MEMORY_KINDS, default="anon",
                    help="anon, file (page cache or fs-dax, via --path) or devdax")
    sp.add_argument("--path", help="file for --memory file, /dev/daxX.Y for devdax")
    sp.add_argument("--mapping", choices=MAPPINGS, default="shared")
    _dax_target_args(sp)
    if size:
        sp.add_argument("--size", type=_size, default=DEFAULT_SIZE,
                        help="buffer bytes, multiple of 4096 (default 2 MiB)")


def _add_pinners(sub: Any) -> None:
    sp = sub.add_parser("rdma", help="ibv_reg_mr via pyverbs")
    _memory_args(sp)
    sp.add_argument("--device", help="RDMA device (default: first, e.g. rxe0)")
    sp.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the MR; -1 = print, then hold until stdin EOF/SIGTERM")
    sp.set_defaults(func=cmd_rdma)
    sp = sub.add_parser("rdma-odp", help="ibv_reg_mr with IBV_ACCESS_ON_DEMAND (no pin)")
    _memory_args(sp)
    sp.add_argument("--device", help="RDMA device (default: first, e.g. rxe0)")
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the MR")
    sp.set_defaults(func=cmd_rdma_odp)
    sp = sub.add_parser("v4l2", help="V4L2 USERPTR QBUF on vivid")
    _memory_args(sp, size=False)
    sp.add_argument("--device", help="/dev/videoN (default: first vivid capture node)")
    sp.add_argument("--size", type=_size, default=None, help="ignored: sizeimage decides")
    sp.add_argument("--stream", type=int, default=0, metavar="N", help="capture N frames into the pinned buffers")
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the buffer queued")
    sp.set_defaults(func=cmd_v4l2)
    sp = sub.add_parser("odirect", help="O_DIRECT read into the buffer (transient pin)")
    _memory_args(sp)
    sp.add_argument("--target", required=True, help="regular file on a non-DAX fs to read")
    sp.set_defaults(func=cmd_odirect)
    sp = sub.add_parser("io_uring", help="IORING_REGISTER_BUFFERS")
    _memory_args(sp)
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the registration")
    sp.set_defaults(func=cmd_io_uring)


def _add_others(sub: Any) -> None:
    sp = sub.add_parser("truncate-wait", help="truncate vs. DAX pages referenced by a pipe")
    sp.add_argument("--path", required=True, help="file to create (on an fs-dax mount)")
    _dax_target_args(sp)
    sp.add_argument("--size", type=_size, default=DEFAULT_SIZE)
    sp.add_argument("--pages", type=int, default=4, help="pages to vmsplice (1..16)")
    sp.add_argument("--hold", type=float, default=3.0, help="seconds before draining the pipe")
    sp.add_argument("--timeout", type=float, default=20.0,
                    help="max seconds to wait for the truncate after the release")
    sp.set_defaults(func=cmd_truncate_wait)
    sp = sub.add_parser("odp-revoke", help="register, RDMA, revoke the memory (truncate...), RDMA again")
    _memory_args(sp)
    sp.add_argument("--kind", choices=("odp", "pinned"), default="odp", help="on-demand or pinned MR")
    sp.add_argument("--op", choices=("write", "read"), default="write", help="the RDMA operation")
    sp.add_argument("--device", help="RDMA device (default: first, e.g. rxe0)")
    sp.add_argument("--trace-event", default=None, help="kprobe event on the invalidation callback to count")
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for the revocation")
    sp.set_defaults(func=cmd_odp_revoke)
    sp = sub.add_parser("learner-buffer", help="run a learner's buffer(path, size) (source on stdin), register it")
    sp.add_argument("--path", required=True, help="the file buffer() is to map (created, every page written)")
    _dax_target_args(sp)
    sp.add_argument("--size", type=_size, default=DEFAULT_SIZE)
    sp.add_argument("--device", help="RDMA device (default: first, e.g. rxe0)")
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for the learner's code")
    sp.set_defaults(func=cmd_learner_buffer)
    sp = sub.add_parser("learner-hold", help="run a learner's hold(m) (source on stdin) on a shared mapping of "
                        "an fs-dax file; truncate the file; call the release function hold returned")
    sp.add_argument("--path", required=True, help="the file to map and truncate (created, every page written)")
    _dax_target_args(sp)
    sp.add_argument("--size", type=_size, default=DEFAULT_SIZE)
    sp.add_argument("--timeout", type=float, default=20.0, help="max seconds for each call of the learner's code")
    sp.add_argument("--hold", type=float, default=2.0, help="seconds the truncate runs before the release")
    sp.add_argument("--after", type=float, default=10.0, help="max seconds the truncate may take after the release")
    sp.set_defaults(func=cmd_learner_hold)
    sp = sub.add_parser("status", help="VmPin of --pid and the FOLL_PIN counters")
    sp.add_argument("--pid", type=int, default=None, help="default: this process")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("mount", help="mount a filesystem; report the mount and its DAX state")
    sp.add_argument("--fs", choices=FILESYSTEMS, required=True)
    sp.add_argument("--device", required=True)
    sp.add_argument("--mountpoint", required=True)
    sp.add_argument("--options", default="dax")
    sp.set_defaults(func=cmd_mount)
    sp = sub.add_parser("mountinfo", help="the mount holding --path, and its DAX state")
    sp.add_argument("--path", required=True)
    sp.set_defaults(func=cmd_mountinfo)
    sp = sub.add_parser("batch", help="run many probes (JSON lines of argv lists on stdin), each observed")
    sp.add_argument("--case-timeout", type=float, default=60.0)
    sp.set_defaults(func=cmd_batch)


def build_parser() -> JSONArgumentParser:
    p = JSONArgumentParser(prog="pinprobe", description="try to pin user memory in the guest, and measure")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    _add_pinners(sub)
    _add_others(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except SetupError as e:
        fail(str(e), 2, command=args.command)
    except Exception as e:  # noqa: BLE001  (a bug in the probe, not a kernel answer: reported as JSON)
        traceback.print_exc()
        fail(f"internal error: {type(e).__name__}: {e}", 1, command=args.command)
    if result:
        result.setdefault("kernel", os.uname().release)
        emit(result)
    return 0
