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
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from labkit import paths
from labkit.errors import ChannelError, ConfigError, GuestDied, GuestTimeout, LabError, StateError
from labkit.image import build as image
from labkit.lab.report import format_matrix
from labkit.machine.vm import VM, VMState

EPILOG = "Environment: LABKIT_ACCEL=kvm|tcg forces the accelerator; LABKIT_STATE_DIR moves VM state; " \
         "LABKIT_CACHE_DIR moves the caches (warm-start snapshots); LABKIT_TCG_CACHE_MB=N sizes TCG's " \
         "translation cache (default 128 MiB; QEMU's own is 1024); " \
         "LABKIT_MIRROR / LABKIT_APT_SOURCES choose the Debian package source for image builds."


CHECK_EPILOG = """\
A notebook saved with outputs (run in JupyterLab) is graded from the answers recorded in
its outputs; it is never re-run or modified. A notebook without outputs is first executed
headless (nbclient) in memory against the running lab VM (LABKIT_VM, default 'default').
Checks compare answers with what the live guest does now.

exit status: 0 every check passed, 1 some check failed, 2 bad input or lab error"""


def _err(msg: str) -> None:
    print(f"labkit: {msg}", file=sys.stderr, flush=True)


def _boot_progress(quiet: bool = False):
    """A console-line callback that shows the learner the boot is moving."""
    start = time.monotonic()

    def show(line: str) -> None:
        if quiet:
            return
        text = line.strip()
        if len(text) > 90:
            text = text[:87] + "..."
        sys.stderr.write(f"\r\033[K  booting [{time.monotonic() - start:5.1f}s] {text}")
        sys.stderr.flush()
    return show


def _end_progress(quiet: bool) -> None:
    if not quiet:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.capacity:
        from labkit.tools.capacity import capacity
        print(capacity().text())
        return 0
    from labkit.tools.doctor import report, run_checks
    text, ok = report(run_checks())
    print(text)
    return 0 if ok else 1


def cmd_image_build(args: argparse.Namespace) -> int:
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    if args.jobs == 1 or len(kernels) == 1:
        for k in kernels:
            img = image.build_image(k, force=args.force)
            print(f"{k}: {img.kernel_release} in {img.directory}")
        return 0
    # Several images at once: each build is mostly one dpkg or one download at a time, so
    # two or three overlap well even on two cores. Each progress line names its kernel.
    from concurrent.futures import ThreadPoolExecutor

    def one(k: str) -> image.Image:
        return image.build_image(k, force=args.force, progress=lambda line: print(f"[{k}] {line}", file=sys.stderr,
                                                                                   flush=True))
    with ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="labkit-image") as pool:
        futures = {k: pool.submit(one, k) for k in kernels}
        failed = []
        for k, fut in futures.items():
            try:
                img = fut.result()
            except LabError as exc:
                failed.append(k)
                _err(f"image {k}: {exc}")
                continue
            print(f"{k}: {img.kernel_release} in {img.directory}")
    if failed:
        _err(f"{len(failed)} of {len(kernels)} images failed ({', '.join(failed)}); the others are built. "
             f"Retry one with: labkit image build --kernel {failed[0]}")
        return 2
    return 0


def cmd_image_container(args: argparse.Namespace) -> int:
    from labkit.image.container import build_container
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    build_container(kernels, tag=args.tag, runtime=args.runtime)
    return 0


