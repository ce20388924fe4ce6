"""``labkit bench --first-run``: what a new user waits for, measured.

A fresh clone of this project's repository in a scratch directory, then the
steps of ``make lab`` up to a working first notebook cell: the host packages
and the virtualenv (``make host-deps venv``, pip's cache off, as on a fresh
machine), the 6.1 guest image (``labkit image build``), and the first code
cell of notebook 00 executed headless by the clone's own Jupyter kernel (it
boots the guest cold and saves its warm-start snapshot). State, caches and
images all go to the scratch directory; nothing of this user's lab is used or
touched. The download is the growth of the host's received bytes on its
network interfaces over the whole measurement (other traffic of the host
during it is included, so it is an upper bound).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit.errors import ConfigError
from labkit.paths import PROJECT_DIR

FIRST_NOTEBOOK = "notebooks/00-welcome.ipynb"
STEP_TIMEOUT = 1800.0

RUN_FIRST_CELL = r"""
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
nb.cells = nb.cells[:first + 1]
NotebookClient(nb, timeout=900, kernel_name="python3").execute()
out = nb.cells[first].get("outputs", [])
errors = [o for o in out if o.get("output_type") == "error"]
if errors:
    sys.exit("the first cell failed: " + errors[0].get("ename", "") + ": " + errors[0].get("evalue", ""))
print("first cell ran")
"""


def received_bytes(net_dev: str = "/proc/net/dev") -> int:
    """Bytes received on every interface but loopback, since boot."""
    total = 0
    with open(net_dev) as fh:
        for line in fh.readlines()[2:]:
            name, _, data = line.partition(":")
            if name.strip() != "lo" and data.split():
                total += int(data.split()[0])
    return total


def _step(what: str, argv: list[str], cwd: Path, env: dict[str, str], say: Callable[[str], None]) -> float:
    say(f"first run: {what}")
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=STEP_TIMEOUT)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        raise ConfigError(f"first run: {what} failed (exit {p.returncode}):\n" + "\n".join(tail))
    return round(time.monotonic() - t0, 1)


def _du_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return round(total / 2**20, 1)


def measure(say: Callable[[str], None], source: Path = PROJECT_DIR, keep: bool = False) -> dict[str, Any]:
    """Clone ``source`` (committed state only), set it up and run the first
    cell; the figures as ``first_run_*`` keys."""
    if not (source / ".git").exists():
        raise ConfigError(f"--first-run clones the project's git repository, and {source} is not one; "
                          "run it from a git checkout of labkit")
    scratch = Path(tempfile.mkdtemp(prefix="labkit-first-run-"))
    clone = scratch / "labkit"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABKIT_", "VIRTUAL_ENV", "PYTHONPATH", "JUPYTER"))}
    env.update(LABKIT_STATE_DIR=str(scratch / "state"), LABKIT_CACHE_DIR=str(scratch / "cache"),
               LABKIT_SHARED_CACHE_DIR="", XDG_CACHE_HOME=str(scratch / "xdg-cache"),
               PIP_NO_CACHE_DIR="1")
    rx0, t0 = received_bytes(), time.monotonic()
    out: dict[str, Any] = {}
    try:
        out["first_run_clone_s"] = _step("git clone", ["git", "clone", "-q", str(source), str(clone)], scratch,
                                         env, say)
        out["first_run_setup_s"] = _step("host packages and the virtualenv (make host-deps venv)",
                                         ["make", "host-deps", "venv"], clone, env, say)
        out["first_run_image_s"] = _step("the 6.1 guest image (labkit image build)",
                                         [str(clone / ".venv/bin/labkit"), "image", "build", "--kernel", "6.1"],
                                         clone, env, say)
        out["first_run_cell_s"] = _step("the first cell of notebook 00 (cold boot, warm-start snapshot)",
                                        [str(clone / ".venv/bin/python"), "-c", RUN_FIRST_CELL,
                                         str(clone / FIRST_NOTEBOOK)], clone, env, say)
        out["first_run_s"] = round(time.monotonic() - t0, 1)
        out["first_run_download_mb"] = round((received_bytes() - rx0) / 2**20, 1)
        out["first_run_venv_mb"] = _du_mb(clone / ".venv")
        out["first_run_images_mb"] = _du_mb(clone / "images" / "build")
        return out
    finally:
        labkit = clone / ".venv/bin/labkit"
        if labkit.exists():         # the lab VM the first cell started
            subprocess.run([str(labkit), "vm", "stop"], cwd=clone, env=env, capture_output=True, timeout=120,
                           check=False)
        subprocess.run(["pkill", "-f", str(scratch)], check=False)     # anything of the clone still running
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
