"""The hub load test: N learners start at once through a real hub.

    sudo .venv/bin/python deploy/hub/loadtest/run.py -n 8 --out hub-load-8.json
    .venv/bin/python deploy/hub/loadtest/run.py --table hub-load-*.json

It makes N local Unix learners (useradd, a password each), the learners'
venv and configurable-http-proxy (or reuses them: ``--tools DIR``), the
instructor's host-wide warm-start snapshot, and starts JupyterHub from
deploy/hub/jupyterhub_config.py with labkit's CgroupSpawner; then runs
deploy/hub/loadtest/locustfile.py headless with all N users spawned in the
same second, samples the host's CPU and memory meanwhile, stops the hub and
removes everything it made. The figures (per learner: each phase's seconds,
what the spawn's progress said, the failure and its kind; per run: time to
ready p50/p95/max, failures, HTTP 5xx and proxy errors in the hub's log, the
host's CPU and memory peak) go to ``--out`` as JSON and a summary line to
stdout; ``--table`` turns several runs into the table of docs/performance.md.

It reuses the hub test's real parts (tests/hubsetup.py); it needs root (users,
cgroups), the test extras (locust, pytest) and built guest images. It boots N
guests: on a shared host run it under the guest lock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[3]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
sys.path.insert(0, str(REPO / "tests"))

from hubsetup import (  # noqa: E402 - tests/ is put on the path just above
    ClassTools,
    Hub,
    Learner,
    add_learner,
    build_shared_snapshot,
    kill_user_processes,
    make_class_tools,
    readable_images,
    remove_cgroups,
    run,
    sweep_stale_load,
)

from labkit.cgroups import missing_controllers  # noqa: E402
from labkit.image import DEFAULT_KERNEL  # noqa: E402
from labkit.machine.process import free_port  # noqa: E402
from labkit.settings import from_environment  # noqa: E402

PHASES = ("login", "spawn", "kernel", "cell")


class Sampler:
    """The host's CPU (percent of all cores) and memory in use (total less
    available), sampled every ``every`` seconds in a thread, and the CPU in
    the second before it started."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.cpu: list[float] = []
        self.mem: list[int] = []
        self.base_mem = psutil.virtual_memory().total - psutil.virtual_memory().available
        self._stop = threading.Event()
        # what the host was busy with before the learners came (on a shared host: everything else)
        self.cpu_before = psutil.cpu_percent(1.0)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            vm = psutil.virtual_memory()
            self.cpu.append(psutil.cpu_percent(None))
            self.mem.append(vm.total - vm.available)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        gib = 2**30
        peak = max(self.mem, default=self.base_mem)
        return {"cpus": psutil.cpu_count(), "cpu_before_pct": self.cpu_before,
                "cpu_peak_pct": max(self.cpu, default=0.0),
                "cpu_mean_pct": round(sum(self.cpu) / len(self.cpu), 1) if self.cpu else 0.0,
                "mem_total_gib": round(psutil.virtual_memory().total / gib, 2),
                "mem_before_gib": round(self.base_mem / gib, 2), "mem_peak_gib": round(peak / gib, 2),
                "mem_peak_added_gib": round((peak - self.base_mem) / gib, 2)}


def stats(values: list[float]) -> dict[str, float | None]:
    """p50, p95 (nearest rank: with 8 values or fewer, p95 is the maximum) and max."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    v = sorted(values)

    def rank(p: float) -> float:
        return v[max(0, math.ceil(p * len(v)) - 1)]
    return {"p50": rank(0.50), "p95": rank(0.95), "max": v[-1]}


_HTTP_5XX = re.compile(r"\] (5\d\d) (GET|POST|PUT|PATCH|DELETE|HEAD) ")
_PROXY_ERROR = re.compile(r"\[ConfigProxy\] error|Error adding route|Failed to (add|delete) route|proxy error",
                          re.IGNORECASE)


def hub_errors(log: str) -> dict[str, Any]:
    """HTTP 5xx answered by the hub or a server, proxy errors, and error-level lines, from the hub's log."""
    lines = log.splitlines()
    http = [ln for ln in lines if _HTTP_5XX.search(ln)]
    proxy = [ln for ln in lines if _PROXY_ERROR.search(ln)]
    errors = [ln for ln in lines if (ln.startswith("[E ") or ln.startswith("[C ")) and "Received signal SIGTERM" not in ln]
    return {"http_5xx": len(http), "proxy_errors": len(proxy), "error_lines": len(errors),
            "examples": [ln[:300] for ln in (http + proxy + errors)[:8]]}


