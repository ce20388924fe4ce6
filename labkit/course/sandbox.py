"""The sandbox a submission's Jupyter kernel runs in during summative grading.

Student code never runs with the grader's privileges. The kernel is started
(by jupyter_client, through the argv of a kernel spec this module writes) as:

    python -m labkit.course.sandbox enter ...   (outside, as the grader: joins
        the job's cgroups, sets rlimits, then execs)
      bwrap ...                                  (mount/net/ipc/uts namespaces)
        setpriv --reuid UID ...                  (a throwaway uid, no caps,
                                                  no_new_privs)
          bwrap --unshare-user --disable-userns  (as UID: no more user
                                                  namespaces; when the host allows)
            python -m labkit.course.sandbox inside (the SSH relay, then execs)
              python -m ipykernel_launcher -f CONNECTION_FILE

Without root (``sandbox_mode.ROOTLESS``, where the host lets users make user
namespaces; ``sandbox_mode.grading_mode`` decides) there is no uid switch:

    python -m labkit.course.sandbox enter ...   (as the grader: rlimits)
      bwrap --unshare-user --unshare-pid --disable-userns ...
        python -m labkit.course.sandbox inside --nproc N ...
          python -m ipykernel_launcher -f CONNECTION_FILE

The uid is leased host-wide (:mod:`labkit.course.uids`): no two kernels on
one host share it, whichever grader process started them. User namespaces:
bubblewrap's ``--disable-userns`` (0.8) only works with ``--unshare-user``,
which bwrap run as root maps to uid 0 outside (the sandbox's files and
signals would be root's); so a second, unprivileged bwrap does it after the
uid switch, binding the first one's root as it is (a user namespace of its
own that maps the sandbox uid to itself, with ``user.max_user_namespaces``
at 1 above it). It needs unprivileged user namespaces on the host
(:func:`userns_problem` probes once); without them there is nothing left to
create inside either.

What the kernel sees: a read-only view of /usr and /etc, the Python it runs
and the labkit package (never the tests, the instructor solutions, the
grader's home, other submissions or the grading output), a private tmpfs
home and /tmp, and a copy of its own guest's record and SSH key at the path
the grader's VM uses (so ``labkit.connect()`` attaches), without the guest's
QMP or console sockets (QMP can run host commands as QEMU's user). A notebook
that compares two kernels gets its companion VM (started by the grader) the
same way: a copy of its record at its path, its SSH port through its own gate.

Network: its own network namespace with only a loopback. The guest's SSH
forward listens on the host's loopback, which that namespace cannot reach;
so the grader serves one Unix socket per guest (bound into the sandbox) that
leads only to that guest's port, and a relay inside the sandbox listens on the same port
number on the sandbox's loopback. The kernel's ZeroMQ channels use IPC
sockets in a directory shared with the grader, so no TCP is needed for them.

Limits: a cgroup per kernel (:mod:`labkit.cgroups`, v1 or v2: ``pids``,
``memory`` and ``cpu``, frozen to stop a fork bomb while it is killed) when
the grader is root and the host has the hierarchy (FACTS.md: v1 on the lab
machines), plus rlimits (processes per uid, file size, open files,
no core dumps); time is bounded by the grader (``--timeout``), which kills
the whole cgroup.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import select
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import labkit.cgroups
from labkit.errors import LabError

log = logging.getLogger(__name__)

HOME = "/home/student"


class SandboxError(LabError):
    """The sandbox cannot be set up on this host."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.hint = hint


@dataclass(frozen=True)
class KernelLimits:
    """Per-kernel limits: its cgroup's (``labkit.cgroups.Limits``; the pids
    limit counts threads too: ipykernel uses about 10, and is the uid's
    RLIMIT_NPROC as well), the rlimits, and the sizes of its tmpfs."""

    cgroup: labkit.cgroups.Limits = labkit.cgroups.Limits(
        memory_bytes=1536 * 2**20, pids=128,
        cpu_weight=50)             # half the default weight: the guests come first
    nofile: int = 1024
    fsize_mb: int = 256
    home_mb: int = 256
    run_mb: int = 64               # the run directory shared with the grader (sockets, kernel log)


