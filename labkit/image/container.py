"""The container image: JupyterLab, labkit, the notebooks, QEMU and the guest
images (with their warm-start snapshots) of the kernels asked for, in one OCI
image built from Debian packages with no registry, no base image and no
Dockerfile.

mmdebstrap makes the root filesystem from the host's own apt sources (as the
guest recipe does, ``sources.py``); the hook ``deploy/container/customize.sh``
adds the learner, a venv installed from wheels the host fetched from its own
configured pip index, the guest images already built on this host and a
warm-start snapshot made in the chroot by the container's own QEMU; the tar
stream goes straight into ``docker import`` / ``podman import`` with the
image's configuration as ``--change`` lines. The same image is the
Kubernetes single-user image (``deploy/k8s/values.yaml``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import HostSetupError, ImageBuildError
from labkit.image.build import STRIP, follow_output, load_image, read_packages
from labkit.image.kernels import KernelVariant, check_kernel
from labkit.image.sources import apt_sources, os_release
from labkit.settings import Settings

DEFAULT_TAG = "labkit"
USER, UID, GID = "jovyan", 1000, 100
HOME = f"/home/{USER}"
VENV = "/opt/labkit/venv"
IMAGES = "/opt/labkit/images"
PORT = 8888
SYSTEM_PYTHON = "/usr/bin/python3"     # Debian's: the container's python3 is the same package
# What pip puts in the venv besides labkit: the single-user server of JupyterHub (Kubernetes).
EXTRA_REQUIREMENTS = ("jupyterhub",)

Progress = Callable[[str], None]


def recipe_dir() -> Path:
    """The container's recipe: ``deploy/container/`` of the project."""
    return paths.PROJECT_DIR / "deploy" / "container"


def image_config(port: int = PORT) -> list[str]:
    """The image's configuration, as ``--change`` instructions for ``docker/podman import`` (pure)."""
    env = {
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": HOME,
        "LANG": "C.UTF-8",
        "LABKIT_IMAGES_DIR": IMAGES,
        "LABKIT_NOTEBOOKS_DIR": f"{HOME}/notebooks",
        # No mmdebstrap in the image: a kernel that is not in it is named, never built.
        "LABKIT_AUTO_BUILD": "0",
    }
    return [
        *(f"ENV {k}={v}" for k, v in env.items()),
        f"USER {UID}:{GID}",
        f"WORKDIR {HOME}",
        f"EXPOSE {port}",
        # tini reaps QEMU (and whatever else a learner starts) and passes signals on;
        # labkit-home copies the notebooks into a home that has none (a new volume).
        'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/labkit-home"]',
        "CMD " + json.dumps(["jupyter", "lab", "--ServerApp.ip=0.0.0.0", f"--ServerApp.port={port}",
                             "--no-browser", f"--ServerApp.root_dir={HOME}",
                             "--ServerApp.default_url=/lab/tree/notebooks/00-welcome.ipynb"]),
    ]


def import_argv(runtime: str, tag: str, changes: Sequence[str]) -> list[str]:
    """``docker import`` (or podman's) of a tar stream on stdin (pure)."""
    argv = [runtime, "import"]
    for c in changes:
        argv += ["--change", c]
    return argv + ["-", tag]


def mmdebstrap_argv(suite: str, packages: Sequence[str], mirrors: Sequence[str], mode: str) -> list[str]:
    """The root filesystem as a tar stream on stdout (pure). ``apt`` variant: no recommends."""
    argv = ["mmdebstrap", f"--mode={mode}", "--variant=apt", "--format=tar",
            "--include=" + ",".join(packages), "--aptopt=Acquire::Retries \"3\"",
            "--customize-hook=sh \"$LABKIT_CONTAINER_RECIPE/customize.sh\" \"$1\""]
    argv += [f"--dpkgopt=path-exclude={p}" for p in STRIP]
    argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    return argv + [suite, "-", *mirrors]


def wheel_argv(python: str, wheelhouse: Path, project: Path) -> list[str]:
    """Wheels for labkit and all it needs, from this machine's configured pip index (its
    cache reused); the chroot installs from them with ``--no-index``."""
    return [python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(wheelhouse),
            str(project), *EXTRA_REQUIREMENTS]


def find_runtime(wanted: str | None = None) -> str:
    """``docker`` (else ``podman``), or the one asked for; a HostSetupError if it is missing."""
    for name in ([wanted] if wanted else ["docker", "podman"]):
        if shutil.which(name):
            return name
    raise HostSetupError(f"no container runtime found ({wanted or 'docker or podman'})",
                         hint="install Debian's docker.io (and start dockerd) or podman: "
                              "sudo apt-get install docker.io")


@dataclass(frozen=True)
class ContainerImage:
    """The result of a build: its tag, the runtime that holds it, its size and the build time."""

    tag: str
    runtime: str
    bytes: int
    seconds: float
    kernels: tuple[str, ...]


