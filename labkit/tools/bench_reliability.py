"""``labkit bench --reliability``: how often a guest fails to come up, or dies
while the kernel patches its own text, counted by kind, per kernel.

Under TCG with two vCPUs a guest kernel sometimes dies on ``Oops: int3``
while it live-patches its text (text_poke's breakpoint): a vCPU runs a stale
translation of the patched bytes. ``boot.py`` boots once more when that
happens in early boot. Kernel text is patched later too: a kprobe armed
through tracefs (the lab's tracing, the kretprobe exercises) and a module
load (the counterfactual's modules register kretprobes). This bench counts,
per kernel:

- ``cold``: a cold boot to a working SSH command;
- ``warm``: a warm start (restore of the snapshot) to a working SSH command;
- ``kprobe``: in a running guest, a kretprobe added to ``kprobe_events``,
  enabled, triggered, disabled and removed;
- ``module``: in a running guest, the counterfactual's module loaded,
  triggered and unloaded;

both while a loop on the other vCPU runs the probed function (``BUSY``).

Each trial ends in one ``OUTCOMES`` kind (``reliability_count.classify``). A trial is written to
the ``--out`` file as soon as it ends, so a long measurement runs in chunks
(``--budget`` seconds each, under the host's guest lock) that add up.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labkit.errors import LabError
from labkit.tools.reliability_count import RETRY_NOTE, Trial, classify, first_line, load, save, summarize

Say = Callable[[str], None]

TRACE_GROUP = "labkit_rel"
KPROBE_CYCLE = (f"cd /sys/kernel/tracing && "
                f"{{ echo '-:{TRACE_GROUP}/cvf' >> kprobe_events; }} 2>/dev/null; "
                f"echo 'r:{TRACE_GROUP}/cvf check_vma_flags ret=$retval:s32' >> kprobe_events && "
                f"echo 1 > events/{TRACE_GROUP}/cvf/enable && cat /proc/1/cmdline >/dev/null && "
                f"echo 0 > events/{TRACE_GROUP}/cvf/enable && echo '-:{TRACE_GROUP}/cvf' >> kprobe_events")
MODULE = "labkit_no_longterm_check"      # the counterfactual's module: a kretprobe on check_vma_flags
MODULE_CYCLE = f"modprobe {MODULE} && cat /proc/1/cmdline >/dev/null && rmmod {MODULE}"
# The race needs a vCPU executing the text while another patches it: a loop keeps the other vCPU
# in the probed function (reading another process's memory is a GUP: check_vma_flags) meanwhile.
BUSY = "( while :; do cat /proc/1/cmdline >/dev/null; done ) & b=$!; ( {cycle} ); rc=$?; kill $b; wait $b; exit $rc"
CYCLES = {"kprobe": BUSY.format(cycle=KPROBE_CYCLE), "module": BUSY.format(cycle=MODULE_CYCLE)}


# -- running trials -----------------------------------------------------------------

class Guest(Protocol):
    """What a trial needs of a VM (``labkit.machine.vm.VM`` has it)."""

    @property
    def console_log(self) -> Path: ...

    def start(self) -> Any: ...
    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> Any: ...
    def finish(self) -> None: ...


MakeVM = Callable[..., Guest]    # (name, kernel, warm=..., on_console_line=...) -> a VM not yet started


@dataclass
class Plan:
    """How many trials of each kind, per kernel, and the limits of this chunk."""

    kernels: Sequence[str]
    cold: int = 0
    warm: int = 0
    cycles: int = 0
    cycles_per_guest: int = 20
    parallel: int = 1
    budget_s: float | None = None     # start no new trial after this many seconds
    started: float = field(default_factory=time.monotonic)

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.started > self.budget_s


def _console_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def start_trial(make_vm: MakeVM, kernel: str, kind: str, name: str) -> Trial:
    """One cold boot or warm start to a working SSH command, then a stop."""
    retried: list[str] = []
    vm = make_vm(name, kernel, warm=kind == "warm",
                 on_console_line=lambda line: retried.append(line) if RETRY_NOTE.match(line) else None)
    t0 = time.monotonic()
    exc: BaseException | None = None
    booting = True
    try:
        vm.start()
        booting = False
        kind = _came_up(vm, kind)
        vm.run("true", timeout=30, check=True)
    except LabError as e:
        exc = e
    seconds = time.monotonic() - t0
    console = _console_since(vm.console_log, 0)
    try:
        vm.finish()
    except LabError:
        pass
    outcome, detail = classify(kind, exc, console, retried=bool(retried), booting=booting)
    return Trial(kernel, kind, outcome, detail, round(seconds, 2), _stamp())


def _came_up(vm: Guest, kind: str) -> str:
    """The kind of start it really was: a warm start without a snapshot to restore is a cold boot."""
    record = getattr(vm, "record", None)
    return "cold" if kind == "warm" and getattr(record, "start_kind", "warm") == "cold" else kind


def cycle_trials(make_vm: MakeVM, kernel: str, kinds: Sequence[str], name: str,
                 record: Callable[[Trial], None], stop: Callable[[], bool]) -> None:
    """Kprobe or module cycles (``kinds`` in order) in one warm-started guest.
    A failed cycle ends the guest: the next cycles get a fresh one."""
    vm = make_vm(name, kernel, warm=True, on_console_line=None)
    try:
        vm.start()
    except LabError:                        # counted by the start trials, not here
        vm.finish()
        raise
    try:
        for kind in kinds:
            if stop():
                return
            trial = _one_cycle(vm, kernel, kind)
            record(trial)
            if trial.failed:
                return
    finally:
        try:
            vm.finish()
        except LabError:
            pass


def _one_cycle(vm: Guest, kernel: str, kind: str) -> Trial:
    offset = _size(vm.console_log)
    t0 = time.monotonic()
    exc: BaseException | None = None
    output = ""
    try:
        r = vm.run(CYCLES[kind], timeout=30)
        if r.rc != 0:
            output = f"exit {r.rc}: " + (r.stderr or r.stdout or "").strip()
    except LabError as e:
        exc = e
    seconds = time.monotonic() - t0
    outcome, detail = classify(kind, exc, _console_since(vm.console_log, offset), output=output)
    return Trial(kernel, kind, outcome, detail, round(seconds, 2), _stamp())


def run(plan: Plan, make_vm: MakeVM, record: Callable[[Trial], None], say: Say) -> None:
    """Run the plan's trials, ``plan.parallel`` guests at a time; each trial is
    handed to ``record`` as soon as it ends."""
    lock = threading.Lock()
    counter = iter(range(10**9))

    def rec(t: Trial) -> None:
        with lock:
            record(t)
        say(f"{t.kernel} {t.kind}: {t.outcome}{' - ' + t.detail if t.detail else ''} ({t.seconds:.1f} s)")

    def name() -> str:
        with lock:
            return f"rel-{os.getpid()}-{next(counter)}"

    queues: list[list[Callable[[], None]]] = []
    for kernel in plan.kernels:
        for kind, n in (("cold", plan.cold), ("warm", plan.warm)):
            queues.append([functools.partial(_start_job, make_vm, kernel, kind, name, rec) for _ in range(n)])
        kinds = [("kprobe", "module")[i % 2] for i in range(plan.cycles)]
        queues.append([functools.partial(_guest_cycles, make_vm, kernel, kinds[i:i + plan.cycles_per_guest], name,
                                         rec, plan.out_of_time, say)
                       for i in range(0, len(kinds), plan.cycles_per_guest)])
    jobs = interleave(queues)
    with concurrent.futures.ThreadPoolExecutor(max_workers=plan.parallel) as pool:
        futures = [pool.submit(_unless_out_of_time, plan, job) for job in jobs]
        for f in concurrent.futures.as_completed(futures):
            f.result()


def interleave(queues: Sequence[Sequence[Any]]) -> list[Any]:
    """One of each queue in turn, so a chunk cut short by its budget still samples every kind and kernel."""
    out: list[Any] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def _start_job(make_vm: MakeVM, kernel: str, kind: str, name: Callable[[], str],
               rec: Callable[[Trial], None]) -> None:
    rec(start_trial(make_vm, kernel, kind, name()))


def _unless_out_of_time(plan: Plan, job: Callable[[], None]) -> None:
    if not plan.out_of_time():
        job()


def _guest_cycles(make_vm: MakeVM, kernel: str, kinds: list[str], name: Callable[[], str],
                  rec: Callable[[Trial], None], stop: Callable[[], bool], say: Say) -> None:
    """Cycles until ``kinds`` are all done: a fresh guest after each failed one
    (a guest that would not start is retried twice, then the rest is given up)."""
    done: list[Trial] = []

    def keep(t: Trial) -> None:
        done.append(t)
        rec(t)

    starts_failed = 0
    while len(done) < len(kinds) and not stop() and starts_failed < 3:
        try:
            cycle_trials(make_vm, kernel, kinds[len(done):], name(), keep, stop)
        except LabError as exc:
            starts_failed += 1
            say(f"{kernel}: the guest for the cycles did not start ({first_line(exc)}); trying a fresh one")


# -- the real guests ------------------------------------------------------------------

def real_vm_factory(settings: Any) -> MakeVM:
    """Throwaway VMs of labkit's own (``labkit.machine.vm.VM``) with these settings."""
    from labkit.machine.vm import VM

    def make(name: str, kernel: str, warm: bool = True,
             on_console_line: Callable[[str], None] | None = None) -> Guest:
        return VM(name, kernel=kernel, warm=warm, on_console_line=on_console_line, settings=settings)
    return make