@dataclass(frozen=True)
class Companion:
    """A second guest the kernel may reach (a notebook's companion VM),
    exposed exactly like the main one: ``view`` (see ``make_vm_view``) at
    ``state``, and its SSH port through a gate socket of its own."""

    name: str
    state: Path
    view: Path
    ssh_port: int


@dataclass(frozen=True)
class Sandbox:
    """One kernel's sandbox. ``run_dir`` is shared with the grader (IPC
    sockets, the connection file, the SSH Unix socket); ``vm_state`` is the
    grader's VM state dir, ``vm_view`` the copy of it the kernel sees."""

    uid: int
    run_dir: Path
    vm_state: Path
    vm_view: Path
    state_root: Path
    vm_name: str
    ssh_port: int
    limits: KernelLimits = field(default_factory=KernelLimits)
    cgroups: tuple[Path, ...] = ()
    python: str = sys.executable
    kernel_source: Path | None = None   # the guest kernel's source files (read-only; no network in here)
    companions: tuple[Companion, ...] = ()
    disable_userns: bool = False        # the inner bwrap layer (see userns_problem)
    rootless: bool = False              # the grader is not root: one unprivileged bwrap (sandbox_mode)

    @property
    def ssh_socket(self) -> Path:
        return self.run_dir / "ssh.sock"

    def views(self) -> list[tuple[Path, Path]]:
        """(view, state dir) of every guest: the main one first."""
        return [(self.vm_view, self.vm_state)] + [(c.view, c.state) for c in self.companions]

    def gates(self) -> list[tuple[int, Path]]:
        """(SSH port, gate socket) of every guest: the main one first."""
        return [(self.ssh_port, self.ssh_socket)] + [(c.ssh_port, self.run_dir / f"ssh-{c.name}.sock")
                                                     for c in self.companions]


def require_bwrap() -> str:
    """The bwrap binary, or a SandboxError saying how to install it."""
    found = shutil.which("bwrap")
    if not found:
        raise SandboxError("bubblewrap (bwrap) is not installed: summative grading runs every submission's "
                           "kernel in a bwrap sandbox",
                           hint="sudo apt-get install bubblewrap (or `make test-deps`)")
    return found


def _python_paths(python: str) -> list[str]:
    """Directories the sandboxed Python needs: its venv and its base install."""
    exe = Path(python)
    venv = exe.parent.parent
    base = Path(os.path.realpath(exe)).parent.parent
    return sorted({str(venv), str(base)})


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent.parent)      # .../labkit


def _parents(path: str) -> list[str]:
    parts = Path(path).parts
    return [str(Path(*parts[:i])) for i in range(2, len(parts))]


