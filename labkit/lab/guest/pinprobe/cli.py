"""The helper's command line: one subcommand per probe, one JSON object out.

The subcommands are not listed here: each module registers its own
(``COMMANDS``, see ``registry``)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

from .common import SetupError, emit, fail
from .registry import commands


class JSONArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as the one JSON object (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(self.format_usage().rstrip(), file=sys.stderr)
        fail(f"{self.prog}: {message}", 2)


def build_parser() -> JSONArgumentParser:
    p = JSONArgumentParser(prog="pinprobe", description="try to pin user memory in the guest, and measure")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for command in commands():
        sp = sub.add_parser(command.name, help=command.help)
        command.arguments(sp)
        sp.set_defaults(func=command.run)
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
