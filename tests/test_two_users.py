"""Two real learners on one host (issue 25): what the one (the attacker)
tries against the other (the victim), that each attempt fails, and that the
victim's lab keeps working and loses nothing.

Both are real local users, made by ``labkit class enrol`` (the code of
``labkit.deploy.accounts``) and removed at the end; each runs labkit as
itself with its own state and cache. One guest is booted, by the victim, on
6.1: its start is attacked twice (a port taken under it, a snapshot planted in
the shared cache) and the running guest then once more (its SSH port).

(a) the attacker binds the port the victim's QEMU is about to bind (for the
    cold boot and for the warm start) -> the start tries another, the guest runs;
(b) the attacker connects to the victim's guest port -> no key gets in; a
    server the attacker puts on a port -> the victim's client refuses its host key;
(c) the attacker plants a snapshot in a shared cache it can write -> refused,
    with the reason; the victim boots cold and makes its own;
(d) the attacker replaces the victim's file in the exchange of ``labkit class
    exchange`` -> EPERM (sticky);
(e) the attacker reads the victim's notebook in the home ``labkit class enrol``
    made -> EACCES.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from labkit.deploy import accounts
from labkit.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
NOTEBOOK = "00-my-work.ipynb"
SUBMISSION = "inbound/{victim}+ps1+2026-12-07 06:00:00.000000 UTC"

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        base = {"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                "LABKIT_STATE_DIR": str(self.home / "state"), "LABKIT_CACHE_DIR": str(self.home / "cache"),
                "LABKIT_IMAGES_DIR": str(Settings.from_env(os.environ).images_dir), "LABKIT_AUTO_BUILD": "0",
                "LABKIT_SHARED_CACHE_DIR": "", "LABKIT_LIFETIME_PID": "0"}
        return {**base, **extra}

    def run(self, python: str, code: str, *args: str, timeout: float = 60, **env: str) -> dict:
        """Run ``code`` as this user; it prints one JSON object last."""
        r = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                           user=self.uid, group=self.gid, extra_groups=[], cwd=self.home, env=self.env(**env))
        assert r.returncode == 0, f"as {self.name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return json.loads(r.stdout.strip().splitlines()[-1])


def _remove_user(name: str) -> None:
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
    subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)
    subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def _sweep_stale() -> None:
    """Users of a run of this file whose pytest was killed (``lk2u<pid>v/a``)."""
    for entry in pwd.getpwall():
        n = entry.pw_name
        if n.startswith("lk2u") and n[4:-1].isdigit() and not psutil.pid_exists(int(n[4:-1])):
            _remove_user(n)


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the two-user tests create Unix users and need root (CI runs as root)")
    base = Path(tempfile.mkdtemp(prefix="labkit-2u-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def python(where: Path) -> str:
    """A Python both users can run with labkit and its dependencies: Debian's
    python3 in a venv that reads this run's site-packages (the same 3.11 ABI)
    and a copy of labkit (root's own interpreter may live under the 0700 /root)."""
    shutil.copytree(REPO / "labkit", where / "src/labkit", ignore=shutil.ignore_patterns("__pycache__"))
    venv = where / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "labkit-test.pth").write_text(f"{where / 'src'}\n{sysconfig.get_paths()['purelib']}\n")
    subprocess.run(["chmod", "-R", "a+rX", str(where)], check=True)
    exe = str(venv / "bin/python")
    probe = subprocess.run([exe, "-c", "import labkit.machine.vm, paramiko, psutil, pexpect, qemu.qmp"],
                           capture_output=True, text=True, user=65534, group=65534, extra_groups=[], cwd="/")
    if probe.returncode != 0:
        pytest.fail(f"an unprivileged user cannot import labkit's dependencies from {site}: {probe.stderr[-800:]}")
    return exe