def cmd_image_verify(args: argparse.Namespace) -> int:
    kernels = [k for k, _s, img in image.list_images() if img] if args.kernel == "all" else [args.kernel]
    for k in kernels:
        t = time.monotonic()
        img = image.verify_image(k)
        print(f"{k}: {len(img.manifest.get('artifacts', {}))} files match the manifest's sha256 "
              f"({time.monotonic() - t:.1f} s)")
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    rows = []
    for kernel, status, img in image.list_images():
        rel = img.kernel_release if img else "-"
        built = img.manifest.get("built_at", "-") if img else "-"
        size = f"{img.manifest['artifacts']['root.ext4']['bytes'] / 2**20:.0f} MiB" if img else "-"
        rows.append((kernel, status, rel, built, size))
    if args.json:
        print(json.dumps([dict(zip(("kernel", "status", "release", "built_at", "root_size"), r)) for r in rows],
                         indent=2))
        return 0
    print(f"{'KERNEL':7s} {'STATUS':8s} {'RELEASE':22s} {'BUILT':21s} ROOT")
    for r in rows:
        print(f"{r[0]:7s} {r[1]:8s} {r[2]:22s} {r[3]:21s} {r[4]}")
    return 0


def cmd_vm_start(args: argparse.Namespace) -> int:
    vm = VM(args.name, kernel=args.kernel, persistent=True, warm=not args.cold,
            on_console_line=_boot_progress(args.quiet))
    if vm.status() is VMState.RUNNING:
        d = vm.describe()
        print(f"VM {args.name!r} is already running ({d.get('kernel_release')}, {d.get('accel')})")
        return 0
    image.ensure_image(args.kernel)
    try:
        vm.start()
    finally:
        _end_progress(args.quiet)
    print(f"VM {args.name!r} running: kernel {vm.release}, accelerator {vm.accel}, "
          f"SSH-ready in {vm.record.boot_seconds:.1f} s ({_start_words(vm)})")
    vm.close()
    return 0


def _start_words(vm: VM) -> str:
    if vm.record.start_kind == "warm":
        return "warm start from the snapshot"
    return "cold boot" + (f"; warm start failed: {vm.record.warm_error}" if vm.record.warm_error else "")


def cmd_vm_reset(args: argparse.Namespace) -> int:
    if args.pmem and not args.yes:
        _err("--pmem erases the VM's persistent memory (your files on the DAX mounts); add --yes to confirm")
        return 2
    vm = VM(args.name, persistent=True)
    st = vm.status()
    if st is VMState.RUNNING:
        vm = VM.attach(args.name)
    elif not vm.info_path.exists():
        _err(f"VM {args.name!r} does not exist; start it with `labkit vm start --name {args.name}`")
        return 2
    else:
        info = vm.sd.load_info()
        if info is None:
            _err(f"the record of VM {args.name!r} ({vm.info_path}) was unreadable and has been set aside; "
                 f"resetting it with the default kernel {image.DEFAULT_KERNEL}")
        vm = VM(args.name, kernel=info.kernel if info else image.DEFAULT_KERNEL, persistent=True)
    t = time.monotonic()
    vm.reset(pmem=args.pmem)
    print(f"VM {args.name!r} reset in {time.monotonic() - t:.1f} s ({_start_words(vm)}); persistent memory "
          + ("erased" if args.pmem else "kept"))
    vm.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from labkit.tools import bench
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    if args.runs < 1 or args.runs > 50:
        _err(f"--runs {args.runs}: use 1..50")
        return 2
    if args.learners < 0 or args.learners > 20:
        _err(f"--learners {args.learners}: use 1..20 (or 0 to skip)")
        return 2
    grade = tuple(args.grade or ()) or (tuple(bench.bench_class.default_grade_set()) if args.grade == [] else ())
    missing = [g for g in grade if not os.path.isfile(g)]
    if missing:
        _err(f"--grade: no such notebook: {missing[0]}")
        return 2
    extras = bench.Extras(learners=args.learners, matrix_ratio=args.matrix_ratio, grade=grade,
                           first_run=args.first_run)
    say = (lambda s: None) if args.json else (lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
    results = [bench.run(k, runs=args.runs, matrix=not args.no_matrix, progress=say, extras=extras)
               for k in kernels]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {r["kernel"]: r for r in results}, indent=2))
    else:
        print("\n\n".join(bench.format_report(r) for r in results))
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    vm = VM(args.name, persistent=True)
    st = vm.status()
    vm.stop()
    print(f"VM {args.name!r} stopped" + (" (it was not running)" if st is VMState.STOPPED else ""))
    return 0


