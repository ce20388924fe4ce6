"""The container image, for real: Debian's docker.io (installed where missing;
its dockerd started when none runs, and stopped again), `labkit image
container` from the guest images this run already built, the container run
unprivileged with a published port, Jupyter's API reached through it with a
token we pass, notebook 00 executed inside it headless, and the guest checked
from outside the notebook (the VM's record, its QEMU among the container's
processes). The learner's home is a named volume; what the VM left there is
still there in the next container. Container, volume and image are removed.

The figures (build time, image size, `docker run` to the first working cell)
go to tests/artifacts/container-figures.json (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests
from conftest import ARTIFACTS, require_image

from labkit.image import DEFAULT_KERNEL
from labkit.image.container import HOME, UID, find_runtime, image_config, import_argv, mmdebstrap_argv
from labkit.timeout import Deadline

# Run inside the container by `docker exec`: execute notebook 00 with nbclient (headless) and
# say when each code cell finished, so the time from `docker run` to the first working cell
# is measured on the cells themselves.
RUN_NOTEBOOK = """
import json, sys, time
import nbformat
from nbclient import NotebookClient
nb = nbformat.read("notebooks/00-welcome.ipynb", as_version=4)
done = []
client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "notebooks"}},
                        on_cell_executed=lambda cell, cell_index, execute_reply: done.append(
                            (cell_index, cell.cell_type, time.time())))
