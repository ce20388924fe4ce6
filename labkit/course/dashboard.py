"""Live dashboards for the course notebooks: ipywidgets views over plain models.

Every panel is a thin view (STYLE.md item 10). The state and the actions live
in plain Python models that know nothing about widgets and can be driven and
tested without a browser:

* ``VMPanelModel``   state, kernel, release, accelerator (and why), boot
                     progress; start / stop / reset actions
* ``KernelLogModel`` the guest's kernel log (``labkit.lab.observe.KernelLog``) plus
                     the ``check_vma_flags`` refusals traced by a kretprobe,
                     with the lines that matter classified
* ``PinModel``       VmPin of a holder process and the FOLL_PIN counters over
                     time (``labkit.lab.observe.PinCounters``); register/release a
                     long-term pin on a chosen memory kind
* ``MatrixModel``    ``Lab.matrix()`` results (one kernel or several)

The public functions ``vm_panel``, ``log_pane``, ``pin_panel``,
``matrix_table``, ``boot_progress`` and ``dashboard`` return displayable
widgets whose ``.model`` attribute is the model. Every value shown comes from
the live guest. Background threads (log readers, the pin sampler, actions
started by buttons) never block the notebook's kernel, every wait is bounded,
and ``close()`` on a widget or model stops its threads and closes its SSH
channels.
"""

from __future__ import annotations

import atexit
import html
import queue
import re
import shlex
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets

from labkit.errors import GuestTimeout, LabError, StateError
from labkit.lab.observe import KernelLog, LogLine, PinCounters, PinSample, classify

# --------------------------------------------------------------------------
# Plain models
# --------------------------------------------------------------------------

_LIVE_MODELS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:   # a notebook kernel exiting still closes channels politely
    for m in list(_LIVE_MODELS):
        try:
            m.close()
        except Exception:
            pass