@pytest.fixture(scope="module")
def users(where: Path) -> Iterator[tuple[User, User]]:
    """The victim and the attacker, enrolled the way an instructor does it
    (their homes are made 0700 whatever this host's HOME_MODE)."""
    _sweep_stale()
    names = (f"lk2u{os.getpid()}v", f"lk2u{os.getpid()}a")
    try:
        learners = accounts.enrol([accounts.Row(n, "two-user test", i + 1) for i, n in enumerate(names)])
        assert [x.created for x in learners] == [True, True]
        again = accounts.enrol([accounts.Row(n, "", i + 1) for i, n in enumerate(names)])   # idempotent
        assert [(x.created, x.home_fixed) for x in again] == [(False, False), (False, False)]
        pair = tuple(User(x.username, x.uid, pwd.getpwnam(x.username).pw_gid, x.home) for x in learners)
        yield pair    # type: ignore[misc]
    finally:
        for n in names:
            _remove_user(n)


# -- the victim's guest: (a) and (c) are attacks on its start --------------------------------------

PLANT = r'''
import json, os, sys
from pathlib import Path
from labkit.image import ensure_image
from labkit.machine import snapshot
from labkit.machine.accel import choose_accel
from labkit.machine.boot import Launch
from labkit.machine.statedir import VMInfo
from labkit.machine.vm import VM
from labkit.settings import Settings
shared = Path(sys.argv[1])
settings = Settings.from_env(os.environ)
vm = VM("lab", kernel="6.1", persistent=True, settings=settings)   # the victim's machine, as the attacker sees it
image = ensure_image("6.1", settings=settings)
launch = Launch(vm._spec(), image, choose_accel(settings), VMInfo("lab", "6.1"))
key = snapshot.machine_key(launch.config(""), image)
d = shared / "snapshots" / f"6.1-{key}"
d.mkdir(parents=True)
(d / "meta.json").write_text(json.dumps({"key": key, "format": snapshot.FORMAT, "kernel": "6.1"}))
(d / "state.mig").write_bytes(b"the attacker's guest")
(d / "disk.qcow2").write_bytes(b"the attacker's disk")
print(json.dumps({"planted": str(d)}))
'''

BIND = r'''
import json, os, signal, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
signal.pause()
'''

# The victim's start, with one seam: the attacker cannot guess the port labkit
# picks at random, so the test tells the victim's labkit to pick, as the first
# port of each QEMU it spawns (the cold boot that makes the snapshot, the warm
# start that restores it), the port the attacker holds. Everything after the
# pick is real: QEMU fails to bind it, labkit sees that and retries.
VICTIM_START = r'''
import json, os, sys
from labkit.machine import boot
from labkit.machine.vm import VM
from labkit.settings import Settings
taken_port = int(sys.argv[1])
real_free_port, real_spawn_retrying = boot.free_port, boot.Launch.spawn_retrying
armed = []
def spawn_retrying(self, *a, **k):
    armed.append(True)
    return real_spawn_retrying(self, *a, **k)
def free_port():
    return taken_port if armed and armed.pop() else real_free_port()
boot.free_port, boot.Launch.spawn_retrying = free_port, spawn_retrying
lines = []
vm = VM("lab", kernel="6.1", persistent=True, settings=Settings.from_env(os.environ), on_console_line=lines.append)
vm.start()
vm.run(["sh", "-c", "echo victim-work > /root/work.txt"], check=True)
print(json.dumps({"progress": [l for l in lines if l.startswith("labkit:")], "port": vm.info.ssh_port,
                  "host_key": vm.info.host_key, "kind": vm.info.start_kind, "refused": vm.info.snapshot_refused,
                  "key_path": str(vm.key_path)}))
'''


@pytest.fixture(scope="module")
def victim_lab(where: Path, python: str, users: tuple[User, User]) -> Iterator[dict]:
    """The victim's persistent guest, started while the attacker holds its first
    port (a) and has planted a snapshot in the shared cache (c)."""
    from conftest import require_image
    require_image("6.1")
    victim, attacker = users
    (victim.home / NOTEBOOK).write_text('{"cells": [], "the victim": "work"}')
    os.chown(victim.home / NOTEBOOK, victim.uid, victim.gid)
    shared = where / "shared-cache"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    os.chown(shared, attacker.uid, attacker.gid)   # the attacker's, writable by all: no place for a snapshot
    planted = attacker.run(python, PLANT, str(shared))["planted"]
    binder = subprocess.Popen([python, "-c", BIND], stdout=subprocess.PIPE, text=True, user=attacker.uid,
                              group=attacker.gid, extra_groups=[], cwd=attacker.home, env=attacker.env())
    try:
        assert binder.stdout is not None
        held = json.loads(binder.stdout.readline())["port"]
        lab = victim.run(python, VICTIM_START, str(held), timeout=300, LABKIT_SHARED_CACHE_DIR=str(shared))
        yield {**lab, "held": held, "planted": planted}
    finally:
        binder.kill()
        binder.wait()
        victim.run(python, "import json, os\nfrom labkit.machine.vm import VM\nfrom labkit.settings import Settings\n"
                   "VM.attach('lab', settings=Settings.from_env(os.environ)).stop()\nprint('{}')")