client.execute()
outputs = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
print(json.dumps({"done": done, "text": "".join(outputs)}))
"""


# -- offline: the image's configuration ------------------------------------------------

def test_the_image_runs_jupyter_as_the_learner_under_tini():
    changes = image_config()
    assert f"USER {UID}:100" in changes and UID != 0
    assert "EXPOSE 8888" in changes and f"WORKDIR {HOME}" in changes
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/labkit-home"]' in changes
    cmd = json.loads(next(c for c in changes if c.startswith("CMD "))[4:])
    assert cmd[:2] == ["jupyter", "lab"] and "--ServerApp.ip=0.0.0.0" in cmd and "--ServerApp.port=8888" in cmd
    assert "ENV LABKIT_IMAGES_DIR=/opt/labkit/images" in changes


def test_the_import_reads_the_tar_stream_and_the_build_writes_one():
    argv = import_argv("podman", "labkit:t", ["EXPOSE 8888", "USER 1000:100"])
    assert argv == ["podman", "import", "--change", "EXPOSE 8888", "--change", "USER 1000:100", "-", "labkit:t"]
    mm = mmdebstrap_argv("bookworm", ["qemu-system-x86", "tini"], ["/tmp/apt-00.sources"], "root")
    assert mm[-3:] == ["bookworm", "-", "/tmp/apt-00.sources"]
    assert "--format=tar" in mm and "--variant=apt" in mm and "--include=qemu-system-x86,tini" in mm
    assert any(a.startswith("--dpkgopt=path-exclude=/usr/share/doc") for a in mm)


def test_a_missing_runtime_is_named_with_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    from labkit.errors import HostSetupError
    with pytest.raises(HostSetupError) as exc:
        find_runtime()
    assert "docker.io" in exc.value.hint


# -- for real ------------------------------------------------------------------------------

def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def _daemon_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def _install_docker() -> None:
    """Debian's docker.io, where dockerd is missing (``make test`` installs it; this covers a
    bare pytest run)."""
    if shutil.which("dockerd"):
        return
    if os.geteuid() != 0:
        pytest.fail("dockerd is missing: sudo apt-get install docker.io")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker.io"],
                       capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        pytest.fail(f"apt-get install docker.io failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory) -> Iterator[None]:
    """A running Docker engine: the one already running, else a dockerd started here (root,
    no systemd) with its own pidfile and log, stopped at the end with its containerd."""
    _install_docker()
    if _daemon_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.fail("no Docker engine runs and this user cannot start one (dockerd needs root)")
    d = tmp_path_factory.mktemp("dockerd")
    with open(d / "dockerd.log", "wb") as log:
        proc = subprocess.Popen(["dockerd", "--pidfile", str(d / "dockerd.pid")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = Deadline(60)
        while not _daemon_up():     # dockerd says nothing else when its API is ready
            if proc.poll() is not None or deadline.expired:
                pytest.fail(f"dockerd did not come up (exit {proc.poll()}): "
                            f"{(d / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)       # dockerd stops the containerd it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert not left, f"processes of the dockerd this test started are still running: {left}"


def _wait_api(port: int, token: str, timeout: float) -> None:
    deadline = Deadline(timeout)
    while True:
        try:
            r = requests.get(f"http://127.0.0.1:{port}/api/status", params={"token": token}, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        if deadline.expired:
            pytest.fail(f"Jupyter's API on port {port} did not answer within {timeout} s")
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.fresh_guest("notebook 00 boots (restores) the learner's guest inside the container")
def test_the_container_runs_the_lab_unprivileged(dockerd, tmp_path, monkeypatch):
    require_image(DEFAULT_KERNEL)
    tag = f"labkit-test-{secrets.token_hex(4)}"
    name, volume, token = tag, f"{tag}-home", secrets.token_hex(16)
    figures: dict = {"kernel": DEFAULT_KERNEL}
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "labkit", "image", "container", "--kernel", DEFAULT_KERNEL, "--tag", tag,
                            "--runtime", "docker"], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-4000:]
        figures["build_seconds"] = round(time.monotonic() - t0, 1)
        figures["image_bytes"] = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)

        t_run = time.time()
        docker("run", "-d", "--name", name, "-p", "127.0.0.1::8888", "-e", f"JUPYTER_TOKEN={token}",
               "-v", f"{volume}:{HOME}", tag)
        port = int(docker("port", name, "8888/tcp").stdout.split(":")[-1])
        _wait_api(port, token, timeout=120)
        figures["run_to_api_seconds"] = round(time.time() - t_run, 1)

        cfg = json.loads(docker("inspect", name).stdout)[0]
        assert cfg["HostConfig"]["Privileged"] is False and not cfg["HostConfig"]["CapAdd"]
        assert not cfg["HostConfig"]["Devices"]
        assert docker("exec", name, "id", "-u").stdout.strip() == str(UID)

        r = docker("exec", name, "python", "-c", RUN_NOTEBOOK, timeout=900)
        result = json.loads(r.stdout.strip().splitlines()[-1])
        first_code = next(t for _i, kind, t in result["done"] if kind == "code")
        figures["run_to_first_cell_seconds"] = round(first_code - t_run, 1)
        figures["notebook_seconds"] = round(result["done"][-1][2] - first_code, 1)
        # No --device /dev/kvm: TCG, and the notebook says why in plain words.
        assert "accelerator    : TCG" in result["text"] and "no /dev/kvm" in result["text"], result["text"][-2000:]

        # The guest, seen from outside the notebook: its record and its QEMU, the learner's.
        rec = json.loads(docker("exec", name, "sh", "-c",
                                f"cat {HOME}/.local/state/labkit/vms/*/vm.json").stdout)
        assert rec["start_kind"] == "warm", rec          # the snapshot made at build time matched
        assert rec["kernel_release"].startswith(DEFAULT_KERNEL), rec
        figures["vm_boot_seconds"] = rec["boot_seconds"]
        qemu = docker("exec", name, "ps", "-o", "uid=,args=", "-C", "qemu-system-x86_64").stdout.strip()
        assert qemu and qemu.split()[0] == str(UID), qemu
        assert "-accel tcg" in qemu or "accel=tcg" in qemu, qemu

        # Learner work survives the container: the VM's files are on the volume.
        docker("rm", "-f", name, timeout=120)
        kept = docker("run", "--rm", "-v", f"{volume}:{HOME}", tag, "sh", "-c",
                      f"ls {HOME}/.local/state/labkit/vms/*/ && ls {HOME}/notebooks").stdout
        assert "vm.json" in kept and "00-welcome.ipynb" in kept, kept
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)
        docker("rmi", "-f", tag, check=False)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "container-figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    assert docker("images", "-q", tag).stdout.strip() == ""
