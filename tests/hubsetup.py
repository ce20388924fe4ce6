"""The real parts of the hub test (tests/test_hub.py): a venv made from
Debian's python3 in a directory every user can read, configurable-http-proxy
from npm, local Unix learners made with useradd, the hub process started
from deploy/hub/jupyterhub_config.py, and the REST and kernel-websocket
clients. Everything it makes is undone by ``Cleanup`` even when a test fails."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
import websocket

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def run(argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


# What the hub test (the idle culler) and the Slurm test (batchspawner) run: one venv serves both.
CLASS_PACKAGES = ("jupyterhub", "jupyterhub-idle-culler", "batchspawner")


def make_venv(where: Path, packages: tuple[str, ...] = CLASS_PACKAGES) -> Path:
    """Debian's python3 (root's own python may live under the 0700 /root), with
    ``packages`` (JupyterHub, its idle culler and batchspawner by default) and labkit
    itself (from a copy: an in-tree build would leave build/ in the repository)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: apt-get install python3 python3-venv")
    src = where / "src"
    src.mkdir()
    shutil.copytree(REPO / "labkit", src / "labkit", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    venv = where / "venv"
    run([SYSTEM_PYTHON, "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "-q", *packages, str(src)], timeout=900)
    return venv


def install_proxy(where: Path) -> Path:
    if shutil.which("npm") is None:
        pytest.fail("npm is missing: apt-get install npm (configurable-http-proxy comes from the npm registry)")
    run(["npm", "install", "--prefix", str(where / "chp"), "--no-audit", "--no-fund", "configurable-http-proxy"])
    return where / "chp/node_modules/.bin/configurable-http-proxy"


@dataclass
class ClassTools:
    """The learners' venv and the proxy, made once per test run (conftest's
    ``class_tools`` fixture) in a directory every user can read."""
    venv: Path
    proxy: Path
    seconds: float


def make_class_tools(where: Path) -> ClassTools:
    t0 = time.monotonic()
    venv = make_venv(where)
    proxy = install_proxy(where)
    return ClassTools(venv, proxy, round(time.monotonic() - t0, 1))


@dataclass
class Learner:
    name: str
    password: str
    token: str = ""

    @property
    def pw(self) -> pwd.struct_passwd:
        return pwd.getpwnam(self.name)

    @property
    def home(self) -> Path:
        return Path(self.pw.pw_dir)

    @property
    def state_dir(self) -> Path:
        return self.home / ".local/state/labkit/vms/default"


def add_learner(name: str, group: str) -> Learner:
    run(["useradd", "--create-home", "--shell", "/bin/bash", "--gid", group, name])
    password = secrets.token_urlsafe(16)
    run(["chpasswd"], input=f"{name}:{password}\n")
    return Learner(name, password)


def kill_user_processes(name: str) -> None:
    """SIGKILL every process of ``name``, one PID at a time."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def sweep_stale(remove_groups: Callable[[str], None]) -> None:
    """Users, groups and cgroups left by a hub test whose pytest was killed
    (named after its PID: ``lkhub<pid>a``, ``labkit-hub-test-<pid>``)."""
    for entry in pwd.getpwall():
        m = re.fullmatch(r"lkhub(\d+)[ab]", entry.pw_name)
        if m and not psutil.pid_exists(int(m.group(1))):
            kill_user_processes(entry.pw_name)
            subprocess.run(["userdel", "--remove", entry.pw_name], capture_output=True, timeout=60)
            subprocess.run(["groupdel", f"lkhub{m.group(1)}"], capture_output=True, timeout=60)
    for d in Path("/sys/fs/cgroup/memory").glob("labkit-hub-test-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            remove_groups(d.name)


def user_processes(name: str) -> list[str]:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return []
    return [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}"
            for p in psutil.process_iter(["uids", "cmdline"]) if p.info["uids"] and p.info["uids"].real == uid]


def as_user(learner: Learner, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the learner (their uid, gid and groups only)."""
    pw = learner.pw
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, user=pw.pw_uid,
                          group=pw.pw_gid, extra_groups=[], cwd=pw.pw_dir,
                          env={"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin"})


def _default_sigint() -> None:
    # A test run started in the background of a shell inherits SIGINT ignored, and so would
    # the hub and its services: the idle culler would then ignore the hub's SIGINT at
    # shutdown and hold it up for 30 s. An instructor's hub has the default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class HubClient:
    """A hub's REST API as a learner's browser or the instructor's scripts use it: at ``url``,
    over HTTPS with ``verify`` (a CA file: the server's certificate) when the hub has TLS."""

    url: str
    admin_token: str
    verify: bool | str = True
    log: Callable[[], str] = field(default=lambda: "")

    @property
    def session(self) -> requests.Session:
        """A new session (cookies of its own); give each request ``verify=self.verify``: requests
        lets REQUESTS_CA_BUNDLE override a session's own ``verify``."""
        return requests.Session()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    def api(self, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = {"Authorization": f"token {token or self.admin_token}"}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30,
                                verify=self.verify, **kw)

    def wait_up(self, timeout: float) -> None:
        """Until the hub answers through its proxy (after a restart)."""
        def up() -> bool:
            try:
                return self.api("GET", "").status_code == 200
            except requests.RequestException:
                return False
        wait_until(up, timeout, f"the hub at {self.url} answering")

    def login(self, learner: Learner) -> str:
        """A token for the learner, requested with their Unix password (PAM)."""
        r = requests.post(f"{self.url}/hub/api/users/{learner.name}/tokens", timeout=60, verify=self.verify,
                          json={"auth": {"username": learner.name, "password": learner.password},
                                "note": "hub test", "expires_in": 3600})
        assert r.status_code in (200, 201), f"login of {learner.name}: {r.status_code} {r.text}\n{self.log_tail()}"
        learner.token = r.json()["token"]
        return learner.token

    def login_form(self, learner: Learner) -> str:
        """Log in as a browser does, with the login form (the hub makes the learner's account
        on their first login), then take a token with that session; returns the token."""
        with self.session as s:
            r = s.get(f"{self.url}/hub/login", timeout=60, verify=self.verify)
            assert r.status_code == 200, (r.status_code, r.text[:300])
            xsrf = s.cookies.get("_xsrf", "")
            r = s.post(f"{self.url}/hub/login", data={"username": learner.name, "password": learner.password,
                                                      "_xsrf": xsrf}, timeout=120, allow_redirects=False,
                       verify=self.verify)
            assert r.status_code == 302, f"login of {learner.name}: {r.status_code} {r.text[:500]}\n{self.log_tail()}"
            r = s.post(f"{self.url}/hub/api/users/{learner.name}/tokens", json={"note": "hub test", "expires_in": 7200},
                       headers={"X-XSRFToken": s.cookies.get("_xsrf", xsrf), "Referer": f"{self.url}/hub/home"},
                       timeout=60, verify=self.verify)
            assert r.status_code in (200, 201), f"token of {learner.name}: {r.status_code} {r.text[:500]}"
        learner.token = r.json()["token"]
        return learner.token

    def start_server(self, learner: Learner, timeout: float = 120) -> float:
        """Start the learner's server and follow its progress stream until it
        is ready; returns the seconds it took."""
        t0 = time.monotonic()
        r = self.api("POST", f"/users/{learner.name}/server", learner.token)
        assert r.status_code in (201, 202), f"spawn of {learner.name}: {r.status_code} {r.text}"
        with requests.get(f"{self.url}/hub/api/users/{learner.name}/server/progress", stream=True,
                          headers={"Authorization": f"token {learner.token}"}, timeout=(10, timeout),
                          verify=self.verify) as s:
            for line in s.iter_lines():
                if time.monotonic() - t0 > timeout:
                    break
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if event.get("ready"):
                        return time.monotonic() - t0
                    if event.get("failed"):
                        pytest.fail(f"{learner.name}'s server failed: {event}\n{self.log_tail()}")
        pytest.fail(f"{learner.name}'s server not ready in {timeout} s\n{self.log_tail()}")

    def server_running(self, learner: Learner) -> bool:
        r = self.api("GET", f"/users/{learner.name}")
        return bool(r.json().get("servers", {}).get("", {}).get("ready"))


@dataclass
class Hub(HubClient):
    """The JupyterHub process started here, and its REST API."""

    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = Path("/dev/null")
    _running: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, venv: Path, env: dict[str, str], log_path: Path, timeout: float = 60) -> Hub:
        port = int(env["LABKIT_HUB_PORT"])
        proc = subprocess.Popen([str(venv / "bin/jupyterhub"), "-f", str(REPO / "deploy/hub/jupyterhub_config.py")],
                                cwd=env["LABKIT_HUB_DIR"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
        hub = cls(f"http://127.0.0.1:{port}", env["LABKIT_HUB_ADMIN_TOKEN"], proc=proc, log_path=log_path)
        threading.Thread(target=hub._pump, daemon=True).start()
        if not hub._running.wait(timeout):
            pytest.fail(f"JupyterHub did not start within {timeout} s:\n{hub.log_tail()}")
        return hub

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if b"JupyterHub is now running" in line:
                    self._running.set()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, as an instructor's Ctrl-C or service stop would; it stops every server."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(f"JupyterHub did not stop within {timeout} s\n{self.log_tail()}")


@dataclass
class CellResult:
    stdout: str
    error: str
    died: bool


def execute(hub: HubClient, learner: Learner, code: str, timeout: float = 300, token: str | None = None) -> CellResult:
    """Run one cell in a new kernel of the learner's server, through the
    Jupyter server's REST and kernel-websocket API (as a browser would)."""
    token = token or learner.token
    base = f"{hub.url}/user/{learner.name}/api"
    headers = {"Authorization": f"token {token}"}
    r = requests.post(f"{base}/kernels", headers=headers, json={"name": "python3"}, timeout=60, verify=hub.verify)
    assert r.status_code == 201, f"kernel start for {learner.name}: {r.status_code} {r.text}"
    kid = r.json()["id"]
    ssl = {"ca_certs": hub.verify} if isinstance(hub.verify, str) else {}
    ws = websocket.create_connection(f"{base.replace('http', 'ws', 1)}/kernels/{kid}/channels",
                                     header=[f"Authorization: token {token}"], timeout=timeout, sslopt=ssl)
    try:
        return _run_cell(ws, code, timeout)
    finally:
        ws.close()
        requests.delete(f"{base}/kernels/{kid}", headers=headers, timeout=30, verify=hub.verify)


def _run_cell(ws: websocket.WebSocket, code: str, timeout: float) -> CellResult:
    msg_id, session = uuid.uuid4().hex, uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "session": session, "username": "test", "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    out, err = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            msg = json.loads(ws.recv())
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return CellResult("".join(out), "".join(err), died=True)
        kind, content = msg.get("msg_type") or msg["header"]["msg_type"], msg.get("content", {})
        if kind == "status" and content.get("execution_state") in ("dead", "restarting"):
            return CellResult("".join(out), "".join(err), died=True)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if kind == "stream":
            out.append(content.get("text", ""))
        elif kind == "error":
            err.append(f"{content.get('ename')}: {content.get('evalue')}\n" + "\n".join(content.get("traceback", [])))
        elif kind == "status" and content.get("execution_state") == "idle":
            return CellResult("".join(out), re.sub(r"\x1b\[[0-9;]*m", "", "".join(err)), died=False)
    pytest.fail(f"the cell did not finish within {timeout} s; output so far: {''.join(out)[-2000:]}")


class KeepAlive:
    """Requests through the proxy to the servers that must not be culled
    yet (the culler is set to a short timeout); the cull test drops one."""

    def __init__(self, hub: HubClient, every: float = 3.0) -> None:
        self.hub, self.every = hub, every
        self.learners: dict[str, Learner] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            for lr in list(self.learners.values()):
                try:
                    requests.get(f"{self.hub.url}/user/{lr.name}/api/kernels", timeout=10,
                                 headers={"Authorization": f"token {lr.token}"}, verify=self.hub.verify)
                except requests.RequestException:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> float:
    """Poll ``cond`` (state kept by another program: no event to wait on) until
    true; returns the seconds it took; fails the test with ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - t0


def qemu_of(learner: Learner) -> psutil.Process | None:
    """The learner's lab-VM QEMU (by its pidfile in the learner's state dir)."""
    uid = learner.pw.pw_uid
    for p in psutil.process_iter(["uids", "cmdline"]):
        argv = p.info["cmdline"] or []
        if p.info["uids"] and p.info["uids"].real == uid and argv and "qemu-system" in argv[0] \
                and str(learner.state_dir / "qemu.pid") in argv:
            return p
    return None


# -- for the hub load test (deploy/hub/loadtest/run.py, tests/test_hub_load.py) --------------------

def remove_cgroups(parent: str) -> None:
    """Remove every group under ``parent`` (on each cgroup-v1 controller), then ``parent``."""
    from labkit.cgroups import CONTROLLERS, Group
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


def sweep_stale_load() -> None:
    """Learners, groups and cgroups left by a load run whose process was killed
    (named after its PID: ``lkload<pid>u<i>``, ``labkit-hub-load-<pid>``)."""
    for entry in pwd.getpwall():
        m = re.fullmatch(r"lkload(\d+)u\d+", entry.pw_name)
        if m and not psutil.pid_exists(int(m.group(1))):
            kill_user_processes(entry.pw_name)
            subprocess.run(["userdel", "--remove", entry.pw_name], capture_output=True, timeout=60)
            subprocess.run(["groupdel", f"lkload{m.group(1)}"], capture_output=True, timeout=60)
    for d in Path("/sys/fs/cgroup/memory").glob("labkit-hub-load-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            remove_cgroups(d.name)


def readable_images(images: Path, learner: Learner, where: Path, kernel: str) -> tuple[Path, Path | None]:
    """``images`` if the learner can read the kernel's root image there, else a
    read-only bind mount of it under ``where`` (e.g. a clone under the 0700
    /root); the second value is the mount to undo, or None."""
    if as_user(learner, ["test", "-r", str(images / kernel / "root.ext4")]).returncode == 0:
        return images, None
    bound = where / "images"
    bound.mkdir()
    run(["mount", "--bind", "-o", "ro", str(images), str(bound)])
    return bound, bound


def build_shared_snapshot(venv: Path, env: dict[str, str], base: Path, kernel: str) -> float:
    """The instructor's once-per-host step: a warm-start snapshot in the
    host-wide cache (``env``'s LABKIT_SHARED_CACHE_DIR); returns its seconds."""
    env = dict(env, LABKIT_STATE_DIR=str(base / "root-state"), LABKIT_CACHE_DIR=str(base / "root-cache"),
               LABKIT_LIFETIME_PID="0")
    t0 = time.monotonic()
    run([str(venv / "bin/labkit"), "vm", "start", "--name", "warmup", "--kernel", kernel], env=env)
    run([str(venv / "bin/labkit"), "vm", "stop", "--name", "warmup"], env=env)
    return time.monotonic() - t0