@pytest.mark.fresh_guest("the victim boots its own guest, as another user, while the attacker takes its port")
def test_a_port_taken_by_the_attacker_is_retried_and_the_guest_starts(victim_lab):
    taken = [line for line in victim_lab["progress"] if "was taken by another process" in line]
    assert len(taken) == 2, victim_lab["progress"]         # the cold boot's QEMU and the warm start's
    assert all(f"port {victim_lab['held']} " in line for line in taken)
    assert victim_lab["kind"] == "warm" and victim_lab["port"] != victim_lab["held"]


@pytest.mark.fresh_guest("the victim's guest of test (a)")
def test_c_a_snapshot_planted_in_a_shared_cache_is_refused(victim_lab, users):
    _, attacker = users
    assert "not trusted" in victim_lab["refused"] and f"uid {attacker.uid}" in victim_lab["refused"]
    assert any("not trusted" in line and "not restoring it" in line for line in victim_lab["progress"])
    assert any("first start of this machine: cold boot" in line for line in victim_lab["progress"])
    assert Path(victim_lab["planted"]).is_dir()             # left alone, never loaded


# -- (b) the victim's running guest ------------------------------------------------------------------

ATTACK_SSH = r'''
import json, sys, paramiko
port, key_path = int(sys.argv[1]), sys.argv[2]
out = {}
try:
    open(key_path).read()
    out["read key"] = "read"
except OSError as e:
    out["read key"] = type(e).__name__
for how in ("none", "password", "own key"):
    t = paramiko.Transport(("127.0.0.1", port))
    t.start_client(timeout=10)
    try:
        if how == "none":
            t.auth_none("root")
        elif how == "password":
            t.auth_password("root", "root")
        else:
            t.auth_publickey("root", paramiko.ECDSAKey.generate())
        out[how] = "logged in"
    except paramiko.AuthenticationException as e:
        out[how] = type(e).__name__
    finally:
        t.close()
print(json.dumps(out))
'''

FAKE_GUEST = r'''
import json, socket, tempfile, paramiko
from pathlib import Path
from labkit.machine.channels.keys import ensure_client_key
path = Path(tempfile.mkdtemp()) / "fake_host_key"
ensure_client_key(path)                     # an ed25519 key, the type the victim pinned
key = paramiko.Ed25519Key.from_private_key_file(str(path))
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(json.dumps({"port": s.getsockname()[1], "key": key.get_base64()}), flush=True)
class Anyone(paramiko.ServerInterface):
    def get_allowed_auths(self, username): return "publickey"
    def check_auth_publickey(self, username, key): return paramiko.AUTH_SUCCESSFUL
while True:
    conn, _ = s.accept()
    t = paramiko.Transport(conn); t.add_server_key(key)
    try: t.start_server(server=Anyone())
    except Exception: pass
'''

VICTIM_TRUSTS = r'''
import json, os, sys
from pathlib import Path
from labkit.errors import HostKeyMismatch
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.vm import VM
from labkit.settings import Settings
vm = VM.attach("lab", settings=Settings.from_env(os.environ))
try:
    SSHChannel(int(sys.argv[1]), vm.key_path, tuple(vm.info.host_key)).connect(timeout=10)
    verdict = "connected"
except HostKeyMismatch as e:
    verdict = "HostKeyMismatch"
print(json.dumps({"fake": verdict, "work": vm.run(["cat", "/root/work.txt"], check=True).stdout.strip()}))
'''


