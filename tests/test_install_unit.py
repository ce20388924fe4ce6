"""The class installer's pieces that need no server (labkit.deploy.install, .deliver) and the hub
config it installs, loaded the way JupyterHub loads it. The installer run for real, on a
systemd + cgroup-v2 server: tests/test_server_guest.py."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest
from traitlets.config import Config

from labkit.deploy import deliver, install

REPO = Path(__file__).resolve().parent.parent


def test_the_unit_runs_the_hub_from_the_venv_with_its_environment():
    plan = install.Plan()
    text = install.unit_text(plan)
    assert "ExecStart=/opt/labkit/venv/bin/jupyterhub -f /etc/labkit/jupyterhub_config.py" in text
    assert "EnvironmentFile=/etc/labkit/hub.env" in text and "WantedBy=multi-user.target" in text
    assert "Restart=on-failure" in text


def test_the_environment_keeps_the_instructors_token_across_runs(tmp_path):
    plan = install.plan_from(etc=tmp_path, admins=("prof", "ta"), port=8443)
    text = install.env_text(plan, "tok123")
    (tmp_path / "hub.env").write_text(text)
    env = install.read_env(tmp_path / "hub.env")
    assert env["LABKIT_HUB_ADMIN_TOKEN"] == "tok123" and env["LABKIT_HUB_ADMINS"] == "prof,ta"
    assert env["LABKIT_HUB_SPAWNER"] == "systemd" and env["LABKIT_HUB_PORT"] == "8443"
    assert env["LABKIT_HUB_SSL_CERT"] == str(tmp_path / "tls" / "hub.crt")
    assert "LABKIT_BOOT_TIMEOUT" not in env
    slow = install.read_env_text(install.env_text(install.plan_from(boot_timeout=900), "t"))
    assert slow["LABKIT_BOOT_TIMEOUT"] == "900"
    with pytest.raises(install.InstallError, match="environment file"):
        install.env_text(install.plan_from(group='bad"group'), "t")


def test_preflight_names_what_this_host_lacks(tmp_path):
    problems = install.preflight(install.plan_from(source=tmp_path, images_from=tmp_path / "nope"))
    text = "\n".join(problems)
    assert "not a labkit checkout" in text and "--images" in text
    if not Path("/run/systemd/system").is_dir():           # this CI host: PID 1 is not systemd
        assert "systemd is not PID 1" in text
        with pytest.raises(install.InstallError, match="cannot install here"):
            install.install(install.plan_from(source=tmp_path), say=lambda s: None)


def test_a_dry_run_lists_every_step_and_changes_nothing(tmp_path):
    lines: list[str] = []
    plan = install.plan_from(prefix=tmp_path / "opt", etc=tmp_path / "etc", units=tmp_path / "units",
                             images=tmp_path / "img", shared_cache=tmp_path / "cache", exchange=tmp_path / "x")
    install.install(plan, say=lines.append, dry_run=True)
    steps = [ln for ln in lines if not ln.startswith("note: ")]
    assert len(steps) == len(install.steps(plan, print)) and all(ln.split()[0] in ("ok", "todo") for ln in steps)
    assert any("service labkit-hub.service" in ln for ln in lines)
    # every kernel the course's notebooks start (06 and 09 start a second guest on 6.12 and 7.3)
    assert any("guest images 6.1, 6.12, 7.3, 5.10 in" in ln for ln in lines), lines
    assert sorted(os.listdir(tmp_path)) == []



def test_copied_images_are_hashed_while_copied_made_read_only_and_stamped(tmp_path):
    """The images step copies (never the source's ".verified"), hashing each file against the
    manifest in the same read, makes the copy read-only, then writes the stamp load_image reads,
    which learners cannot write: their starts find the image verified. A copy without the stamp
    (cut short) is not done; a kernel done already is not touched (a chmod would change the ctime
    the stamp keeps); a file that does not match its manifest stops the step and is not kept."""
    import hashlib
    import json

    from labkit.image.build import load_image
    src = tmp_path / "built" / "6.1"
    src.mkdir(parents=True)
    files = {"vmlinuz": b"kernel", "initrd.img": b"initrd", "root.ext4": b"root" * 1000}
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "manifest.json").write_text(json.dumps({"artifacts": {
        n: {"sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}))
    (src / ".verified").write_text("from elsewhere")
    plan = install.plan_from(prefix=tmp_path / "opt", images=tmp_path / "img", images_from=tmp_path / "built",
                             kernels=("6.1",))
    (step,) = [s for s in install.steps(plan, print) if s.name.startswith("guest images")]
    assert not step.done()
    step.do()
    assert step.done()
    copy = plan.images / "6.1"
    assert sorted(p.name for p in copy.iterdir()) == sorted([*files, "manifest.json", ".verified"])
    assert all((copy / n).stat().st_mode & 0o777 == 0o444 for n in [*files, ".verified"])
    assert copy.stat().st_mode & 0o777 == 0o755
    # what a learner's start does: the stamp matches, so nothing is hashed
    import labkit.image.build as build
    real = build.sha256_file
    build.sha256_file = None        # type: ignore[assignment]
    try:
        from labkit.settings import Settings
        load_image("6.1", settings=Settings.from_env({"LABKIT_IMAGES_DIR": str(plan.images)}))
    finally:
        build.sha256_file = real
    before = (copy / "root.ext4").stat().st_ctime_ns
    step.do()                                   # done: nothing copied, changed or hashed again
    assert (copy / "root.ext4").stat().st_ctime_ns == before
    (copy / ".verified").unlink()               # a copy cut short
    assert not step.done()
    (src / "root.ext4").write_bytes(b"changed")
    with pytest.raises(install.InstallError, match="not the one its manifest describes"):
        step.do()
    assert not step.done() and not (copy / ".root.ext4.part").exists()


def test_delivery_adds_new_notebooks_and_never_overwrites(tmp_path):
    src, home = tmp_path / "release", tmp_path / "home"
    src.mkdir()
    (src / "00-welcome.ipynb").write_text("release 1")
    (src / "01-pmem.ipynb").write_text("release 1")
    (src / ".labkit-release").write_text("x")
    home.mkdir()
    assert {p.name for p in deliver.deliver(src, home / "notebooks")} == {"00-welcome.ipynb", "01-pmem.ipynb"}
    (home / "notebooks" / "00-welcome.ipynb").write_text("my answers")
    (src / "00-welcome.ipynb").write_text("release 2")
    (src / "02-dax.ipynb").write_text("release 2")
    (home / "notebooks" / "01-pmem.ipynb").unlink()
    (home / "notebooks" / "01-pmem.ipynb").symlink_to("/etc/passwd")      # the learner's own link stays
    assert [p.name for p in deliver.deliver(src, home / "notebooks")] == ["02-dax.ipynb"]
    assert (home / "notebooks" / "00-welcome.ipynb").read_text() == "my answers"
    assert not (home / "notebooks" / ".labkit-release").exists()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (home / "n2").symlink_to(other)
    assert deliver.deliver(src, home / "n2") == [] and list(other.iterdir()) == []
    assert deliver.main([str(tmp_path / "missing"), str(home)]) == 2


def _load_hub_config(monkeypatch, **env: str) -> Config:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    c = Config()
    runpy.run_path(str(REPO / "deploy/hub/jupyterhub_config.py"), init_globals={"get_config": lambda: c})
    return c


def test_the_installed_hub_config_has_tls_tasksmax_admins_notebooks_and_keeps_servers(tmp_path, monkeypatch):
    c = _load_hub_config(monkeypatch, LABKIT_HUB_DIR=str(tmp_path / "hub"), LABKIT_HUB_SPAWNER="systemd",
                         LABKIT_HUB_SSL_CERT="/etc/labkit/tls/hub.crt", LABKIT_HUB_SSL_KEY="/etc/labkit/tls/hub.key",
                         LABKIT_HUB_PIDS="512", LABKIT_HUB_ADMINS="prof,ta", LABKIT_HUB_NOTEBOOKS="/opt/labkit/notebooks",
                         LABKIT_HUB_ADMIN_TOKEN="t")
    assert c.JupyterHub.spawner_class == "systemdspawner.SystemdSpawner"
    assert c.SystemdSpawner.unit_extra_properties == {"TasksMax": "512", "CollectMode": "inactive-or-failed"}
    # systemd turns "$$" into "$" in a unit's command: the shell must still get "$$" (its own PID)
    assert "LABKIT_LIFETIME_PID=$$$$;" in c.Spawner.cmd[2]
    assert "LABKIT_BOOT_TIMEOUT" in c.Spawner.env_keep
    assert c.JupyterHub.ssl_cert == "/etc/labkit/tls/hub.crt" and c.JupyterHub.ssl_key == "/etc/labkit/tls/hub.key"
    assert c.Authenticator.admin_users == {"prof", "ta"}
    assert c.JupyterHub.cleanup_servers is False
    assert callable(c.Spawner.pre_spawn_hook)
    admin = [r for r in c.JupyterHub.load_roles if r["name"] == "labkit-admin"][0]
    assert "tokens" not in admin["scopes"] and "admin:users" in admin["scopes"]


def test_without_those_settings_the_hub_config_has_none_of_them(tmp_path, monkeypatch):
    for k in ("LABKIT_HUB_SSL_CERT", "LABKIT_HUB_NOTEBOOKS", "LABKIT_HUB_ADMINS"):
        monkeypatch.delenv(k, raising=False)
    c = _load_hub_config(monkeypatch, LABKIT_HUB_DIR=str(tmp_path / "hub"), LABKIT_HUB_SPAWNER="cgroup")
    assert "ssl_cert" not in c.JupyterHub and "pre_spawn_hook" not in c.Spawner
    assert "LABKIT_LIFETIME_PID=$$;" in c.Spawner.cmd[2]      # a shell started directly
    assert c.JupyterHub.last_activity_interval == 60          # the default 30-minute cull timeout


def test_a_short_cull_timeout_gets_activity_reports_often_enough(tmp_path, monkeypatch):
    for k in ("LABKIT_HUB_ACTIVITY_INTERVAL", "LABKIT_HUB_CULL_EVERY"):
        monkeypatch.delenv(k, raising=False)
    c = _load_hub_config(monkeypatch, LABKIT_HUB_DIR=str(tmp_path / "hub"), LABKIT_HUB_SPAWNER="cgroup",
                         LABKIT_HUB_CULL_TIMEOUT="60")
    assert c.JupyterHub.last_activity_interval == 15
    assert c.Spawner.environment["JUPYTERHUB_ACTIVITY_INTERVAL"] == "15"
    culler = [svc for svc in c.JupyterHub.services if svc["name"] == "idle-culler"][0]
    assert "--timeout=60" in culler["command"] and "--cull-every=30" in culler["command"]
    assert c.Authenticator.admin_users == set()


def test_the_culler_looks_first_once_every_server_could_report_after_a_hub_restart(tmp_path, monkeypatch):
    """While the hub restarts no server can report activity; a culler looking at once culled a
    busy learner (server-guest test). Its first look waits two activity intervals, and the
    command really runs jupyterhub_idle_culler with the arguments after the delay."""
    import subprocess
    for k in ("LABKIT_HUB_ACTIVITY_INTERVAL", "LABKIT_HUB_CULL_EVERY"):
        monkeypatch.delenv(k, raising=False)
    c = _load_hub_config(monkeypatch, LABKIT_HUB_DIR=str(tmp_path / "hub"), LABKIT_HUB_SPAWNER="cgroup",
                         LABKIT_HUB_CULL_TIMEOUT="60")
    cmd = [svc for svc in c.JupyterHub.services if svc["name"] == "idle-culler"][0]["command"]
    assert cmd[1] == "-c" and cmd[3] == "30"           # 2 x 15 s reports
    default = _load_hub_config(monkeypatch, LABKIT_HUB_DIR=str(tmp_path / "hub2"), LABKIT_HUB_SPAWNER="cgroup",
                               LABKIT_HUB_CULL_TIMEOUT="1800")
    assert [svc for svc in default.JupyterHub.services][0]["command"][3] == "120"
    r = subprocess.run([*cmd[:3], "0", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--cull-every" in r.stdout and "--timeout" in r.stdout, r.stderr


def test_the_installer_runs_with_nothing_but_the_distributions_python(tmp_path):
    """`sudo python3 -m labkit.deploy.install` on a server with no labkit yet: Debian's python3,
    no venv, no PYTHONPATH, none of labkit's dependencies."""
    import subprocess
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["/usr/bin/python3", "-m", "labkit.deploy.install", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--boot-timeout" in r.stdout and "--wheels" in r.stdout and "--npm-cache" not in r.stdout
    r = subprocess.run(["/usr/bin/python3", "-m", "labkit.deploy.install", "--images", str(tmp_path / "none")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("labkit: error: cannot install here") and \
        "Traceback" not in r.stderr, r.stderr


def test_a_passwords_file_that_exists_is_refused_before_any_account(tmp_path):
    from labkit.deploy import accounts
    given = tmp_path / "passwords.csv"
    given.write_text("username,password\nada,secret\n")
    with pytest.raises(accounts.AccountError, match="may hold passwords already handed out"):
        accounts.check_password_file(given)
    with pytest.raises(accounts.AccountError, match="not a directory"):
        accounts.check_password_file(tmp_path / "no" / "such.csv")
    accounts.check_password_file(tmp_path / "new.csv")


def test_doctor_on_a_class_server_says_what_its_settings_mean(tmp_path):
    """A learner's doctor with the installer's settings (no builds, no warm starts) does not
    promise a build on first use or a snapshot that will never come."""
    from labkit.settings import Settings
    from labkit.tools.doctor import run_checks
    settings = Settings.from_env({"LABKIT_IMAGES_DIR": str(tmp_path / "img"), "LABKIT_CACHE_DIR": str(tmp_path / "c"),
                                  "LABKIT_STATE_DIR": str(tmp_path / "s"), "LABKIT_ACCEL": "tcg",
                                  "LABKIT_AUTO_BUILD": "0", "LABKIT_WARM_START": "0", "LABKIT_SHARED_CACHE_DIR": ""})
    checks = {c.name: c for c in run_checks(("6.1",), settings)}
    other = checks["image 6.12"]
    assert "built on first use" not in other.detail and "LABKIT_AUTO_BUILD=0" in other.detail, other
    assert "labkit class install --kernels 6.12" in other.fix, other
    assert "ask whoever runs this host" in checks["image 6.1"].fix
    assert checks["warm start"].detail == "off (LABKIT_WARM_START=0): every VM start boots cold"
    usual = {c.name: c for c in run_checks(("6.1",), settings.with_(auto_build=True, warm_start=True))}
    assert "built on first use" in usual["image 6.12"].detail
    assert usual["warm start"].detail.startswith("no snapshot yet")


def test_the_venv_counts_as_done_once_pip_finished_and_its_python_finds_every_package(tmp_path):
    """The installer's second run must not import JupyterLab and nbgrader to see that the venv is
    there (half a minute under emulation): the stamp pip's success leaves, and the venv's Python
    finding each package, decide."""
    plan = install.plan_from(prefix=tmp_path / "opt", source=tmp_path / "src")
    venv_done = next(s for s in install.steps(plan, say=lambda line: None) if s.name.startswith("venv ")).done
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for m in install.VENV_MODULES:
        (stubs / f"{m}.py").write_text("")
    (plan.venv / "bin").mkdir(parents=True)
    py = plan.venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={stubs} exec {sys.executable} -S \"$@\"\n")
    py.chmod(0o755)
    assert not venv_done()                                   # pip never finished: no stamp
    (plan.venv / install.VENV_STAMP).write_text(install.venv_stamp(plan))
    assert venv_done()
    (stubs / "nbgrader.py").unlink()                         # a package gone
    assert not venv_done()
    (stubs / "nbgrader.py").write_text("")
    other = install.plan_from(prefix=tmp_path / "opt", source=tmp_path / "elsewhere")
    (plan.venv / install.VENV_STAMP).write_text(install.venv_stamp(other))
    assert not venv_done()                                   # made from another labkit
