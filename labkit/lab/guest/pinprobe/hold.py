"""Keeping a pin up: for a number of seconds, or until the host goes away."""

from __future__ import annotations

import os
import select
import signal
import stat
import time
from typing import Any

from .common import MAX_HOLD_SECONDS, log


class _Stop(Exception):
    pass


def _stdin_can_close() -> bool:
    """Only a pipe, socket or terminal on stdin can tell us "the host went away"
    by EOF; /dev/null or a file would read EOF at once and end the hold early."""
    try:
        mode = os.fstat(0).st_mode
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(0)
    except OSError:
        return False


def _wait(deadline: float, watch_stdin: bool) -> None:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            log("hold: safety limit reached, releasing")
            return
        if not watch_stdin:
            time.sleep(min(left, 60.0))  # a signal interrupts this via _Stop
            continue
        ready, _, _ = select.select([0], [], [], min(left, 60.0))
        if ready:
            try:
                if not os.read(0, 4096):
                    return  # EOF
            except OSError:
                return


def hold_until_released(seconds: float) -> float:
    """Keep the pin up.  seconds >= 0: sleep that long.  seconds < 0: wait until
    stdin reaches EOF (the host's SSH session went away) or SIGTERM/SIGHUP/SIGINT,
    at most MAX_HOLD_SECONDS.  Returns how long we waited."""
    t0 = time.monotonic()
    if seconds >= 0:
        time.sleep(seconds)
        return time.monotonic() - t0

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop()

    watch_stdin = _stdin_can_close()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        _wait(t0 + MAX_HOLD_SECONDS, watch_stdin)
    except _Stop:
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return time.monotonic() - t0