def bwrap_argv(sb: Sandbox, inner: list[str], bwrap: str = "bwrap") -> list[str]:
    """The bwrap command line (pure: no probing, no I/O). Every directory
    bwrap has to create on the way to a bind is made 0755 (bwrap's own
    default for them is 0700 when run as root, which the uid could not cross)."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--clearenv"]      # capabilities: setpriv drops them all (it needs CAP_SETUID first)
    if sb.rootless:
        # the grader's own uid: its user namespace (no capabilities outside
        # it), a PID namespace in place of a uid of its own, no user namespace below
        argv += ["--unshare-user", "--unshare-pid"] + (["--disable-userns"] if sb.disable_userns else [])
    made: set[str] = set()

    def dirs_to(path: str) -> list[str]:
        out = []
        for d in _parents(path):
            if d not in made:
                made.add(d)
                out += ["--perms", "0755", "--dir", d]
        return out
    argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    argv += dirs_to(HOME + "/x") + ["--perms", "0777", "--size", str(sb.limits.home_mb * 2**20), "--tmpfs", HOME]
    ro = _python_paths(sb.python) + [_package_dir()]
    for path in ro:
        argv += dirs_to(path) + ["--ro-bind", path, path]
    argv += dirs_to(str(sb.run_dir)) + ["--bind", str(sb.run_dir), str(sb.run_dir)]
    for view, state in sb.views():
        argv += dirs_to(str(state)) + ["--ro-bind", str(view), str(state)]
    if sb.kernel_source is not None:
        argv += dirs_to(str(sb.kernel_source)) + ["--ro-bind", str(sb.kernel_source), str(sb.kernel_source)]
    env = {"HOME": HOME, "PATH": f"{Path(sb.python).parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": str(Path(_package_dir()).parent), "LABKIT_STATE_DIR": str(sb.state_root),
           "LABKIT_VM": sb.vm_name, "LABKIT_CACHE_DIR": f"{HOME}/.cache/labkit", "MPLBACKEND": "Agg",
           "PYTHONDONTWRITEBYTECODE": "1", "LABKIT_AUTO_BUILD": "0",     # never an image build in here
           # the grader starts and stops these guests: a notebook's vm.stop() only lets go of them
           "LABKIT_MANAGED_VMS": " ".join([sb.vm_name] + [c.name for c in sb.companions])}
    if sb.kernel_source is not None:
        env["LABKIT_KERNEL_SOURCE"] = str(sb.kernel_source)
    for k, v in env.items():
        argv += ["--setenv", k, v]
    return argv + ["--chdir", HOME, "--", *inner]


def kernel_argv(sb: Sandbox, bwrap: str = "bwrap") -> list[str]:
    """The kernel spec's argv: enter the limits, then bwrap, then the uid."""
    lim = sb.limits
    inside = [sb.python, "-m", "labkit.course.sandbox", "inside"]
    for port, sock in sb.gates():
        inside += ["--relay", f"{port}={sock}"]
    if sb.rootless:
        # RLIMIT_NPROC counts a uid's processes in the namespace where the
        # fork happens: set outside, it would count the grader's own (its
        # QEMUs' threads); set inside the user namespace, only the submission's.
        inside += ["--nproc", str(lim.cgroup.pids)]
    inside += ["--", sb.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    drop = [] if sb.rootless else drop_argv(sb.uid) + (no_userns_argv(bwrap) if sb.disable_userns else [])
    enter = [sb.python, "-m", "labkit.course.sandbox", "enter"]
    for cg in sb.cgroups:
        enter += ["--cgroup", str(cg)]
    nproc = [] if sb.rootless else ["--nproc", str(lim.cgroup.pids)]
    enter += [*nproc, "--nofile", str(lim.nofile), "--fsize-mb", str(lim.fsize_mb), "--"]
    return enter + bwrap_argv(sb, drop + inside, bwrap)


def drop_argv(uid: int) -> list[str]:
    """Become ``uid`` for good: no groups, no capabilities, no_new_privs."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def no_userns_argv(bwrap: str = "bwrap") -> list[str]:
    """The unprivileged inner bwrap: a user namespace mapping the sandbox uid
    to itself, the outer sandbox's root bound as it is, and no user namespace
    can be made below it (``--disable-userns``)."""
    return [bwrap, "--unshare-user", "--disable-userns", "--die-with-parent", "--bind", "/", "/", "--"]


@functools.lru_cache(maxsize=4)
def userns_problem(bwrap: str = "bwrap", uid: int = 65534) -> str:
    """"" when user namespaces can be switched off inside the sandbox on this
    host (the inner bwrap runs and ``unshare --user`` then fails in it), else
    why not. Measured once per process: a minimal outer sandbox, the uid
    switch, the inner layer, and the attempt."""
    attempt = ["sh", "-c", "if unshare --user true 2>/dev/null; then echo userns-made; fi"]
    if os.geteuid() != 0:       # the rootless sandbox: one bwrap, as this user
        argv = [bwrap, "--unshare-user", "--unshare-pid", "--disable-userns", "--die-with-parent", "--unshare-net",
                "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", *attempt]
    else:
        argv = [bwrap, "--die-with-parent", "--unshare-net", "--ro-bind", "/", "/", "--proc", "/proc", "--dev",
                "/dev", "--", *drop_argv(uid), *no_userns_argv(bwrap), *attempt]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the probe did not run ({exc})"
    if r.returncode != 0:
        return f"bwrap --unshare-user --disable-userns failed as uid {uid}: {(r.stderr or r.stdout).strip()[:200]}"
    if "userns-made" in r.stdout:
        return "a user namespace could still be made inside (bwrap --disable-userns had no effect)"
    return ""


def write_kernelspec(sb: Sandbox, directory: Path, bwrap: str) -> str:
    """A kernel spec named ``labkit-sandbox`` in ``directory``; returns its name."""
    import json
    d = directory / "labkit-sandbox"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": kernel_argv(sb, bwrap), "display_name": "labkit sandbox", "language": "python",
        "interrupt_mode": "signal"}))
    return "labkit-sandbox"


# -- the VM view -----------------------------------------------------------------------

def make_vm_view(state: Path, view: Path, uid: int, rootless: bool = False) -> None:
    """What the kernel may see of its guest's state dir: the record, the
    pidfile, the lock and the SSH key (owned by the sandbox uid); never the
    QMP/console sockets, the disks or the logs. ``rootless``: the kernel has
    a PID namespace of its own and cannot see QEMU, so the view says where
    QEMU runs (``process.QEMU_ELSEWHERE``) and labkit in there takes the
    grader's word that it does."""
    view.mkdir(parents=True, exist_ok=True)
    for name in ("vm.json", "qemu.pid", "lock", "id_ed25519", "id_ed25519.pub"):
        src = state / name
        if src.exists():
            shutil.copy2(src, view / name)
            os.chown(view / name, uid, uid)
    if rootless:
        from labkit.machine import process
        pid = (state / "qemu.pid").read_text().strip() if (state / "qemu.pid").exists() else "0"
        (view / process.QEMU_ELSEWHERE).write_text(f"{process.pid_namespace()} {pid}\n")
    os.chmod(view, 0o755)


@contextlib.contextmanager
def run_dir_mount(path: Path, uid: int, limits: KernelLimits) -> Iterator[Path]:
    """``path`` as a tmpfs of ``limits.run_mb`` owned by ``uid``: the one
    directory the kernel writes that the grader sees (IPC sockets, the kernel
    log) lived on the host's /tmp, where a notebook could write files of up
    to 256 MiB without end (and fill the disk the other guests' state is on).
    Without root (unit tests of other parts) it stays a plain directory."""
    path.mkdir(mode=0o700, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limits.run_mb}m,mode=0700,uid={uid},gid={uid},"
                            "nodev,nosuid,noexec", "labkit-grade-run", str(path)], capture_output=True, text=True)
        mounted = r.returncode == 0
        if not mounted:
            log.warning("could not mount a tmpfs on %s (%s); its size is bounded by the host's disk only", path,
                        r.stderr.strip())
    os.chown(path, uid, uid)
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