def summarize(n: int, records: list[dict[str, Any]], log: str, host: dict[str, Any]) -> dict[str, Any]:
    missing = n - len(records)
    failed = [r for r in records if "failure" in r]
    kinds: dict[str, int] = {}
    for r in failed:
        kinds[r["failure"]["kind"]] = kinds.get(r["failure"]["kind"], 0) + 1
    if missing:
        kinds["no-record"] = missing
    ok = [r for r in records if "failure" not in r]
    return {
        "n": n,
        "ready_s": stats([r["ready_s"] for r in ok]),
        "phases_s": {p: stats([r["phases"][p] for r in ok]) for p in PHASES},
        "connect_s": stats([r["result"]["connect_s"] for r in ok]),
        "start_kinds": sorted({r["result"]["kind"] for r in ok}),
        "failures": len(failed) + missing,
        "failure_kinds": kinds,
        "spawn_failures": sum(1 for r in failed if r["failure"]["kind"].startswith(("spawn", "progress"))),
        "spawn_retries": sum(r.get("spawn_retries", 0) for r in records),
        "hub": hub_errors(log),
        "host": host,
        "learners": records,
    }


def _hub_env(tools: ClassTools, base: Path, images: Path, group: str, parent: str,
             mem: str, spawn_limit: int) -> dict[str, str]:
    shared = base / "shared"
    (shared / "snapshots").mkdir(parents=True)
    for d in (shared, shared / "snapshots"):
        d.chmod(0o755)
    env = {"PATH": f"{tools.venv / 'bin'}:{tools.proxy.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "LABKIT_IMAGES_DIR": str(images), "LABKIT_SHARED_CACHE_DIR": str(shared),
           "LABKIT_ACCEL": "tcg", "LABKIT_AUTO_BUILD": "0"}
    hubdir = base / "hub"
    hubdir.mkdir(mode=0o700)
    env.update(LABKIT_HUB_PORT=str(free_port()), LABKIT_HUB_API_PORT=str(free_port()),
               LABKIT_HUB_PROXY_API_PORT=str(free_port()), LABKIT_HUB_DIR=str(hubdir), LABKIT_HUB_GROUP=group,
               LABKIT_HUB_PROXY=str(tools.proxy), LABKIT_HUB_MEM=mem, LABKIT_HUB_CPUS="1.0",
               LABKIT_HUB_PIDS="512", LABKIT_HUB_ADMIN_TOKEN=secrets.token_hex(24),
               LABKIT_HUB_CGROUP_PARENT=parent, LABKIT_HUB_SPAWNER="cgroup")
    if spawn_limit:
        env["LABKIT_HUB_SPAWN_LIMIT"] = str(spawn_limit)
    return env


