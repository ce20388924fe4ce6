"""JupyterHub for a class on one host: every learner is a local Unix user
with their own Jupyter server, lab VM, memory/CPU/PIDs limit, and nothing
left behind when the server stops or is culled.

    jupyterhub -f deploy/hub/jupyterhub_config.py

Which spawner: on a host whose PID 1 is systemd (``/run/systemd/system``
exists) SystemdSpawner (pip package ``jupyterhub-systemdspawner``) runs each
server in a transient systemd unit with MemoryMax/CPUQuota and stops the unit
on stop; elsewhere labkit's CgroupSpawner does the same with cgroup-v1 groups
(``labkit.deploy.spawner``). ``LABKIT_HUB_SPAWNER=cgroup|systemd`` forces one.

Everything a deployment changes is an environment variable (defaults in brackets):
LABKIT_HUB_IP [127.0.0.1], LABKIT_HUB_PORT [8000], LABKIT_HUB_API_PORT (the hub's
internal API) [8081], LABKIT_HUB_PROXY_API_PORT [8001], LABKIT_HUB_DIR (database,
cookie secret) [/var/lib/labkit-hub], LABKIT_HUB_GROUP (Unix group of the
learners, who log in with their Unix password through PAM) [labkit-learners],
LABKIT_HUB_MEM [2G], LABKIT_HUB_CPUS [1.0], LABKIT_HUB_PIDS [1024],
LABKIT_HUB_CGROUP_PARENT (cgroup spawner only) [labkit-hub],
LABKIT_HUB_CULL_TIMEOUT (s idle before a server and its VM are stopped) [1800],
LABKIT_HUB_CULL_EVERY [60, or half the timeout if that is less], LABKIT_HUB_ACTIVITY_INTERVAL [60, or a quarter of the cull timeout if that is less],
LABKIT_HUB_SPAWN_LIMIT (servers starting at once; 0 = no limit) [10 per core],
LABKIT_HUB_ADMIN_TOKEN (an API token for the instructor's scripts: enrol, list,
start and stop; it cannot mint tokens; none when unset), LABKIT_HUB_ADMINS (Unix
users who get /hub/admin) [none], LABKIT_HUB_SSL_CERT and LABKIT_HUB_SSL_KEY (HTTPS)
[none], LABKIT_HUB_NOTEBOOKS (the release delivered into ~/notebooks) [none], LABKIT_HUB_PROXY (configurable-http-proxy's path).
LABKIT_START_QUEUE_DIR (labkit's host-wide guest start queue, made sticky and shared by the hub)
[/run/labkit-start-queue]. The learners' servers get LABKIT_IMAGES_DIR, LABKIT_SHARED_CACHE_DIR
the start queue's LABKIT_START_SLOTS/_QUEUE_TIMEOUT, LABKIT_BOOT_TIMEOUT and LABKIT_WARM_START from the hub's environment.
"""

import os
import shutil
import sys
from pathlib import Path

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

env = os.environ.get
BIN = Path(sys.executable).parent        # the venv JupyterHub runs from, readable by every learner