def build_container(kernels: Sequence[str], settings: Settings, tag: str = DEFAULT_TAG,
                    runtime: str | None = None, progress: Progress | None = None) -> ContainerImage:
    """Build the image from the guest images already built here (never rebuilds them)."""
    say = progress or _stderr
    for k in kernels:
        check_kernel(k)
        load_image(k, settings=settings)       # ImageMissing names the build command
    for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("mountpoint", "util-linux")):
        if shutil.which(tool) is None:
            raise HostSetupError(f"{tool} is not installed", hint=f"sudo apt-get install {pkg}")
    rt = find_runtime(runtime)
    _check_daemon(rt)
    work = settings.cache_dir / "container"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)     # only what this build resolved goes in
    say(f"container: wheels for labkit and {', '.join(EXTRA_REQUIREMENTS)} (this machine's pip index)")
    _run(wheel_argv(_wheel_python(work), wheels, paths.PROJECT_DIR), "pip wheel")
    suite = os_release().get("VERSION_CODENAME") or "bookworm"
    mode = "root" if os.geteuid() == 0 else "unshare"
    mirrors = apt_sources(KernelVariant("container", suite, "-"), work, settings)
    argv = mmdebstrap_argv(suite, read_packages(recipe_dir() / "packages.txt"), mirrors, mode)
    env = dict(os.environ)      # mmdebstrap's own variables and proxies; the hook's on top
    env.update(LABKIT_CONTAINER_RECIPE=str(recipe_dir()), LABKIT_WHEELS=str(wheels),
               LABKIT_IMAGES=str(settings.images_dir), LABKIT_KERNELS=" ".join(kernels),
               LABKIT_PROJECT=str(paths.PROJECT_DIR))
    say(f"container: mmdebstrap ({mode} mode, {suite}) | {rt} import {tag}; log: {work}/build.log")
    _pipe(argv, import_argv(rt, tag, image_config()), env, work / "build.log", say, t0)
    size = _image_bytes(rt, tag)
    seconds = time.monotonic() - t0
    say(f"container: {tag} built in {seconds:.0f} s ({size / 2**20:.0f} MiB); "
        f"start it with: {rt} run --rm -p {PORT}:{PORT} {tag}")
    return ContainerImage(tag, rt, size, seconds, tuple(kernels))


def _wheel_python(work: Path) -> str:
    """A venv of Debian's own python3 (the Python the container runs: the same release), so
    that pip picks the wheels for its version (a newer pyenv Python would pick some that
    refuse 3.11.2). Kept between builds; pip's cache is reused as well."""
    python = work / "pyvenv" / "bin" / "python"
    if not python.exists():
        if not Path(SYSTEM_PYTHON).exists():
            raise HostSetupError(f"{SYSTEM_PYTHON} is missing", hint="sudo apt-get install python3-venv")
        _run([SYSTEM_PYTHON, "-m", "venv", str(work / "pyvenv")], "python3 -m venv",
             hint="install Debian's python3-venv (sudo apt-get install python3-venv)")
    return str(python)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_daemon(rt: str) -> None:
    r = subprocess.run([rt, "info"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise HostSetupError(f"`{rt} info` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}",
                             hint="start the daemon (`sudo systemctl start docker`, or `sudo dockerd &` "
                                  "where there is no systemd), or use --runtime podman")


PIP_HINT = ("check that `pip install` works on this machine (its pip configuration is what the "
            "container's venv is fetched with)")


def _run(argv: list[str], what: str, hint: str = PIP_HINT) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageBuildError(f"{what} failed with exit code {r.returncode}", log_tail=r.stderr[-3000:],
                              hint=hint)


def _pipe(mm_argv: list[str], imp_argv: list[str], env: dict[str, str], log_path: Path, say: Progress,
          t0: float) -> None:
    """mmdebstrap's tar stream straight into the import: the root filesystem never lands on disk."""
    with open(log_path, "w", buffering=1) as log:
        log.write("$ " + " ".join(mm_argv) + "\n$ " + " ".join(imp_argv) + "\n")
        mm = subprocess.Popen(mm_argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        imp = subprocess.Popen(imp_argv, stdin=mm.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert mm.stdout is not None and mm.stderr is not None
        mm.stdout.close()       # the import holds the read end; mmdebstrap sees EPIPE if it dies
        imp_out: list[bytes] = []
        reader = threading.Thread(target=lambda: imp_out.extend(imp.communicate()), daemon=True)
        reader.start()
        tail = follow_output((raw.decode(errors="replace") for raw in mm.stderr), log, say, t0)
        rc = mm.wait()
        reader.join()
        out = b"".join(imp_out).decode(errors="replace")
        log.write(out)
    if rc != 0:
        raise ImageBuildError(f"mmdebstrap failed with exit code {rc}", log_tail="\n".join(tail),
                              hint=f"see {log_path}")
    if imp.returncode != 0:
        raise ImageBuildError(f"{imp_argv[0]} import failed with exit code {imp.returncode}", log_tail=out,
                              hint=f"see {log_path}")


def _image_bytes(rt: str, tag: str) -> int:
    r = subprocess.run([rt, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True,
                       timeout=60)
    try:
        return int(r.stdout.strip())
    except ValueError:
        return 0
