"""The lifecycle lock of one VM: start, stop, reset and delete are serialised
between processes with an flock on ``<state dir>/lock``; commands do not take
it, so any number of processes may attach and run commands at once."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labkit.errors import StateDirError, VMInUse
from labkit.timeout import Deadline, flock_before

log = logging.getLogger(__name__)


class LifecycleLock:
    """Re-entrant within one owner (a reset holds it across its stop and start)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.held = False

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        if self.held:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateDirError(self.path.parent, f"cannot be written ({exc.strerror})") from exc
        deadline = Deadline(timeout)
        try:
            if not flock_before(fd, deadline):
                raise VMInUse(self.name, _holder(fd), deadline.elapsed)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            log.debug("lifecycle lock of %s taken", self.name)
            self.held = True
            try:
                yield
            finally:
                self.held = False
                log.debug("lifecycle lock of %s released", self.name)
        finally:
            os.close(fd)

    def busy_elsewhere(self) -> bool:
        """True if another process holds the lock right now (a start, stop or
        reset is in progress there)."""
        if self.held:
            return False
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)     # closing drops our probe lock, if we took it
        return False


def _holder(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else -1
