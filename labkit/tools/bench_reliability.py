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

Each trial ends in one ``OUTCOMES`` kind (``classify``). A trial is written to
the ``--out`` file as soon as it ends, so a long measurement runs in chunks
(``--budget`` seconds each, under the host's guest lock) that add up.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labkit.errors import (
    ChannelError,
    ConfigError,
    GuestDied,
    GuestHung,
    GuestPanic,
    GuestTimeout,
    LabError,
    LaunchError,
)

Say = Callable[[str], None]

KINDS = ("cold", "warm", "kprobe", "module")
# Every way a trial ends; all but "ok" are failures ("int3_boot_recovered" one that labkit recovered from).
OUTCOMES = {
    "ok": "ok",
    "int3_boot_recovered": "int3 oops in early boot, booted again (recovered)",
    "int3_boot": "int3 oops in early boot, not recovered",
    "int3_running": "int3 oops outside early boot",
    "ssh_timeout": "SSH timeout",
    "qemu_died": "QEMU died",
    "other": "other",
}
RECOVERED = frozenset({"int3_boot_recovered"})
INT3 = "Oops: int3"
# The line boot.py shows when it boots again after an int3 in early boot.
RETRY_NOTE = re.compile(r"^labkit: .*int3.*booting again")
# The first console line of a kernel error, for "other".
ERROR_LINE = re.compile(r"(Oops|BUG:|Kernel panic|general protection fault|WARNING:|Call Trace)")
# What makes a trial that otherwise worked a failure (a WARN alone does not).
FATAL_LINE = re.compile(r"(Oops|BUG:|Kernel panic|general protection fault)")

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


@dataclass
class Trial:
    """One trial as it ended; one line of the results file."""

    kernel: str
    kind: str                 # KINDS
    outcome: str              # OUTCOMES
    detail: str = ""          # for a failure: the first console line of the error, or the error's first line
    seconds: float = 0.0
    when: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


# -- classification (pure) --------------------------------------------------------

def first_error_line(console: str, pattern: re.Pattern[str] = ERROR_LINE) -> str:
    """The first console line that reports a kernel error, or ''."""
    for line in console.splitlines():
        if pattern.search(line):
            return line.strip()[:200]
    return ""


def classify(kind: str, exc: BaseException | None, console: str, retried: bool = False,
             output: str = "", booting: bool = False) -> tuple[str, str]:
    """How a trial of ``kind`` ended: ``(outcome, detail)``.

    ``exc`` is what the trial raised (None: it ran to the end), ``console``
    the guest's console output during the trial, ``retried`` whether the boot
    said it booted again after an int3, ``output`` a failed cycle command's
    output, ``booting`` whether ``exc`` came from the start itself."""
    text = console + "\n" + _carried(exc)
    if exc is None and not output:
        if retried:
            return "int3_boot_recovered", ""
        if INT3 in text:               # the guest survived it (the oops killed a process)
            return "int3_running", _line_with(text, INT3)
        err = first_error_line(console, FATAL_LINE)
        return ("other", err) if err else ("ok", "")
    if INT3 in text:
        # after its one retry a cold boot that still dies on int3 died in early boot; a restored
        # (warm) kernel or a cycle's is a running kernel
        early = kind == "cold" and booting and isinstance(exc, (GuestPanic, LaunchError))
        return ("int3_boot" if early else "int3_running"), _line_with(text, INT3)
    if exc is None:
        return "other", first_error_line(console) or (output.strip().splitlines() or ["?"])[0][:200]
    if isinstance(exc, GuestPanic):
        return "other", first_error_line(text) or _first(exc)
    if isinstance(exc, GuestDied) or (isinstance(exc, LaunchError) and _qemu_gone(exc)):
        return "qemu_died", first_error_line(text) or _first(exc)
    if isinstance(exc, ChannelError) or (isinstance(exc, GuestTimeout) and _over_ssh(exc)):
        return "ssh_timeout", _first(exc)
    return "other", first_error_line(text) or _first(exc)


def _carried(exc: BaseException | None) -> str:
    return "\n".join(str(getattr(exc, a, "") or "") for a in ("console_tail", "output")) if exc else ""


def _over_ssh(exc: GuestTimeout) -> bool:
    """An SSH connect, a guest command or a guest that stopped answering (not the console's boot wait)."""
    return isinstance(exc, GuestHung) or any(w in str(exc) for w in ("SSH", "guest command"))


def _qemu_gone(exc: LaunchError) -> bool:
    return any(w in str(exc) for w in ("QEMU exited", "QEMU closed", "exited or crashed"))


