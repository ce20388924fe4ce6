"""``labkit bench --concurrent N ...``: the first five minutes of a class.
N learners' guests are warm-started at the same instant on this host, each
then runs the first cells' work (attach from a second notebook, the pmem
namespaces, DAX mounts, one pin), through the same calls the notebooks make.

Each learner is a process of its own with a state directory of its own
(``LABKIT_STATE_DIR``), as a learner's Jupyter kernel is; they share the
host's warm-start snapshot, as a class does. All of them import labkit
first and wait at a barrier, so the starts, not the imports, are what
happens at once. Per N: time to ready (go to ``connect()`` returning,
queue wait included) p50/p95/max, the failures by kind, what recovered on
its own (an int3 oops booted again, a warm start that fell back to a cold
boot), how many waited in the host's start queue (``machine/pace.py``),
the host's CPU and memory while it ran, and p95(N) over the single start.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import psutil

from labkit.errors import ChannelError, GuestDied, GuestTimeout, LabError, LaunchError, StartQueueTimeout
from labkit.machine import pace
from labkit.settings import Settings, from_environment
from labkit.timeout import Deadline

Say = Callable[[str], None]
KINDS = ("int3 oops", "SSH timeout", "QEMU exit", "queue timeout", "other")
MB = 2**20


# -- figures (pure) ------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (with 8 samples p95 is the largest: no interpolation
    invents a start that did not happen)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def classify(exc: BaseException) -> str:
    """The kind of a failed start or first cell, for the table."""
    text = str(exc)
    if isinstance(exc, StartQueueTimeout):
        return "queue timeout"
    if "Oops: int3" in text or (isinstance(exc, GuestDied) and "Oops: int3" in exc.console_tail):
        return "int3 oops"
    if isinstance(exc, (LaunchError, GuestDied)):
        return "QEMU exit"
    if isinstance(exc, (GuestTimeout, ChannelError)) and "SSH" in text:
        return "SSH timeout"
    return "other"


def recovered(lines: Sequence[str]) -> list[str]:
    """What went wrong in a start and was recovered by the start itself."""
    out = []
    if any("int3" in line and "booting again" in line for line in lines):
        out.append("int3 oops, booted again")
    if any("booting cold" in line for line in lines):
        out.append("warm start fell back to a cold boot")
    return out


def summarize(n: int, results: Sequence[dict[str, Any]], host: dict[str, float]) -> dict[str, Any]:
    """One row of the table from the learners' reports and the host's samples."""
    ready = [r["ready_s"] for r in results if r.get("ok")]
    failures = Counter(r["kind"] for r in results if not r.get("ok"))
    queued = [r.get("queue_s", 0.0) for r in results if r.get("queue_place")]
    fig = {"n": n, "ok": len(ready), "failures": {k: failures.get(k, 0) for k in KINDS},
           "failed": sum(failures.values()),
           "recovered": dict(Counter(x for r in results for x in r.get("recovered", []))),
           "queued": len(queued), "queue_wait_max_s": round(max(queued), 2) if queued else 0.0,
           "work_p50_s": _r(percentile([r["work_s"] for r in results if r.get("work_s") is not None], 50)),
           "errors": [r["error"] for r in results if not r.get("ok")][:5],
           "told": sorted({r["told"] for r in results if r.get("told")})[:5]}    # what waiting learners read
    for p, key in ((50, "ready_p50_s"), (95, "ready_p95_s"), (100, "ready_max_s")):
        fig[key] = _r(percentile(ready, p))
    return {**fig, **host}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    single = next((r["ready_p95_s"] for r in rows if r["n"] == 1 and r["ready_p95_s"]), None)
    for r in rows:
        r["p95_over_single"] = round(r["ready_p95_s"] / single, 2) if single and r["ready_p95_s"] else None
    return rows


# -- the host while it runs ------------------------------------------------------------------

class HostSampler(threading.Thread):
    """CPU, load and memory of the whole host, twice a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.cpu: list[float] = []
        self.load_peak, self.used_peak, self.avail_min = 0.0, 0, psutil.virtual_memory().available
        psutil.cpu_percent(interval=None)          # starts psutil's interval

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.cpu.append(psutil.cpu_percent(interval=None))
            vm = psutil.virtual_memory()
            self.used_peak = max(self.used_peak, vm.total - vm.available)
            self.avail_min = min(self.avail_min, vm.available)
            self.load_peak = max(self.load_peak, os.getloadavg()[0])

    def figures(self) -> dict[str, float]:
        self.stop_event.set()
        self.join(timeout=5)
        return {"cpu_mean_pct": round(sum(self.cpu) / len(self.cpu), 1) if self.cpu else 0.0,
                "cpu_peak_pct": round(max(self.cpu, default=0.0), 1), "load1_peak": round(self.load_peak, 2),
                "mem_used_peak_mb": round(self.used_peak / MB), "mem_available_min_mb": round(self.avail_min / MB)}


# -- one round: N learners at once ---------------------------------------------------------

