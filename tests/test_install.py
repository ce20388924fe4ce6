"""``pip install .`` into a fresh virtualenv, not editable (issue 22's done
criterion): the installed labkit finds every guest-side file through the
package (the pin probes' zipapp, ``counterfactual.py``, the kernel module
sources with their Kbuild and Makefile), ``labkit doctor`` passes, a throwaway
guest boots and runs the helper, and the counterfactual switch loads and
unloads its module in that guest.

How it stays quick and honest: the virtualenv is new (``python -m venv``,
without the system's site-packages) and labkit is installed into it with
pip's ordinary build (build isolation, from a copy of the tree, ``--no-deps``);
its dependencies are the suite's own, reached through one ``.pth`` line (so
nothing is downloaded but the build backend), and that directory's editable
hook for the checkout is *not* processed (only site directories run their
``.pth`` files). The copy's ``labkit/`` is deleted after the install, so
nothing can be read from it; the image recipe (``images/``, not package data)
is the copy's, named by ``LABKIT_RECIPE_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from labkit import image, paths
from labkit.settings import from_environment

pytestmark = pytest.mark.integration

KERNEL = image.DEFAULT_KERNEL

# Runs with the installed labkit: checks what the package holds, then boots a throwaway guest.
CHECK = textwrap.dedent('''
    import io, json, sys, time, zipfile
    from pathlib import Path
    import labkit
    from labkit.image import build
    from labkit.lab.guest import bundle, files
    from labkit.lab import Lab
    from labkit.lab import counterfactual as cf
    from labkit.machine.vm import VM
    out = {"labkit": labkit.__file__}
    out["modules"] = sorted(files.module_sources())
    from labkit.settings import from_environment
    staged = build.stage_recipe(Path(sys.argv[2]), from_environment())
    out["staged_modules"] = {n: (staged / "modules" / n).read_bytes() == d for n, d in files.module_sources().items()}
    out["recipe_hash"] = build.recipe_hash(sys.argv[1])
    out["zipapp"] = sorted(zipfile.ZipFile(io.BytesIO(bundle.build())).namelist())
    out["excerpt"] = cf.module_excerpt("no-longterm-check")
    out["script"] = len(files.counterfactual_script())
    t0 = time.monotonic()
    with VM("install-check", kernel=sys.argv[1], boot_timeout=240) as vm:   # a busy 2-core host
        out["boot_s"] = round(time.monotonic() - t0, 1)
        lab = Lab(vm)
        out["status"] = lab.helper.call(["status"], "helper status")
        cf.ensure_script(lab)
        r = vm.run(["python3", cf.SCRIPT_PATH, "--help"])
        out["cf_help"] = [r.rc, r.stdout]
        with cf.counterfactual(lab, "no-longterm-check") as switched:
            out["loaded"] = cf.loaded(lab)
        out["unloaded"] = cf.loaded(lab)
        out["switches"] = [[s.action, s.ok] for s in switched.switches]
    print(json.dumps(out))
''')


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path, dict[str, float]]:
    """A fresh virtualenv with labkit installed from a copy of the tree; its python, environment, the copy."""
    root = tmp_path_factory.mktemp("install")
    src, venv = root / "src", root / "venv"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(paths.PROJECT_DIR / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build")
    for name in ("labkit", "images"):
        shutil.copytree(paths.PROJECT_DIR / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    times: dict[str, float] = {}
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], env, root, 300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=env).stdout.strip())
    (site / "labkit-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    times["venv"] = time.monotonic() - t0
    t0 = time.monotonic()
    _run([str(py), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", str(src)], env, root, 600)
    times["pip install"] = time.monotonic() - t0
    shutil.rmtree(src / "labkit")       # the installed copy is all there is now
    env.update(LABKIT_RECIPE_DIR=str(src / "images"), LABKIT_IMAGES_DIR=str(from_environment().images_dir),
               LABKIT_AUTO_BUILD="0")
    return py, env, root, times


def test_the_installed_package_holds_its_own_guest_side_files(installed):
    py, env, root, _ = installed
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=env).stdout.strip())
    pkg = site / "labkit" / "lab" / "guest"
    for name in ("counterfactual.py", "vocab.py", "files.py", "pinprobe/cli.py", "pinprobe/registry.py",
                 "modules/Kbuild", "modules/Makefile", "modules/labkit_no_longterm_check.c",
                 "modules/labkit_no_layout_wait.c"):
        assert (pkg / name).is_file(), f"pip install . did not install labkit/lab/guest/{name}"
    assert not (root / "src" / "images" / "modules").exists()     # nothing left outside the package to find


@pytest.mark.timeout(900)
@pytest.mark.fresh_guest("it checks that a labkit installed by pip boots a throwaway guest of its own")
def test_an_installed_labkit_runs_doctor_a_throwaway_guest_and_the_counterfactual(installed, tmp_path):
    py, env, root, times = installed
    # the fixture's environment was copied during the first test: the guest started here names this one
    env = dict(env, PYTEST_CURRENT_TEST=os.environ.get("PYTEST_CURRENT_TEST", ""))
    t0 = time.monotonic()
    doctor = _run([str(py.parent / "labkit"), "doctor"], env, tmp_path, 300)
    times["doctor"] = time.monotonic() - t0
    assert f"image {KERNEL}" in doctor.stdout and "The lab can run." in doctor.stdout, doctor.stdout
    t0 = time.monotonic()
    r = _run([str(py), "-c", CHECK, KERNEL, str(tmp_path / "stage")], env, tmp_path, 600)
    times["guest checks"] = time.monotonic() - t0
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print("install test, seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
          + f" (guest boot {out['boot_s']})")

    assert out["labkit"].startswith(str(py.parent.parent)), out["labkit"]       # the installed copy, not the tree
    assert out["modules"] == ["Kbuild", "Makefile", "labkit_no_layout_wait.c", "labkit_no_longterm_check.c"]
    assert all(out["staged_modules"].values()) and len(out["staged_modules"]) == 4
    built = image.load_image(KERNEL, verify=False).manifest["recipe_hash"]
    assert out["recipe_hash"] == built          # the installed labkit would build this very image
    assert "__main__.py" in out["zipapp"] and "labkit/lab/guest/pinprobe/registry.py" in out["zipapp"]
    assert "_return(" in out["excerpt"] and out["script"] > 1000
    assert out["status"]["alive"] is True and "nr_foll_pin_acquired" in out["status"]
    assert out["cf_help"][0] == 0 and "hold-truncate" in out["cf_help"][1]
    assert out["loaded"] == ["no-longterm-check"] and out["unloaded"] == []
    assert out["switches"] == [["load", True], ["unload", True]]
