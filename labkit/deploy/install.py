"""``labkit class install``: a class server in one command, run once as root
on a systemd host (Debian 12/13, Ubuntu 24.04), and again at any time.

Each step first looks whether its result is already there and says so;
running the installer again changes only what is missing or different, and
never touches a learner's files. The steps, in order:

1. the host: root, systemd as PID 1, cgroup v2 (what SystemdSpawner's limits
   need), the distribution's packages (QEMU, configurable-http-proxy, openssl);
2. a venv of the distribution's Python at ``/opt/labkit/venv`` with labkit,
   JupyterHub, SystemdSpawner, the idle culler, JupyterLab and nbgrader (from
   ``--wheels DIR`` when given: no index is asked);
   configurable-http-proxy is the distribution's ``node-configurable-http-proxy``
   (Debian 12 and 13, Ubuntu 24.04 universe): no npm and no npm registry;
3. TLS: the certificate and key given, else a self-signed one;
4. ``/etc/labkit``: the hub's config and its environment file (the admins,
   the instructor's token, which is kept across runs, the limits);
5. the guest images of every kernel the course uses (``--images DIR`` copies
   images built elsewhere; otherwise they are built here) and a warm-start
   snapshot of each in the shared read-only cache ``/var/cache/labkit``;
6. the notebooks learners get on their first spawn, and the nbgrader exchange;
7. the hub as the systemd service ``labkit-hub``, enabled and started (a
   restart leaves every learner's server and VM running).

What each learner gets is in ``deploy/hub/jupyterhub_config.py``.

It needs nothing but the distribution's Python and this checkout: on a server
that has no labkit yet, ``sudo python3 -m labkit.deploy.install`` is the same
command as ``labkit class install`` (this module imports only the standard
library and labkit's stdlib-only modules; the venv it makes has the rest).
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import ImageMissing, LabError
from labkit.image.build import install_copy, seal  # like this module: the standard library only
from labkit.paths import PROJECT_DIR

Say = Callable[[str], None]

# The kernels the course's notebooks start guests of (00-05, 07: 6.1; 06: 6.12; 08, 09: 7.3; 10: 5.10).
COURSE_KERNELS = ("6.1", "6.12", "7.3", "5.10")
HUB_PACKAGES = ("jupyterhub>=5", "jupyterhub-systemdspawner>=1.0", "jupyterhub-idle-culler>=1.2",
                "jupyterlab>=4", "nbgrader>=0.9.6,<0.10")
VENV_STAMP = ".labkit-installed"     # written into the venv once pip has installed everything
VENV_MODULES = ("labkit", "jupyterhub", "systemdspawner", "jupyterhub_idle_culler", "jupyterlab", "nbgrader")
APT_PACKAGES = ("qemu-system-x86", "qemu-utils", "python3-venv", "openssl", "node-configurable-http-proxy",
                "mmdebstrap")
PROXY = Path("/usr/bin/configurable-http-proxy")      # node-configurable-http-proxy's
UNIT = "labkit-hub.service"


class InstallError(LabError):
    """A step of the installer could not be done."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Plan:
    """Where everything goes and what the class gets (``labkit class install --help``)."""

    prefix: Path = Path("/opt/labkit")
    etc: Path = Path("/etc/labkit")
    hub_state: Path = Path("/var/lib/labkit-hub")
    images: Path = Path("/var/lib/labkit/images")
    shared_cache: Path = Path("/var/cache/labkit")
    exchange: Path = Path("/srv/nbgrader/exchange")
    units: Path = Path("/etc/systemd/system")
    group: str = "labkit-learners"
    admins: tuple[str, ...] = ()
    ip: str = "0.0.0.0"
    port: int = 443
    kernels: tuple[str, ...] = COURSE_KERNELS
    images_from: Path | None = None
    wheels: Path | None = None
    source: Path = PROJECT_DIR
    cert: Path | None = None
    key: Path | None = None
    memory: str = "2G"
    cpus: float = 1.0
    tasks: int = 1024
    cull_timeout: int = 1800
    boot_timeout: int | None = None     # LABKIT_BOOT_TIMEOUT for every guest (None: labkit's default)
    accel: str | None = None            # LABKIT_ACCEL for every guest (None: KVM where it works, else TCG)
    warm_start: bool = True             # False: no snapshots; every guest boots cold (LABKIT_WARM_START=0)

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @property
    def proxy(self) -> Path:
        return PROXY

    @property
    def notebooks(self) -> Path:
        return self.prefix / "notebooks"

    @property
    def tls_cert(self) -> Path:
        return self.cert or self.etc / "tls" / "hub.crt"

    @property
    def tls_key(self) -> Path:
        return self.key or self.etc / "tls" / "hub.key"


