"""A class on one host, for real: JupyterHub (from PyPI) with
configurable-http-proxy (from npm) on 127.0.0.1, two local Unix learners made
with useradd who log in with their password through the REST API, each
server in its own cgroup (deploy/hub/jupyterhub_config.py with labkit's
CgroupSpawner), a notebook cell in each that starts labkit and pins memory in
the learner's *own* VM (warm-started from the host-wide snapshot the
instructor made once), isolation between the learners, the memory limit, the
idle culler, and a hub stop that leaves nothing behind.

The tests run in order and share one hub (the module fixture); the figures
(hub start, spawn, VM start, per-learner memory, culling, resume) go to
tests/artifacts/hub-figures.json. Needs root (useradd, cgroups) like CI.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from conftest import ARTIFACTS, require_image
from hubsetup import (
    Hub,
    KeepAlive,
    Learner,
    add_learner,
    as_user,
    execute,
    kill_user_processes,
    qemu_of,
    run,
    sweep_stale,
    user_processes,
    wait_until,
)

from labkit.cgroups import CONTROLLERS, Group, Limits, group_of, missing_controllers
from labkit.image import DEFAULT_KERNEL
from labkit.machine.process import free_port
from labkit.settings import from_environment

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("every learner's server boots its own VM")]

MEM_LIMIT = 1536 * 2**20       # per learner: the server, a kernel and a 1 GiB-RAM guest
CPU_LIMIT = 1.0
PIDS_LIMIT = 512
CULL_TIMEOUT = 30              # s idle before the culler stops a server (and its VM)

START_CELL = f"KERNEL = {DEFAULT_KERNEL!r}\n" + """
import json, time
t0 = time.monotonic()
import labkit
from labkit.lab import Lab
vm = labkit.connect(kernel=KERNEL)
started = time.monotonic() - t0
pin = Lab(vm).pin("rdma", "anon")
print("RESULT " + json.dumps({"start_s": round(started, 2), "kind": vm.record.start_kind,
      "boot_seconds": vm.record.boot_seconds, "snapshot": vm.record.snapshot, "pid": vm.record.pid,
      "ssh_port": vm.record.ssh_port, "pin_ok": pin.ok, "vmpin_kb": pin.vmpin_kb_delta, "pin": pin.cell}))
"""

ALIVE_CELL = f"KERNEL = {DEFAULT_KERNEL!r}\n" + """
import labkit
vm = labkit.connect(kernel=KERNEL)
print("RESULT", vm.run(["echo", "alive"]).stdout.strip(), vm.record.pid)
"""

RUNAWAY_CELL = """
hog = []
while True:
    hog.append(b"\\x01" * (64 << 20))      # written, so really resident
