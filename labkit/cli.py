"""labkit: see the kernel refuse long-term page pins on DAX, live.

    labkit doctor                       can this host run the lab?
    labkit image build|list             the guest images
    labkit vm start|stop|status|...     a persistent VM
    labkit run -- CMD ARGS...           one command in the guest
    labkit bench                        cold/warm start, reset, matrix, memory
    labkit lab                          JupyterLab on notebooks/ with the VM up
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from labkit.commands import classroom, course, lab, tools, vm
from labkit.commands import image as image_commands
from labkit.commands.common import err
from labkit.errors import LabError
from labkit.image import build as image  # noqa: F401  (the image layer, as tests reach it: cli.image)
from labkit.settings import Settings

EPILOG = "Environment: LABKIT_ACCEL=kvm|tcg forces the accelerator; LABKIT_STATE_DIR moves VM state; " \
         "LABKIT_CACHE_DIR moves the caches (warm-start snapshots); LABKIT_TCG_CACHE_MB=N sizes TCG's " \
         "translation cache (default 128 MiB; QEMU's own is 1024); " \
         "LABKIT_MIRROR / LABKIT_APT_SOURCES choose the Debian package source for image builds."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit", description=__doc__.split("\n\n")[0].strip(),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log each lifecycle step (start, boot phases, stop) to stderr")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    # the order of `labkit --help`
    for add in (tools.add_doctor, image_commands.add_image, vm.add_vm, vm.add_run, lab.add_matrix, tools.add_bench,
                course.add_check, course.add_source, course.add_course, classroom.add_class, lab.add_lab):
        add(sub)
    return p


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so `finally` blocks stop a throwaway
    # VM and remove its state (and key) instead of leaving them behind.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate_as_interrupt)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
        for noisy in ("paramiko", "qemu.qmp", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # the edge: the environment's LABKIT_* settings, read once, passed to every command
        return args.func(args, Settings.from_env(os.environ))
    except LabError as exc:
        err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:
        # `labkit vm status | head -1`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