# -- what is written (pure, unit-tested) -------------------------------------------------------

def unit_text(plan: Plan) -> str:
    """The hub's systemd unit. The learners' servers are transient units of
    their own (SystemdSpawner), so stopping or restarting this one ends
    neither a server nor a VM (the config keeps ``cleanup_servers`` off)."""
    return f"""\
# written by `labkit class install`; run it again rather than editing this file
[Unit]
Description=JupyterHub of the labkit class
After=network-online.target
Wants=network-online.target

[Service]
User=root
EnvironmentFile={plan.etc / "hub.env"}
WorkingDirectory={plan.hub_state}
ExecStart={plan.venv / "bin" / "jupyterhub"} -f {plan.etc / "jupyterhub_config.py"}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def env_text(plan: Plan, admin_token: str) -> str:
    """The hub's environment (read by deploy/hub/jupyterhub_config.py)."""
    values = {
        "LABKIT_HUB_IP": plan.ip, "LABKIT_HUB_PORT": str(plan.port), "LABKIT_HUB_DIR": str(plan.hub_state),
        "LABKIT_HUB_GROUP": plan.group, "LABKIT_HUB_ADMINS": ",".join(plan.admins),
        "LABKIT_HUB_ADMIN_TOKEN": admin_token, "LABKIT_HUB_PROXY": str(plan.proxy),
        "LABKIT_HUB_SPAWNER": "systemd", "LABKIT_HUB_MEM": plan.memory, "LABKIT_HUB_CPUS": str(plan.cpus),
        "LABKIT_HUB_PIDS": str(plan.tasks), "LABKIT_HUB_CULL_TIMEOUT": str(plan.cull_timeout),
        "LABKIT_HUB_SSL_CERT": str(plan.tls_cert), "LABKIT_HUB_SSL_KEY": str(plan.tls_key),
        "LABKIT_HUB_NOTEBOOKS": str(plan.notebooks),
        "LABKIT_IMAGES_DIR": str(plan.images), "LABKIT_SHARED_CACHE_DIR": str(plan.shared_cache),
        "LABKIT_AUTO_BUILD": "0",
    }
    if plan.boot_timeout:
        values["LABKIT_BOOT_TIMEOUT"] = str(plan.boot_timeout)
    if plan.accel:
        values["LABKIT_ACCEL"] = plan.accel
    if not plan.warm_start:
        values["LABKIT_WARM_START"] = "0"
    for k, v in values.items():
        if "\n" in v or '"' in v:
            raise InstallError(f"{k} would be {v!r}, which an environment file cannot hold",
                               hint="use names and paths without newlines or double quotes")
    return "# written by `labkit class install` (mode 0600: it holds the instructor's token)\n" + \
        "".join(f'{k}="{v}"\n' for k, v in values.items())


@dataclass(frozen=True)
class HubEnv:
    """What other commands need of an installed hub's environment file."""

    port: str = "8000"
    ssl_cert: str = ""
    admin_token: str = ""

    FIELDS = {"LABKIT_HUB_PORT": "port", "LABKIT_HUB_SSL_CERT": "ssl_cert", "LABKIT_HUB_ADMIN_TOKEN": "admin_token"}

    @classmethod
    def read(cls, path: Path) -> HubEnv:
        values = read_env(path)
        return cls(**{attr: values[key] for key, attr in cls.FIELDS.items() if values.get(key)})


def read_env(path: Path) -> dict[str, str]:
    """The values of an environment file written by :func:`env_text`."""
    try:
        return read_env_text(path.read_text())
    except OSError:
        return {}