# -- cgroups -----------------------------------------------------------------------------

@contextlib.contextmanager
def cgroup(name: str, limits: KernelLimits) -> Iterator[labkit.cgroups.Group | None]:
    """The kernel's cgroup (``labkit.cgroups``: v1 or v2, with the controllers
    this host has) when we are root and the host has a hierarchy, else None;
    every process left in it is killed and the group removed on exit."""
    group = labkit.cgroups.Group(name, parent="labkit-grade")
    if os.geteuid() != 0 or not group.dirs():
        yield None
        return
    try:
        group.create(limits.cgroup, require=False)
    except labkit.cgroups.CgroupError as exc:      # e.g. a read-only cgroupfs in a container: rlimits only
        log.warning("no cgroup for the kernel %s: %s", name, exc)
        with contextlib.suppress(labkit.cgroups.CgroupError):
            group.remove(timeout=1.0)                # what was made of it
        yield None
        return
    try:
        yield group
    finally:
        try:
            group.remove(timeout=10.0)
        except labkit.cgroups.CgroupError as exc:
            log.warning("%s", exc)


def kill(group: labkit.cgroups.Group | None, timeout: float = 10.0) -> None:
    """SIGKILL everything in the kernel's cgroup until it is empty (the time
    limit's kill; the group itself stays until :func:`cgroup` removes it)."""
    if group is None:
        return
    try:
        group.kill(timeout)
    except labkit.cgroups.CgroupError as exc:
        log.warning("%s", exc)


