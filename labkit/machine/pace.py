"""The host-wide start queue: when more guests start at once than the host
can take (the first minutes of a class), each waits its turn and says so,
instead of all of them starving each other into timeouts.

Only the expensive phase of a start is gated (the snapshot restore or the
cold boot, up to SSH-ready): ``start`` enters ``turn()`` around it, and the
turn ends when that phase succeeds or fails.

How it works. A start takes a *ticket*: an empty file in one directory that
every local user can write, named ``<time_ns>.<uid>.<pid>.<seq>`` and held
under ``flock`` by its owner for as long as it waits and boots. The live
tickets, ordered by their time, are the queue; the first ``slots`` of them
may boot. A ticket whose owner died is unlocked (the kernel drops a dead
process's flocks), so it is ignored and frees its slot at once: no ticket
outlives the start that took it in any way that matters.

Why a shared 1777 directory is safe here. It is sticky, like /tmp, so a
user can remove or rename only their own tickets. A ticket is made under a
dot-name, locked, then renamed into the queue, so nobody sees a live ticket
unlocked; it is opened with ``O_NOFOLLOW`` and one whose owner is not the
uid in its name is ignored. Tickets carry no data and nothing in them is
ever trusted or executed. The queue is cooperative fairness, not a security
boundary: a local user who fakes an early ticket can at worst delay other
starts up to the queue's timeout, which they could also do by running
guests. A directory that is unusable (a symlink, not sticky and not ours)
turns the queue off for this start rather than failing it.

Overhead on an idle host: a mkdir, one file created, locked, renamed and
removed, and one listing (docs/performance.md, "Concurrent starts").
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import StartQueueTimeout
from labkit.settings import Settings
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

POLL_S = 0.2          # the stdlib has no inotify; a listing of a few names is cheap
SUFFIX = ".ticket"
_seq = itertools.count()   # several starts of one process (threads) take distinct tickets


@dataclass(frozen=True, order=True)
class Ticket:
    """One start's place in the queue, as its file name says."""

    time_ns: int
    uid: int
    pid: int
    seq: int

    @property
    def name(self) -> str:
        return f"{self.time_ns:019d}.{self.uid}.{self.pid}.{self.seq}{SUFFIX}"

    @classmethod
    def parse(cls, name: str) -> Ticket | None:
        """The ticket a file name stands for; None for anything else."""
        if not name.endswith(SUFFIX) or name.startswith("."):
            return None
        parts = name[:-len(SUFFIX)].split(".")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            return None
        t, uid, pid, seq = (int(p) for p in parts)
        return cls(t, uid, pid, seq)


@dataclass(frozen=True)
class Place:
    """Where a ticket stands: ``ahead`` live tickets before it, ``starting`` in all."""

    ahead: int
    starting: int
    slots: int

    @property
    def may_start(self) -> bool:
        return self.ahead < self.slots

    def message(self) -> str:
        return (f"labkit: {self.starting} guests starting on this host ({self.slots} at a time); "
                f"yours is {ordinal(self.ahead + 1)} in line")


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def place_of(mine: Ticket, live: list[Ticket], slots: int) -> Place:
    """FIFO by ticket time: how many live tickets are before ``mine``."""
    others = [t for t in live if t != mine]
    return Place(sum(1 for t in others if t < mine), len(others) + 1, slots)


def host_slots(memory_mb: int, cpus: int | None, mem_available_mb: int | None) -> int:
    """How many guests this host can start at once: one per CPU (a restore
    or a boot keeps a core busy), and no more than the guests whose memory
    is available now; never less than one."""
    by_cpu = cpus or 1
    by_mem = by_cpu if mem_available_mb is None else mem_available_mb // max(1, memory_mb)
    return max(1, min(by_cpu, by_mem))