def cmd_vm_delete(args: argparse.Namespace) -> int:
    vm = VM(args.name, persistent=True)
    if not vm.state_dir.exists():
        print(f"VM {args.name!r} does not exist")
        return 0
    if not args.yes:
        _err(f"this erases {vm.state_dir}, including the VM's persistent memory; add --yes to confirm")
        return 2
    vm.delete()
    print(f"VM {args.name!r} deleted")
    return 0


def cmd_vm_status(args: argparse.Namespace) -> int:
    vm = VM(args.name, persistent=True)
    d = vm.describe()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        st = d["state"]
        words = {"running": "running", "stopped": "stopped",
                 "dead": "dead (QEMU exited without being stopped: crashed or killed; see "
                         f"{vm.console_log})",
                 "incomplete": "incomplete (the start or reset that launched it was interrupted, so its "
                               f"guest is not ready; `labkit vm start --name {args.name}` discards it and "
                               "starts again, pmem kept)",
                 "starting": "starting (another process is starting, stopping or resetting it)"}
        print(f"VM {args.name!r}: {words.get(st, st)}")
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
    return STATUS_EXIT.get(str(d["state"]), 1)


STATUS_EXIT = {"running": 0, "stopped": 3, "dead": 4, "incomplete": 5, "starting": 6}


def cmd_vm_ssh(args: argparse.Namespace) -> int:
    vm = VM.attach(args.name)
    try:
        cmd = _command(args.command)
        if not cmd:   # interactive: use the system ssh client with the VM's pinned key
            return _interactive_ssh(vm)
        return _guest_command(vm, cmd)
    finally:
        vm.close()


GUEST_FAILED = 125   # as `docker run`: labkit itself could not run the command to its end


def _guest_command(vm: VM, cmd: list[str]) -> int:
    """Run ``cmd`` with the terminal's stdin/stdout; the guest command's exit
    code, or GUEST_FAILED with the reason when the guest died or hung."""
    try:
        return vm.run_passthrough(cmd, stdin=sys.stdin.buffer)
    except (GuestDied, GuestTimeout, ChannelError) as exc:
        _err(f"the command did not finish: {exc}")
        return GUEST_FAILED