@pytest.mark.fresh_guest("the victim's guest of test (a)")
def test_b_the_attacker_cannot_log_in_nor_pass_for_the_victims_guest(victim_lab, python, users):
    victim, attacker = users
    got = attacker.run(python, ATTACK_SSH, str(victim_lab["port"]), victim_lab["key_path"])
    assert got == {"read key": "PermissionError", "none": "BadAuthenticationType",
                   "password": "BadAuthenticationType", "own key": "AuthenticationException"}, got
    fake = subprocess.Popen([python, "-c", FAKE_GUEST], stdout=subprocess.PIPE, text=True, user=attacker.uid,
                            group=attacker.gid, extra_groups=[], cwd=attacker.home, env=attacker.env())
    try:
        assert fake.stdout is not None
        port = json.loads(fake.stdout.readline())["port"]
        seen = victim.run(python, VICTIM_TRUSTS, str(port))
    finally:
        fake.kill()
        fake.wait()
    assert seen == {"fake": "HostKeyMismatch", "work": "victim-work"}   # and the real guest still answers


# -- (d) and (e): the exchange and the homes ----------------------------------------------------------

REPLACE = r'''
import errno, json, os, sys
from pathlib import Path
target = Path(sys.argv[1])                  # inbound/<the victim's submission>/ps1.ipynb
inbound = target.parent.parent
mine = inbound / "attacker-file"
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = "done"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
attempt("write own", lambda: mine.write_text("forged"))
attempt("replace submission", lambda: os.rename(mine, target.parent))
attempt("move submission away", lambda: os.rename(target.parent, inbound / "gone"))
top = inbound.parent.parent / "attacker-course"      # the exchange's root: writable by all, sticky
attempt("write own at the top", lambda: top.mkdir())
attempt("replace course", lambda: os.rename(top, inbound.parent))
attempt("overwrite", lambda: target.write_text("forged"))
attempt("list inbound", lambda: os.listdir(inbound))
attempt("write outbound", lambda: (inbound.parent / "outbound" / "ps1").mkdir())
print(json.dumps(out))
'''


def test_d_the_attacker_cannot_replace_the_victims_submission(where, python, users):
    victim, attacker = users
    ex = accounts.prepare_exchange(where / "exchange")
    sub = ex.root / ex.course / SUBMISSION.format(victim=victim.name)
    victim.run(python, "import json, sys\nfrom pathlib import Path\np = Path(sys.argv[1])\np.mkdir()\n"
               "(p / 'ps1.ipynb').write_text('the victim\\'s answers')\nprint('{}')", str(sub))
    got = attacker.run(python, REPLACE, str(sub / "ps1.ipynb"))
    # the sticky bits: EPERM; the modes of the victim's file and of inbound/outbound: EACCES
    assert got == {"write own": "done", "write own at the top": "done", "replace submission": "EPERM", "move submission away": "EPERM",
                   "replace course": "EPERM", "overwrite": "EACCES", "list inbound": "EACCES",
                   "write outbound": "EACCES"}, got
    assert (sub / "ps1.ipynb").read_text() == "the victim's answers"


READ_HOME = r'''
import errno, json, os, sys
out = {}
for name, f in (("read", lambda: open(sys.argv[1]).read()), ("list", lambda: os.listdir(os.path.dirname(sys.argv[1])))):
    try:
        f()
        out[name] = "done"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
'''


def test_e_the_attacker_cannot_read_the_victims_notebook(python, users):
    victim, attacker = users
    nb = victim.home / NOTEBOOK
    if not nb.exists():              # when run without the guest tests
        nb.write_text("{}")
        os.chown(nb, victim.uid, victim.gid)
    nb.chmod(0o644)                  # readable itself: the home's 0700 is what stops the attacker
    assert oct(victim.home.stat().st_mode & 0o777) == oct(accounts.HOME_MODE)
    got = attacker.run(python, READ_HOME, str(nb))
    assert got == {"read": "EACCES", "list": "EACCES"}, got