def _message(exc: BaseException) -> str:
    """A learner-facing one-paragraph message for an error raised by an action."""
    if isinstance(exc, LabError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Model:
    """Observable plain model: views register ``observe(fn)``; ``fn(model)``
    runs after every change (possibly on a background thread).

    Actions started with ``submit`` run one at a time on the model's worker
    thread, so a button click returns at once; ``wait`` blocks (bounded) until
    the action is done. The worker lives until ``close()``: a throwaway VM
    (which dies with the thread that started it, PR_SET_PDEATHSIG) started
    from a button stays up as long as its panel.
    """

    def __init__(self) -> None:
        self._observers: list[Callable[[Any], None]] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._done: threading.Event | None = None
        self._action_lock = threading.Lock()
        self.busy = ""          # the name of the running action, "" when idle
        self.error = ""         # the last action's error message, "" if it worked
        self.closed = False
        _LIVE_MODELS.add(self)

    def observe(self, fn: Callable[[Any], None]) -> None:
        self._observers.append(fn)

    def unobserve(self, fn: Callable[[Any], None]) -> None:
        if fn in self._observers:
            self._observers.remove(fn)

    def changed(self) -> None:
        for fn in list(self._observers):
            try:
                fn(self)
            except Exception:   # a broken view must not break the model
                traceback.print_exc()

    def submit(self, name: str, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` on the worker thread; False if another action is running."""
        with self._action_lock:
            if self.busy or self.closed:
                return False
            self.busy = name
            self.error = ""
            self._done = threading.Event()
            self._queue.put((fn, self._done))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name=f"labkit-{type(self).__name__}",
                                                daemon=True)
                self._worker.start()
        self.changed()
        return True

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, done = item
            try:
                fn()
            except Exception as exc:
                self.error = _message(exc)
            finally:
                self.busy = ""
                done.set()
                self.changed()

    def wait(self, timeout: float = 180.0) -> None:
        """Wait for the running action (bounded); raises GuestTimeout if it is not done."""
        done = self._done
        if done is not None and not done.wait(timeout):
            raise GuestTimeout(f"the dashboard action {self.busy!r} to finish", timeout)

    def close(self) -> None:
        self.closed = True
        _LIVE_MODELS.discard(self)
        if self._worker is not None:
            self._queue.put(None)       # the worker ends after a running action
            if not self.busy and self._worker is not threading.current_thread():
                self._worker.join(timeout=5)


# -- boot progress ---------------------------------------------------------

# Console milestones of a labkit guest boot, in order, and how far along each is.
BOOT_MILESTONES: tuple[tuple[str, float, str], ...] = (
    (r"Linux version \S+", 0.10, "the kernel is starting"),
    (r"Run /init as init process|Freeing unused kernel", 0.35, "the initramfs is mounting the root disk"),
    (r"EXT4-fs \(vda\): mounted", 0.50, "root disk mounted; the labkit init is starting"),
    (r"labkit: hostkey", 0.80, "sshd is starting"),
    (r"labkit: ready", 0.95, "the guest is ready; connecting over SSH"),
)


class BootProgressModel(Model):
    """Boot progress fed by the guest's serial console lines.

    ``on_console_line`` is what ``VM(on_console_line=...)`` or
    ``labkit.connect(on_console_line=...)`` calls for each console line.
    The fraction only moves forward: the larger of the last milestone seen
    and the elapsed time over the expected boot time.
    """

    def __init__(self, expected_seconds: float = 10.0) -> None:
        super().__init__()
        self.expected_seconds = expected_seconds
        self.fraction = 0.0
        self.stage = "not started"
        self.last_line = ""
        self.lines = 0
        self.started: float | None = None
        self.elapsed = 0.0
        self.done = False
        self.summary = ""

    def begin(self, expected_seconds: float | None = None, tick: float | None = 0.5) -> None:
        """Start the clock. With ``tick``, a thread advances the bar by elapsed
        time between console lines (the guest kernel logs little to the console)."""
        if expected_seconds:
            self.expected_seconds = expected_seconds
        self._stop_tick()
        self.fraction, self.stage, self.last_line, self.lines = 0.0, "starting QEMU", "", 0
        self.started, self.elapsed, self.done, self.summary, self.error = time.monotonic(), 0.0, False, "", ""
        self.changed()
        if tick:
            stop = self._tick_stop = threading.Event()

            def ticker() -> None:
                while not stop.wait(tick):
                    self._advance()
                    self.changed()
            self._ticker = threading.Thread(target=ticker, name="labkit-boot-progress", daemon=True)
            self._ticker.start()

    def _stop_tick(self) -> None:
        stop, t = getattr(self, "_tick_stop", None), getattr(self, "_ticker", None)
        if stop is not None:
            stop.set()
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2)
        self._tick_stop = self._ticker = None

    def _advance(self, line: str = "") -> None:
        if self.started is None or self.done:
            return
        self.elapsed = time.monotonic() - self.started
        for rx, frac, stage in BOOT_MILESTONES:
            if line and frac > self.fraction and re.search(rx, line):
                self.fraction, self.stage = frac, stage
        by_time = 0.9 * min(1.0, self.elapsed / max(1.0, self.expected_seconds))
        self.fraction = max(self.fraction, by_time)
        if self.stage == "starting QEMU" and self.elapsed > 1.0:
            self.stage = "booting (the guest kernel writes little to the console)"

    def on_console_line(self, line: str) -> None:
        if self.started is None:
            self.begin()
        self.lines += 1
        self.last_line = line.strip()[:160]
        self._advance(line)
        self.changed()

    def finish(self, vm=None, attached: bool | None = None) -> None:
        """Mark the boot done; with ``vm``, summarise what the live guest reported."""
        self._stop_tick()
        self.done, self.fraction = True, 1.0
        if self.started is not None:
            self.elapsed = time.monotonic() - self.started
        if vm is not None:
            d = vm.describe()
            accel = vm.accel or d.get("accel")
            how = "attached to the running guest" if (attached or (attached is None and not self.lines)) \
                else f"booted in {self.elapsed:.1f} s"
            self.summary = (f"{how}: kernel {d.get('kernel_release') or '?'}, accelerator {accel}")
        self.stage = "done"
        self.changed()

    def fail(self, exc: BaseException) -> None:
        self._stop_tick()
        self.error = _message(exc)
        self.stage = "failed"
        self.changed()

    def close(self) -> None:
        self._stop_tick()
        super().close()


# -- VM panel --------------------------------------------------------------

class VMPanelModel(Model):
    """The VM's lifecycle as the learner sees it; values read from the live VM.

    ``before_stop`` / ``after_start`` hooks let other models drop and reopen
    their SSH channels around a stop, start or reset.
    """

    def __init__(self, vm, poll_interval: float | None = 2.0) -> None:
        super().__init__()
        self.vm = vm
        self.progress = BootProgressModel()
        self.before_stop: list[Callable[[], None]] = []
        self.after_start: list[Callable[[], None]] = []
        self.name = getattr(vm, "name", "?")
        self.state = "unknown"
        self.kernel = ""
        self.kernel_release = ""
        self.accel = ""
        self.accel_reason = ""
        self.boot_seconds: float | None = None
        self.message = ""
        self._stop_poll = threading.Event()
        self._poller: threading.Thread | None = None
        self.refresh()
        if poll_interval:
            self._poller = threading.Thread(target=self._poll, args=(poll_interval,),
                                            name="labkit-vm-panel", daemon=True)
            self._poller.start()

    def refresh(self) -> None:
        """Read state, kernel, release and accelerator from the VM (release via ``uname -r``)."""
        d = self.vm.describe()
        self.state = str(d.get("state", "unknown"))
        self.kernel = str(d.get("kernel") or getattr(self.vm, "kernel", "") or "")
        choice = getattr(self.vm, "accel", None)
        self.accel = (choice.accel if choice else d.get("accel")) or ""
        self.accel_reason = (choice.reason if choice else d.get("accel_reason")) or ""
        self.boot_seconds = d.get("boot_seconds")
        self.kernel_release = ""
        if self.state == "running" and str(getattr(self.vm, "state", "running")) == "running":
            try:   # what the guest itself says, not what was recorded at boot
                self.kernel_release = self.vm.run(["uname", "-r"], timeout=15).stdout.strip()
            except LabError as exc:
                self.kernel_release = d.get("kernel_release") or ""
                self.message = f"could not ask the guest for its kernel release: {exc}"
        self.changed()

    def _poll(self, interval: float) -> None:
        # Only the host-side status (vm.json and /proc): a stop from a terminal
        # (`labkit vm stop`) or a crash shows up without touching the guest.
        while not self._stop_poll.wait(interval):
            if self.busy:
                continue
            try:
                st = str(self.vm.status())
            except Exception:
                continue
            if st != self.state:
                was_running = self.state == "running"
                try:
                    if was_running:   # stopped or crashed elsewhere: the observers' channels are gone
                        self._run_hooks(self.before_stop)
                        self.message = f"the VM is {st} (stopped from outside this dashboard?)"
                    self.refresh()
                except Exception as exc:
                    self.message = _message(exc)
                    self.changed()

    # actions (synchronous; the view runs them through ``submit``)
    def start(self) -> None:
        if str(self.vm.status()) != "running" and str(self.vm.state) in ("running", "starting", "stopping"):
            self.vm.stop()    # stopped or crashed behind our back: clear this VM object's stale channels first
        self._boot(self.vm.start, "started")

    def reset(self) -> None:
        """``vm.reset()``: the guest back to a fresh start, persistent memory kept."""
        self._run_hooks(self.before_stop)
        self._boot(self.vm.reset, "reset")

    def stop(self) -> None:
        self._run_hooks(self.before_stop)
        self.state = "stopping"
        self.changed()
        self.vm.stop()
        self.message = "stopped (persistent memory kept; Start boots it again)"
        self.refresh()

    def _boot(self, action: Callable[[], Any], verb: str) -> None:
        info = self.vm.describe()
        self.progress.begin(expected_seconds=info.get("boot_seconds") or 10.0)
        self.state = "starting"
        self.message = ""
        self.changed()
        old = getattr(self.vm, "on_console_line", None)
        feed = self.progress.on_console_line

        def both(line: str) -> None:
            feed(line)
            if old is not None:
                old(line)
        self.vm.on_console_line = both
        try:
            action()
        except BaseException as exc:
            self.progress.fail(exc)
            self.refresh()
            raise
        finally:
            self.vm.on_console_line = old
        self.progress.finish(self.vm, attached=False)
        self.message = f"{verb}: {self.progress.summary}"
        self.refresh()
        self._run_hooks(self.after_start)

    def _run_hooks(self, hooks: Iterable[Callable[[], None]]) -> None:
        for fn in list(hooks):
            try:
                fn()
            except Exception as exc:
                self.message = f"{self.message} ({_message(exc)})".strip()

    def submit_action(self, name: str) -> bool:
        """``start``, ``stop`` or ``reset`` on a worker thread (what the buttons do)."""
        fn = {"start": self.start, "stop": self.stop, "reset": self.reset}[name]
        return self.submit(name, fn)

    def close(self) -> None:
        self._stop_poll.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        self.progress.close()
        super().close()


# -- kernel log ------------------------------------------------------------

class _GuestFollower(KernelLog):
    """A line stream from a guest command that first prints its own PID, so
    ``stop`` can end it: a reader blocked in ``dmesg --follow`` or in a
    trace_pipe would otherwise linger in the guest until its next line."""

    PID_PREFIX = "labkit-follow-pid "

    def __init__(self, vm, maxlen: int = 1000) -> None:
        super().__init__(vm, maxlen)
        self.guest_pid: int | None = None

    def script(self, since_now: bool) -> str:
        raise NotImplementedError

    def command(self, since_now: bool = True) -> str:
        return f"sh -c {shlex.quote(f'echo {self.PID_PREFIX}$$; ' + self.script(since_now))}"

    def is_pid_line(self, line: LogLine) -> bool:
        if line.text.startswith(self.PID_PREFIX):
            self.guest_pid = int(line.text.split()[1])
            return True
        return False

    def cleanup_script(self) -> str:
        return ""

    def stop(self) -> None:
        super().stop()
        kill = f"kill {self.guest_pid} 2>/dev/null; " if self.guest_pid else ""
        try:
            if kill or self.cleanup_script():
                self.vm.run(["sh", "-c", f"{kill}{self.cleanup_script()} true"], timeout=10)
        except (LabError, StateError):
            pass    # the guest is gone: so is the reader


class FollowedDmesg(_GuestFollower):
    def script(self, since_now: bool) -> str:
        return "exec dmesg --follow-new" if since_now else "exec dmesg --follow"


# A second ftrace instance follows the lab's kretprobe on check_vma_flags, with
# a filter for failures only. It has its own buffer, so reading its trace_pipe
# never takes events away from Lab.observe (which reads the global trace).
TRACE_SCRIPT = (
    "cd /sys/kernel/tracing || exit 1; "
    "grep -q 'labkit_cvf' kprobe_events || echo 'r:labkit_cvf check_vma_flags ret=$retval:s32' >> kprobe_events; "
    "mkdir -p instances/{inst} && echo 'ret != 0' > instances/{inst}/events/kprobes/labkit_cvf/filter && "
    "echo 1 > instances/{inst}/events/kprobes/labkit_cvf/enable || exit 1; "
    "exec cat instances/{inst}/trace_pipe")


class RefusalTrace(_GuestFollower):
    """``check_vma_flags`` calls that returned an error, as they happen (kretprobe,
    own ftrace instance). Lines look like ``... <- check_vma_flags) ret=-95``."""

    def __init__(self, vm, maxlen: int = 500) -> None:
        super().__init__(vm, maxlen)
        self.instance = f"labkit-log-{uuid.uuid4().hex[:8]}"

    def script(self, since_now: bool) -> str:
        return TRACE_SCRIPT.format(inst=self.instance)

    def cleanup_script(self) -> str:
        return f"sleep 0.1; rmdir /sys/kernel/tracing/instances/{self.instance} 2>/dev/null;"


HIGHLIGHT_LABELS = {
    "experimental": "EXPERIMENTAL DAX warning",
    "pin-refused": "pin refused",
    "refusal": "check_vma_flags refused",
    "dax": "DAX",
}


class KernelLogModel(Model):
    """The guest's kernel log as it grows, plus traced check_vma_flags refusals.

    ``lines`` holds ``LogLine``s (text, kind, received); ``kind`` is the
    highlight class from ``labkit.lab.observe.classify`` (None for ordinary lines).
    """

    def __init__(self, vm, lab=None, maxlen: int = 1000, trace_refusals: bool = True) -> None:
        super().__init__()
        self.vm = vm
        self.lab = lab
        self.maxlen = maxlen
        self.trace_refusals = trace_refusals
        self.lines: deque[LogLine] = deque(maxlen=maxlen)
        self.counts: dict[str, int] = {k: 0 for k in HIGHLIGHT_LABELS}
        self.highlights_only = False
        self.running = False
        self._log: KernelLog | None = None
        self._trace: RefusalTrace | None = None
        self._lock = threading.Lock()

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
        except LabError as exc:
            self.error = _message(exc)
        self.changed()
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
        self.changed()

    def visible(self, limit: int = 40) -> list[LogLine]:
        """The last ``limit`` lines shown (only highlighted ones if ``highlights_only``)."""
        with self._lock:
            lines = list(self.lines)
        if self.highlights_only:
            lines = [ln for ln in lines if ln.kind]
        return lines[-limit:]

    def set_highlights_only(self, value: bool) -> None:
        self.highlights_only = bool(value)
        self.changed()

    def stop(self) -> None:
        for reader in (self._trace, self._log):
            if reader is not None:
                try:
                    reader.stop()
                except Exception:
                    pass
        self._log = self._trace = None
        if self.running:
            self.running = False
            self.changed()

    def close(self) -> None:
        self.stop()
        super().close()


# -- pins ------------------------------------------------------------------

MEMORY_KINDS = ("anon", "pagecache", "fsdax-xfs", "fsdax-ext4", "devdax")


class PinModel(Model):
    """Pin counters over time and one long-term (RDMA) pin held on request.

    The sampler reads VmPin of the holder process and nr_foll_pin_acquired /
    nr_foll_pin_released from /proc/vmstat every ``interval`` seconds;
    ``history`` keeps the last samples for the plot.
    """

    def __init__(self, vm, lab, interval: float = 1.0, history: int = 120) -> None:
        super().__init__()
        self.vm = vm
        self.lab = lab
        self.interval = interval
        self.counters = PinCounters(vm, maxlen=history)
        self.counters.callbacks.append(self._sampled)
        self.memory = "anon"
        self.held = None           # the HeldPin while a registration is held
        self.last_result: dict | None = None
        self.message = ""
        self._ready: set[str] = set()
        self.sampling = False

    @property
    def history(self) -> list[PinSample]:
        return list(self.counters.samples)

    @property
    def latest(self) -> PinSample | None:
        return self.counters.samples[-1] if self.counters.samples else None

    @property
    def summary(self) -> str:
        """The latest sample in words (what the Pins tab shows)."""
        s = self.latest
        if s is None:
            return "no sample yet"

        def num(v: int | None) -> str:
            return "-" if v is None else str(v)
        holder = f"holder PID {self.counters.pid}" if self.counters.pid else "no holder"
        return (f"VmPin ({holder}): {num(s.vmpin_kb)} kB; nr_foll_pin_acquired {num(s.foll_pin_acquired)}, "
                f"nr_foll_pin_released {num(s.foll_pin_released)}")

    def _sampled(self, sample: PinSample) -> None:
        self.changed()

    def start(self) -> PinModel:
        """Start sampling (one sample now, then every ``interval`` s)."""
        try:
            self.counters.sample()
        except LabError as exc:
            self.error = _message(exc)
        self.counters.start(self.interval)
        self.sampling = True
        self.changed()
        return self

    def set_memory(self, memory: str) -> None:
        if memory not in MEMORY_KINDS:
            raise LabError(f"unknown memory kind {memory!r}; choose one of: {', '.join(MEMORY_KINDS)}")
        self.memory = memory
        self.changed()

    def _prepare(self, memory: str) -> None:
        """Set up what a registration on ``memory`` needs, once per boot."""
        if "rdma" not in self._ready:
            self.message = "setting up soft-RoCE (rdma_rxe) on the guest NIC ..."
            self.changed()
            self.lab.setup_rdma()
            self._ready.add("rdma")
        if memory.startswith("fsdax-") and "mounts" not in self._ready:
            self.message = "preparing the fs-dax namespaces and DAX mounts ..."
            self.changed()
            self.lab.prepare_mounts()
            self._ready.add("mounts")
        if memory == "devdax" and "devdax" not in self._ready:
            self.message = "preparing the device-dax namespace ..."
            self.changed()
            self.lab.prepare_pmem()
            self._ready.add("devdax")

    def register(self, memory: str | None = None, size: int = 2 * 2**20) -> dict:
        """Register ``size`` bytes of ``memory`` with RDMA and hold it; returns
        what the kernel answered (the pin probe's JSON)."""
        memory = memory or self.memory
        self.set_memory(memory)
        if self.held is not None:
            self.release()
        self._prepare(memory)
        held = self.lab.hold_pin("rdma", memory, size=size)
        info = dict(held.info)
        self.last_result = info
        if held.ok:
            self.held = held
            self.counters.pid = held.pid
            self.message = (f"registered {size // 1024} KiB of {memory} memory (ibv_reg_mr): ok; "
                            f"the holder (PID {held.pid}) keeps it pinned until Release")
        else:
            held.release()
            name, num = info.get("errname") or "?", info.get("errno")
            self.message = f"ibv_reg_mr on {memory} memory was refused by the kernel: {name} ({num})"
        self._sample_quietly()
        return info

    def release(self) -> int | None:
        """Deregister and let the holder exit; returns its exit code."""
        held, self.held = self.held, None
        if held is None:
            return None
        rc = held.release()
        self.message = f"released (the holder exited with {rc})"
        self._sample_quietly()
        return rc

    def _sample_quietly(self) -> None:
        try:
            self.counters.sample()
        except LabError as exc:
            self.error = _message(exc)
        self.changed()

    def submit_register(self, memory: str | None = None) -> bool:
        return self.submit("register", lambda: self.register(memory))

    def submit_release(self) -> bool:
        return self.submit("release", self.release)

    def stop(self) -> None:
        """Stop sampling and release a held pin (before the VM goes away)."""
        try:
            if self.held is not None:
                self.release()
        except LabError:
            pass
        self.counters.stop()
        self.sampling = False

    def restart(self) -> None:
        """After the VM was (re)started: everything set up before is gone."""
        self._ready.clear()
        self.held = None
        self.counters.pid = None
        self.start()

    def close(self) -> None:
        self.stop()
        super().close()


# -- the pin matrix --------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    ok: bool
    errno: int | None
    errname: str | None
    vmpin_kb_delta: int | None
    foll_pin_delta: int | None
    traced: bool

    @property
    def label(self) -> str:
        return "ok" if self.ok else f"{self.errname or 'errno'} ({self.errno})"


class MatrixModel(Model):
    """``Lab.matrix()`` output for one kernel, or ``{label: matrix}`` for several."""

    def __init__(self, results: Mapping | None = None, lab=None) -> None:
        super().__init__()
        self.lab = lab
        self.matrices: dict[str, dict] = {}
        self.progress_text = ""
        if results:
            self.set_results(results)

    def set_results(self, results: Mapping) -> None:
        if "pins" in results:
            self.matrices = {str(results.get("kernel", "kernel")): dict(results)}
        else:
            self.matrices = {str(k): dict(v) for k, v in results.items()}
            for label, m in self.matrices.items():
                if "pins" not in m:
                    raise LabError(f"matrix_table: {label!r} is not a Lab.matrix() result (no 'pins')")
        self.changed()

    @property
    def labels(self) -> list[str]:
        return list(self.matrices)

    def rows(self) -> list[tuple[str, str]]:
        """(mechanism, mapping) in first-seen order over all kernels."""
        seen: dict[tuple[str, str], None] = {}
        for m in self.matrices.values():
            for p in m["pins"]:
                seen[(p["mechanism"], p["mapping"])] = None
        return list(seen)

    def memories(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.matrices.values():
            for p in m["pins"]:
                seen[p["memory"]] = None
        return list(seen)

    def cell(self, label: str, mechanism: str, memory: str, mapping: str = "shared") -> Cell | None:
        for p in self.matrices[label]["pins"]:
            if (p["mechanism"], p["memory"], p["mapping"]) == (mechanism, memory, mapping):
                return Cell(bool(p["ok"]), p.get("errno"), p.get("errname"), p.get("vmpin_kb_delta"),
                            p.get("foll_pin_delta"), bool(p.get("trace")))
        return None

    def differs(self, mechanism: str, memory: str, mapping: str = "shared") -> bool:
        """True if the kernels answered differently (ok vs errno, or another errno)."""
        answers = {(c.ok, c.errno) for label in self.labels
                   if (c := self.cell(label, mechanism, memory, mapping)) is not None}
        return len(answers) > 1

    def measure(self) -> None:
        """Run ``lab.matrix()`` on the live guest and show it (about half a minute under TCG)."""
        if self.lab is None:
            raise LabError("no Lab to measure with; pass lab= or use Lab(vm).matrix()")

        def say(text: str) -> None:
            self.progress_text = text
            self.changed()
        m = self.lab.matrix(progress=say)
        self.progress_text = f"measured in {m.get('seconds')} s"
        self.set_results(m)

    def html(self) -> str:
        return matrix_html(self)


# --------------------------------------------------------------------------
# Pure renderers (tested without widgets)
# --------------------------------------------------------------------------

LOG_COLOURS = {"experimental": "#b45309", "pin-refused": "#b91c1c", "refusal": "#7c3aed", "dax": "#1d4ed8"}
OK_BG, REFUSED_BG, MISSING_BG = "#dcfce7", "#fee2e2", "#f3f4f6"


def log_html(lines: Iterable[LogLine], height_px: int = 260) -> str:
    """The log as HTML: highlighted lines coloured and labelled, newest last."""
    rows = []
    for ln in lines:
        text = html.escape(ln.text)
        if ln.kind:
            colour = LOG_COLOURS.get(ln.kind, "#111827")
            label = html.escape(HIGHLIGHT_LABELS.get(ln.kind, ln.kind))
            rows.append(f'<div class="labkit-log-line labkit-log-{ln.kind}" style="color:{colour};'
                        f'font-weight:bold" title="{label}">{text}</div>')
        else:
            rows.append(f'<div class="labkit-log-line">{text}</div>')
    body = "".join(rows) or '<div class="labkit-log-empty" style="color:#6b7280">(no kernel log lines yet)</div>'
    # column-reverse keeps the newest line in view without any script
    return (f'<div class="labkit-log" style="font-family:monospace;font-size:11px;line-height:1.35;'
            f'white-space:pre-wrap;max-height:{height_px}px;overflow-y:auto;display:flex;'
            f'flex-direction:column-reverse;border:1px solid #d1d5db;padding:4px">'
            f'<div>{body}</div></div>')


def sparkline_svg(points: list[tuple[float, float | None]], title: str, unit: str, colour: str,
                  width: int = 320, height: int = 90) -> str:
    """A small line plot (inline SVG) of (t, value) points; gaps where value is None."""
    vals = [v for _, v in points if v is not None]
    latest = points[-1][1] if points else None
    head = (f'<div style="font:12px sans-serif">{html.escape(title)}: '
            f'<b class="labkit-latest">{"-" if latest is None else f"{latest:g} {unit}"}</b></div>')
    if len(points) < 2 or not vals:
        return head + f'<svg width="{width}" height="{height}" style="background:#f9fafb"></svg>'
    t0, t1 = points[0][0], points[-1][0]
    lo, hi = min(vals + [0]), max(vals)
    if hi == lo:
        hi = lo + 1
    pad = 4

    def xy(t: float, v: float) -> str:
        x = pad + (width - 2 * pad) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        y = height - pad - (height - 2 * pad) * (v - lo) / (hi - lo)
        return f"{x:.1f},{y:.1f}"
    segments, cur = [], []
    for t, v in points:
        if v is None:
            if cur:
                segments.append(cur)
            cur = []
        else:
            cur.append(xy(t, v))
    if cur:
        segments.append(cur)
    lines = "".join(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(s)}"/>'
                    if len(s) > 1 else
                    f'<circle cx="{s[0].split(",")[0]}" cy="{s[0].split(",")[1]}" r="2.5" fill="{colour}"/>'
                    for s in segments if s)
    axis = (f'<text x="{width - pad}" y="12" font-size="10" text-anchor="end" fill="#6b7280">'
            f'max {hi:g}</text><text x="{width - pad}" y="{height - 6}" font-size="10" text-anchor="end" '
            f'fill="#6b7280">{t1 - t0:.0f} s</text>')
    return head + (f'<svg width="{width}" height="{height}" style="background:#f9fafb">'
                   f'{lines}{axis}</svg>')


def matrix_html(model: MatrixModel) -> str:
    """The pin matrix: one coloured table per kernel, side by side; cells where
    the kernels disagree get a thick border."""
    if not model.matrices:
        return '<div class="labkit-matrix" style="color:#6b7280">(no matrix measured yet)</div>'
    several = len(model.matrices) > 1
    tables = []
    for label in model.labels:
        m = model.matrices[label]
        head = "".join(f'<th style="padding:2px 6px">{html.escape(mem)}</th>' for mem in model.memories())
        body = []
        for mech, mapping in model.rows():
            cells = []
            for mem in model.memories():
                c = model.cell(label, mech, mem, mapping)
                if c is None:
                    cells.append(f'<td style="background:{MISSING_BG};padding:2px 6px">&nbsp;</td>')
                    continue
                bg = OK_BG if c.ok else REFUSED_BG
                border = "border:3px solid #111827;" if several and model.differs(mech, mem, mapping) else ""
                tip = (f"VmPin {c.vmpin_kb_delta:+d} kB" if c.vmpin_kb_delta is not None else "VmPin -") + \
                      (f", foll_pin {c.foll_pin_delta:+d}" if c.foll_pin_delta is not None else "") + \
                      (", refusal traced in check_vma_flags" if c.traced else "")
                cls = "labkit-ok" if c.ok else "labkit-refused"
                cells.append(f'<td class="{cls}" title="{html.escape(tip)}" style="background:{bg};{border}'
                             f'padding:2px 6px;text-align:center">{html.escape(c.label)}</td>')
            rowname = mech if mapping == "shared" else f"{mech} ({mapping})"
            body.append(f'<tr><th style="text-align:left;padding:2px 6px">{html.escape(rowname)}</th>'
                        + "".join(cells) + "</tr>")
        mounts = "".join(
            f'<li>{html.escape(mt["fs"])} -o {html.escape(str(mt.get("options", "dax")))}: '
            f'{"mounted" if mt.get("ok") else "NOT mounted"}, DAX {"on" if mt.get("dax_active") else "off"}, '
            f'EXPERIMENTAL warning {"printed" if mt.get("experimental_warning") else "not printed"}</li>'
            for mt in m.get("mounts", []))
        tables.append(
            f'<div style="margin-right:16px"><div style="font:bold 13px sans-serif">kernel '
            f'{html.escape(str(m.get("kernel", label)))}</div>'
            f'<table class="labkit-matrix-table" style="border-collapse:collapse;font:12px sans-serif">'
            f'<tr><th></th>{head}</tr>{"".join(body)}</table>'
            + (f'<ul style="font:11px sans-serif;margin:4px 0 0 0;padding-left:16px">{mounts}</ul>'
               if mounts else "") + "</div>")
    return f'<div class="labkit-matrix" style="display:flex;flex-wrap:wrap">{"".join(tables)}</div>'


# --------------------------------------------------------------------------
# Widgets (thin views)
# --------------------------------------------------------------------------

class _Throttle:
    """Call ``fn`` at most every ``interval`` s; the last request always lands."""

    def __init__(self, fn: Callable[[], None], interval: float = 0.25) -> None:
        self.fn, self.interval = fn, interval
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __call__(self, *_: object) -> None:
        with self._lock:
            wait = self._last + self.interval - time.monotonic()
            if wait <= 0:
                self._last = time.monotonic()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._fire)
                self._timer.daemon = True
                self._timer.start()
                return
            else:
                return
        self.fn()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        self.fn()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class BootProgress(widgets.VBox):
    """A progress bar and the last console line, over a ``BootProgressModel``."""

    def __init__(self, model: BootProgressModel) -> None:
        self.model = model
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="boot",
                                         layout=widgets.Layout(width="420px"))
        self.text = widgets.HTML()
        super().__init__([self.bar, self.text])
        self.add_class("labkit-boot-progress")
        model.observe(self._render)
        self._render(model)

    def _render(self, m: BootProgressModel) -> None:
        self.layout.display = "none" if m.started is None else None   # nothing to show before a boot
        self.bar.value = m.fraction
        self.bar.bar_style = "danger" if m.error else ("success" if m.done else "info")
        if m.error:
            self.text.value = f'<pre style="color:#b91c1c;white-space:pre-wrap">{html.escape(m.error)}</pre>'
        elif m.done:
            self.text.value = f'<span class="labkit-boot-summary">{html.escape(m.summary or "done")}</span>'
        elif m.started is not None:
            self.text.value = (f'<span style="font:12px sans-serif">[{m.elapsed:5.1f} s] {html.escape(m.stage)}'
                               f'</span><br><code style="font-size:11px">{html.escape(m.last_line)}</code>')
        else:
            self.text.value = ""

    def close(self) -> None:
        self.model.unobserve(self._render)
        self.model.close()
        super().close()


class VMPanel(widgets.VBox):
    """State, kernel, release, accelerator and why; boot progress; Start/Stop/Reset."""

    def __init__(self, model: VMPanelModel) -> None:
        self.model = model
        self.info = widgets.HTML()
        self.start_button = widgets.Button(description="Start", icon="play", tooltip="boot the guest")
        self.stop_button = widgets.Button(description="Stop", icon="stop", tooltip="shut the guest down")
        self.reset_button = widgets.Button(description="Reset", icon="refresh", button_style="warning",
                                           tooltip="vm.reset(): back to a freshly started guest; pmem is kept")
        self.start_button.on_click(lambda _: model.submit_action("start"))
        self.stop_button.on_click(lambda _: model.submit_action("stop"))
        self.reset_button.on_click(lambda _: model.submit_action("reset"))
        self.progress = BootProgress(model.progress)
        self.status = widgets.HTML()
        super().__init__([self.info, widgets.HBox([self.start_button, self.stop_button, self.reset_button]),
                          self.progress, self.status])
        self.add_class("labkit-vm-panel")
        model.observe(self._render)
        self._render(model)

    def _render(self, m: VMPanelModel) -> None:
        colour = {"running": "#15803d", "stopped": "#6b7280", "dead": "#b91c1c"}.get(m.state, "#b45309")
        rows = [("VM", m.name), ("state", f'<b class="labkit-vm-state" style="color:{colour}">'
                                          f'{html.escape(m.state)}</b>'),
                ("kernel", f'<span class="labkit-vm-release">{html.escape(m.kernel_release or "-")}</span>'
                           f' (image {html.escape(m.kernel or "?")})'),
                ("accelerator", f'<b class="labkit-vm-accel">{html.escape(m.accel.upper() or "-")}</b>'
                                f' <span style="color:#4b5563">{html.escape(m.accel_reason)}</span>')]
        if m.boot_seconds:
            rows.append(("boot", f"SSH-ready {m.boot_seconds:.1f} s after QEMU started"))
        self.info.value = ('<table class="labkit-vm-info" style="font:13px sans-serif">' + "".join(
            f'<tr><td style="padding-right:12px;color:#4b5563">{k}</td><td>{v if k != "VM" else html.escape(v)}'
            f'</td></tr>' for k, v in rows) + "</table>")
        running = m.state == "running"
        self.start_button.disabled = bool(m.busy) or running
        self.stop_button.disabled = bool(m.busy) or not running
        self.reset_button.disabled = bool(m.busy)
        parts = []
        if m.busy:
            parts.append(f"<i>{html.escape(m.busy)} ...</i>")
        if m.message:
            parts.append(html.escape(m.message))
        if m.error:
            parts.append(f'<pre style="color:#b91c1c;white-space:pre-wrap">{html.escape(m.error)}</pre>')
        self.status.value = "<br>".join(parts)

    def close(self) -> None:
        self.model.unobserve(self._render)
        self.progress.close()
        self.model.close()
        super().close()


class LogPane(widgets.VBox):
    """The live kernel log with the lines that matter highlighted."""

    def __init__(self, model: KernelLogModel, height_px: int = 260, limit: int = 60) -> None:
        self.model = model
        self.limit = limit
        self.height_px = height_px
        self.highlights_only = widgets.Checkbox(value=model.highlights_only, description="highlighted only",
                                                indent=False)
        self.highlights_only.observe(lambda ch: model.set_highlights_only(ch["new"]), names="value")
        self.summary = widgets.HTML()
        self.text = widgets.HTML()
        super().__init__([widgets.HBox([self.summary, self.highlights_only]), self.text])
        self.add_class("labkit-log-pane")
        self._throttle = _Throttle(self._render_now)
        model.observe(self._throttle)
        self._render_now()

    def _render_now(self) -> None:
        m = self.model
        counts = ", ".join(f'<span style="color:{LOG_COLOURS[k]}">{HIGHLIGHT_LABELS[k]}: {n}</span>'
                           for k, n in m.counts.items() if k != "dax")
        state = "following" if m.running else "not following"
        err = f' <span style="color:#b91c1c">{html.escape(m.error)}</span>' if m.error else ""
        self.summary.value = (f'<span style="font:12px sans-serif">kernel log ({state}, '
                              f'<span class="labkit-log-count">{len(m.lines)}</span> lines) · {counts}{err}</span>')
        self.text.value = log_html(m.visible(self.limit), self.height_px)

    def close(self) -> None:
        self.model.unobserve(self._throttle)
        self._throttle.cancel()
        self.model.close()
        super().close()


class PinPanel(widgets.VBox):
    """Live pin counters with a small plot; register / release a buffer."""

    def __init__(self, model: PinModel) -> None:
        self.model = model
        self.memory = widgets.Dropdown(options=list(MEMORY_KINDS), value=model.memory, description="memory")
        self.memory.observe(lambda ch: model.set_memory(ch["new"]), names="value")
        self.register_button = widgets.Button(description="Register", icon="lock", button_style="primary",
                                              tooltip="ibv_reg_mr on a 2 MiB buffer of this memory, held")
        self.release_button = widgets.Button(description="Release", icon="unlock",
                                             tooltip="ibv_dereg_mr: the holder exits")
        self.register_button.on_click(lambda _: model.submit_register())
        self.release_button.on_click(lambda _: model.submit_release())
        self.numbers = widgets.HTML()
        self.plot = widgets.HTML()
        self.status = widgets.HTML()
        super().__init__([widgets.HBox([self.memory, self.register_button, self.release_button]),
                          self.numbers, self.plot, self.status])
        self.add_class("labkit-pin-panel")
        self._throttle = _Throttle(self._render_now)
        model.observe(self._throttle)
        self._render_now()

    def _render_now(self) -> None:
        m = self.model
        if self.memory.value != m.memory:
            self.memory.value = m.memory
        s = m.latest

        def num(v: int | None) -> str:
            return "-" if v is None else str(v)
        holder = f"PID {m.counters.pid}" if m.counters.pid else "no holder"
        self.numbers.value = (
            '<table class="labkit-pin-numbers" style="font:13px sans-serif">'
            f'<tr><td>VmPin of the holder ({holder})</td><td class="labkit-vmpin"><b>'
            f'{num(s.vmpin_kb if s else None)}</b> kB</td></tr>'
            f'<tr><td>nr_foll_pin_acquired</td><td>{num(s.foll_pin_acquired if s else None)}</td></tr>'
            f'<tr><td>nr_foll_pin_released</td><td>{num(s.foll_pin_released if s else None)}</td></tr>'
            f'<tr><td>FOLL_PIN pins held (acquired - released)</td><td>'
            f'{num(s.foll_pins_held if s else None)}</td></tr></table>')
        hist = m.history
        self.plot.value = ('<div style="display:flex;gap:12px">'
                           # no holder process means nothing pinned by it: plotted as 0
                           + sparkline_svg([(x.t, x.vmpin_kb or 0) for x in hist], "VmPin of the holder", "kB",
                                           "#2563eb")
                           .join(["<div>", "</div>"])
                           + sparkline_svg([(x.t, x.foll_pins_held) for x in hist], "FOLL_PIN held", "pages",
                                           "#db2777").join(["<div>", "</div>"]) + "</div>")
        self.register_button.disabled = bool(m.busy)
        self.release_button.disabled = bool(m.busy) or m.held is None
        parts = []
        if m.busy:
            parts.append(f"<i>{html.escape(m.busy)} ...</i>")
        if m.message:
            parts.append(f'<span class="labkit-pin-message">{html.escape(m.message)}</span>')
        if m.error:
            parts.append(f'<pre style="color:#b91c1c;white-space:pre-wrap">{html.escape(m.error)}</pre>')
        self.status.value = "<br>".join(parts)

    def close(self) -> None:
        self.model.unobserve(self._throttle)
        self._throttle.cancel()
        self.model.close()
        super().close()


class MatrixTable(widgets.VBox):
    """The pin matrix as a coloured table; ``Measure`` runs ``lab.matrix()`` when a Lab is given."""

    def __init__(self, model: MatrixModel) -> None:
        self.model = model
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        children: list[widgets.Widget] = [self.table, self.status]
        self.measure_button = None
        if model.lab is not None:
            self.measure_button = widgets.Button(description="Measure now", icon="table",
                                                 tooltip="every mechanism x memory kind on the live guest")
            self.measure_button.on_click(lambda _: model.submit("measure", model.measure))
            children.insert(0, self.measure_button)
        super().__init__(children)
        self.add_class("labkit-matrix-widget")
        model.observe(self._render)
        self._render(model)

    def _render(self, m: MatrixModel) -> None:
        self.table.value = m.html()
        if self.measure_button is not None:
            self.measure_button.disabled = bool(m.busy)
        parts = [html.escape(m.progress_text)] if m.busy or m.progress_text else []
        if m.error:
            parts.append(f'<pre style="color:#b91c1c;white-space:pre-wrap">{html.escape(m.error)}</pre>')
        self.status.value = "<br>".join(parts)

    def close(self) -> None:
        self.model.unobserve(self._render)
        self.model.close()
        super().close()


@dataclass
class DashboardModel:
    """The models of the whole dashboard, wired so a stop/reset from the VM
    panel closes the observers' channels first and reopens them after."""

    vm_panel: VMPanelModel
    log: KernelLogModel
    pins: PinModel
    matrix: MatrixModel

    def __post_init__(self) -> None:
        self.vm_panel.before_stop.append(self._before_stop)
        self.vm_panel.after_start.append(self._after_start)

    def _before_stop(self) -> None:
        self.pins.stop()
        self.log.stop()

    def _after_start(self) -> None:
        self.log.start()
        self.pins.restart()

    def close(self) -> None:
        for m in (self.pins, self.log, self.matrix, self.vm_panel):
            m.close()


class Dashboard(widgets.VBox):
    def __init__(self, model: DashboardModel, panel: VMPanel, log: LogPane, pins: PinPanel,
                 matrix: MatrixTable) -> None:
        self.model = model
        self.panel_view, self.log_view, self.pin_view, self.matrix_view = panel, log, pins, matrix
        self.tabs = widgets.Tab(children=[log, pins, matrix], titles=("Kernel log", "Pins", "Pin matrix"))
        self.tabs.selected_index = 0
        super().__init__([panel, self.tabs])
        self.add_class("labkit-dashboard")

    def close(self) -> None:
        for w in (self.pin_view, self.log_view, self.matrix_view, self.panel_view):
            w.close()
        self.tabs.close()
        super().close()


# --------------------------------------------------------------------------
# Public API (what notebooks call)
# --------------------------------------------------------------------------

def boot_progress(expected_seconds: float = 10.0) -> BootProgress:
    """A boot progress bar, its clock started; pass ``.model.on_console_line``
    to ``labkit.connect`` and call ``.model.finish(vm)`` when it returns (it
    says "attached" if no console line came: the VM was already running)."""
    model = BootProgressModel(expected_seconds)
    model.begin()
    return BootProgress(model)


def vm_panel(vm, poll_interval: float | None = 2.0) -> VMPanel:
    """State, kernel, release, accelerator (and why), boot progress, Start/Stop/Reset."""
    return VMPanel(VMPanelModel(vm, poll_interval=poll_interval))


def log_pane(vm, lab=None, since_now: bool = False) -> LogPane:
    """The live kernel log with EXPERIMENTAL warnings, pin refusals and
    check_vma_flags refusals highlighted."""
    return LogPane(KernelLogModel(vm, lab).start(since_now=since_now))


def pin_panel(vm, lab, interval: float = 1.0) -> PinPanel:
    """VmPin of the holder and nr_foll_pin_acquired/released over time, with
    Register / Release of a held RDMA registration on a chosen memory kind."""
    return PinPanel(PinModel(vm, lab, interval=interval).start())


def matrix_table(results: Mapping | None = None, lab=None) -> MatrixTable:
    """``Lab.matrix()`` output (or ``{label: matrix}`` side by side) as a coloured table."""
    return MatrixTable(MatrixModel(results, lab=lab))


def dashboard(vm, lab=None) -> Dashboard:
    """The VM panel above tabs with the kernel log, the pin counters and the pin matrix."""
    if lab is None:
        from labkit.lab.core import Lab
        lab = Lab(vm)
    panel, log, pins, matrix = vm_panel(vm), log_pane(vm, lab), pin_panel(vm, lab), matrix_table(None, lab)
    model = DashboardModel(panel.model, log.model, pins.model, matrix.model)
    return Dashboard(model, panel, log, pins, matrix)


__all__ = ["BootProgressModel", "VMPanelModel", "KernelLogModel", "PinModel", "MatrixModel", "DashboardModel",
           "boot_progress", "vm_panel", "log_pane", "pin_panel", "matrix_table", "dashboard",
           "log_html", "sparkline_svg", "matrix_html"]
