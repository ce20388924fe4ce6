"""Deadlines for every wait on the guest (seconds, monotonic clock)."""

from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass, field


@dataclass
class Deadline:
    """A point in time after which a wait gives up.

    ``Deadline(5).remaining`` counts down from 5 s; ``expired`` says when to stop
    a retry loop; ``remaining`` never goes below zero so it can be handed to a
    blocking call as its timeout.
    """

    seconds: float
    start: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed)

    @property
    def expired(self) -> bool:
        return self.elapsed >= self.seconds


def flock_before(fd: int, deadline: Deadline, poll: float = 0.1) -> bool:
    """Take an exclusive flock on ``fd``, retrying until ``deadline``; False if
    another holder kept it that long (flock itself has no timeout)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline.expired:
                return False
            time.sleep(poll)