@pytest.mark.fresh_guest("the victim's guest of test (a)")
def test_after_every_attack_the_victims_lab_works_and_lost_nothing(victim_lab, python, users):
    victim, _ = users
    got = victim.run(python, "import json, os\nfrom labkit.machine.vm import VM\nfrom labkit.settings import Settings\n"
                     "vm = VM.attach('lab', settings=Settings.from_env(os.environ))\n"
                     "print(json.dumps({'work': vm.run(['cat', '/root/work.txt'], check=True).stdout.strip(), "
                     "'port': vm.info.ssh_port, 'notebook': open(os.path.expanduser('~/" + NOTEBOOK + "')).read()}))")
    assert got == {"work": "victim-work", "port": victim_lab["port"],
                   "notebook": '{"cells": [], "the victim": "work"}'}, got



# -- (f) the grader without root ----------------------------------------------------------------------

# As the (non-root) grader: the sandbox's own command line around a hostile
# "submission" (stdlib only, so no kernel is needed), run the way a kernel is:
# `inside` sets its process limit in its namespace and execs it.
ROOTLESS = r'''
import json, os, subprocess, sys, tempfile
from pathlib import Path
from labkit.course import sandbox, sandbox_mode
bwrap = sandbox.require_bwrap()
mode = sandbox_mode.grading_mode(bwrap)
tmp = Path(tempfile.mkdtemp())
for d in ("run", "view", "state"):
    (tmp / d).mkdir()
secret = Path.home() / "grader-secret"
secret.write_text("the exam key")
other = subprocess.Popen(["sleep", "60"])          # another submission's process, same uid
sb = sandbox.Sandbox(uid=os.geteuid(), run_dir=tmp / "run", vm_state=tmp / "state", vm_view=tmp / "view",
                     state_root=tmp, vm_name="g", ssh_port=2222, rootless=True,
                     disable_userns=not sandbox.userns_problem(bwrap))
code = """
import errno, json, os, socket, subprocess
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = "done"
    except subprocess.CalledProcessError:
        out[name] = "failed"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
attempt("read grader", lambda: open(%r).read())
attempt("kill other", lambda: os.kill(%d, 9))
attempt("setuid", lambda: os.setuid(0))
attempt("userns", lambda: subprocess.run(["unshare", "--user", "true"], check=True, capture_output=True))
attempt("network", lambda: socket.create_connection(("1.1.1.1", 80), timeout=3))
kids = []
try:
    for _ in range(1000):
        pid = os.fork()
        if pid == 0:
            import time; time.sleep(30); os._exit(0)
        kids.append(pid)
except OSError:
    pass
for k in kids:
    os.kill(k, 9); os.waitpid(k, 0)
out["forks"] = len(kids)
out["pids"] = len([p for p in os.listdir("/proc") if p.isdigit()])
print(json.dumps(out), flush=True)
""" % (str(secret), other.pid)
inside = [sys.executable, "-m", "labkit.course.sandbox", "inside", "--relay", f"2222={tmp / 'run' / 'ssh.sock'}",
          "--nproc", str(sb.limits.cgroup.pids), "--", sys.executable, "-I", "-S", "-c", code]
r = subprocess.run(sandbox.bwrap_argv(sb, inside, bwrap), capture_output=True, text=True, timeout=60)
log = (tmp / "run" / "kernel.log").read_text() if (tmp / "run" / "kernel.log").exists() else ""
alive = other.poll() is None
other.kill()
print(json.dumps({"mode": mode, "rc": r.returncode, "stderr": r.stderr[-1000:], "log": log, "other alive": alive,
                  "uid": os.geteuid()}))
'''


def test_f_a_grader_without_root_sandboxes_each_submission_in_namespaces(python, users):
    _, grader = users                                  # any unprivileged user
    got = grader.run(python, ROOTLESS)
    assert got["mode"] == "userns" and got["rc"] == 0, got
    seen = json.loads(got["log"].strip().splitlines()[-1])
    assert {k: seen[k] for k in ("read grader", "kill other", "setuid", "userns", "network")} == {
        "read grader": "ENOENT",       # the grader's home is not in the sandbox
        "kill other": "ESRCH",         # its own PID namespace: the same uid's other processes are not there
        "setuid": "EINVAL",            # root is not even mapped in its user namespace
        "userns": "failed", "network": "ENETUNREACH"}, seen
    assert seen["forks"] < 128 and seen["pids"] <= 3, seen   # RLIMIT_NPROC counts its namespace only
    assert got["other alive"]