def _locust(hub: Hub, learners: list[Learner], base: Path, kernel: str, timeout: float) -> list[dict[str, Any]]:
    """Run the locustfile headless, all users spawned at once; the learners' records."""
    creds = base / "learners.json"
    creds.write_text(json.dumps([{"name": lr.name, "password": lr.password} for lr in learners]))
    creds.chmod(0o600)
    out = base / "learners.jsonl"
    n = len(learners)
    env = dict(os.environ, LOADTEST_LEARNERS=str(creds), LOADTEST_OUT=str(out), LOADTEST_KERNEL=kernel,
               LOADTEST_TIMEOUT=str(timeout))
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(n), "-r", str(n),
            "--host", hub.url, "--run-time", f"{int(timeout * 2 + 60)}s", "--stop-timeout", "10",
            "--only-summary", "--csv", str(base / "locust"), "--exit-code-on-error", "0"]
    with open(base / "locust.log", "wb") as log:
        r = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout * 2 + 120)
    if r.returncode != 0:
        raise RuntimeError(f"locust exited {r.returncode}:\n{(base / 'locust.log').read_text()[-3000:]}")
    return [json.loads(ln) for ln in out.read_text().splitlines()] if out.exists() else []


def run_load(n: int, tools: ClassTools, kernel: str = DEFAULT_KERNEL, mem: str = "1536M",
             timeout: float = 600, spawn_limit: int = 0, keep_log: Path | None = None) -> dict[str, Any]:
    """Set up ``n`` learners and a hub, run the load, tear everything down; the figures."""
    if os.geteuid() != 0:
        raise SystemExit("the load test creates Unix users and cgroups: run it as root")
    if missing_controllers():
        raise SystemExit(f"cgroup-v1 controllers {missing_controllers()} are not mounted under /sys/fs/cgroup")
    sweep_stale_load()
    group, parent = f"lkload{os.getpid()}", f"labkit-hub-load-{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="labkit-hubload-"))
    base.chmod(0o755)           # the shared snapshot must be readable by the learners
    learners: list[Learner] = []
    bound: Path | None = None
    hub: Hub | None = None
    setup: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        run(["groupadd", group])
        learners = [add_learner(f"{group}u{i}", group) for i in range(n)]
        images, bound = readable_images(from_environment().images_dir.resolve(), learners[0], base, kernel)
        env = _hub_env(tools, base, images, group, parent, mem, spawn_limit)
        setup["users_s"] = round(time.monotonic() - t0, 1)
        setup["shared_snapshot_s"] = round(build_shared_snapshot(tools.venv, env, base, kernel), 1)
        t0 = time.monotonic()
        hub = Hub.start(tools.venv, env, base / "hub.log")
        for lr in learners:             # the instructor enrols the roster
            r = hub.api("POST", f"/users/{lr.name}")
            if r.status_code != 201:
                raise RuntimeError(f"enrolling {lr.name}: {r.status_code} {r.text}")
        setup["hub_start_s"] = round(time.monotonic() - t0, 1)
        sampler = Sampler()
        t0 = time.monotonic()
        records = _locust(hub, learners, base, kernel, timeout)
        wall = round(time.monotonic() - t0, 1)
        host = sampler.stop()
        t0 = time.monotonic()
        hub.stop()
        setup["hub_stop_s"] = round(time.monotonic() - t0, 1)
        figures = summarize(n, records, hub.log_tail(10**8), host)
        figures.update(kernel=kernel, mem_limit=mem, spawn_limit=spawn_limit, wall_s=wall, setup=setup)
        return figures
    finally:
        _teardown(hub, learners, group, parent, bound, base, keep_log)


def _teardown(hub: Hub | None, learners: list[Learner], group: str, parent: str, bound: Path | None,
              base: Path, keep_log: Path | None) -> None:
    if hub is not None and hub.proc.poll() is None:
        hub.proc.terminate()
        try:
            hub.proc.wait(60)
        except subprocess.TimeoutExpired:
            hub.proc.kill()
            hub.proc.wait(10)
    if keep_log is not None:
        keep_log.parent.mkdir(parents=True, exist_ok=True)
        for name in ("hub.log", "locust.log"):
            if (base / name).exists():
                shutil.copy(base / name, keep_log.parent / f"{keep_log.name}-{name}")
    for lr in learners:
        kill_user_processes(lr.name)
    remove_cgroups(parent)
    for lr in learners:
        subprocess.run(["userdel", "--remove", lr.name], capture_output=True, timeout=60)
    subprocess.run(["groupdel", group], capture_output=True, timeout=60)
    if bound is not None:
        subprocess.run(["umount", str(bound)], capture_output=True, timeout=60)
    shutil.rmtree(base, ignore_errors=True)


