"""The QEMU process: spawn it, know it is ours, stop it.

A PID alone is not an identity (PIDs are reused, a pidfile can be stale or
point at anything). A process is this VM's QEMU only if it is a
``qemu-system-*`` executable whose ``-pidfile`` argument is exactly this VM's
pidfile and, when known, whose start time is the one recorded at launch.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

from labkit.errors import LaunchError

log = logging.getLogger(__name__)

# A process's identity beyond its PID is when it started, in clock ticks since
# boot (/proc/PID/stat), which no change of the wall clock moves. psutil's
# create_time adds the boot time as the wall clock sees it *now* (/proc/stat
# btime, whole seconds), so it shifts when the host's clock is stepped or the
# host itself is paused and resumed: a running QEMU then looked dead.
START_TICK_SLACK = 0.02    # seconds; the ticks are exact, this only absorbs float rounding
LEGACY_SLACK = 1.0         # for a start time recorded by an older labkit as wall-clock seconds
_LEGACY_AFTER = 1e8        # boot-relative seconds never reach this (3 years of uptime); epoch times do


def free_port() -> int:
    """A loopback port free *now*. Only a guess: the socket is closed before
    QEMU binds the port, and any local user can bind it in between (by chance
    or to make another learner's guest fail). The caller therefore checks that
    QEMU got it (``forward_state``) and tries another port if not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What QEMU prints (and then exits 1) when its user-mode network cannot bind
# the host side of a ``hostfwd`` rule: the port was taken.
HOSTFWD_FAILED = "Could not set up host forwarding rule"


def forward_taken(output: str) -> bool:
    """True if QEMU's ``output`` says its SSH forward's port was taken."""
    return HOSTFWD_FAILED in output


def listens_on(pid: int, port: int) -> bool:
    """True if process ``pid`` holds a TCP socket listening on loopback ``port``
    (QEMU's slirp binds its forwards after creating the chardev sockets, so a
    console socket alone does not say the forward worked)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp4")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_time(pid: int) -> float:
    """The process's start time in seconds since boot (its identity beyond
    the PID; unaffected by the wall clock), 0.0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19]) / _CLOCK_TICKS     # field 22, starttime
    except (IndexError, ValueError):
        return 0.0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def same_start(pid: int, started: float) -> bool:
    """True if ``pid`` started at ``started`` (as recorded by ``start_time``)."""
    if started >= _LEGACY_AFTER:      # recorded as a wall-clock time by an older labkit
        try:
            return abs(psutil.Process(pid).create_time() - started) <= LEGACY_SLACK
        except psutil.Error:
            return False
    return abs(start_time(pid) - started) <= START_TICK_SLACK


# A VM whose QEMU runs in another PID namespace, where no process of this one
# can see or check it: the rootless grading sandbox (course/sandbox.py) sees
# its guest's state through a read-only copy made by the grader, who writes
# this file beside the pidfile: its own PID namespace and QEMU's PID there.
# The guest's liveness is then the grader's to judge (it started the QEMU and
# stops it); in here a dead guest shows as its SSH failing.
QEMU_ELSEWHERE = "qemu-elsewhere"


def pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid), 0 if unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _in_other_namespace(pid: int, pidfile: Path) -> bool:
    try:
        ns, qemu = (int(x) for x in (pidfile.parent / QEMU_ELSEWHERE).read_text().split())
    except (OSError, ValueError):
        return False
    return qemu == pid and ns != pid_namespace()


def is_qemu_of(pid: int, pidfile: Path, started: float = 0.0) -> bool:
    """True if ``pid`` is a live QEMU started with ``-pidfile <pidfile>``
    (and, if ``started`` is given, started at that time), or the QEMU the
    grader recorded beside the pidfile as running in its PID namespace,
    which this process is not in (``QEMU_ELSEWHERE``)."""
    if pid <= 0:
        return False
    if _in_other_namespace(pid, pidfile):
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        argv = proc.cmdline()
    except psutil.Error:
        return False
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    try:
        at = argv.index("-pidfile")
    except ValueError:
        return False
    if at + 1 >= len(argv) or argv[at + 1] != str(pidfile):
        return False
    return not started or same_start(pid, started)


