"""``labkit class status``: each learner of a class, their Jupyter server and
lab VMs, what they use now, when they were last active and the last error.

Two sources, each read as it is: the hub's REST API (the learners, their
servers and last activity; an instructor's token with ``admin:users``, which
the hub configs in ``deploy/`` give the ``labkit-admin`` service) and, on this
host, each learner's labkit state (their ``vm.json`` records, read without
changing anything) and processes (memory and CPU of everything running as
them: server, kernels, QEMU). Run it as root on the hub's host; on a cluster,
where servers run on other nodes, the VM columns say "elsewhere".
"""

from __future__ import annotations

import json
import pwd
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from labkit.errors import LabError
from labkit.machine.statedir import VMInfo


class StatusError(LabError):
    """The hub could not be asked."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class VMStatus:
    name: str
    kernel: str
    state: str                 # recorded: running / starting / stopped; "dead" when recorded running but gone
    start_kind: str
    pid: int
    problem: str = ""          # why the last warm start fell back, a refused snapshot, a dead QEMU


@dataclass
class LearnerStatus:
    name: str
    server: str                # running, starting, stopping, stopped
    last_activity: str         # ISO time from the hub, "" when never
    memory_mb: float           # everything running as the learner on this host
    cpu_cores: float
    vms: list[VMStatus] = field(default_factory=list)
    last_error: str = ""

    @property
    def vm_summary(self) -> str:
        live = [v for v in self.vms if v.state == "running"]
        if not self.vms:
            return "none"
        return ", ".join(f"{v.name} ({v.kernel}, {v.state}{', ' + v.start_kind if v.start_kind else ''})"
                         for v in (live or self.vms))


# -- the hub ---------------------------------------------------------------------------------------

def hub_users(url: str, token: str, timeout: float = 15.0, cafile: str | None = None) -> list[dict[str, Any]]:
    """Every user the hub knows, with their servers (GET /hub/api/users);
    ``cafile`` verifies an HTTPS hub (the installer's self-signed certificate)."""
    import ssl
    req = urllib.request.Request(url.rstrip("/") + "/hub/api/users?limit=10000",
                                 headers={"Authorization": f"token {token}", "Accept": "application/json"})
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:  # noqa: S310 - the admin's hub
            data = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise StatusError(f"the hub at {url} refused the request: HTTP {exc.code}",
                          hint="give the instructor's token (LABKIT_HUB_ADMIN_TOKEN, or --token-file); it needs "
                               "the admin:users scope of the hub's labkit-admin service") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusError(f"cannot reach the hub at {url}: {getattr(exc, 'reason', exc)}",
                          hint="is the hub running? give its address with --hub (e.g. http://127.0.0.1:8000)") from None
    return data["items"] if isinstance(data, dict) and "items" in data else list(data)


def server_state(user: dict[str, Any]) -> str:
    server = (user.get("servers") or {}).get("")
    if server is None:
        return "starting" if user.get("pending") == "spawn" else "stopped"
    if server.get("pending") == "stop" or user.get("pending") == "stop":
        return "stopping"
    if server.get("pending") == "spawn" or not server.get("ready", False):
        return "starting"
    return "running"


# -- this host -------------------------------------------------------------------------------------

def state_dir_of(home: Path) -> Path:
    """Where labkit keeps a learner's VMs under the hub (its default: ~/.local/state/labkit)."""
    return home / ".local" / "state" / "labkit"


def vms_of(state_dir: Path) -> list[VMStatus]:
    """Every VM recorded under a labkit state dir (``<state>/vms/<name>/vm.json``, as machine/vm.py lays it out)."""
    out = []
    for record in sorted((state_dir / "vms").glob("*/vm.json")):
        try:
            info = VMInfo.from_json(json.loads(record.read_text()))
        except (OSError, ValueError):
            info = None
        if info is None:
            out.append(VMStatus(record.parent.name, "?", "unreadable", "", 0, f"{record} is not a VM record"))
            continue
        state, problem = info.state, info.warm_error or info.snapshot_refused
        if info.state == "running" and not psutil.pid_exists(info.pid):
            state, problem = "dead", f"QEMU (pid {info.pid}) is gone though the record says running"
        out.append(VMStatus(info.name, info.kernel, state, info.start_kind, info.pid, problem))
    return out


def usage(uids: dict[str, int], interval: float) -> dict[str, tuple[float, float]]:
    """Name -> (MiB resident, cores busy over ``interval``) of every process of each uid."""
    by_uid = {uid: name for name, uid in uids.items()}
    procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real in by_uid]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    if procs and interval:
        time.sleep(interval)
    acc = {name: [0.0, 0.0] for name in uids}
    for p in procs:
        try:
            name = by_uid[p.info["uids"].real]
            acc[name][0] += p.memory_info().rss / 2**20
            acc[name][1] += p.cpu_percent(None) / 100
        except psutil.Error:
            continue
    return {k: (v[0], v[1]) for k, v in acc.items()}


def collect(users: list[dict[str, Any]], interval: float = 0.5) -> list[LearnerStatus]:
    """The status of every learner (not the admins) the hub lists."""
    out, uids = [], {}
    for u in sorted(users, key=lambda u: u["name"]):
        if u.get("admin") or u.get("kind", "user") != "user":
            continue
        name = u["name"]
        row = LearnerStatus(name, server_state(u), u.get("last_activity") or "", 0.0, 0.0)
        out.append(row)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            row.last_error = "no Unix account of that name on this host"
            continue
        uids[name] = pw.pw_uid
        row.vms = vms_of(state_dir_of(Path(pw.pw_dir)))
        problems = [f"{v.name}: {v.problem}" for v in row.vms if v.problem]
        row.last_error = problems[-1] if problems else ""
    used = usage(uids, interval)
    for row in out:
        row.memory_mb, row.cpu_cores = used.get(row.name, (0.0, 0.0))
    return out


def _ago(iso: str, now: datetime | None = None) -> str:
    if not iso:
        return "never"
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    secs = int(((now or datetime.now(timezone.utc)) - then).total_seconds())
    if secs < 60:
        return f"{max(secs, 0)} s ago"
    if secs < 3600:
        return f"{secs // 60} min ago"
    return f"{secs // 3600} h {secs % 3600 // 60} min ago"


def render(rows: list[LearnerStatus], now: datetime | None = None) -> str:
    """A table for the terminal, then one line per learner with an error."""
    if not rows:
        return "no learners on this hub yet (enrol them: labkit class enrol CLASS.csv)"
    head = ("learner", "server", "VMs", "memory", "CPU", "last active")
    table = [head] + [(r.name, r.server, r.vm_summary, f"{r.memory_mb:.0f} MiB", f"{r.cpu_cores:.2f}",
                       _ago(r.last_activity, now)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    running = sum(r.server == "running" for r in rows)
    lines.append(f"{len(rows)} learners, {running} servers running, "
                 f"{sum(v.state == 'running' for r in rows for v in r.vms)} VMs running, "
                 f"{sum(r.memory_mb for r in rows) / 1024:.1f} GiB in use")
    errors = [f"  {r.name}: {r.last_error}" for r in rows if r.last_error]
    if errors:
        lines += ["last errors:", *errors]
    return "\n".join(lines)


def as_json(rows: list[LearnerStatus]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
