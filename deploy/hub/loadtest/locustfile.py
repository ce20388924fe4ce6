"""Locust learners for the hub load test ("everyone starts at once").

Each simulated learner does what a learner does in the first minute of a
class, once: logs in with their Unix password (a token through the hub's REST
API, PAM behind it), starts their server and follows its progress stream,
opens a kernel, and runs notebook 01's first cells over the kernel websocket
(``labkit.connect()``, then the first measurement: the pmem namespaces as
``ndctl`` lists them). Then it stops; the run ends when every learner has.

    locust -f deploy/hub/loadtest/locustfile.py --headless -u N -r N --host HUB_URL

deploy/hub/loadtest/run.py sets up the learners and the hub and runs this.
Environment: LOADTEST_LEARNERS (a JSON list of {"name", "password"}, one per
simulated user), LOADTEST_OUT (a JSON-lines file, one line per learner),
LOADTEST_KERNEL (the guest kernel, e.g. 6.1), LOADTEST_TIMEOUT (s per phase),
LOADTEST_CELL (another cell to run instead, printing its own RESULT line).
Every phase is also a locust "request" (type PHASE), so locust's own summary
shows the phases beside the HTTP calls.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websocket
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

LEARNERS: list[dict[str, str]] = json.loads(Path(os.environ["LOADTEST_LEARNERS"]).read_text())
OUT = Path(os.environ["LOADTEST_OUT"])
KERNEL = os.environ.get("LOADTEST_KERNEL", "6.1")
TIMEOUT = float(os.environ.get("LOADTEST_TIMEOUT", "600"))
_next = itertools.count()
_done = itertools.count(1)

# Notebook 01's first code cell and its first measurement (the namespaces), timed inside the kernel.
CELL = f"KERNEL = {KERNEL!r}\n" + """
import json, time
t0 = time.monotonic()
import labkit
from labkit.lab import Lab
vm = labkit.connect(kernel=KERNEL)
lab = Lab(vm)
t1 = time.monotonic()
release = vm.describe()["kernel_release"]
namespaces = lab.namespaces()
t2 = time.monotonic()
print("RESULT " + json.dumps({"connect_s": round(t1 - t0, 2), "measure_s": round(t2 - t1, 2),
      "kind": vm.record.start_kind, "release": release, "namespaces": len(namespaces)}))