# -- the SSH relay -------------------------------------------------------------------------

def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes."""
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 3600)
            if not ready:
                return
            for src in ready:
                data = src.recv(65536)
                if not data:
                    return
                (b if src is a else a).sendall(data)
    except OSError:
        return
    finally:
        a.close()
        b.close()


def serve(listener: socket.socket, connect: tuple[int, Any], stop: threading.Event | None = None) -> None:
    """Accept on ``listener`` and relay each connection to ``connect``
    (family, address), one thread per connection."""
    family, address = connect
    listener.settimeout(1.0)
    while stop is None or not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        out = socket.socket(family, socket.SOCK_STREAM)
        try:
            out.connect(address)
        except OSError:
            conn.close()
            out.close()
            continue
        threading.Thread(target=_pump, args=(conn, out), daemon=True).start()


@contextlib.contextmanager
def ssh_gate(sb: Sandbox) -> Iterator[None]:
    """The grader's side: one Unix socket in ``run_dir`` per guest (the main
    one, then each companion), each leading to that guest's SSH forward and
    nowhere else."""
    stop = threading.Event()
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []
    try:
        for port, path in sb.gates():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(listener)
            listener.bind(str(path))
            os.chown(path, sb.uid, sb.uid)
            listener.listen(16)
            t = threading.Thread(target=serve, args=(listener, (socket.AF_INET, ("127.0.0.1", port)), stop),
                                 daemon=True)
            t.start()
            threads.append(t)
        yield
    finally:
        stop.set()
        for listener in listeners:
            listener.close()
        for t in threads:
            t.join(timeout=5)


# -- entry points (run as processes) --------------------------------------------------------

def _enter(argv: list[str]) -> None:
    """Outside, as the grader: join the cgroups, set the rlimits, exec."""
    import argparse
    p = argparse.ArgumentParser(prog="labkit.course.sandbox enter")
    p.add_argument("--cgroup", action="append", default=[])
    p.add_argument("--nproc", type=int, default=0)       # 0: set inside (the rootless sandbox)
    p.add_argument("--nofile", type=int, required=True)
    p.add_argument("--fsize-mb", type=int, required=True)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    for g in a.cgroup:
        Path(g, "cgroup.procs").write_text(str(os.getpid()))
    limits = [(resource.RLIMIT_NOFILE, a.nofile), (resource.RLIMIT_FSIZE, a.fsize_mb * 2**20),
              (resource.RLIMIT_CORE, 0)] + ([(resource.RLIMIT_NPROC, a.nproc)] if a.nproc else [])
    for res, value in limits:
        resource.setrlimit(res, (value, value))
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    os.execvp(cmd[0], cmd)


def _relay(port: int, path: str) -> None:
    """Listen on ``port`` of the sandbox's loopback and relay to the
    grader's Unix socket ``path`` (a child process; it dies with the sandbox)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    if os.fork() == 0:
        try:
            serve(listener, (socket.AF_UNIX, path))
        finally:
            os._exit(0)
    listener.close()


def _inside(argv: list[str]) -> None:
    """Inside, as the sandbox uid: one relay per guest (``--relay
    PORT=SOCKET``, the main guest first), then exec the kernel."""
    import argparse
    p = argparse.ArgumentParser(prog="labkit.course.sandbox inside")
    p.add_argument("--relay", action="append", required=True, metavar="PORT=SOCKET")
    p.add_argument("--nproc", type=int, default=0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (a.nproc, a.nproc))
    relays = [(int(port), path) for port, path in (r.split("=", 1) for r in a.relay)]
    for port, path in relays:
        _relay(port, path)
    # The kernel's own stdout/stderr (banners, warnings) go to a log next to
    # its sockets, not into the grader's progress output.
    logfd = os.open(str(Path(relays[0][1]).parent / "kernel.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["enter"]:
        _enter(args[1:])
    elif args[:1] == ["inside"]:
        _inside(args[1:])
    else:
        sys.exit(f"usage: python -m labkit.course.sandbox enter|inside ... (internal; see {shlex.quote(__file__)})")


if __name__ == "__main__":
    main()