def _first(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _line_with(text: str, needle: str) -> str:
    return next((ln.strip()[:200] for ln in text.splitlines() if needle in ln), needle)


# -- the results: a file of trials, added up ------------------------------------------

def load(path: Path | None) -> list[Trial]:
    """The trials in a results file (none if it does not exist)."""
    if path is None or not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [Trial(**t) for t in data["trials"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a results file of `labkit bench --reliability`: {exc}",
                       hint="give another --out file, or remove this one") from exc


def save(path: Path, trials: Sequence[Trial]) -> None:
    """Write the trials atomically (an interrupted chunk never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "trials": [asdict(t) for t in trials]}, indent=0))
    os.replace(tmp, path)


def upper_bound(failures: int, trials: int) -> float:
    """The 95 % upper bound of a failure rate (Wilson score interval: 0 of 200 gives 1.9 %)."""
    if trials == 0:
        return 1.0
    z, p = 1.96, failures / trials
    centre = p + z * z / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + margin) / (1 + z * z / trials))


def summarize(trials: Iterable[Trial]) -> dict[str, Any]:
    """Per kernel and kind: trials, failures by outcome, recovered, rates, mean seconds."""
    out: dict[str, dict[str, Any]] = {}
    for t in trials:
        row = out.setdefault(t.kernel, {}).setdefault(t.kind, {
            "trials": 0, "failures": 0, "recovered": 0, "by_outcome": {}, "details": {}, "seconds": 0.0})
        row["trials"] += 1
        row["seconds"] += t.seconds
        if t.failed:
            row["failures"] += 1
            row["recovered"] += t.outcome in RECOVERED
            row["by_outcome"][t.outcome] = row["by_outcome"].get(t.outcome, 0) + 1
            if t.detail:
                row["details"].setdefault(t.outcome, [])
                if t.detail not in row["details"][t.outcome] and len(row["details"][t.outcome]) < 3:
                    row["details"][t.outcome].append(t.detail)
    for kinds in out.values():
        for row in kinds.values():
            n = row["trials"]
            row["mean_s"] = round(row.pop("seconds") / n, 2)
            row["failure_rate"] = round(row["failures"] / n, 4)
            unrecovered = row["failures"] - row["recovered"]
            row["unrecovered_rate"] = round(unrecovered / n, 4)
            row["unrecovered_upper95"] = round(upper_bound(unrecovered, n), 4)
    return {"kernels": out, "totals": _totals(out)}


def _totals(out: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tot: dict[str, Any] = {}
    for kinds in out.values():
        for kind, row in kinds.items():
            t = tot.setdefault(kind, {"trials": 0, "failures": 0, "recovered": 0, "by_outcome": {}})
            for k in ("trials", "failures", "recovered"):
                t[k] += row[k]
            for o, n in row["by_outcome"].items():
                t["by_outcome"][o] = t["by_outcome"].get(o, 0) + n
    return tot


def format_report(summary: dict[str, Any], accel: str = "") -> str:
    """The table: one line per kernel and kind, then the totals, with rates."""
    cols = [o for o in OUTCOMES if o != "ok"]
    short = {"int3_boot_recovered": "i3boot+rec", "int3_boot": "i3boot", "int3_running": "i3run",
             "ssh_timeout": "ssh", "qemu_died": "qemu", "other": "other"}
    head = f"  {'kernel':7s} {'kind':7s} {'trials':>6s} " + " ".join(f"{short[c]:>10s}" for c in cols)
    lines = [f"labkit bench --reliability{' (' + accel + ')' if accel else ''}: failures per kind", "", head]
    rows = [(k, kind, row) for k, kinds in sorted(summary["kernels"].items()) for kind, row in kinds.items()]
    rows += [("all", kind, row) for kind, row in summary["totals"].items()]
    for kernel, kind, row in rows:
        cells = " ".join(f"{row['by_outcome'].get(c, 0):>10d}" for c in cols)
        lines.append(f"  {kernel:7s} {kind:7s} {row['trials']:>6d} {cells}")
    lines += ["", "Rates (failures / trials; unrecovered with its 95 % upper bound):"]
    for kernel, kind, row in rows:
        if kernel == "all":
            continue
        n, unrec = row["trials"], row["failures"] - row["recovered"]
        lines.append(f"  {kernel:7s} {kind:7s} {row['failures']}/{n} failed ({100 * row['failure_rate']:.1f} %), "
                     f"{row['recovered']} recovered, {unrec} unrecovered "
                     f"(<= {100 * upper_bound(unrec, n):.1f} %), {row['mean_s']:.1f} s each")
        for outcome, details in row.get("details", {}).items():
            lines += [f"      {outcome}: {d}" for d in details]
    lines += ["", "  columns: " + "; ".join(f"{short[c]} = {OUTCOMES[c]}" for c in cols)]
    return "\n".join(lines)


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
            say(f"{kernel}: the guest for the cycles did not start ({_first(exc)}); trying a fresh one")


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
            say(f"{kernel}: making the snapshot failed ({_first(exc)}); attempt {attempt} of {attempts}")
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
