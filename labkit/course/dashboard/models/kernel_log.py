"""The guest's kernel log as it grows, plus the traced ``check_vma_flags``
refusals, with the lines that matter classified."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque

from traitlets import Bool, Int

from labkit.course.dashboard.models.base import Model, message
from labkit.course.dashboard.models.followers import FollowedDmesg, RefusalTrace
from labkit.course.dashboard.protocols import GuestMachine
from labkit.errors import LabError
from labkit.lab.observe import HIGHLIGHTS, LogLine, classify

log = logging.getLogger(__name__)


class KernelLogModel(Model):
    """The guest's kernel log as it grows, plus traced check_vma_flags refusals.

    ``lines`` holds ``LogLine``s (text, kind, received); ``kind`` is the
    highlight class from ``labkit.lab.observe.classify`` (None for ordinary
    lines). ``received`` counts the lines added, so a view observing it
    hears about each new line.
    """

    received = Int(0, help="lines added so far (a change signal for views)")
    highlights_only = Bool(False)
    running = Bool(False)

    def __init__(self, vm: GuestMachine, lab: object = None, maxlen: int = 1000,
                 trace_refusals: bool = True) -> None:
        super().__init__()
        self.vm = vm
        self.lab = lab
        self.maxlen = maxlen
        self.trace_refusals = trace_refusals
        self.lines: deque[LogLine] = deque(maxlen=maxlen)
        self.counts: dict[str, int] = {k: 0 for k in HIGHLIGHTS}
        self._log: FollowedDmesg | None = None
        self._trace: RefusalTrace | None = None
        self._lock = threading.Lock()
        self._received = 0

    def start(self, since_now: bool = False) -> KernelLogModel:
        """Follow the log (by default from the start of the ring buffer)."""
        self.stop()
        self.error = ""
        try:
            self._log = FollowedDmesg(self.vm, maxlen=self.maxlen)
            self._log.on_line(self._logged)
            self._log.start(since_now=since_now)
            if self.trace_refusals:
                self._trace = RefusalTrace(self.vm)
                self._trace.on_line(self._traced)
                self._trace.start()
            self.running = True
            log.debug("kernel log: following (since_now=%s, trace=%s)", since_now, self.trace_refusals)
        except LabError as exc:
            self.error = message(exc)
            log.debug("kernel log: could not follow: %s", self.error)
        return self

    def _logged(self, line: LogLine) -> None:
        if self._log is not None and self._log.is_pid_line(line):
            return
        self.add(line)

    def _traced(self, line: LogLine) -> None:
        if self._trace is not None and self._trace.is_pid_line(line):
            return
        text = re.sub(r"^\s*", "", line.text)
        self.add(LogLine(f"[trace] {text}", classify(text) or "refusal", line.received))

    def add(self, line: LogLine | str) -> None:
        """Append one line (the readers call this; tests may too)."""
        if isinstance(line, str):
            line = LogLine(line, classify(line), time.time())
        with self._lock:
            self.lines.append(line)
            if line.kind in self.counts:
                self.counts[line.kind] += 1
            self._received += 1
            received = self._received
        self.received = received     # outside the lock: views read ``visible()``, which takes it

    def visible(self, limit: int = 40) -> list[LogLine]:
        """The last ``limit`` lines shown (only highlighted ones if ``highlights_only``)."""
        with self._lock:
            lines = list(self.lines)
        if self.highlights_only:
            lines = [ln for ln in lines if ln.kind]
        return lines[-limit:]

    def set_highlights_only(self, value: bool) -> None:
        self.highlights_only = bool(value)

    def stop(self) -> None:
        """Stop following; the guest readers are ended too."""
        for reader in (self._trace, self._log):
            if reader is not None:
                try:
                    reader.stop()
                except Exception:
                    log.debug("kernel log: stopping %r failed", reader, exc_info=True)
        self._log = self._trace = None
        if self.running:
            self.running = False
            log.debug("kernel log: stopped")

    def close(self) -> None:
        self.stop()
        super().close()