def tools_in(where: Path) -> ClassTools:
    """The learners' venv and the proxy in ``where``: made there once, reused after."""
    venv, proxy = where / "venv", where / "chp/node_modules/.bin/configurable-http-proxy"
    if (venv / "bin/jupyterhub").exists() and proxy.exists():
        return ClassTools(venv, proxy, 0.0)
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o755)
    return make_class_tools(where)


def table(files: list[Path]) -> str:
    """The markdown table of docs/performance.md from several runs' figures."""
    runs = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["n"])
    single = next((r["ready_s"]["p95"] for r in runs if r["n"] == 1), None)
    rows = ["| N | ready p50 / p95 / max (s) | p95(N)/single | spawn p95 (s) | connect p95 (s) | failures (kind) "
            "| spawn failures | hub 5xx / proxy errors | host CPU before / mean / peak | host memory peak (+added) |",
            "| " + " | ".join(["---"] * 10) + " |"]
    for r in runs:
        rd, kinds = r["ready_s"], ", ".join(f"{k} ×{v}" for k, v in r["failure_kinds"].items())
        ratio = f"{rd['p95'] / single:.2f}" if single and rd["p95"] else "–"
        h = r["host"]
        rows.append(f"| {r['n']} | {rd['p50']} / {rd['p95']} / {rd['max']} | {ratio} | {r['phases_s']['spawn']['p95']} "
                    f"| {r['connect_s']['p95']} | {r['failures']}{f' ({kinds})' if kinds else ''} "
                    f"| {r['spawn_failures']} | {r['hub']['http_5xx']} / {r['hub']['proxy_errors']} "
                    f"| {h.get('cpu_before_pct', '–')} / {h['cpu_mean_pct']} / {h['cpu_peak_pct']} % "
                    f"| {h['mem_peak_gib']} GiB (+{h['mem_peak_added_gib']}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2, help="learners starting at once [2]")
    p.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"the guest kernel [{DEFAULT_KERNEL}]")
    p.add_argument("--mem", default="1536M", help="each learner's memory limit [1536M]")
    p.add_argument("--timeout", type=float, default=600, help="seconds each phase may take [600]")
    p.add_argument("--spawn-limit", type=int, default=0,
                   help="the hub's concurrent_spawn_limit for this run [the config's default]")
    p.add_argument("--tools", type=Path, default=Path("/var/tmp/labkit-hubload-tools"),
                   help="where the learners' venv and the proxy are made once and reused")
    p.add_argument("--out", type=Path, help="write the figures (JSON) here")
    p.add_argument("--table", type=Path, nargs="+", metavar="FIGURES", help="print the table of these runs")
    a = p.parse_args(argv)
    # a `timeout` or the instructor's kill ends the run through its cleanup (users, cgroups, hub)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.table:
        print(table(a.table))
        return 0
    if a.n < 1:
        p.error("-n must be at least 1")
    figures = run_load(a.n, tools_in(a.tools), a.kernel, a.mem, a.timeout, a.spawn_limit,
                       keep_log=a.out.with_suffix("") if a.out else None)
    if a.out:
        a.out.write_text(json.dumps(figures, indent=1) + "\n")
    rd, h = figures["ready_s"], figures["host"]
    print(f"N={a.n}: ready p50 {rd['p50']} s, p95 {rd['p95']} s, max {rd['max']} s; failures {figures['failures']} "
          f"{figures['failure_kinds']}; hub 5xx {figures['hub']['http_5xx']}, proxy errors "
          f"{figures['hub']['proxy_errors']}; CPU mean {h['cpu_mean_pct']} %, memory peak {h['mem_peak_gib']} GiB")
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
