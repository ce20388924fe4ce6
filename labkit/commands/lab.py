"""``labkit matrix`` (what the kernel allows, measured) and ``labkit lab``
(the lab VM and JupyterLab on the notebooks)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from labkit.commands.common import number, positive, progress_lines
from labkit.commands.vm import start_persistent, vm_for
from labkit.image import build as image
from labkit.lab.report import format_matrix
from labkit.machine import persistent
from labkit.settings import Settings


def cmd_matrix(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.tools import kernel_matrix
    if args.kernel != "all":
        m = one_matrix(args, settings, args.kernel, prefix="")
        print(json.dumps(m, indent=2) if args.json else format_matrix(m))
        return 0
    kernels = list(image.KERNELS)
    for k in kernels:        # build missing images one after the other, before any guest starts
        image.ensure_image(k, settings=settings)
    matrices = kernel_matrix.measure(kernels, lambda k: one_matrix(args, settings, k, prefix=f"[{k}] ", quiet=True),
                                     jobs=args.jobs)
    if args.json:
        print(json.dumps(kernel_matrix.as_json(matrices), indent=2))
    else:
        print(kernel_matrix.side_by_side(matrices))
    return 0


def one_matrix(args: argparse.Namespace, settings: Settings, kernel: str | None, prefix: str,
               quiet: bool = False) -> dict:
    """The matrix measured on ``kernel``'s guest (the running VM's, or a throwaway one)."""
    from labkit.lab import Lab
    say = progress_lines(args.json)
    if prefix:
        say(f"{prefix}starting the guest")
    vm = vm_for(args, settings, kernel, quiet=quiet)
    try:
        return Lab(vm).matrix(progress=lambda s: say(prefix + s)).to_dict()
    finally:
        vm.finish()


def cmd_lab(args: argparse.Namespace, settings: Settings) -> int:
    got = start_persistent(args.name, args.kernel, settings, quiet=False,
                           announce=f"Starting the lab VM {args.name!r} (kernel {args.kernel}) ...")
    if got.started:
        print(f"VM running: {persistent.start_report(got.vm)}", file=sys.stderr)
        got.vm.close()
    else:
        print(f"VM {args.name!r} already running.", file=sys.stderr)
    argv = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={settings.notebooks_dir}",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={args.port}"]
    if args.no_browser:
        argv.append("--no-browser")
    if os.geteuid() == 0:      # containers and CI machines run as root; Jupyter refuses that by default
        argv.append("--allow-root")
    env = dict(os.environ, LABKIT_VM=args.name)     # the notebooks' labkit.connect() finds this VM
    print("Starting JupyterLab on 127.0.0.1 (token-protected; the URL is printed below). "
          "Ctrl-C stops JupyterLab; the VM keeps running (`labkit vm stop` stops it).", file=sys.stderr)
    return subprocess.call(argv, env=env)


def add_matrix(sub: Any) -> None:
    mx = sub.add_parser("matrix", help="measure every DAX mount and pin mechanism x memory kind")
    mx.add_argument("--kernel", choices=list(image.KERNELS) + ["all"], default=None,
                    help=f"kernel variant, or all of them side by side with the differences marked "
                         f"(default: the running VM's, else {image.DEFAULT_KERNEL})")
    mx.add_argument("--jobs", type=positive(int), default=2, help="with --kernel all: guests at a time (default 2)")
    mx.add_argument("--name", default="default", help="use this persistent VM if it is running")
    mx.add_argument("--json", action="store_true", help="machine-readable output")
    mx.add_argument("--quiet", action="store_true", help="no boot progress")
    mx.set_defaults(func=cmd_matrix)


def add_lab(sub: Any) -> None:
    lab = sub.add_parser("lab", help="start the VM and JupyterLab on notebooks/")
    lab.add_argument("--name", default="default")
    lab.add_argument("--kernel", choices=list(image.KERNELS), default=image.DEFAULT_KERNEL)
    lab.add_argument("--port", type=number(int, 1024, 65535, flag="port", what="a port number"), default=8888)
    lab.add_argument("--no-browser", action="store_true")
    lab.set_defaults(func=cmd_lab)
