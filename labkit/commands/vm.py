"""``labkit vm ...`` (a persistent VM) and ``labkit run`` (one command in a guest)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from typing import Any

from labkit.commands.common import boot_progress, command_words, end_progress, err
from labkit.errors import ChannelError, GuestDied, GuestTimeout, StateError
from labkit.image import build as image
from labkit.machine import persistent
from labkit.machine.vm import VM, VMState
from labkit.settings import Settings

GUEST_FAILED = 125   # as `docker run`: labkit itself could not run the command to its end
STATUS_EXIT = {"running": 0, "stopped": 3, "dead": 4, "incomplete": 5, "starting": 6}


def start_persistent(name: str, kernel: str, settings: Settings, *, quiet: bool, warm: bool = True,
                     announce: str = "") -> persistent.Started:
    """Start the persistent VM unless it runs (``labkit vm start``, ``labkit
    lab``), with boot progress on stderr. Before a boot a missing image is
    built, its progress lines on stderr as they come (the boot's own progress
    is one line, rewritten in place), and ``announce`` is said."""
    def before_boot() -> None:
        image.ensure_image(kernel, settings=settings)
        if announce:
            print(announce, file=sys.stderr)
    try:
        got = persistent.start(name, kernel, settings, warm=warm, on_console_line=boot_progress(quiet),
                               before_boot=before_boot)
    except BaseException:
        end_progress(quiet)
        raise
    if got.started:
        end_progress(quiet)
    return got


def cmd_vm_start(args: argparse.Namespace, settings: Settings) -> int:
    got = start_persistent(args.name, args.kernel, settings, quiet=args.quiet, warm=not args.cold)
    if not got.started:
        d = got.vm.describe()
        print(f"VM {args.name!r} is already running ({d.get('kernel_release')}, {d.get('accel')})")
        return 0
    print(f"VM {args.name!r} running: {persistent.start_report(got.vm)}")
    got.vm.close()
    return 0


def cmd_vm_reset(args: argparse.Namespace, settings: Settings) -> int:
    if args.pmem and not args.yes:
        err("--pmem erases the VM's persistent memory (your files on the DAX mounts); add --yes to confirm")
        return 2
    got = persistent.for_reset(args.name, settings)
    if got is None:
        err(f"VM {args.name!r} does not exist; start it with `labkit vm start --name {args.name}`")
        return 2
    if got.note:
        err(got.note)
    t = time.monotonic()
    got.vm.reset(pmem=args.pmem)
    print(f"VM {args.name!r} reset in {time.monotonic() - t:.1f} s ({persistent.start_words(got.vm)}); "
          "persistent memory " + ("erased" if args.pmem else "kept"))
    got.vm.close()
    return 0


def cmd_vm_stop(args: argparse.Namespace, settings: Settings) -> int:
    vm = VM(args.name, persistent=True, settings=settings)
    st = vm.status()
    vm.stop()
    print(f"VM {args.name!r} stopped" + (" (it was not running)" if st is VMState.STOPPED else ""))
    return 0


def cmd_vm_delete(args: argparse.Namespace, settings: Settings) -> int:
    vm = VM(args.name, persistent=True, settings=settings)
    if not vm.state_dir.exists():
        print(f"VM {args.name!r} does not exist")
        return 0
    if not args.yes:
        err(f"this erases {vm.state_dir}, including the VM's persistent memory; add --yes to confirm")
        return 2
    vm.delete()
    print(f"VM {args.name!r} deleted")
    return 0


def _status_words(name: str, vm: VM) -> dict[str, str]:
    return {"running": "running", "stopped": "stopped",
            "dead": f"dead (QEMU exited without being stopped: crashed or killed; see {vm.console_log})",
            "incomplete": "incomplete (the start or reset that launched it was interrupted, so its "
                          f"guest is not ready; `labkit vm start --name {name}` discards it and "
                          "starts again, pmem kept)",
            "starting": "starting (another process is starting, stopping or resetting it)"}


def cmd_vm_status(args: argparse.Namespace, settings: Settings) -> int:
    vm = VM(args.name, persistent=True, settings=settings)
    d = vm.describe()
    if args.json:
        print(json.dumps(d, indent=2))
        return STATUS_EXIT.get(str(d["state"]), 1)
    st = d["state"]
    print(f"VM {args.name!r}: {_status_words(args.name, vm).get(st, st)}")
    if st == "running":
        print(f"  kernel {d.get('kernel_release')} ({d.get('kernel')}), accelerator {d.get('accel')} "
              f"({d.get('accel_reason')})")
        print(f"  SSH 127.0.0.1:{d.get('ssh_port')}, QEMU PID {d.get('pid')}, NVDIMMs "
              f"{', '.join(f'{n} MiB' for n in d.get('nvdimm_mb', []))}")
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in (d.get("phases") or {}).items())
        kind = "warm start from the snapshot" if d.get("start_kind") == "warm" else "cold boot"
        print(f"  {kind}, SSH-ready in {d.get('boot_seconds')} s" + (f" ({phases})" if phases else ""))
        if d.get("warm_error"):
            print(f"  (the warm start failed and it booted cold: {d['warm_error']})")
    print(f"  state dir {d['state_dir']}")
    return STATUS_EXIT.get(str(st), 1)


def cmd_vm_ssh(args: argparse.Namespace, settings: Settings) -> int:
    vm = VM.attach(args.name, settings=settings)
    try:
        cmd = command_words(args.command)
        if not cmd:   # interactive: use the system ssh client with the VM's pinned key
            return _interactive_ssh(vm)
        return guest_command(vm, cmd)
    finally:
        vm.close()


def guest_command(vm: VM, cmd: list[str]) -> int:
    """Run ``cmd`` with the terminal's stdin/stdout; the guest command's exit
    code, or GUEST_FAILED with the reason when the guest died or hung."""
    try:
        return vm.run_passthrough(cmd, stdin=sys.stdin.buffer)
    except (GuestDied, GuestTimeout, ChannelError) as exc:
        err(f"the command did not finish: {exc}")
        return GUEST_FAILED


def _interactive_ssh(vm: VM) -> int:
    if shutil.which("ssh") is None:
        raise StateError("no ssh client", "installed (apt-get install openssh-client)")
    kh = vm.state_dir / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{vm.record.ssh_port} {' '.join(vm.record.host_key)}\n")
    return subprocess.call(["ssh", "-i", str(vm.key_path), "-p", str(vm.record.ssh_port),
                            "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                            "-o", "IdentitiesOnly=yes", "root@127.0.0.1"])


def cmd_vm_console(args: argparse.Namespace, settings: Settings) -> int:
    vm = VM.attach(args.name, settings=settings)
    try:
        print("Serial console of the guest (Ctrl-] to leave). Press Enter for a prompt.", file=sys.stderr)
        with vm.console() as con:
            con.interact()
    finally:
        vm.close()
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    cmd = command_words(args.command)
    if not cmd:
        err(f"no command given; usage: labkit run [--kernel {'|'.join(image.KERNELS)}] -- CMD ARGS...")
        return 2
    vm = vm_for(args, settings)
    try:
        return guest_command(vm, cmd)
    finally:
        vm.finish()


def vm_for(args: argparse.Namespace, settings: Settings, kernel: str | None = None, quiet: bool = False) -> VM:
    """The running persistent VM if it has the requested kernel, else a throwaway one (booted;
    its image is built first if it never was)."""
    kernel = kernel or args.kernel
    existing = VM(args.name, persistent=True, settings=settings)
    if existing.status() is VMState.RUNNING and (kernel is None
                                                 or existing.describe().get("kernel") == kernel):
        return VM.attach(args.name, settings=settings)
    kernel = kernel or image.DEFAULT_KERNEL
    image.ensure_image(kernel, settings=settings)
    quiet = quiet or getattr(args, "quiet", False) or not sys.stderr.isatty()
    vm = VM(f"{args.cmd}-{kernel.replace('.', '-')}", kernel=kernel, on_console_line=boot_progress(quiet),
            settings=settings)
    try:
        vm.start()
    finally:
        end_progress(quiet)
    return vm


def add_vm(sub: Any) -> None:
    kernels = list(image.KERNELS)
    vm = sub.add_parser("vm", help="a persistent lab VM").add_subparsers(dest="sub", required=True,
                                                                        metavar="ACTION")

    def vm_cmd(name: str, func: Any, help: str, kernel: bool = False) -> argparse.ArgumentParser:
        sp = vm.add_parser(name, help=help)
        sp.add_argument("--name", default="default", help="VM name (default %(default)s)")
        if kernel:
            sp.add_argument("--kernel", choices=kernels, default=image.DEFAULT_KERNEL,
                            help="kernel variant (default %(default)s)")
        sp.set_defaults(func=func)
        return sp
    s = vm_cmd("start", cmd_vm_start, "boot the VM and leave it running", kernel=True)
    s.add_argument("--quiet", action="store_true", help="no boot progress")
    s.add_argument("--cold", action="store_true",
                   help="boot the kernel from scratch instead of restoring the warm-start snapshot")
    rs = vm_cmd("reset", cmd_vm_reset, "back to the prepared guest in about a second (pmem kept)")
    rs.add_argument("--pmem", action="store_true", help="also erase the persistent memory (needs --yes)")
    rs.add_argument("--yes", action="store_true", help="confirm erasing the persistent memory")
    vm_cmd("stop", cmd_vm_stop, "shut the VM down (polite, then forced)")
    st = vm_cmd("status", cmd_vm_status, "running, stopped, dead, incomplete or starting (exit 0, 3, 4, 5, 6)")
    st.add_argument("--json", action="store_true")
    vm_cmd("console", cmd_vm_console, "attach to the serial console (Ctrl-] leaves)")
    sh = vm_cmd("ssh", cmd_vm_ssh, "a shell, or with -- CMD one command (its exit code passed through; "
                                   f"{GUEST_FAILED} if the guest died or hung)")
    sh.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    de = vm_cmd("delete", cmd_vm_delete, "stop the VM and erase its state (disk and pmem)")
    de.add_argument("--yes", action="store_true", help="confirm erasing the VM's persistent memory")


def add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run one command in the guest (boots a throwaway VM if none is running)")
    r.add_argument("--kernel", choices=list(image.KERNELS), default=None,
                   help=f"kernel variant (default: the running VM's, else {image.DEFAULT_KERNEL})")
    r.add_argument("--name", default="default", help="use this persistent VM if it is running")
    r.add_argument("--quiet", action="store_true", help="no boot progress")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    r.set_defaults(func=cmd_run)
