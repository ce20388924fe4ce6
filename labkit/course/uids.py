"""Throwaway sandbox uids that are unique on this host, across grader processes.

Every sandboxed kernel of ``labkit course grade`` runs as a uid that no user
and no other kernel has. Within one grader process a counter would do, but
two graders on one host (the Slurm array's per-task runs, or an instructor
re-running one student beside a class run) each counted from the same base:
two students got the same uid and could read each other's kernel connection
file, environment and memory, and kill each other's kernel.

A uid is leased by holding an exclusive ``flock`` on its own file in a
root-owned directory (``/run/labkit/grade-uids``, mode 0700): the kernel
releases the lock when the lease is closed or its process dies (a crashed
grader leaves nothing stale), and a uid that still has a process (left over
from a grader that was killed) is skipped. ``LABKIT_GRADE_UIDS=START-END``
gives a job a range of its own (e.g. one per Slurm array task); the lock
still guards it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import LabError
from labkit.settings import GRADE_UIDS_COUNT, GRADE_UIDS_FIRST, GRADE_UIDS_VAR, Settings, from_environment

log = logging.getLogger(__name__)

FIRST, COUNT = GRADE_UIDS_FIRST, GRADE_UIDS_COUNT
LOCK_DIR = Path("/run/labkit/grade-uids")
RANGE_ENV = GRADE_UIDS_VAR


class UidError(LabError):
    """No sandbox uid can be leased (the pool is used up, or its lock directory is unsafe)."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.hint = hint


@dataclass
class Lease:
    """One uid, ours until ``release()`` (or until this process ends)."""

    uid: int
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)        # closing the file description drops its flock
            log.debug("sandbox uid %d released", self.uid)
            self.fd = -1


def uid_range(env: Mapping[str, str] | None = None) -> range:
    """The uids this process may lease: the settings' ``grade_uids``
    (``LABKIT_GRADE_UIDS``, ``START-END`` inclusive, or 62000-62999) of ``env``,
    else of this process's environment."""
    return (from_environment() if env is None else Settings.from_env(env)).grade_uids


def lock_dir(path: Path = LOCK_DIR) -> Path:
    """The lease directory, made root-only if missing; refused when someone
    else could write it (they could hold every uid, or swap the lock files)."""
    for d in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o755 if d == path.parent else 0o700)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UidError(f"{d}: not a directory only the grader can write (owner {st.st_uid}, "
                           f"mode {stat.filemode(st.st_mode)})",
                           hint=f"remove it; the grader makes it again (root, mode 0700 for {path.name})")
    return path


def _has_processes(uid: int) -> bool:
    """True if any process runs as ``uid`` (a leftover of a grader that was killed)."""
    import psutil
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if uid in tuple(p.info["uids"]):
                return True
    return False


def _try(directory: Path, uid: int) -> Lease | None:
    fd = os.open(directory / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if _has_processes(uid):
        log.warning("sandbox uid %d still has processes (a grader that was killed?); skipping it", uid)
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {time.time():.0f}\n".encode())
    return Lease(uid, fd)


def acquire(uids: range | None = None, directory: Path | None = None) -> Lease:
    """Lease a uid nobody on this host uses now (a random start spreads the
    graders over the range, so they seldom try the same files)."""
    uids = uids if uids is not None else uid_range()
    d = lock_dir(directory or LOCK_DIR)
    start = random.randrange(len(uids))
    for i in range(len(uids)):
        uid = uids[(start + i) % len(uids)]
        lease = _try(d, uid)
        if lease is not None:
            log.debug("sandbox uid %d leased (%s)", uid, d / str(uid))
            return lease
    raise UidError(f"every sandbox uid of {uids.start}-{uids.stop - 1} is in use on this host",
                   hint=f"lower --jobs, wait for the other graders, or give this run more uids ({RANGE_ENV})")


@contextlib.contextmanager
def leased(uids: range | None = None, directory: Path | None = None) -> Iterator[int]:
    """``with leased() as uid:`` a uid of our own for the block."""
    lease = acquire(uids, directory)
    try:
        yield lease.uid
    finally:
        lease.release()
