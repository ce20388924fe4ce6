"""Live observation models: a streaming kernel log and pin counters sampled
over time, plus pins held open on request.

These are plain Python objects (the dashboards of the course are thin views
over them): they run over their own SSH channels, so they never mix with
command output, and every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labkit.errors import ChannelError, GuestTimeout, LabError
from labkit.lab.protocols import Machine, Stream
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

HIGHLIGHTS = {
    "experimental": re.compile(r"DAX enabled\. Warning: EXPERIMENTAL"),
    "pin-refused": re.compile(r"Unable to pin|pin.*err = -\d+"),
    "refusal": re.compile(r"labkit_cvf\w*:.*ret=-\d+"),     # the lab's kretprobes (lab/tracing.py)
    "dax": re.compile(r"\bDAX\b|\bdax\b"),
}


def classify(line: str) -> str | None:
    """The highlight class of a kernel log line, or None for an ordinary line."""
    for name, rx in HIGHLIGHTS.items():
        if rx.search(line):
            return name
    return None


@dataclass(frozen=True)
class LogLine:
    text: str
    kind: str | None
    received: float


class KernelLog:
    """``dmesg --follow`` on its own SSH channel, kept in a bounded buffer.

    ``on_line`` callbacks run on the reader thread for each new line.
    """

    def __init__(self, vm: Machine, maxlen: int = 2000) -> None:
        self.vm = vm
        self.lines: deque[LogLine] = deque(maxlen=maxlen)
        self.callbacks: list[Callable[[LogLine], None]] = []
        self._chan: Stream | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def on_line(self, fn: Callable[[LogLine], None]) -> None:
        self.callbacks.append(fn)

    def command(self, since_now: bool = True) -> str:
        """The guest command whose output lines are followed (subclasses follow other sources)."""
        cmd = "dmesg --follow-new" if since_now else "dmesg --follow"
        return f"sh -c {shlex.quote(cmd)}"

    def start(self, since_now: bool = True) -> KernelLog:
        self._chan = self.vm.ssh.start(self.command(since_now), timeout=10.0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, name="labkit-kernel-log", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        chan = self._chan
        assert chan is not None      # start() opened it before starting this thread
        buf = b""
        while not self._stop.is_set():
            try:
                if not chan.wait_readable(0.5):
                    continue
                data, _err = chan.read_available()
            except (OSError, EOFError, ValueError):   # closed under us by stop()
                break
            if not data:
                if chan.finished:
                    break
                continue
            buf += data
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                text = raw.decode(errors="replace").rstrip("\r")
                if not text:
                    continue
                line = LogLine(text, classify(text), time.time())
                self.lines.append(line)
                for fn in list(self.callbacks):
                    try:
                        fn(line)
                    except Exception:
                        log.debug("kernel log callback failed", exc_info=True)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> LogLine:
        """Block until a line matching ``pattern`` arrives (bounded)."""
        rx = re.compile(pattern)
        deadline = Deadline(timeout)
        seen = 0
        while not deadline.expired:
            snapshot = list(self.lines)
            for line in snapshot[seen:]:
                if rx.search(line.text):
                    return line
            seen = len(snapshot)
            time.sleep(0.05)
        raise GuestTimeout(f"a kernel log line matching {pattern!r}", timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._chan is not None:
            self._chan.interrupt()       # ends the guest's `dmesg --follow` too, not just our channel
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> KernelLog:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class PinSample:
    t: float
    vmpin_kb: int | None
    foll_pin_acquired: int | None
    foll_pin_released: int | None

    @property
    def foll_pins_held(self) -> int | None:
        if self.foll_pin_acquired is None or self.foll_pin_released is None:
            return None
        return self.foll_pin_acquired - self.foll_pin_released


SAMPLE_SCRIPT = ("pid={pid}; v=$(awk '/^VmPin:/{{print $2}}' /proc/$pid/status 2>/dev/null); "
                 "a=$(awk '/^nr_foll_pin_acquired/{{print $2}}' /proc/vmstat); "
                 "r=$(awk '/^nr_foll_pin_released/{{print $2}}' /proc/vmstat); echo \"${{v:--}} ${{a:--}} ${{r:--}}\"")


def parse_sample(text: str, t: float) -> PinSample:
    parts = (text.split() + ["-", "-", "-"])[:3]   # '-' stands for a missing value
    vals = [int(p) if p.isdigit() else None for p in parts]
    return PinSample(t, *vals)


class PinCounters:
    """VmPin of a process and the system's FOLL_PIN counters, sampled over time."""

    def __init__(self, vm: Machine, pid: int | None = None, maxlen: int = 600) -> None:
        self.vm = vm
        self.pid = pid
        self.samples: deque[PinSample] = deque(maxlen=maxlen)
        self.callbacks: list[Callable[[PinSample], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.time()

    def sample(self) -> PinSample:
        pid = int(self.pid) if self.pid else 0
        r = self.vm.run(["sh", "-c", SAMPLE_SCRIPT.format(pid=pid)], timeout=10)
        s = parse_sample(r.stdout, time.time() - self.t0)
        self.samples.append(s)
        for fn in list(self.callbacks):
            fn(s)
        return s

    def start(self, interval: float = 0.5) -> PinCounters:
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sample()
                except LabError:
                    pass   # a sample lost to a busy guest is skipped, not fatal
        self._thread = threading.Thread(target=loop, name="labkit-pin-counters", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


class HeldPin:
    """A pin kept open in the guest by a pinprobe process until ``release()``."""

    def __init__(self, chan: Stream, info: dict) -> None:
        self._chan = chan
        self.info = info
        self.pid: int | None = info.get("pid")
        self.released = False

    @property
    def ok(self) -> bool:
        return bool(self.info.get("ok"))

    def release(self, timeout: float = 15.0) -> int | None:
        """Close the probe's stdin (it unregisters and exits); return its exit code."""
        if self.released:
            return None
        self.released = True
        try:
            self._chan.close_stdin()
            return self._chan.exit_status(timeout)
        finally:
            self._chan.close()

    def __enter__(self) -> HeldPin:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_held_pin(vm: Machine, command: Sequence[str] | str, timeout: float = 60.0) -> HeldPin:
    """Start ``command`` (a pinprobe argument list with ``--hold -1``) and wait
    for its JSON line, which it prints while the pin is held."""
    line = command if isinstance(command, str) else shlex.join(command)
    log.debug("holding a pin: %s", line)
    chan = vm.ssh.start(line, timeout=10.0)
    deadline = Deadline(timeout)
    out, err = b"", b""
    while not deadline.expired:
        data, more_err = chan.read_available()
        out, err = out + data, err + more_err
        for text in out.decode(errors="replace").splitlines():
            if text.startswith("{") and text.rstrip().endswith("}"):
                info = json.loads(text)
                if "error" in info:
                    chan.close()
                    raise LabError(f"holding a pin failed: {info['error']}")
                return HeldPin(chan, info)
        if chan.finished and not data and not more_err:
            chan.close()
            why = err.decode(errors="replace").strip() or out.decode(errors="replace")
            raise ChannelError(f"the pin holder exited early: {why}")
        if not data and not more_err:
            chan.wait_readable(min(0.5, deadline.remaining))
    chan.close()
    raise GuestTimeout("the pin holder to report", timeout)