"""
CELL = os.environ.get("LOADTEST_CELL") or CELL      # another cell (e.g. a smoke run of the hub alone)


class PhaseFailed(Exception):
    """One phase of a learner's start went wrong; ``kind`` names which way."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class Learner(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.me = LEARNERS[next(_next) % len(LEARNERS)]
        self.token = ""
        self.record: dict[str, Any] = {"learner": self.me["name"], "phases": {}, "progress": [],
                                       "spawn_retries": 0}

    def _phase(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        exc: Exception | None = None
        try:
            return fn()
        except PhaseFailed as e:
            exc = e
            raise
        except Exception as e:  # noqa: BLE001 - any error is this phase's failure, named by its class
            exc = PhaseFailed(f"{name}-{type(e).__name__}", str(e)[:300])
            raise exc from e
        finally:
            seconds = time.monotonic() - t0
            self.record["phases"][name] = round(seconds, 2)
            events.request.fire(request_type="PHASE", name=name, response_time=seconds * 1000,
                                response_length=0, exception=exc, context={})

    @task
    def start_like_a_learner(self) -> None:
        t0 = time.monotonic()
        try:
            self._phase("login", self._login)
            self._phase("spawn", self._spawn)
            kid = self._phase("kernel", self._kernel)
            self.record["result"] = self._phase("cell", lambda: self._cell(kid))
            self.record["ready_s"] = round(time.monotonic() - t0, 2)
        except PhaseFailed as e:
            self.record["failure"] = {"kind": e.kind, "detail": e.detail}
        finally:
            self.record["elapsed_s"] = round(time.monotonic() - t0, 2)
            with OUT.open("a") as f:
                f.write(json.dumps(self.record) + "\n")
            if next(_done) >= len(LEARNERS):
                self.environment.runner.quit()      # the last one ends the run, whatever --run-time says
            raise StopUser()

    # -- the phases -------------------------------------------------------------------
    def _login(self) -> None:
        name = self.me["name"]
        with self.client.post(f"/hub/api/users/{name}/tokens", name="/hub/api/users/[name]/tokens",
                              json={"auth": {"username": name, "password": self.me["password"]},
                                    "note": "load test", "expires_in": 3600},
                              catch_response=True, timeout=TIMEOUT) as r:
            if r.status_code not in (200, 201):
                r.failure(f"{r.status_code}")
                raise PhaseFailed(f"login-http-{r.status_code}", r.text[:300])
            self.token = r.json()["token"]

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def _spawn(self) -> None:
        name = self.me["name"]
        deadline = time.monotonic() + TIMEOUT
        while True:
            with self.client.post(f"/hub/api/users/{name}/server", name="/hub/api/users/[name]/server",
                                  headers=self._auth(), catch_response=True, timeout=TIMEOUT) as r:
                if r.status_code == 429 and time.monotonic() < deadline:
                    # the hub's concurrent_spawn_limit: the hub's own page says "try again in N s"
                    r.success()
                    self.record["spawn_retries"] += 1
                    time.sleep(float(r.headers.get("Retry-After", "5")))
                    continue
                if r.status_code not in (201, 202):
                    r.failure(f"{r.status_code}")
                    raise PhaseFailed(f"spawn-http-{r.status_code}", r.text[:300])
                break
        self._follow_progress(name, deadline)

    def _follow_progress(self, name: str, deadline: float) -> None:
        s = self.client.get(f"/hub/api/users/{name}/server/progress", name="/hub/api/users/[name]/server/progress",
                            headers=self._auth(), stream=True, timeout=(30, TIMEOUT))
        try:
            if s.status_code != 200:
                raise PhaseFailed(f"progress-http-{s.status_code}", s.text[:300])
            for line in s.iter_lines():
                if time.monotonic() > deadline:
                    break
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("message"):
                    self.record["progress"].append(event["message"][:200])
                if event.get("ready"):
                    return
                if event.get("failed"):
                    raise PhaseFailed("spawn-failed", str(event.get("message"))[:300])
        finally:
            s.close()
        raise PhaseFailed("spawn-timeout", f"not ready within {TIMEOUT} s")

    def _kernel(self) -> str:
        with self.client.post(f"/user/{self.me['name']}/api/kernels", name="/user/[name]/api/kernels",
                              headers=self._auth(), json={"name": "python3"}, catch_response=True,
                              timeout=TIMEOUT) as r:
            if r.status_code != 201:
                r.failure(f"{r.status_code}")
                raise PhaseFailed(f"kernel-http-{r.status_code}", r.text[:300])
            return str(r.json()["id"])

    def _cell(self, kid: str) -> dict[str, Any]:
        url = f"{self.host.replace('http', 'ws', 1)}/user/{self.me['name']}/api/kernels/{kid}/channels"
        ws = websocket.create_connection(url, header=[f"Authorization: token {self.token}"], timeout=TIMEOUT)
        try:
            out, err = _run_cell(ws, CELL, TIMEOUT)
        finally:
            ws.close()
        self.record["cell_output"] = [ln[:200] for ln in out.splitlines() if not ln.startswith("RESULT ")][:20]
        if err:
            kind = re.sub(r"\W", "", err.split(":", 1)[0])[:60] or "error"
            raise PhaseFailed(f"cell-{kind}", err[-600:])
        results = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not results:
            raise PhaseFailed("cell-no-result", out[-600:])
        return dict(json.loads(results[-1][len("RESULT "):]))


def _run_cell(ws: websocket.WebSocket, code: str, timeout: float) -> tuple[str, str]:
    """Send one execute_request; return its stdout and its error (if any)."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "session": uuid.uuid4().hex, "username": "load", "version": "5.3",
                   "msg_type": "execute_request", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    out: list[str] = []
    err: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        msg = json.loads(ws.recv())
        kind, content = msg.get("msg_type") or msg["header"]["msg_type"], msg.get("content", {})
        if kind == "status" and content.get("execution_state") in ("dead", "restarting"):
            raise PhaseFailed("cell-kernel-died", "".join(out)[-600:])
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if kind == "stream":
            out.append(content.get("text", ""))
        elif kind == "error":
            err.append(f"{content.get('ename')}: {content.get('evalue')}")
        elif kind == "status" and content.get("execution_state") == "idle":
            return "".join(out), "".join(err)
    raise PhaseFailed("cell-timeout", f"no answer within {timeout} s; output: {''.join(out)[-300:]}")
