"""The base of every dashboard model: traitlets that views observe, and the
actions started by buttons, run one at a time on the model's worker.

A model is a ``traitlets.HasTraits``: a view calls ``model.observe(handler)``
and is told about every change of a trait (possibly on a background thread).
Actions go to a single-thread ``ThreadPoolExecutor``, so a click returns at
once and a double click does not start a second action.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from traitlets import Bool, HasTraits, Unicode

from labkit.errors import GuestTimeout, LabError

log = logging.getLogger(__name__)

_LIVE_MODELS: weakref.WeakSet[Model] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A notebook kernel exiting still closes the models' channels politely."""
    for model in list(_LIVE_MODELS):
        try:
            model.close()
        except Exception:
            log.debug("closing %r at exit failed", model, exc_info=True)


def message(exc: BaseException) -> str:
    """A learner-facing one-paragraph message for an error raised by an action."""
    if isinstance(exc, LabError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Periodic:
    """Call ``fn`` every ``interval`` seconds on a daemon thread until ``stop()``.

    The thread waits on an event, so ``stop()`` ends it at once instead of
    after the next period.
    """

    def __init__(self, name: str, interval: float, fn: Callable[[], None]) -> None:
        self.name, self.interval, self.fn = name, interval, fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Periodic:
        log.debug("%s: every %.2f s", self.name, self.interval)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.fn()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)
        log.debug("%s: stopped", self.name)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


class Model(HasTraits):
    """Observable plain model with one action at a time on its worker.

    ``submit`` hands an action to the worker and returns; ``wait`` blocks
    (bounded) until it is done. The worker thread lives until ``close()``: a
    throwaway VM (which dies with the thread that started it, PR_SET_PDEATHSIG)
    started from a button stays up as long as its panel.
    """

    busy = Unicode("", help="the name of the running action, '' when idle")
    error = Unicode("", help="the last action's error message, '' if it worked")
    closed = Bool(False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"labkit-{type(self).__name__}")
        self._future: Future[None] | None = None
        self._worker: threading.Thread | None = None
        self._action_lock = threading.RLock()
        _LIVE_MODELS.add(self)
        log.debug("%s: created", type(self).__name__)

    def submit(self, name: str, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` on the worker; False if another action is running."""
        with self._action_lock:
            if self.busy or self.closed:
                log.debug("%s: %r refused (busy=%r, closed=%s)", type(self).__name__, name, self.busy,
                          self.closed)
                return False
            self.error = ""
            self.busy = name
            self._future = self._executor.submit(self._run, name, fn)
        return True

    def _run(self, name: str, fn: Callable[[], Any]) -> None:
        self._worker = threading.current_thread()
        log.debug("%s: action %r started", type(self).__name__, name)
        try:
            fn()
        except Exception as exc:
            log.debug("%s: action %r failed", type(self).__name__, name, exc_info=True)
            self.error = message(exc)
        finally:
            self.busy = ""
            log.debug("%s: action %r done", type(self).__name__, name)

    def wait(self, timeout: float = 180.0) -> None:
        """Wait for the running action (bounded); raises GuestTimeout if it is not done."""
        future = self._future
        if future is not None and not wait_futures([future], timeout).done:
            raise GuestTimeout(f"the dashboard action {self.busy!r} to finish", timeout)

    def close(self) -> None:
        """Refuse new actions and end the worker (after a running action)."""
        self.closed = True
        _LIVE_MODELS.discard(self)
        # Joining is only possible when idle and not from the worker itself.
        join = not self.busy and self._worker is not threading.current_thread()
        self._executor.shutdown(wait=join)
        log.debug("%s: closed", type(self).__name__)