def prime(make_vm: MakeVM, kernel: str, say: Say, attempts: int = 3) -> None:
    """Make sure the kernel's warm-start snapshot exists (not a trial: it may be a cold boot)."""
    say(f"making the warm-start snapshot for {kernel} (not a trial)")
    for attempt in range(1, attempts + 1):
        vm = make_vm(f"rel-prime-{os.getpid()}", kernel, warm=True, on_console_line=None)
        try:
            vm.start()
            return
        except LabError as exc:
            say(f"{kernel}: making the snapshot failed ({first_line(exc)}); attempt {attempt} of {attempts}")
            if attempt == attempts:
                raise
        finally:
            vm.finish()


def measure(plan: Plan, settings: Any, out: Path | None, say: Say) -> dict[str, Any]:
    """Run the plan on real guests; add its trials to ``out`` (if given) as
    they end; return the summary of everything in ``out`` (or of this run)."""
    from labkit.image.build import ensure_image
    from labkit.machine import snapshot
    from labkit.tools.bench import machine
    trials = load(out)
    before = len(trials)
    make_vm = real_vm_factory(settings)
    for kernel in plan.kernels if plan.cold or plan.warm or plan.cycles else ():
        ensure_image(kernel)
        # a snapshot of another machine key is not restored: that warm trial counts as the cold boot it was
        if (plan.warm or plan.cycles) and not any(s.meta.get("kernel") == kernel
                                                  for s in snapshot.list_snapshots(settings)):
            prime(make_vm, kernel, say)

    def record(t: Trial) -> None:
        trials.append(t)
        if out is not None:
            save(out, trials)
    run(plan, make_vm, record, say)
    summary = summarize(trials)
    summary.update(this_run=len(trials) - before, out=str(out) if out else None, machine=machine(),
                   date=_stamp() + " UTC", out_of_time=plan.out_of_time())
    return summary