def _interactive_ssh(vm: VM) -> int:
    if shutil.which("ssh") is None:
        raise StateError("no ssh client", "installed (apt-get install openssh-client)")
    kh = vm.state_dir / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{vm.record.ssh_port} {' '.join(vm.record.host_key)}\n")
    return subprocess.call(["ssh", "-i", str(vm.key_path), "-p", str(vm.record.ssh_port),
                            "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                            "-o", "IdentitiesOnly=yes", "root@127.0.0.1"])


def cmd_vm_console(args: argparse.Namespace) -> int:
    vm = VM.attach(args.name)
    try:
        print("Serial console of the guest (Ctrl-] to leave). Press Enter for a prompt.", file=sys.stderr)
        with vm.console() as con:
            con.interact()
    finally:
        vm.close()
    return 0


def _port(text: str) -> int:
    """argparse type for a TCP port the learner's browser will use."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1024 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (use 1024..65535)")
    return port


def _command(words: list[str]) -> list[str]:
    return words[1:] if words[:1] == ["--"] else words


def cmd_run(args: argparse.Namespace) -> int:
    cmd = _command(args.command)
    if not cmd:
        _err(f"no command given; usage: labkit run [--kernel {'|'.join(image.KERNELS)}] -- CMD ARGS...")
        return 2
    vm = _vm_for(args)
    try:
        return _guest_command(vm, cmd)
    finally:
        vm.finish()


def _vm_for(args: argparse.Namespace, kernel: str | None = None, quiet: bool = False) -> VM:
    """The running persistent VM if it has the requested kernel, else a throwaway one (booted;
    its image is built first if it never was)."""
    kernel = kernel or args.kernel
    existing = VM(args.name, persistent=True)
    if existing.status() is VMState.RUNNING and (kernel is None
                                                 or existing.describe().get("kernel") == kernel):
        return VM.attach(args.name)
    kernel = kernel or image.DEFAULT_KERNEL
    image.ensure_image(kernel)
    quiet = quiet or getattr(args, "quiet", False) or not sys.stderr.isatty()
    vm = VM(f"{args.cmd}-{kernel.replace('.', '-')}", kernel=kernel, on_console_line=_boot_progress(quiet))
    try:
        vm.start()
    finally:
        _end_progress(quiet)
    return vm


def cmd_matrix(args: argparse.Namespace) -> int:
    from labkit.tools import kernel_matrix
    if args.kernel != "all":
        m = _one_matrix(args, args.kernel, prefix="")
        print(json.dumps(m, indent=2) if args.json else format_matrix(m))
        return 0
    kernels = list(image.KERNELS)
    for k in kernels:        # build missing images one after the other, before any guest starts
        image.ensure_image(k)
    matrices = kernel_matrix.measure(kernels, lambda k: _one_matrix(args, k, prefix=f"[{k}] ", quiet=True),
                                     jobs=args.jobs)
    if args.json:
        print(json.dumps(kernel_matrix.as_json(matrices), indent=2))
    else:
        print(kernel_matrix.side_by_side(matrices))
    return 0


def _one_matrix(args: argparse.Namespace, kernel: str | None, prefix: str, quiet: bool = False) -> dict:
    from labkit.lab import Lab
    say = (lambda s: None) if args.json else (lambda s: print(f"  ... {prefix}{s}", file=sys.stderr, flush=True))
    if prefix:
        say("starting the guest")
    vm = _vm_for(args, kernel, quiet=quiet)
    try:
        return Lab(vm).matrix(progress=say).to_dict()
    finally:
        vm.finish()


def cmd_source(args: argparse.Namespace) -> int:
    from labkit.course import source
    if not args.function and not args.grep:
        raise ConfigError("give a function name or --grep REGEX",
                          hint="e.g. labkit source check_vma_flags --mark-return -95")
    if args.grep:
        try:
            re.compile(args.grep)
        except re.error as exc:
            raise ConfigError(f"--grep {args.grep!r} is not a regular expression ({exc})",
                              hint="e.g. --grep FOLL_LONGTERM") from exc
    src = source.for_kernel(args.kernel, progress=lambda s: print(s, file=sys.stderr))
    if args.grep:
        for path, n, fn, text in src.grep(args.grep):
            print(f"{path}:{n}: {fn + '(): ' if fn else ''}{text}")
        return 0
    listing = src.function(args.function)
    mark = listing.returning(args.mark_return) if args.mark_return is not None else []
    print(f"{listing.path}:{listing.start}-{listing.end} (Linux {src.release})")
    print(listing.text(mark))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from labkit.course import grading
    paths = args.notebooks or grading.default_notebooks()
    if not paths:
        _err("no notebooks to check: give notebook paths, e.g. labkit check notebooks/03-rdma-pins.ipynb")
        return 2
    say = (lambda s: None) if args.json else (lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
    results = grading.grade(list(paths), progress=say)
    print(grading.dumps(results) if args.json else grading.report(results))
    return 0 if all(c.passed for r in results for c in r.checks) else 1


def cmd_course_grade(args: argparse.Namespace) -> int:
    from labkit.course import gradebook, summative
    jobs = args.jobs or summative.default_jobs()
    opts = summative.Options(timeout=args.timeout, kernel=args.kernel)
    say = (lambda s: None) if args.quiet else (lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
    # each student's file and the CSV are written as their notebooks are graded
    results = summative.grade_all(args.submissions, opts, jobs, progress=say, out=args.out)
    for student, grades in results.items():
        path = gradebook.student_path(args.out, student)
        print(f"{student}: {sum(g.score for g in grades)}/{sum(g.max for g in grades)}  ({path})")
    print(f"CSV: {args.out / 'grades.csv'}")
    return 0


def cmd_course_gradebook(args: argparse.Namespace) -> int:
    from labkit.course import gradebook
    n = gradebook.merge(args.dirs, args.output)
    print(f"{n} students -> {args.output}")
    return 0


def cmd_course_release(args: argparse.Namespace) -> int:
    from labkit.course import release
    written = release.release(out_dir=args.out, src=args.source)
    for path in written:
        print(path)
    print(f"{len(written)} student notebooks written (solutions and hidden checks stripped, nbgrader metadata kept)",
          file=sys.stderr)
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    image.ensure_image(args.kernel)
    vm = VM(args.name, kernel=args.kernel, persistent=True, on_console_line=_boot_progress(False))
    if vm.status() is not VMState.RUNNING:
        print(f"Starting the lab VM {args.name!r} (kernel {args.kernel}) ...", file=sys.stderr)
        try:
            vm.start()
        finally:
            _end_progress(False)
        print(f"VM running: {vm.release}, accelerator {vm.accel}, "
              f"SSH-ready in {vm.record.boot_seconds:.1f} s", file=sys.stderr)
        vm.close()
    else:
        print(f"VM {args.name!r} already running.", file=sys.stderr)
    argv = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={paths.notebooks_dir()}",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={args.port}"]
    if args.no_browser:
        argv.append("--no-browser")
    if os.geteuid() == 0:      # containers and CI machines run as root; Jupyter refuses that by default
        argv.append("--allow-root")
    env = dict(os.environ, LABKIT_VM=args.name)
    print("Starting JupyterLab on 127.0.0.1 (token-protected; the URL is printed below). "
          "Ctrl-C stops JupyterLab; the VM keeps running (`labkit vm stop` stops it).", file=sys.stderr)
    return subprocess.call(argv, env=env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit", description=__doc__.split("\n\n")[0].strip(),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log each lifecycle step (start, boot phases, stop) to stderr")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser("doctor", help="check that this host can run the lab")
    d.add_argument("--capacity", action="store_true",
                   help="how many learners this host holds at once (cores, memory, measured cost per learner)")
    d.set_defaults(func=cmd_doctor)
    _add_image(sub)
    _add_vm(sub)
    _add_measuring(sub)
    _add_course(sub)
    return p


def _add_image(sub: Any) -> None:
    kernels = list(image.KERNELS)
    im = sub.add_parser("image", help="build or list guest images").add_subparsers(dest="sub", required=True,
                                                                                   metavar="ACTION")
    b = im.add_parser("build", help="build the guest image (skipped when up to date)")
    b.add_argument("--kernel", choices=kernels + ["all"], default=image.DEFAULT_KERNEL,
                   help="kernel variant (default %(default)s)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--jobs", type=_positive(int), default=3, metavar="N",
                   help="with --kernel all: build up to N images at once (default %(default)s; 1 builds them "
                        "one after the other)")
    b.set_defaults(func=cmd_image_build)
    vf = im.add_parser("verify", help="hash every file of an image against its manifest now")
    vf.add_argument("--kernel", choices=kernels + ["all"], default="all",
                    help="kernel variant (default: every built image)")
    vf.set_defaults(func=cmd_image_verify)
    ls = im.add_parser("list", help="show the built images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_list)
    ct = im.add_parser("container", help="build the container image (JupyterLab, labkit, QEMU, the guest images) "
                                         "with docker/podman import; no registry needed")
    ct.add_argument("--kernel", choices=kernels + ["all"], default=image.DEFAULT_KERNEL,
                    help="the guest images to put in (default %(default)s; they must be built)")
    ct.add_argument("--tag", default="labkit", help="the image's name (default %(default)s)")
    ct.add_argument("--runtime", choices=["docker", "podman"], default=None, help="default: docker, else podman")
    ct.set_defaults(func=cmd_image_container)


def _add_vm(sub: Any) -> None:
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


def _add_measuring(sub: Any) -> None:
    kernels = list(image.KERNELS)
    r = sub.add_parser("run", help="run one command in the guest (boots a throwaway VM if none is running)")
    r.add_argument("--kernel", choices=kernels, default=None,
                   help=f"kernel variant (default: the running VM's, else {image.DEFAULT_KERNEL})")
    r.add_argument("--name", default="default", help="use this persistent VM if it is running")
    r.add_argument("--quiet", action="store_true", help="no boot progress")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    r.set_defaults(func=cmd_run)

    mx = sub.add_parser("matrix", help="measure every DAX mount and pin mechanism x memory kind")
    mx.add_argument("--kernel", choices=kernels + ["all"], default=None,
                    help=f"kernel variant, or all of them side by side with the differences marked "
                         f"(default: the running VM's, else {image.DEFAULT_KERNEL})")
    mx.add_argument("--jobs", type=int, default=2, help="with --kernel all: guests at a time (default 2)")
    mx.add_argument("--name", default="default", help="use this persistent VM if it is running")
    mx.add_argument("--json", action="store_true", help="machine-readable output")
    mx.add_argument("--quiet", action="store_true", help="no boot progress")
    mx.set_defaults(func=cmd_matrix)

    bn = sub.add_parser("bench", help="measure cold boot, warm start, reset, SSH, the matrix and memory",
                        description="Runs, one after the other on this machine: a cold boot to SSH-ready, a "
                                    "warm start (snapshot restore) to SSH-ready, a reset, SSH round trips, the "
                                    "full pin matrix on the warm guest, and QEMU's resident memory. Prints "
                                    "ratios of figures from the same run first (warm start over its floor, reset "
                                    "over warm start), then medians and min-max over --runs with the machine "
                                    "and date.")
    bn.add_argument("--kernel", choices=kernels + ["all"], default=image.DEFAULT_KERNEL,
                    help="kernel variant (default %(default)s)")
    bn.add_argument("--runs", type=int, default=3, help="repetitions (default %(default)s)")
    bn.add_argument("--json", action="store_true",
                    help="one JSON object: cold_boot_s, warm_start_s, warm_floor_s, reset_s, ssh_rtt_ms, matrix_s, "
                         "qemu_rss_mb, accel (medians), the ratios warm_over_floor, reset_over_warm, "
                         "cold_warm_ratio, plus min/max/raw, machine and date (docs/performance.md)")
    bn.add_argument("--no-matrix", action="store_true", help="skip the pin matrix (much quicker)")
    bn.add_argument("--learners", type=int, default=0, metavar="N",
                    help="N learners' VMs from one snapshot, each running the pin matrix, then one more: "
                         "learner_marginal_mb (its cost in summed PSS), its USS and PSS")
    bn.add_argument("--matrix-ratio", action="store_true",
                    help="matrix_all_over_one: the matrix on every kernel (2 at a time) over one kernel's")
    bn.add_argument("--grade", nargs="*", metavar="NOTEBOOK",
                    help="grade_per_core_hour: grade these notebooks (default: notebooks 01 and 02) as "
                         "submissions with `labkit check`, from the CPU time of the grader and its guest")
    bn.add_argument("--first-run", action="store_true",
                    help="first_run_s: a fresh clone of this repository in a scratch directory, set up like "
                         "`make lab` (no pip cache) to a working first cell of notebook 00; with the download "
                         "size and the disk used (several minutes)")
    bn.set_defaults(func=cmd_bench)


def _add_course(sub: Any) -> None:
    kernels = list(image.KERNELS)
    ck = sub.add_parser("check", help="grade the exercises of course notebooks against the live guest",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECK_EPILOG)
    ck.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", help="notebook files (default: all of notebooks/)")
    ck.add_argument("--json", action="store_true", help="machine-readable results (for an LMS or nbgrader)")
    ck.set_defaults(func=cmd_check)

    sr = sub.add_parser("source", help="show a function of the guest kernel's own source (Debian linux-source)",
                        description="Prints a function from the exact source of a guest image's kernel (Debian's "
                                    "linux-source package of that version, fetched once, about 150 MB; only the "
                                    "files the course reads are kept). --mark-return -95 marks the lines that "
                                    "return that value, e.g. the ones a kretprobe that saw ret=-95 could have "
                                    "caught.")
    sr.add_argument("function", nargs="?", help="a C function name, e.g. check_vma_flags")
    sr.add_argument("--kernel", choices=kernels, default=image.DEFAULT_KERNEL, help="default %(default)s")
    sr.add_argument("--grep", metavar="REGEX", help="instead: list the lines matching REGEX and their functions")
    sr.add_argument("--mark-return", type=int, metavar="N", help="mark the lines returning N (e.g. -95)")
    sr.set_defaults(func=cmd_source)

    cs = _add_course_grading(sub)
    rel = cs.add_parser("release", help="write the student notebooks from instructor/source (nbgrader's "
                                        "preprocessors strip solutions and hidden checks)")
    rel.add_argument("--out", type=Path, default=None, metavar="DIR", help="where to write them (default: notebooks/)")
    rel.add_argument("--source", type=Path, default=None, metavar="DIR",
                     help="the instructor sources (default: instructor/source/)")
    rel.set_defaults(func=cmd_course_release)

    lab = sub.add_parser("lab", help="start the VM and JupyterLab on notebooks/")
    lab.add_argument("--name", default="default")
    lab.add_argument("--kernel", choices=kernels, default=image.DEFAULT_KERNEL)
    lab.add_argument("--port", type=_port, default=8888)
    lab.add_argument("--no-browser", action="store_true")
    lab.set_defaults(func=cmd_lab)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be more than 0")
        return value
    return parse


def _add_course_grading(sub: Any) -> Any:
    course = sub.add_parser("course", help="instructor tools: release the student notebooks, summative "
                                           "grading, the gradebook")
    cs = course.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = cs.add_parser("grade", help="re-execute submissions in fresh sandboxed guests and grade them",
                      description="Each SUBMISSION is a directory named after the student id holding that "
                                  "student's notebooks. Every notebook is run from the top in a fresh throwaway "
                                  "guest by a sandboxed kernel (docs/grading.md), graded on its own, and written "
                                  "to OUT/<student>.json and OUT/grades.csv. Needs root and bubblewrap.")
    g.add_argument("submissions", nargs="+", metavar="SUBMISSION")
    g.add_argument("--out", type=Path, default=Path("grades"), help="output directory (default %(default)s)")
    g.add_argument("--jobs", type=_positive(int), default=None,
                   help="notebooks graded at a time (default: one per core, as free memory allows)")
    g.add_argument("--timeout", type=_positive(float), default=900.0,
                   help="seconds per notebook, run and checks (default %(default)s)")
    g.add_argument("--kernel", choices=list(image.KERNELS), default=None,
                   help=f"guest kernel variant (default {image.DEFAULT_KERNEL})")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.set_defaults(func=cmd_course_grade)
    b = cs.add_parser("gradebook", help="merge per-student grade files into one CSV")
    b.add_argument("dirs", nargs="+", metavar="DIR", help="--out directories (or JSON files) of course grade")
    b.add_argument("-o", "--output", type=Path, required=True, help="the CSV to write")
    b.set_defaults(func=cmd_course_gradebook)
    return cs


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
        return args.func(args)
    except LabError as exc:
        _err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # `labkit vm status | head -1`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