# -- the hub ------------------------------------------------------------------------
c.JupyterHub.ip = env("LABKIT_HUB_IP", "127.0.0.1")
c.JupyterHub.port = int(env("LABKIT_HUB_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(env("LABKIT_HUB_API_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(env('LABKIT_HUB_PROXY_API_PORT', '8001'))}"
state = Path(env("LABKIT_HUB_DIR", "/var/lib/labkit-hub"))
state.mkdir(parents=True, exist_ok=True, mode=0o700)
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
proxy = env("LABKIT_HUB_PROXY") or shutil.which("configurable-http-proxy")
if proxy:
    c.ConfigurableHTTPProxy.command = [proxy]
# A hub restart (an upgrade, a config change, a crash) must not end a class: the servers, their
# kernels and their VMs keep running and the restarted hub finds them again from its database
# (the spawner's state). Stopping a class is stopping its servers first (`labkit class stop`, or
# the admin page), then the hub.
c.JupyterHub.cleanup_servers = False
# Activity reaches the hub every minute, or 4 times per cull timeout where that is shorter: a
# server busy all along must never look idle to the culler (a 60 s timeout beside 60 s reports
# culled a learner in the middle of a cell in the server-guest test).
CULL_TIMEOUT = int(env("LABKIT_HUB_CULL_TIMEOUT", "1800"))
ACTIVITY_INTERVAL = env("LABKIT_HUB_ACTIVITY_INTERVAL", str(min(60, max(5, CULL_TIMEOUT // 4))))
c.JupyterHub.last_activity_interval = int(ACTIVITY_INTERVAL)
# Servers starting at once: 10 per core (LABKIT_HUB_SPAWN_LIMIT; 0 = no limit). A server's start
# costs about 3 core-seconds here (docs/performance.md, "Hub load": 8 at once on 2 cores took 10-12 s
# each, 20 at once beside starting guests 46-53 s), inside start_timeout (120 s); with JupyterHub's
# default of 100 at once, the last would need about 150 s on 2 cores, past start_timeout. Beyond the limit a learner is told "Too many users trying to log
# in right now. Try again in N seconds" (N from 30 to 60, about one spawn round at the limit);
# the guests themselves are paced by labkit's host-wide start queue in the learner's kernel.
c.JupyterHub.concurrent_spawn_limit = int(env("LABKIT_HUB_SPAWN_LIMIT", str(10 * len(os.sched_getaffinity(0)))))

# TLS, where the installer (or the admin) gave a certificate: the hub's public port speaks HTTPS.
if env("LABKIT_HUB_SSL_CERT") and env("LABKIT_HUB_SSL_KEY"):
    c.JupyterHub.ssl_cert = env("LABKIT_HUB_SSL_CERT")
    c.JupyterHub.ssl_key = env("LABKIT_HUB_SSL_KEY")

# -- who may log in: local Unix users of one group, by their password (PAM) ------------
c.JupyterHub.authenticator_class = "pam"
c.LocalAuthenticator.allowed_groups = {env("LABKIT_HUB_GROUP", "labkit-learners")}
# The instructors: they get /hub/admin (every learner's server, start and stop) and log in like a
# learner. Comma-separated Unix user names.
c.Authenticator.admin_users = {u for u in env("LABKIT_HUB_ADMINS", "").split(",") if u}

# -- each learner's server ---------------------------------------------------------------
c.Spawner.mem_limit = env("LABKIT_HUB_MEM", "2G")
c.Spawner.cpu_limit = float(env("LABKIT_HUB_CPUS", "1.0"))
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
c.Spawner.http_timeout = 60
c.Spawner.start_timeout = 120
# The server's own PID becomes LABKIT_LIFETIME_PID (``exec`` keeps it), so a
# persistent VM started from a kernel *or* a terminal ends with the server
# even if the cgroup kill were bypassed.
c.Spawner.cmd = ["sh", "-c", 'LABKIT_LIFETIME_PID=$$; export LABKIT_LIFETIME_PID; exec "$0" "$@"',
                 str(BIN / "jupyterhub-singleuser")]
c.Spawner.environment = {
    "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
    "JUPYTERHUB_ACTIVITY_INTERVAL": ACTIVITY_INTERVAL,
}
# The course's notebooks, delivered into ~/notebooks at each spawn as the learner (never over a
# file they have: labkit.deploy.deliver), where LABKIT_HUB_NOTEBOOKS names the release.
NOTEBOOKS = env("LABKIT_HUB_NOTEBOOKS", "")


def _deliver_notebooks(spawner) -> None:
    import pwd
    import subprocess
    name = spawner.user.name
    home = pwd.getpwnam(name).pw_dir
    r = subprocess.run(["runuser", "-u", name, "--", sys.executable, "-m", "labkit.deploy.deliver", NOTEBOOKS,
                        os.path.join(home, "notebooks")], capture_output=True, text=True, timeout=120)
    (spawner.log.info if r.returncode == 0 else spawner.log.warning)(
        "notebooks for %s: %s", name, (r.stdout or r.stderr).strip()[-500:])


if NOTEBOOKS:
    c.Spawner.pre_spawn_hook = _deliver_notebooks

c.Spawner.env_keep = ["LANG", "LC_ALL", "LABKIT_IMAGES_DIR", "LABKIT_SHARED_CACHE_DIR", "LABKIT_ACCEL",
                      "LABKIT_AUTO_BUILD", "LABKIT_BOOT_TIMEOUT", "LABKIT_WARM_START",
                      # the host-wide guest start queue's settings, the same for every learner
                      "LABKIT_START_SLOTS", "LABKIT_START_QUEUE_TIMEOUT"]
# The start queue paces the learners' guest starts only if it is one directory for all of them: its
# default is under /tmp, which SystemdSpawner's isolate_tmp makes private to each learner. So the hub
# (root) makes a sticky, shared one outside /tmp and names it to every server.
start_queue = Path(env("LABKIT_START_QUEUE_DIR", "/run/labkit-start-queue"))
try:
    start_queue.mkdir(mode=0o1777, exist_ok=True)
    start_queue.chmod(0o1777)             # mkdir's mode went through the umask
    c.Spawner.environment["LABKIT_START_QUEUE_DIR"] = str(start_queue)
except OSError as exc:
    print(f"labkit: no shared start queue at {start_queue} ({exc}); each learner's guest starts unpaced",
          file=sys.stderr)


def _pid1_is_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()      # sd_booted()'s test


spawner = env("LABKIT_HUB_SPAWNER") or ("systemd" if _pid1_is_systemd() else "cgroup")
if spawner == "systemd":
    c.JupyterHub.spawner_class = "systemdspawner.SystemdSpawner"
    c.SystemdSpawner.unit_name_template = "labkit-{USERNAME}"
    # systemd expands "$$" in a unit's command line to "$": the shell must get "$$" (its own PID)
    c.Spawner.cmd = [c.Spawner.cmd[0], c.Spawner.cmd[1], c.Spawner.cmd[2].replace("$$", "$$$$"), *c.Spawner.cmd[3:]]
    c.SystemdSpawner.isolate_tmp = True
    c.SystemdSpawner.disable_user_sudo = True
    # mem_limit and cpu_limit become the unit's MemoryMax and CPUQuota; the process limit is a
    # unit property of its own (SystemdSpawner has no trait for it).
    # CollectMode: a server's unit that ended in failure is removed too, never left behind.
    c.SystemdSpawner.unit_extra_properties = {"TasksMax": str(int(env("LABKIT_HUB_PIDS", "1024"))),
                                              "CollectMode": "inactive-or-failed"}
elif spawner == "cgroup":
    c.JupyterHub.spawner_class = "labkit.deploy.spawner.CgroupSpawner"
    c.CgroupSpawner.pids_limit = int(env("LABKIT_HUB_PIDS", "1024"))
    c.CgroupSpawner.cgroup_parent = env("LABKIT_HUB_CGROUP_PARENT", "labkit-hub")
else:
    raise SystemExit(f"LABKIT_HUB_SPAWNER={spawner!r}: use 'cgroup' or 'systemd'")

# -- services: the idle culler, and an admin token for the instructor's scripts ----------------
# The culler looks every minute, or twice per timeout where the timeout is shorter. Its first look
# waits two activity intervals after the hub starts: while a hub restarts, no server can report
# its activity, and a culler looking at once culled a learner kept busy all along (a 48 s restart
# beside a 60 s timeout, in the server-guest test); by then every running server has reported.
CULLER_AFTER = 2 * int(ACTIVITY_INTERVAL)
START_CULLER = ("import runpy, sys, time; time.sleep(float(sys.argv[1])); "
                "sys.argv = ['jupyterhub_idle_culler', *sys.argv[2:]]; "
                "runpy.run_module('jupyterhub_idle_culler', run_name='__main__', alter_sys=True)")
c.JupyterHub.services = [{
    "name": "idle-culler",
    "command": [sys.executable, "-c", START_CULLER, str(CULLER_AFTER), f"--timeout={CULL_TIMEOUT}",
                f"--cull-every={int(env('LABKIT_HUB_CULL_EVERY', str(min(60, max(5, CULL_TIMEOUT // 2)))))}"],
}]
c.JupyterHub.load_roles = [{
    "name": "idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": ["idle-culler"],
}]
if env("LABKIT_HUB_ADMIN_TOKEN"):
    c.JupyterHub.services.append({"name": "labkit-admin", "api_token": env("LABKIT_HUB_ADMIN_TOKEN")})
    # What the instructor's scripts do: enrol learners, list them with their activity, start and
    # stop servers. No `tokens` scope: this token cannot mint a token that acts as a learner.
    c.JupyterHub.load_roles.append({"name": "labkit-admin", "scopes": ["admin:users", "servers", "read:hub"],
                                    "services": ["labkit-admin"]})