def run(kernel: str, ns: Sequence[int], say: Say, settings: Settings | None = None) -> dict[str, Any]:
    """Every round of ``ns``, one after the other; the figures and the machine."""
    from labkit.image.build import ensure_image
    from labkit.machine.vm import VM
    from labkit.tools.bench import machine
    settings = settings or from_environment()
    ensure_image(kernel)
    say(f"making sure the warm-start snapshot for {kernel} exists (not timed)")
    with VM("bench-prime", kernel=kernel, settings=settings) as vm:
        accel = vm.accel.accel if vm.accel else None
    rows = [one_round(kernel, n, say) for n in ns]
    return {"kernel": kernel, "accel": accel, "start_slots": pace.slots_for(settings, 1024),
            "concurrent": with_ratios(rows), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def one_round(kernel: str, n: int, say: Say, env: dict[str, str] | None = None) -> dict[str, Any]:
    """N learners started at one instant; their figures and the host's."""
    with tempfile.TemporaryDirectory(prefix=f"labkit-conc{n}-") as tmp:
        workers = [_spawn(kernel, i, Path(tmp), env or dict(os.environ)) for i in range(n)]
        events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        for i, w in enumerate(workers):
            threading.Thread(target=_pump, args=(i, w, events), daemon=True).start()
        try:
            _barrier(workers, events, say, n)
            sampler = HostSampler()
            sampler.start()
            say(f"N={n}: go")
            for w in workers:
                _send(w, "go")
            results = _collect(workers, events, say, n)
            host = sampler.figures()
        finally:
            _finish(workers)
        for i, r in enumerate(results):
            if r.get("kind") == "other" and r.get("error", "").startswith("worker exited"):
                r["error"] += " " + (Path(tmp) / f"learner{i}.log").read_text(errors="replace")[-300:]
    row = summarize(n, results, host)
    say(f"N={n}: ready p50 {row['ready_p50_s']} s, p95 {row['ready_p95_s']} s, failed {row['failed']}, "
        f"queued {row['queued']}")
    return row


def _spawn(kernel: str, i: int, tmp: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    env = dict(env, LABKIT_STATE_DIR=str(tmp / f"learner{i}"))
    log = open(tmp / f"learner{i}.log", "w")
    try:
        return subprocess.Popen([sys.executable, "-m", "labkit.tools.bench_concurrent", f"learner{i}", kernel],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    finally:
        log.close()


def _pump(i: int, w: subprocess.Popen[str], events: queue.Queue[tuple[int, dict[str, Any]]]) -> None:
    assert w.stdout is not None
    for line in w.stdout:
        try:
            events.put((i, json.loads(line)))
        except ValueError:
            continue                     # not ours (a library's print)
    events.put((i, {"event": "exit"}))


def _send(w: subprocess.Popen[str], word: str) -> None:
    try:
        assert w.stdin is not None
        w.stdin.write(word + "\n")
        w.stdin.flush()
    except (OSError, ValueError):
        pass                             # it died; its end is reported by its pump


def _barrier(workers: list[subprocess.Popen[str]], events: queue.Queue[tuple[int, dict[str, Any]]],
             say: Say, n: int) -> None:
    say(f"N={n}: {n} learner process(es) importing labkit (not timed)")
    waiting, deadline = set(range(n)), Deadline(120)
    while waiting:
        i, ev = events.get(timeout=max(0.1, deadline.remaining))
        if ev["event"] == "exit":
            raise LabError(f"learner {i + 1} of the bench exited before the start (exit {workers[i].wait()})")
        if ev["event"] == "imported":
            waiting.discard(i)


def _collect(workers: list[subprocess.Popen[str]], events: queue.Queue[tuple[int, dict[str, Any]]],
             say: Say, n: int) -> list[dict[str, Any]]:
    """Each learner's report, with progress lines as they come."""
    results: dict[int, dict[str, Any]] = {}
    # the longest a learner may wait in line, then start and run its cells
    deadline = Deadline(from_environment().start_queue_timeout + 300 + 60 * n)
    while len(results) < n and not deadline.expired:
        try:
            i, ev = events.get(timeout=max(0.1, deadline.remaining))
        except queue.Empty:
            break
        kind = ev["event"]
        if kind == "queued":
            say(f"N={n} learner {i + 1}: {ev['line'].removeprefix('labkit: ')}")
        elif kind == "ready":
            say(f"N={n} learner {i + 1}: ready in {ev['ready_s']:.1f} s ({ev['start_kind']} start"
                + (f", {ev['queue_s']:.1f} s in the start queue)" if ev.get("queue_place") else ")"))
        elif kind in ("done", "failed"):
            results[i] = ev
            if kind == "failed":
                say(f"N={n} learner {i + 1}: FAILED ({ev['kind']}): {ev['error']}")
        elif kind == "exit" and i not in results:
            results[i] = {"ok": False, "kind": "other", "error": f"worker exited ({workers[i].wait()})"}
    for i in range(n):
        results.setdefault(i, {"ok": False, "kind": "other", "error": "no report within the round's time"})
    return [results[i] for i in range(n)]


def _finish(workers: list[subprocess.Popen[str]]) -> None:
    """Every learner stops and deletes its VM; one that does not is killed
    (its QEMU dies with it: the learners tie their VMs to themselves)."""
    for w in workers:
        _send(w, "end")
    deadline = Deadline(120)
    for w in workers:
        try:
            w.wait(timeout=max(0.1, deadline.remaining))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(timeout=10)


# -- one learner (a process of its own) --------------------------------------------------------

def learner(name: str, kernel: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Wait for "go", then do what a learner's first cells do; report each
    step as one JSON line; on "end", delete the VM."""
    from labkit.lab import Lab
    from labkit.machine.vm import VM, connect

    def emit(**ev: Any) -> None:
        stdout.write(json.dumps(ev) + "\n")
        stdout.flush()

    lines: list[str] = []

    def progress(line: str) -> None:
        if line.startswith("labkit:"):
            lines.append(line)
            if "in line" in line and not any("in line" in x for x in lines[:-1]):
                emit(event="queued", line=line)

    # The VM dies with this process (a killed bench leaves no guest behind).
    settings = from_environment().with_(lifetime_pid=os.getpid())
    emit(event="imported")
    if stdin.readline().strip() != "go":
        return 1
    t0, step = time.monotonic(), "start"
    report: dict[str, Any] = {"event": "failed", "ok": False}
    try:
        vm = connect(name, kernel=kernel, on_console_line=progress, settings=settings)
        ready = time.monotonic() - t0
        phases = vm.record.phases or {}
        emit(event="ready", ready_s=ready, start_kind=vm.record.start_kind, queue_s=phases.get("start queue", 0.0),
             queue_place="start queue" in phases)
        step, t1 = "first cells", time.monotonic()
        first_cells(Lab(connect(name, kernel=kernel, settings=settings)))     # a second notebook attaches
        report = {"event": "done", "ok": True, "ready_s": ready, "work_s": time.monotonic() - t1,
                  "queue_s": phases.get("start queue", 0.0), "queue_place": "start queue" in phases}
    except Exception as exc:      # every failure is a figure of the table, with its kind
        report.update(kind=classify(exc), error=f"{step}: " + (str(exc).splitlines() or [type(exc).__name__])[0])
    report["recovered"] = recovered(lines)
    report["told"] = next((line for line in lines if "in line" in line), "")
    emit(**report)
    stdin.readline()                     # "end" (or the parent's end: EOF)
    VM(name, persistent=True, settings=settings).delete()
    return 0


def first_cells(lab: Any) -> None:
    """Notebooks 00-02's first work: the namespaces, pmem for the course,
    the DAX mounts, one long-term pin of file-backed DAX memory."""
    lab.namespaces()
    roles = lab.prepare_pmem()
    lab.prepare_mounts()
    lab.setup_rdma()
    lab.pin("rdma", "fsdax-xfs", roles=roles)


# -- the table ------------------------------------------------------------------------------------

def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (f"labkit bench --concurrent: kernel {r['kernel']}, accelerator {r['accel']}, "
            f"{r['start_slots']} guest(s) start at once (start queue), {r['date']}: {m['cpu']}, {m['cores']} cores, "
            f"{m['qemu']}")
    cols = (f"  {'N':>3s} {'ready p50':>9s} {'p95':>6s} {'max':>6s} {'p95/1':>6s} {'failed':>6s} {'queued':>6s} "
            f"{'wait max':>8s} {'cells p50':>9s} {'CPU mean/peak':>13s} {'load':>5s} {'mem used':>8s} "
            f"{'avail min':>9s}")
    lines = [head, "", "  time to ready: go to connect() returning (start queue included), in s; memory in MB",
             cols]
    for row in r["concurrent"]:
        lines.append(f"  {row['n']:>3d} {_f(row['ready_p50_s']):>9s} {_f(row['ready_p95_s']):>6s} "
                     f"{_f(row['ready_max_s']):>6s} {_f(row['p95_over_single']):>6s} {row['failed']:>6d} "
                     f"{row['queued']:>6d} {_f(row['queue_wait_max_s']):>8s} {_f(row['work_p50_s']):>9s} "
                     f"{row['cpu_mean_pct']:>6.0f}/{row['cpu_peak_pct']:<3.0f}% {row['load1_peak']:>8.1f} "
                     f"{row['mem_used_peak_mb']:>8d} {row['mem_available_min_mb']:>9d}")
    for row in r["concurrent"]:
        kinds = ", ".join(f"{k} {v}" for k, v in row["failures"].items() if v)
        rec = ", ".join(f"{k} {v}" for k, v in row["recovered"].items())
        if kinds or rec:
            lines.append(f"  N={row['n']}: failed: {kinds or 'none'}; recovered: {rec or 'none'}")
        for e in row["errors"]:
            lines.append(f"    {e[:160]}")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(learner(sys.argv[1], sys.argv[2]))