"""


@dataclass
class Class:
    hub: Hub
    a: Learner
    b: Learner
    parent: str
    base: Path
    keep: KeepAlive
    figures: dict = field(default_factory=dict)
    cells: dict = field(default_factory=dict)
    venv: Path | None = None
    env: dict = field(default_factory=dict)


def result_of(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the cell printed no result:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _learners_can_read(images: Path, learner: Learner) -> bool:
    return as_user(learner, ["test", "-r", str(images / DEFAULT_KERNEL / "root.ext4")]).returncode == 0


def _build_shared_snapshot(venv: Path, env: dict[str, str], base: Path) -> float:
    """The instructor's once-per-host step: a warm-start snapshot in the host-wide cache."""
    env = dict(env, LABKIT_STATE_DIR=str(base / "root-state"), LABKIT_CACHE_DIR=str(base / "root-cache"),
               LABKIT_LIFETIME_PID="0")
    t0 = time.monotonic()
    run([str(venv / "bin/labkit"), "vm", "start", "--name", "warmup", "--kernel", DEFAULT_KERNEL], env=env)
    run([str(venv / "bin/labkit"), "vm", "stop", "--name", "warmup"], env=env)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def klass(class_tools):
    if os.geteuid() != 0:
        pytest.fail("the hub test creates Unix users and cgroups and needs root (CI runs as root)")
    missing = missing_controllers()
    if missing:
        pytest.fail(f"cgroup-v1 controllers {missing} are not mounted under /sys/fs/cgroup")
    require_image(DEFAULT_KERNEL)
    sweep_stale(_remove_cgroups)
    group, parent = f"lkhub{os.getpid()}", f"labkit-hub-test-{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="labkit-hubtest-"))
    base.chmod(0o755)           # the venv and the shared snapshots must be readable by the learners
    names: list[str] = []
    bound: Path | None = None
    hub: Hub | None = None
    keep: KeepAlive | None = None
    figures: dict = {}
    try:
        venv, proxy = class_tools.venv, class_tools.proxy     # made once per run, shared with test_slurm
        figures["setup_venv_and_proxy_s"] = class_tools.seconds
        run(["groupadd", group])
        names = [f"{group}a", f"{group}b"]
        a, b = (add_learner(n, group) for n in names)
        images = from_environment().images_dir.resolve()
        if not _learners_can_read(images, a):       # e.g. a clone under the 0700 /root
            bound = base / "images"
            bound.mkdir()
            run(["mount", "--bind", "-o", "ro", str(images), str(bound)])
            images = bound
        shared = base / "shared"
        (shared / "snapshots").mkdir(parents=True)
        for d in (shared, shared / "snapshots"):
            d.chmod(0o755)
        env = {"PATH": f"{venv / 'bin'}:{proxy.parent}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "LABKIT_IMAGES_DIR": str(images), "LABKIT_SHARED_CACHE_DIR": str(shared),
               "LABKIT_ACCEL": "tcg", "LABKIT_AUTO_BUILD": "0"}
        figures["shared_snapshot_build_s"] = round(_build_shared_snapshot(venv, env, base), 1)
        hubdir = base / "hub"
        env.update(LABKIT_HUB_PORT=str(free_port()), LABKIT_HUB_API_PORT=str(free_port()),
                   LABKIT_HUB_PROXY_API_PORT=str(free_port()), LABKIT_HUB_DIR=str(hubdir), LABKIT_HUB_GROUP=group,
                   LABKIT_HUB_PROXY=str(proxy), LABKIT_HUB_MEM=f"{MEM_LIMIT // 2**20}M", LABKIT_HUB_CPUS=str(CPU_LIMIT),
                   LABKIT_HUB_PIDS=str(PIDS_LIMIT), LABKIT_HUB_CULL_TIMEOUT=str(CULL_TIMEOUT),
                   LABKIT_HUB_CULL_EVERY="5", LABKIT_HUB_ACTIVITY_INTERVAL="5",
                   LABKIT_HUB_ADMIN_TOKEN=secrets.token_hex(24), LABKIT_HUB_CGROUP_PARENT=parent,
                   LABKIT_HUB_SPAWNER="cgroup")
        hubdir.mkdir(mode=0o700)
        t0 = time.monotonic()
        hub = Hub.start(venv, env, base / "hub.log")
        figures["hub_start_s"] = round(time.monotonic() - t0, 2)
        keep = KeepAlive(hub)
        holder = Class(hub, a, b, parent, base, keep, figures, venv=venv, env=env)
        yield holder
        hub = holder.hub            # the restart test starts a new hub process
    finally:
        if keep is not None:
            keep.close()
        if hub is not None and hub.proc.poll() is None:
            hub.proc.terminate()
            try:
                hub.proc.wait(60)
            except subprocess.TimeoutExpired:
                hub.proc.kill()
                hub.proc.wait(10)
        ARTIFACTS.mkdir(exist_ok=True)
        if hub is not None:
            shutil.copy(hub.log_path, ARTIFACTS / "hub.log")
        for name in names:
            kill_user_processes(name)
        _remove_cgroups(parent)
        for name in names:
            subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", group], capture_output=True, timeout=60)
        if bound is not None:
            subprocess.run(["umount", str(bound)], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
        (ARTIFACTS / "hub-figures.json").write_text(json.dumps(figures, indent=1) + "\n")


def _remove_cgroups(parent: str) -> None:
    root = Path("/sys/fs/cgroup")
    names = {d.name for c in CONTROLLERS if (root / c / parent).is_dir()
             for d in (root / c / parent).iterdir() if d.is_dir()}
    for name in names:
        try:
            Group(name, parent=parent).remove()
        except Exception:   # noqa: BLE001 - cleanup goes on with the rest
            pass
    for c in CONTROLLERS:
        try:
            (root / c / parent).rmdir()
        except OSError:
            pass


def test_a_real_group_is_killed_whole_and_removed(as_root):
    """On this host's real cgroup-v1 tree (root, no guest): a process tree in
    a group, killed by one call; nothing is left, the parent goes too."""
    g = Group(f"unit-{os.getpid()}", parent=f"labkit-hub-unit-{os.getpid()}")
    g.create(Limits(memory_bytes=256 << 20, cpus=0.5, pids=64))
    tree = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & setsid sleep 300 & wait"],
                            preexec_fn=lambda: g.add(os.getpid()))
    try:
        deadline = time.monotonic() + 10
        while len(g.pids()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(g.pids()) == 4                   # sh and its three sleeps, the setsid one included
        assert all(group_of(p)["memory"] == f"/{g.parent}/{g.name}" for p in g.pids())
        assert g.kill() == 4
        tree.wait(10)
        g.remove()
        assert not g.exists()
        assert not any((g.root / c / g.parent).exists() for c in CONTROLLERS)
    finally:
        if tree.poll() is None:
            tree.kill()
            tree.wait()
        if g.exists():
            g.remove()


# -- the tests, in order ---------------------------------------------------------------------


def test_learners_run_labkit_in_their_own_limited_vms(klass):
    hub, fig = klass.hub, klass.figures
    for lr in (klass.a, klass.b):     # the instructor enrols the class (the roster), then each learner logs in
        r = hub.api("POST", f"/users/{lr.name}")
        assert r.status_code == 201, r.text
        hub.login(lr)
        fig[f"spawn_s_{lr.name[-1]}"] = round(hub.start_server(lr), 2)
        klass.keep.learners[lr.name] = lr
    for lr in (klass.a, klass.b):
        t0 = time.monotonic()
        cell = execute(hub, lr, START_CELL, timeout=300)
        assert not cell.error and not cell.died, cell.error or cell.stdout
        res = klass.cells[lr.name] = result_of(cell.stdout)
        fig[f"cell_s_{lr.name[-1]}"] = round(time.monotonic() - t0, 2)
        fig[f"vm_start_s_{lr.name[-1]}"] = res["start_s"]
        assert res["pin_ok"] and res["vmpin_kb"] > 0, res
        # warm-started from the instructor's host-wide snapshot, none made by the learner
        assert res["kind"] == "warm", res
        own = lr.home / ".cache/labkit/snapshots"
        assert not own.exists() or not any(own.glob("*-*")), list(own.iterdir())
    # the instructor's view (labkit class status): the hub's API and each learner's VM records
    token_file = klass.base / "admin-token"
    token_file.write_text(hub.admin_token)
    token_file.chmod(0o600)
    cmd = [sys.executable, "-m", "labkit", "class", "status", "--hub", hub.url, "--token-file", str(token_file)]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    for lr in (klass.a, klass.b):
        row = rows[lr.name]
        assert row["server"] == "running" and row["last_activity"] and not row["last_error"], row
        assert [(v["start_kind"], v["pid"]) for v in row["vms"] if v["state"] == "running"] == \
            [("warm", klass.cells[lr.name]["pid"])], row
        assert row["memory_mb"] > 100, row          # server, kernel and QEMU together
    fig["class_status_text"] = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    for lr in (klass.a, klass.b):
        qemu = qemu_of(lr)
        assert qemu is not None and qemu.pid == klass.cells[lr.name]["pid"]
        assert qemu.uids().real == lr.pw.pw_uid and qemu.uids().effective == lr.pw.pw_uid
        mine = f"/{klass.parent}/{lr.name}-default"
        where = group_of(qemu.pid)
        assert all(where[c] == mine for c in CONTROLLERS), where
        g = Group(f"{lr.name}-default", parent=klass.parent)
        assert int(g.read("memory", "memory.limit_in_bytes")) == MEM_LIMIT
        assert int(g.read("cpu", "cpu.cfs_quota_us")) == int(CPU_LIMIT * 100_000)
        assert int(g.read("pids", "pids.max")) == PIDS_LIMIT
        mem = qemu.memory_full_info()
        disk = sum(f.stat().st_blocks * 512 for f in lr.state_dir.iterdir() if f.is_file())
        fig[f"learner_disk_mb_{lr.name[-1]}"] = round(disk / 2**20, 2)
        qemu.cpu_percent(None)
        time.sleep(2)           # CPU use of an idle learner's VM, over 2 s
        fig[f"idle_qemu_cpu_cores_{lr.name[-1]}"] = round(qemu.cpu_percent(None) / 100, 3)
        fig[f"qemu_rss_mb_{lr.name[-1]}"] = round(mem.rss / 2**20)
        fig[f"qemu_uss_mb_{lr.name[-1]}"] = round(mem.uss / 2**20)
        fig[f"learner_cgroup_mb_{lr.name[-1]}"] = round(int(g.read("memory", "memory.usage_in_bytes")) / 2**20)
        fig[f"learner_cgroup_peak_mb_{lr.name[-1]}"] = round(
            int(g.read("memory", "memory.max_usage_in_bytes")) / 2**20)


def test_learners_cannot_reach_each_other(klass):
    hub, a, b = klass.hub, klass.a, klass.b
    url = f"{hub.url}/user/{b.name}/api/kernels"
    assert requests.get(url, headers={"Authorization": f"token {b.token}"}, timeout=30).status_code == 200
    assert requests.get(url, headers={"Authorization": f"token {a.token}"}, timeout=30).status_code == 403
    sd = b.state_dir
    probe = ("import json, os, socket, sys\nout = {}\n"
             "def t(name, f):\n    try:\n        f(); out[name] = 'read'\n"
             "    except OSError as e:\n        out[name] = e.__class__.__name__\n"
             f"t('dir', lambda: os.listdir({str(sd)!r}))\n"
             f"t('key', lambda: open({str(sd / 'id_ed25519')!r}, 'rb').read())\n"
             f"t('pmem', lambda: open({str(sd / 'pmem0.img')!r}, 'rb').read(1))\n"
             f"t('qmp', lambda: socket.socket(socket.AF_UNIX).connect({str(sd / 'qmp.sock')!r}))\n"
             "print(json.dumps(out))\n")
    r = as_user(a, ["/usr/bin/python3", "-c", probe])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {k: "PermissionError" for k in ("dir", "key", "pmem", "qmp")}
    for f in (sd / "id_ed25519", sd / "pmem0.img", sd / "qmp.sock"):
        assert f.exists()                       # they are there: refused, not missing

    def ssh(port: int) -> subprocess.CompletedProcess[str]:
        return as_user(a, ["ssh", "-i", str(a.state_dir / "id_ed25519"), "-p", str(port), "-o", "BatchMode=yes",
                           "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o",
                           "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=30", "root@127.0.0.1", "true"],
                       timeout=90)
    own = ssh(klass.cells[a.name]["ssh_port"])
    assert own.returncode == 0, own.stderr           # the key works where it belongs...
    other = ssh(klass.cells[b.name]["ssh_port"])
    assert other.returncode == 255 and "Permission denied" in other.stderr, other.stderr   # ...and only there


def test_the_memory_limit_stops_a_runaway_server_and_spares_the_other(klass):
    hub, a, b = klass.hub, klass.a, klass.b
    gb = Group(f"{b.name}-default", parent=klass.parent)
    before = gb.oom_kills()
    a_qemu = klass.cells[a.name]["pid"]
    t0 = time.monotonic()
    cell = execute(hub, b, RUNAWAY_CELL, timeout=180)
    klass.figures["oom_stop_s"] = round(time.monotonic() - t0, 1)
    assert cell.died, f"the runaway cell was not stopped: {cell.stdout[-500:]} {cell.error[-500:]}"
    assert gb.oom_kills() > before
    alive = execute(hub, a, ALIVE_CELL, timeout=120)
    assert not alive.error, alive.error
    words = [ln for ln in alive.stdout.splitlines() if ln.startswith("RESULT ")][-1].split()
    assert words[1:] == ["alive", str(a_qemu)], alive.stdout      # the same VM, untouched
    # B's server is still there and B gets a VM again (attached, or warm-started if the OOM took QEMU)
    again = execute(hub, b, ALIVE_CELL, timeout=300)
    assert not again.error, again.error
    assert "alive" in again.stdout


def test_the_idle_culler_stops_a_server_and_its_vm_and_the_vm_comes_back_warm(klass):
    hub, a = klass.hub, klass.a
    qemu = qemu_of(a)
    assert qemu is not None
    del klass.keep.learners[a.name]
    idle_since = time.monotonic()
    wait_until(lambda: not hub.server_running(a), CULL_TIMEOUT + 120, f"the culler to stop {a.name}'s server")
    try:
        qemu.wait(60)
    except psutil.TimeoutExpired:
        pytest.fail(f"{a.name}'s QEMU outlived the culled server")
    klass.figures["cull_after_idle_s"] = round(time.monotonic() - idle_since, 1)
    klass.figures["cull_timeout_s"] = CULL_TIMEOUT
    wait_until(lambda: not user_processes(a.name), 30, f"every process of {a.name} to end")
    assert not Group(f"{a.name}-default", parent=klass.parent).exists()
    # the learner comes back: a new server, the VM warm-started again, pmem and disk overlay kept
    klass.figures["respawn_s"] = round(hub.start_server(a), 2)
    klass.keep.learners[a.name] = a
    cell = execute(hub, a, START_CELL, timeout=300)
    assert not cell.error, cell.error
    res = result_of(cell.stdout)
    assert res["kind"] == "warm" and res["pin_ok"], res
    klass.figures["resume_vm_start_s"] = res["start_s"]
    klass.figures["resume_warm_start_s"] = res["boot_seconds"]


def test_a_hub_restart_keeps_every_server_and_vm_and_stopping_the_class_leaves_nothing(klass):
    hub, a, b = klass.hub, klass.a, klass.b
    klass.keep.close()
    # The instructor's token enrols and stops, but cannot mint a token that acts as a learner.
    r = hub.api("POST", f"/users/{a.name}/tokens", json={"note": "not allowed"})
    assert r.status_code == 403, (r.status_code, r.text)
    qemus = {lr.name: qemu_of(lr) for lr in (a, b)}
    assert all(qemus.values()), qemus
    proxy_pid = int((klass.base / "hub/proxy.pid").read_text())
    t0 = time.monotonic()
    hub.stop()                       # SIGTERM: an upgrade or a config change
    klass.figures["hub_stop_s"] = round(time.monotonic() - t0, 1)
    for lr in (a, b):
        q = qemus[lr.name]
        assert q is not None and q.is_running() and q.status() != psutil.STATUS_ZOMBIE, f"{lr.name}'s VM died"
    t0 = time.monotonic()
    assert klass.venv is not None
    klass.hub = hub = Hub.start(klass.venv, klass.env, hub.log_path)
    klass.figures["hub_restart_s"] = round(time.monotonic() - t0, 1)
    for lr in (a, b):                # the restarted hub found each server, and the proxy routes to it
        assert hub.server_running(lr), f"{lr.name}'s server is not known to the restarted hub"
        cell = execute(hub, lr, ALIVE_CELL, timeout=120)
        assert not cell.error, cell.error
        assert f"RESULT alive {qemus[lr.name].pid}" in cell.stdout, cell.stdout     # the same VM, attached
    assert not psutil.pid_exists(proxy_pid) or psutil.Process(proxy_pid).status() == psutil.STATUS_ZOMBIE \
        or int((klass.base / "hub/proxy.pid").read_text()) == proxy_pid
    # Stopping the class: every server, then the hub.
    t0 = time.monotonic()
    for lr in (a, b):
        r = hub.api("DELETE", f"/users/{lr.name}/server")
        assert r.status_code in (202, 204), (r.status_code, r.text)
    for lr in (a, b):
        wait_until(lambda lr=lr: not hub.server_running(lr), 60, f"{lr.name}'s server to stop")
    hub.stop()
    klass.figures["class_stop_s"] = round(time.monotonic() - t0, 1)
    proxy_pid = int((klass.base / "hub/proxy.pid").read_text()) if (klass.base / "hub/proxy.pid").exists() else 0
    for lr in (a, b):
        wait_until(lambda lr=lr: not user_processes(lr.name), 30, f"every process of {lr.name} to end")
    assert not proxy_pid or not psutil.pid_exists(proxy_pid) \
        or psutil.Process(proxy_pid).status() == psutil.STATUS_ZOMBIE
    left = [str(Path("/sys/fs/cgroup") / c / klass.parent / g) for c in CONTROLLERS
            if (Path("/sys/fs/cgroup") / c / klass.parent).exists()
            for g in os.listdir(Path("/sys/fs/cgroup") / c / klass.parent)
            if (Path("/sys/fs/cgroup") / c / klass.parent / g).is_dir()]
    assert not left, f"cgroups left behind: {left}"
