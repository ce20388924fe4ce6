"""The real parts of the Slurm spawner test: the learner's venv (from Debian's python3, in a
directory every user can read), configurable-http-proxy from npm, a local Unix learner made with
useradd, JupyterHub started from deploy/slurm/jupyterhub_config.py, and the REST and
kernel-websocket clients. ``HubSetup`` undoes everything in ``close`` even when a test fails."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import requests
import websocket
from slurm_cluster import PARTITION2

from labkit.timeout import Deadline

REPO = Path(__file__).resolve().parent.parent
CULL_TIMEOUT = 10         # s idle before the culler stops the learner's server (so, cancels its job)


class SetupError(RuntimeError):
    pass


def run(argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise SetupError(f"`{' '.join(argv)}` failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_processes(uid: int) -> list[str]:
    return [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}"
            for p in psutil.process_iter(["uids", "cmdline"]) if p.info["uids"] and p.info["uids"].real == uid]


def kill_user_processes(uid: int) -> None:
    """SIGKILL every process of ``uid``, one PID at a time."""
    procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def tmp_files_of(uid: int) -> list[Path]:
    """What the learner left in /tmp: a throwaway VM whose kernel is killed with the job (SIGTERM
    from scancel) keeps its temporary state directory (key, pmem files)."""
    out = []
    for p in Path("/tmp").iterdir():
        try:
            if p.lstat().st_uid == uid:
                out.append(p)
        except OSError:
            pass
    return out


def remove_tmp_files_of(uid: int) -> None:
    for p in tmp_files_of(uid):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def readable_images(user: str, images: Path, target: Path) -> tuple[Path, Path | None]:
    """The built images, at a path ``user`` can reach: bind-mounted on ``target`` (in a
    world-readable directory) when their own path is not (a clone under root's 0700 home).
    Returns the path and the bind mount to undo (None when there is none)."""
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(images / "6.1" / "vmlinuz")],
                           capture_output=True, timeout=30)
    if probe.returncode == 0:
        return images, None
    target.mkdir()
    run(["mount", "--bind", str(images), str(target)])
    return target, target


class HubSetup:
    """Everything the test makes, in the order it is undone."""

    def __init__(self, root: Path, slurm_env: dict[str, str]) -> None:
        self.root = root
        self.slurm_env = slurm_env
        self.learner = f"lks{uuid.uuid4().hex[:8]}"
        self.password = secrets.token_urlsafe(16)
        self.admin_token = secrets.token_hex(32)
        self.token = ""
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user_added = False
        self.bind_mount: Path | None = None
        self._running = threading.Event()
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.learner).pw_uid

    # -- set-up --------------------------------------------------------------------------------
    def add_learner(self) -> None:
        run(["useradd", "--create-home", "--shell", "/bin/bash", self.learner])
        self.user_added = True
        run(["chpasswd"], input=f"{self.learner}:{self.password}\n")

    def readable_images(self, images: Path) -> Path:
        path, self.bind_mount = readable_images(self.learner, images, self.root / "images")
        return path

    def start_hub(self, venv: Path, proxy: Path, images: Path, timeout: float = 90) -> None:
        state = self.root / "hub"
        state.mkdir()
        env = {**self.slurm_env, "LABKIT_SLURM_VENV": str(venv), "LABKIT_HUB_DIR": str(state),
               "LABKIT_HUB_PORT": str(self.port), "LABKIT_HUB_API_PORT": str(free_port()),
               "LABKIT_PROXY_API_PORT": str(free_port()), "LABKIT_PROXY_COMMAND": str(proxy),
               "LABKIT_HUB_LEARNERS": self.learner, "LABKIT_HUB_ADMIN_TOKEN": self.admin_token,
               "LABKIT_SLURM_EXEC_PREFIX": f"{shutil.which('runuser')} -u {{username}} --",
               # the learner's job runs on the second node, whose name resolves nowhere: the hub
               # must find the server at the node's NodeAddr (127.0.0.2)
               "LABKIT_SLURM_PARTITION": PARTITION2,
               "LABKIT_HUB_CULL_TIMEOUT": str(CULL_TIMEOUT), "LABKIT_HUB_CULL_EVERY": "3",
               "LABKIT_HUB_ACTIVITY_INTERVAL": "3",
               "LABKIT_SLURM_MEM": "3G", "LABKIT_SLURM_CPUS": "1", "LABKIT_SLURM_TIME": "00:30:00",
               "LABKIT_SLURM_START_TIMEOUT": "180", "LABKIT_IMAGES_DIR": str(images), "LABKIT_AUTO_BUILD": "0"}
        for k in ("LABKIT_STATE_DIR", "LABKIT_CACHE_DIR"):   # the learner's own, under their home
            env.pop(k, None)
        self._hub_env, self._hub_dir = env, state
        self.timings["hub_start_s"] = self._launch(timeout)

    def _launch(self, timeout: float) -> float:
        hub = str(Path(sys.executable).parent / "jupyterhub")
        t0 = time.monotonic()
        self._running.clear()
        self.proc = subprocess.Popen([hub, "-f", str(REPO / "deploy/slurm/jupyterhub_config.py")], cwd=self._hub_dir,
                                     env=self._hub_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._running.wait(timeout):
            raise SetupError(f"JupyterHub did not start within {timeout} s:\n{self.log_tail()}")
        return time.monotonic() - t0

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.root / "hub.log", "ab") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if b"JupyterHub is now running" in line:
                    self._running.set()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return (self.root / "hub.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- REST ----------------------------------------------------------------------------------
    def api(self, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        return requests.request(method, f"{self.url}/hub/api{path}", timeout=30,
                                headers={"Authorization": f"token {token or self.admin_token}"}, **kw)

    def login(self) -> str:
        """A token for the learner, requested with their Unix password (PAM)."""
        r = requests.post(f"{self.url}/hub/api/users/{self.learner}/tokens", timeout=30,
                          json={"auth": {"username": self.learner, "password": self.password},
                                "note": "slurm test", "expires_in": 3600})
        if r.status_code not in (200, 201):
            raise SetupError(f"login: {r.status_code} {r.text}\n{self.log_tail()}")
        self.token = r.json()["token"]
        return self.token

    def start_server(self, timeout: float = 240) -> float:
        """Start the learner's server and follow the hub's progress stream until it is ready."""
        t0 = time.monotonic()
        r = self.api("POST", f"/users/{self.learner}/server", self.token)
        if r.status_code not in (201, 202):
            raise SetupError(f"spawn: {r.status_code} {r.text}\n{self.log_tail()}")
        with requests.get(f"{self.url}/hub/api/users/{self.learner}/server/progress", stream=True,
                          headers={"Authorization": f"token {self.token}"}, timeout=(10, timeout)) as s:
            for line in s.iter_lines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if event.get("ready"):
                        return time.monotonic() - t0
                    if event.get("failed"):
                        raise SetupError(f"server failed: {event}\n{self.log_tail()}")
                if time.monotonic() - t0 > timeout:
                    break
        raise SetupError(f"server not ready in {timeout} s\n{self.log_tail()}")

    def stop_server(self, timeout: float = 60) -> None:
        r = self.api("DELETE", f"/users/{self.learner}/server")
        if r.status_code not in (202, 204):
            raise SetupError(f"stop: {r.status_code} {r.text}")
        deadline = Deadline(timeout)
        while self.api("GET", f"/users/{self.learner}").json().get("servers"):
            if deadline.expired:
                raise SetupError(f"server still listed after {timeout} s\n{self.log_tail()}")
            time.sleep(0.5)

    # -- the Jupyter server's kernel API -----------------------------------------------------
    def execute(self, code: str, timeout: float = 600) -> str:
        """Run ``code`` in a new kernel of the learner's server; its stdout, or the error raised."""
        base = f"{self.url}/user/{self.learner}"
        headers = {"Authorization": f"token {self.token}"}
        r = requests.post(f"{base}/api/kernels", headers=headers, json={"name": "python3"}, timeout=60)
        if r.status_code != 201:
            raise SetupError(f"kernel start: {r.status_code} {r.text}")
        kid = r.json()["id"]
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/user/{self.learner}/api/kernels/{kid}/channels",
                                         header=[f"Authorization: token {self.token}"], timeout=timeout)
        # An open JupyterLab tab polls its server all the time; so does this, while the cell runs, so
        # the idle culler (a short timeout in the test) sees the server in use until the cell ends.
        polling = threading.Event()

        def poll() -> None:
            while not polling.wait(2.0):
                try:
                    requests.get(f"{base}/api/kernels", headers=headers, timeout=10)
                except requests.RequestException:
                    pass

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": self.learner,
                                           "session": uuid.uuid4().hex, "version": "5.3"},
                                "parent_header": {}, "metadata": {}, "channel": "shell",
                                "content": {"code": code, "silent": False, "store_history": False,
                                            "user_expressions": {}, "allow_stdin": False}}))
            out: list[str] = []
            deadline = Deadline(timeout)
            while not deadline.expired:
                ws.settimeout(max(1.0, deadline.remaining))
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind == "error":
                    raise SetupError(f"cell raised {content['ename']}: {content['evalue']}\n" + "".join(out))
                elif kind == "status" and content["execution_state"] == "idle":
                    return "".join(out)
            raise SetupError(f"cell did not finish in {timeout} s: {''.join(out)}")
        finally:
            polling.set()
            poller.join(15)
            ws.close()

    # -- undo ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the hub (the learner's job outlives it: the cluster's stop cancels it), then remove the learner."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            # the proxy runs in the hub's session; anything left of it goes too
            if self.proc is not None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            if self.user_added:
                uid = self.uid
                # a hub stop leaves the learner's job running (cleanup_servers is off): cancel it
                subprocess.run(["scancel", "-u", self.learner], env=self.slurm_env, capture_output=True, timeout=30)
                kill_user_processes(uid)
                remove_tmp_files_of(uid)
                subprocess.run(["userdel", "--remove", self.learner], capture_output=True, timeout=60)
            if self.bind_mount is not None:
                subprocess.run(["umount", "-l", str(self.bind_mount)], capture_output=True, timeout=60)