def mem_available_mb(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def slots_for(settings: Settings, memory_mb: int) -> int:
    """The setting's slot count (``LABKIT_START_SLOTS``), else the host's."""
    if settings.start_slots is not None:
        return settings.start_slots
    return host_slots(memory_mb, len(os.sched_getaffinity(0)), mem_available_mb())


# -- the directory -------------------------------------------------------------------

def ensure_dir(path: Path) -> bool:
    """Make the queue's directory (sticky, world-writable); False if what is
    there cannot be trusted to keep tickets apart."""
    try:
        path.mkdir(mode=0o1777, parents=False)
        os.chmod(path, 0o1777)           # mkdir's mode went through the umask
    except FileExistsError:
        pass
    except OSError as exc:
        log.debug("start queue: cannot make %s: %s", path, exc)
        return False
    st = os.lstat(path)
    sticky_shared = st.st_mode & 0o1777 == 0o1777
    ok = stat.S_ISDIR(st.st_mode) and (sticky_shared or st.st_uid == os.geteuid())
    if not ok:
        log.warning("start queue: %s is not a sticky shared directory; starting without the queue", path)
    return ok


def live_tickets(path: Path) -> list[Ticket]:
    """The tickets whose owners are alive (they hold its flock), oldest first."""
    live = []
    for name in os.listdir(path):
        ticket = Ticket.parse(name)
        if ticket is not None and _held(path / name, ticket):
            live.append(ticket)
    return sorted(live)


def _held(file: Path, ticket: Ticket) -> bool:
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False                     # gone since the listing, or a symlink
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != ticket.uid:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        _remove_stale(file, st.st_uid)    # its owner is gone
        return False
    finally:
        os.close(fd)


def _remove_stale(file: Path, owner: int) -> None:
    if owner == os.geteuid() or os.geteuid() == 0:
        try:
            file.unlink()
        except OSError:
            pass                         # another reader removed it first


def take_ticket(path: Path) -> tuple[Ticket, int]:
    """A new ticket, locked, in the queue: its name and the fd that holds it."""
    ticket = Ticket(time.time_ns(), os.geteuid(), os.getpid(), next(_seq))
    tmp = path / f".{ticket.name}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)             # other users' starts must open it to see it held (umask 077)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, path / ticket.name)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return ticket, fd


def drop_ticket(path: Path, ticket: Ticket, fd: int) -> None:
    (path / ticket.name).unlink(missing_ok=True)
    os.close(fd)                         # and with it the lock


# -- a turn ---------------------------------------------------------------------------

@dataclass
class Turn:
    """What a start's turn cost: seconds waited and its first place in line."""

    waited_s: float = 0.0
    first_place: int = 0                 # 0: started at once


@contextmanager
def turn(settings: Settings, memory_mb: int, progress: Callable[[str], None]) -> Iterator[Turn]:
    """Wait for this start's turn on the host, hold it for the ``with`` body,
    then give it up (whatever the body does)."""
    slots = slots_for(settings, memory_mb)
    path = settings.start_queue_dir
    if slots <= 0 or not ensure_dir(path):
        yield Turn()
        return
    try:
        ticket, fd = take_ticket(path)
    except OSError as exc:
        log.warning("start queue: cannot take a ticket in %s (%s); starting without the queue", path, exc)
        yield Turn()
        return
    try:
        got = wait_turn(path, ticket, slots, settings.start_queue_timeout, progress)
        yield got
    finally:
        drop_ticket(path, ticket, fd)


def wait_turn(path: Path, ticket: Ticket, slots: int, timeout: float,
              progress: Callable[[str], None], sleep: Callable[[float], None] = time.sleep) -> Turn:
    """Until fewer than ``slots`` live tickets are before ``ticket``; says
    the place in line whenever it changes."""
    deadline = Deadline(timeout)
    result, said = Turn(), None
    while True:
        where = place_of(ticket, live_tickets(path), slots)
        if where.may_start:
            break
        if deadline.expired:
            raise StartQueueTimeout(deadline.elapsed, where.ahead + 1, where.starting, slots)
        if where != said:
            progress(where.message())
            log.debug("start queue: %s", where.message())
            result.first_place = result.first_place or where.ahead + 1
            said = where
        sleep(POLL_S)
    result.waited_s = round(deadline.elapsed, 3)
    if said is not None:
        progress(f"labkit: your guest's turn to start (waited {result.waited_s:.1f} s)")
    return result
