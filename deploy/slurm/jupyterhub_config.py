"""JupyterHub on a Slurm cluster: one learner's Jupyter server (and the lab VM it starts) is one
Slurm job, through batchspawner's SlurmSpawner.

    LABKIT_SLURM_VENV=/opt/labkit/venv jupyterhub -f deploy/slurm/jupyterhub_config.py

Each server is a job with its own memory, CPU and walltime request (``LABKIT_SLURM_MEM``,
``LABKIT_SLURM_CPUS``, ``LABKIT_SLURM_TIME``); the walltime is the hard upper bound on a session,
and stopping the server (or the idle culler, after ``LABKIT_HUB_CULL_TIMEOUT`` seconds idle)
cancels the job, which ends every process Slurm tracks for it. The hub reaches each server at
its node's ``NodeAddr`` (``labkit.deploy.slurm``), and a hub restart leaves the jobs running. Where the nodes have a working /dev/kvm, set ``LABKIT_SLURM_GRES=kvm:1`` (the
``kvm`` GRES of slurm.conf.example) so servers land there; otherwise the guest runs under TCG.

The hub runs as root and submits as the learner: with ``sudo -E -u {username}`` where sudo is
set up for that (batchspawner's default), else ``runuser`` (``LABKIT_SLURM_EXEC_PREFIX``). The
learner's venv (``LABKIT_SLURM_VENV``) must be readable on every node: Jupyter server,
batchspawner and labkit, made from the system python3 (not one under a 0700 home).
tests/test_slurm.py runs this file on a single-node cluster; all settings come from the
environment so the test and a real site use the same file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

c = get_config()  # type: ignore[name-defined]  # noqa: F821  (JupyterHub provides it)
env = os.environ.get

venv = Path(env("LABKIT_SLURM_VENV", "/opt/labkit/venv"))
state = Path(env("LABKIT_HUB_DIR", "/var/lib/labkit-hub"))

# -- the hub itself ---------------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://{env('LABKIT_HUB_IP', '127.0.0.1')}:{env('LABKIT_HUB_PORT', '8000')}"
# The single-user servers call the hub's API from the compute nodes: it must listen where they
# reach it (the login node's cluster address on a real site).
c.JupyterHub.hub_ip = env("LABKIT_HUB_API_IP", "127.0.0.1")
c.JupyterHub.hub_port = int(env("LABKIT_HUB_API_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('LABKIT_PROXY_API_PORT', '8001')}"
if env("LABKIT_PROXY_COMMAND"):
    c.ConfigurableHTTPProxy.command = [env("LABKIT_PROXY_COMMAND")]
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
# A hub restart must not end a class: the learners' jobs (servers and VMs) keep running and the
# restarted hub finds them again from its database (each spawner's job id).
c.JupyterHub.cleanup_servers = False
c.JupyterHub.last_activity_interval = int(env("LABKIT_HUB_ACTIVITY_INTERVAL", "60"))

# Local Unix accounts (PAM); on a real site, the cluster's accounts are the learners.
c.JupyterHub.authenticator_class = "pam"
learners = {u for u in env("LABKIT_HUB_LEARNERS", "").split(",") if u}
if learners:
    c.Authenticator.allowed_users = learners
else:
    c.Authenticator.allow_all = True      # every cluster account may log in
c.Authenticator.admin_users = {u for u in env("LABKIT_HUB_ADMINS", "").split(",") if u}

# -- services: the idle culler (stopping a server cancels its job), the instructor's token -------
c.JupyterHub.services = [{
    "name": "idle-culler",
    "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                f"--timeout={int(env('LABKIT_HUB_CULL_TIMEOUT', '1800'))}",
                f"--cull-every={int(env('LABKIT_HUB_CULL_EVERY', '60'))}"],
}]
c.JupyterHub.load_roles = [{
    "name": "idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": ["idle-culler"],
}]
if env("LABKIT_HUB_ADMIN_TOKEN"):
    # An instructor's service account (scripts that enrol, list, start and stop); no `tokens`
    # scope, so it cannot mint a token that acts as a learner.
    c.JupyterHub.services.append({"name": "labkit-admin", "api_token": env("LABKIT_HUB_ADMIN_TOKEN")})
    c.JupyterHub.load_roles.append({"name": "labkit-admin", "services": ["labkit-admin"],
                                    "scopes": ["admin:users", "servers", "read:hub"]})

# -- one learner = one Slurm job ----------------------------------------------------------------
# batchspawner's, reaching each server at its node's NodeAddr (labkit.deploy.slurm): never a fixed
# address, so servers on different nodes are each found where they run.
c.JupyterHub.spawner_class = "labkit.deploy.slurm.SlurmSpawner"
# The server listens on the node's addresses, for the hub to reach it from another machine; the
# hub's token authenticates every request to it.
c.Spawner.ip = "0.0.0.0"
c.SlurmSpawner.exec_prefix = env("LABKIT_SLURM_EXEC_PREFIX", "sudo -E -u {username}")
c.SlurmSpawner.req_memory = env("LABKIT_SLURM_MEM", "3G")       # server + kernel + QEMU (1 GiB guest)
c.SlurmSpawner.req_nprocs = env("LABKIT_SLURM_CPUS", "1")       # a TCG guest keeps one core busy
c.SlurmSpawner.req_runtime = env("LABKIT_SLURM_TIME", "04:00:00")
c.SlurmSpawner.req_partition = env("LABKIT_SLURM_PARTITION", "")
c.SlurmSpawner.req_gres = env("LABKIT_SLURM_GRES", "")          # "kvm:1" where nodes have /dev/kvm
c.SlurmSpawner.start_timeout = int(env("LABKIT_SLURM_START_TIMEOUT", "300"))  # queueing included
c.SlurmSpawner.http_timeout = 120
# The learner's own venv, whatever PATH the hub runs with.
c.SlurmSpawner.batchspawner_singleuser_cmd = str(venv / "bin" / "batchspawner-singleuser")
c.Spawner.cmd = [str(venv / "bin" / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
    # how often the server tells the hub it is in use (the culler's evidence besides the proxy's)
    "JUPYTERHUB_ACTIVITY_INTERVAL": env("LABKIT_HUB_ACTIVITY_INTERVAL", "60"),
    # The guest images are built once per cluster on shared storage and used read-only; each
    # learner's VM state (overlay, pmem files, SSH key) stays under their own home.
    # SLURM_CONF only where the cluster's configuration is not in the default place.
    **{k: v for k in ("LABKIT_IMAGES_DIR", "LABKIT_SHARED_CACHE_DIR", "LABKIT_AUTO_BUILD", "SLURM_CONF")
       if (v := env(k))},
}