def read_env_text(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


# -- running things ------------------------------------------------------------------------------

def run(argv: list[str], timeout: float = 1800, env: dict[str, str] | None = None,
        what: str = "") -> subprocess.CompletedProcess[str]:
    """A command, as an argument list (never a shell); its output becomes the error when it fails."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
    except FileNotFoundError:
        raise InstallError(f"{argv[0]} is not installed", hint="the packages step installs it; run it again") from None
    except subprocess.TimeoutExpired:
        raise InstallError(f"{what or argv[0]} took longer than {timeout:.0f} s") from None
    if r.returncode:
        tail = (r.stderr or r.stdout).strip()[-1500:]
        raise InstallError(f"{what or ' '.join(argv[:3])} failed (exit {r.returncode}): {tail}")
    return r


@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    do: Callable[[], None]


def steps(plan: Plan, say: Say) -> list[Step]:
    """Every step, in order (each checks itself first)."""
    labkit = [str(plan.venv / "bin" / "labkit")]
    root_env = {"LABKIT_IMAGES_DIR": str(plan.images), "LABKIT_SHARED_CACHE_DIR": str(plan.shared_cache),
                "LABKIT_AUTO_BUILD": "0", "LABKIT_LIFETIME_PID": "0"}
    if plan.boot_timeout:
        root_env["LABKIT_BOOT_TIMEOUT"] = str(plan.boot_timeout)
    if plan.accel:
        root_env["LABKIT_ACCEL"] = plan.accel       # the snapshot is made with the learners' accelerator

    def missing_packages() -> list[str]:
        out = []
        for p in APT_PACKAGES:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, timeout=30)
            if "install ok installed" not in r.stdout:
                out.append(p)
        return out

    def install_packages() -> None:
        missing = missing_packages()
        run(["apt-get", "update"], what="apt-get update")
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env={"DEBIAN_FRONTEND": "noninteractive"},
            what=f"apt-get install {' '.join(missing)}")

    def venv_ok() -> bool:
        # The stamp is written once pip has installed everything (a pip cut short leaves none), and
        # the venv's Python must still start and find each package: finding, not importing, which
        # took half a minute under emulation at every run of the installer.
        py = plan.venv / "bin" / "python"
        try:
            if (plan.venv / VENV_STAMP).read_text() != venv_stamp(plan):
                return False
        except OSError:
            return False
        r = subprocess.run([str(py), "-c", "import importlib.util as u, sys; "
                            f"sys.exit(any(u.find_spec(m) is None for m in {VENV_MODULES!r}))"],
                           capture_output=True, text=True, timeout=120)
        return r.returncode == 0

    def make_venv() -> None:
        if not (plan.venv / "bin" / "python").exists():
            run(["/usr/bin/python3", "-m", "venv", str(plan.venv)], what="the venv")
        pip = [str(plan.venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        if plan.wheels:
            pip += ["--no-index", "--find-links", str(plan.wheels), "labkit"]
        else:
            pip += [str(plan.source)]
        run(pip + list(HUB_PACKAGES), what="pip install of labkit and the hub", timeout=3600)
        _write(plan.venv / VENV_STAMP, venv_stamp(plan), 0o644)

    def tls_ok() -> bool:
        return plan.tls_cert.exists() and plan.tls_key.exists()

    def make_tls() -> None:
        if plan.cert or plan.key:
            raise InstallError(f"the certificate {plan.tls_cert} or key {plan.tls_key} is missing",
                               hint="give both --cert and --key, or neither for a self-signed certificate")
        plan.tls_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        host = socket.getfqdn()
        run(["openssl", "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", "825", "-subj", f"/CN={host}",
             "-addext", f"subjectAltName=DNS:{host},DNS:localhost,IP:127.0.0.1",
             "-keyout", str(plan.tls_key), "-out", str(plan.tls_cert)], what="the self-signed certificate")
        plan.tls_key.chmod(0o600)

    def wanted_config() -> tuple[str, str]:
        token = HubEnv.read(plan.etc / "hub.env").admin_token or secrets.token_hex(32)
        config = (plan.source / "deploy" / "hub" / "jupyterhub_config.py").read_text()
        return env_text(plan, token), config

    def config_ok() -> bool:
        env, config = wanted_config()
        try:
            return (plan.etc / "hub.env").read_text() == env and \
                (plan.etc / "jupyterhub_config.py").read_text() == config
        except OSError:
            return False

    def write_config() -> None:
        restart_hub.append("its config changed")
        env, config = wanted_config()
        plan.etc.mkdir(parents=True, exist_ok=True, mode=0o755)
        plan.hub_state.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(plan.etc / "hub.env", env, 0o600)
        _write(plan.etc / "jupyterhub_config.py", config, 0o644)

    def image_ready(k: str) -> bool:
        # ".verified" comes last, after the copy (or build) and the chmod: a copy cut short has none,
        # and learners (who cannot write it) find their image hashed already instead of hashing it
        # at every start
        d = plan.images / k
        return (d / "manifest.json").is_file() and (d / ".verified").is_file()

    def images_ok() -> bool:
        return all(image_ready(k) for k in plan.kernels)

    def get_images() -> None:
        plan.images.mkdir(parents=True, exist_ok=True, mode=0o755)
        for k in plan.kernels:
            if image_ready(k):
                continue
            t0 = time.monotonic()
            if plan.images_from:
                src = plan.images_from / k
                if not (src / "manifest.json").exists():
                    raise InstallError(f"{src} holds no built image of {k}",
                                       hint=f"build it there (labkit image build --kernel {k}) or leave out --images")
                try:
                    install_copy(k, src, plan.images / k)      # hashed while copied, read-only, stamped
                except ImageMissing as exc:
                    raise InstallError(f"the {k} image in {src} is not the one its manifest describes: {exc}",
                                       hint="build it again there (labkit image build --kernel "
                                            f"{k} --force) and copy it anew") from None
            else:
                run(labkit + ["image", "build", "--kernel", k], env={**root_env, "LABKIT_AUTO_BUILD": "1"},
                    what=f"the {k} image", timeout=3600)
                seal(k, plan.images / k)        # read-only, hashed after the chmod, stamped
            say(f"  image {k}: {time.monotonic() - t0:.0f} s")

    stamp = plan.shared_cache / "installed-snapshots.json"
    restart_hub: list[str] = []

    def snapshot_ident(k: str) -> dict[str, object]:
        # what a snapshot is only valid for (labkit.machine.snapshot.machine_key has the whole list):
        # the image's files and the QEMU that restores it
        manifest = json.loads((plan.images / k / "manifest.json").read_text())
        qemu = run(["qemu-system-x86_64", "--version"], what="qemu-system-x86_64 --version").stdout.splitlines()[0]
        return {"artifacts": {a: v.get("sha256") for a, v in sorted(manifest.get("artifacts", {}).items())},
                "qemu": qemu}

    def snapshots_ok() -> bool:
        if not plan.warm_start:
            return True         # --no-warm-start: every guest boots cold, no snapshot is wanted
        made = json.loads(stamp.read_text())
        return all(made.get(k, {}).get("ident") == snapshot_ident(k)
                   and (plan.shared_cache / "snapshots" / made[k]["snapshot"] / "meta.json").is_file()
                   for k in plan.kernels)

    def snapshots() -> None:
        snaps = plan.shared_cache / "snapshots"
        snaps.mkdir(parents=True, exist_ok=True, mode=0o755)
        for d in (plan.shared_cache, snaps):
            os.chown(d, 0, 0)
            d.chmod(0o755)
        try:
            made = json.loads(stamp.read_text())
        except (OSError, ValueError):
            made = {}
        scratch = Path(tempfile.mkdtemp(prefix="labkit-install-"))
        try:
            for k in plan.kernels:
                t0 = time.monotonic()
                name = "install-" + k.replace(".", "-")
                env = {**root_env, "LABKIT_STATE_DIR": str(scratch / "state"), "LABKIT_CACHE_DIR": str(scratch / "c")}
                started = run(labkit + ["vm", "start", "--name", name, "--kernel", k], env=env,
                              what=f"the {k} warm-up guest", timeout=3600)
                run(labkit + ["vm", "stop", "--name", name], env=env, what=f"stopping the {k} warm-up guest")
                # the one the warm-up made, or restored when it was there already: the newest of k's
                newest = max(snaps.glob(f"{k}-*/meta.json"), key=lambda p: p.stat().st_mtime, default=None)
                if newest is None:
                    said = (started.stdout + started.stderr).replace("\x1b[K", "").strip()[-1500:]
                    raise InstallError(f"the {k} warm-up guest left no snapshot in {snaps}: {said}",
                                       hint=f"see `{labkit[0]} doctor`; the learners' guests boot cold meanwhile; "
                                            "where KVM is unreliable (nested), --accel tcg")
                made[k] = {"ident": snapshot_ident(k), "snapshot": newest.parent.name,
                           "seconds": round(time.monotonic() - t0, 1)}
                _write(stamp, json.dumps(made, indent=1, sort_keys=True) + "\n", 0o644)
                say(f"  warm-start snapshot {k}: {newest.parent.name}, {time.monotonic() - t0:.0f} s")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def notebooks_ok() -> bool:
        return (plan.notebooks / ".labkit-release").exists() and plan.exchange.is_dir()

    def notebooks() -> None:
        # the released student notebooks of the checkout (no solutions: those stay in instructor/)
        plan.notebooks.mkdir(parents=True, exist_ok=True)
        for nb in sorted((plan.source / "notebooks").glob("[0-9][0-9]-*.ipynb")):
            shutil.copyfile(nb, plan.notebooks / nb.name)
        (plan.notebooks / ".labkit-release").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        for p in [plan.notebooks, *plan.notebooks.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        from labkit.deploy import accounts
        plan.exchange.parent.mkdir(parents=True, exist_ok=True, mode=0o755)     # /srv/nbgrader on a new server
        accounts.prepare_exchange(plan.exchange)

    def group_ok() -> bool:
        try:
            grp.getgrnam(plan.group)
            return True
        except KeyError:
            return False

    def add_group() -> None:
        run(["groupadd", "--", plan.group], what=f"groupadd {plan.group}")

    def service_ok() -> bool:
        if restart_hub:
            return False        # the running hub has read the old config
        try:
            same = (plan.units / UNIT).read_text() == unit_text(plan)
        except OSError:
            return False
        active = subprocess.run(["systemctl", "is-active", "--quiet", UNIT], timeout=30).returncode == 0
        return same and active

    def service() -> None:
        _write(plan.units / UNIT, unit_text(plan), 0o644)
        run(["systemctl", "daemon-reload"])
        run(["systemctl", "enable", UNIT])
        # restart, not start: a changed config is read; the learners' servers are units of their own
        run(["systemctl", "restart", UNIT], what="starting the hub")

    return [
        Step("packages: " + " ".join(APT_PACKAGES), lambda: not missing_packages(), install_packages),
        Step(f"venv {plan.venv}: labkit, JupyterHub, SystemdSpawner, the culler, JupyterLab, nbgrader",
             venv_ok, make_venv),
        Step(f"TLS {plan.tls_cert}", tls_ok, make_tls),
        Step(f"the learners' group {plan.group}", group_ok, add_group),
        Step(f"hub config {plan.etc}", config_ok, write_config),
        Step(f"guest images {', '.join(plan.kernels)} in {plan.images}", images_ok, get_images),
        Step(f"warm-start snapshots in {plan.shared_cache}", snapshots_ok, snapshots),
        Step(f"notebooks {plan.notebooks} and the nbgrader exchange {plan.exchange}", notebooks_ok, notebooks),
        Step(f"service {UNIT}", service_ok, service),
    ]


def venv_stamp(plan: Plan) -> str:
    """What the venv was made from: where labkit came from and the hub's packages."""
    return json.dumps({"labkit": str(plan.wheels or plan.source), "packages": list(HUB_PACKAGES)}) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    tmp.replace(path)


def preflight(plan: Plan) -> list[str]:
    """What stops the install on this host (empty: nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("run it as root (sudo labkit class install ...): it installs packages and a service")
    if not Path("/run/systemd/system").is_dir():
        problems.append("systemd is not PID 1 here: the installer sets up systemd services (on a host without "
                        "systemd, see docs/teaching-a-class.md, 'without systemd')")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        problems.append("this host does not mount cgroup v2: SystemdSpawner's MemoryMax/CPUQuota/TasksMax need it")
    if not plan.source.joinpath("deploy", "hub", "jupyterhub_config.py").exists():
        problems.append(f"{plan.source} is not a labkit checkout (no deploy/hub/jupyterhub_config.py): run the "
                        "installer from a clone, or give --source")
    if plan.images_from and not plan.images_from.is_dir():
        problems.append(f"--images {plan.images_from} is not a directory")
    if plan.wheels and not plan.wheels.is_dir():
        problems.append(f"--wheels {plan.wheels} is not a directory")
    return problems


def install(plan: Plan, say: Say = print, dry_run: bool = False) -> dict[str, float]:
    """Run every step that is not done yet; returns seconds per step (0: it was done)."""
    problems = preflight(plan)
    if problems and not dry_run:
        raise InstallError("cannot install here: " + "; ".join(problems), hint="see labkit class install --help")
    for problem in problems:
        say(f"note: {problem}")
    took: dict[str, float] = {}
    for step in steps(plan, say):
        try:
            done = step.done()
        except (OSError, subprocess.SubprocessError):
            done = False
        if done:
            say(f"ok    {step.name} (already there)")
            took[step.name] = 0.0
            continue
        if dry_run:
            say(f"todo  {step.name}")
            continue
        say(f"...   {step.name}")
        t0 = time.monotonic()
        step.do()
        took[step.name] = round(time.monotonic() - t0, 1)
        say(f"done  {step.name} ({took[step.name]:.0f} s)")
    return took


def plan_from(**kw: object) -> Plan:
    """A plan with only the given fields changed (the command line's options)."""
    return dataclasses.replace(Plan(), **{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


# -- the command line (``labkit class install`` and ``python3 -m labkit.deploy.install``) ------

DESCRIPTION = """\
Set up this host as the class's server, as root, on a systemd host (Debian 12
or 13, Ubuntu 24.04): packages, a venv with labkit and JupyterHub, the proxy,
TLS (a self-signed certificate unless --cert/--key), the learners' group, the
hub's config, every kernel image the course uses (copied from --images, else
built) and a warm-start snapshot of each in the shared read-only cache, the
notebooks learners get on every spawn, the nbgrader exchange, and the hub as
the systemd service labkit-hub. Each step looks first whether it is done;
running it again changes only what is missing. Then: labkit class enrol CLASS.csv.

On a server with no labkit yet, from a clone: sudo python3 -m labkit.deploy.install"""


def add_arguments(ins: argparse.ArgumentParser) -> None:
    ins.add_argument("--images", type=Path, default=None, metavar="DIR",
                     help="guest images built elsewhere (DIR/<kernel>/...), copied instead of built here")
    ins.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                     help="install labkit and the hub from these wheels only (no package index)")
    ins.add_argument("--source", type=Path, default=None, metavar="DIR",
                     help="the labkit checkout (hub config, notebooks; default: this one)")
    ins.add_argument("--admins", default=None, metavar="USER,...", help="who gets /hub/admin")
    ins.add_argument("--group", default=None, help=f"the learners' Unix group (default {Plan.group})")
    ins.add_argument("--port", type=int, default=None, help=f"the hub's HTTPS port (default {Plan.port})")
    ins.add_argument("--cert", type=Path, default=None, help="TLS certificate (default: a self-signed one)")
    ins.add_argument("--key", type=Path, default=None, help="TLS key, with --cert")
    ins.add_argument("--kernels", nargs="+", default=None, choices=COURSE_KERNELS,
                     help=f"the kernels to install (default: all the course uses, {' '.join(COURSE_KERNELS)})")
    ins.add_argument("--memory", default=None, help=f"memory per learner (default {Plan.memory})")
    ins.add_argument("--cpus", type=float, default=None, help=f"CPUs per learner (default {Plan.cpus})")
    ins.add_argument("--cull-timeout", type=int, default=None, metavar="SECONDS",
                     help=f"stop a learner's server idle this long (default {Plan.cull_timeout})")
    ins.add_argument("--boot-timeout", type=int, default=None, metavar="SECONDS",
                     help="how long a guest may take to start (default: labkit's, 120 s under TCG); raise it on "
                          "a host that emulates slowly, e.g. a server that is itself a VM without nested KVM")
    ins.add_argument("--accel", choices=("kvm", "tcg"), default=None,
                     help="the accelerator of every guest, the warm-up's included (default: KVM where it works, "
                          "else TCG); tcg where KVM is there but unreliable, e.g. nested in a VM")
    ins.add_argument("--no-warm-start", dest="warm_start", action="store_false", default=None,
                     help="make no warm-start snapshots: every guest boots cold (where QEMU cannot save one, "
                          "e.g. Debian 13's QEMU 10.0 under TCG, which crashes in the save)")
    ins.add_argument("--dry-run", action="store_true", help="say which steps would run, change nothing")


def run_from(args: argparse.Namespace) -> int:
    plan = plan_from(admins=tuple(a for a in (args.admins or "").split(",") if a) or None, port=args.port,
                     kernels=tuple(args.kernels) if args.kernels else None, images_from=args.images,
                     wheels=args.wheels, source=args.source, cert=args.cert, key=args.key, memory=args.memory,
                     cpus=args.cpus, group=args.group, cull_timeout=args.cull_timeout,
                     boot_timeout=args.boot_timeout, accel=args.accel, warm_start=args.warm_start)
    took = install(plan, say=lambda line: print(line, flush=True), dry_run=args.dry_run)
    if not args.dry_run:
        print(f"done in {sum(took.values()):.0f} s: https://<this host>:{plan.port}/ ; next: "
              f"{plan.venv}/bin/labkit class enrol CLASS.csv --group {plan.group} --passwords FILE", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m labkit.deploy.install", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from(args)
    except LabError as exc:
        print(f"labkit: error: {exc}", file=sys.stderr)          # LabError's text carries its hint
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted; run it again to finish (each step looks first whether it is done)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