def _set_pdeathsig() -> None:   # runs in the child between fork and exec
    # The kernel sends the signal when the *thread* that forked dies, not the
    # process: a VM started from a short-lived thread would be killed when the
    # thread ends. Only forks from the main thread use it; the others are
    # killed at interpreter exit (kill_throwaways).
    # (After the fork Python renames the forking thread "main", so compare
    # with the real main thread's id, taken at import: pthread_self() is kept.)
    if threading.get_ident() != _MAIN_THREAD:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


_MAIN_THREAD = threading.main_thread().ident


def spawn(argv: Sequence[str], log_path: Path, die_with_parent: bool, owner_pid: int = 0) -> subprocess.Popen[bytes]:
    """Start QEMU in a session of its own, output to ``log_path``. A
    persistent VM (``die_with_parent`` false) outlives this process, but not
    the process ``owner_pid`` (a learner's Jupyter server: the settings'
    ``lifetime_pid``; 0 for none)."""
    log.debug("spawning %s", " ".join(argv))
    with open(log_path, "wb") as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    preexec_fn=_set_pdeathsig if die_with_parent else None)
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]}: {exc}", argv) from exc
    owner = 0 if die_with_parent else owner_pid
    if owner:
        tie_to(proc.pid, owner)
    return proc


# The watcher: stdlib only and started with -S -E so it costs a few MiB. It
# gets two pidfds (the VM's QEMU, the owner; their numbers in argv), opened by labkit while
# QEMU is its unreaped child, so no PID reuse can make it kill a stranger.
# When the owner ends it sends QEMU SIGTERM, then SIGKILL after 5 s; when
# QEMU ends first it just exits.
_WATCHER = """
import select, signal, sys
qemu, owner = int(sys.argv[1]), int(sys.argv[2])
ready, _, _ = select.select([qemu, owner], [], [])
if qemu in ready:
    sys.exit(0)
try:
    signal.pidfd_send_signal(qemu, signal.SIGTERM)
    if not select.select([qemu], [], [], 5.0)[0]:
        signal.pidfd_send_signal(qemu, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def tie_to(pid: int, owner: int) -> subprocess.Popen[bytes] | None:
    """Make ``pid`` (a child of this process) end when ``owner`` ends, from a
    small watcher process in a session of its own (it survives this process,
    like the VM). Returns the watcher, None if the owner is already gone (then
    ``pid`` is killed at once: its server no longer exists)."""
    try:
        qemu_fd = os.pidfd_open(pid)
    except OSError as exc:     # no pidfds (Linux < 5.3) or QEMU already gone
        log.warning("cannot tie QEMU %d to process %d: %s", pid, owner, exc)
        return None
    try:
        try:
            owner_fd = os.pidfd_open(owner)
        except ProcessLookupError:
            log.warning("the VM's owner %d is gone; stopping QEMU %d", owner, pid)
            signal.pidfd_send_signal(qemu_fd, signal.SIGKILL)
            return None
        try:
            watcher = subprocess.Popen(
                [sys.executable, "-S", "-E", "-c", _WATCHER, str(qemu_fd), str(owner_fd)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, pass_fds=(qemu_fd, owner_fd))
        finally:
            os.close(owner_fd)
    finally:
        os.close(qemu_fd)
    log.debug("QEMU %d ends with process %d (watcher %d)", pid, owner, watcher.pid)
    return watcher


def terminate(pids: Iterable[int], is_ours: Callable[[int], bool], grace: float = 2.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` s, every PID that ``is_ours``;
    waits for them to go (psutil waits on the processes, no sleep loop).
    True if something had to be killed."""
    procs = []
    for pid in set(pids):
        if pid and is_ours(pid):
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
    if not procs:
        return False
    for p in procs:
        _signal(p, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        log.debug("QEMU %d ignored SIGTERM; SIGKILL", p.pid)
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5.0)
    return True


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts: its parent may be slow
    to reap it); True if it did. Waits on a pidfd, no sleep loop."""
    if not pid_alive(pid):
        return True
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return not pid_alive(pid)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return bool(readable) or not pid_alive(pid)


class Throwaways:
    """QEMUs that must not outlive this interpreter (throwaway VMs)."""

    def __init__(self) -> None:
        self._vms: weakref.WeakSet = weakref.WeakSet()
        atexit.register(self.kill_all)

    def add(self, vm: object) -> None:
        self._vms.add(vm)

    def kill_all(self) -> None:
        for vm in list(self._vms):
            try:
                vm.kill()
            except Exception:   # interpreter shutdown: do what can be done
                pass


THROWAWAYS = Throwaways()
