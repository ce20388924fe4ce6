"""The `labkit` command line, end to end, against real guests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from labkit import image
from labkit.cli import build_parser

LABKIT = [sys.executable, "-m", "labkit"]


def labkit(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(LABKIT + list(args), input=stdin, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = labkit("--help").stdout
    for word in ("doctor", "image", "vm", "run", "lab"):
        assert word in out


def test_unknown_kernel_is_refused_with_choices():
    r = labkit("run", "--kernel", "5.4", "--", "true")
    assert r.returncode == 2 and "6.1" in r.stderr and "6.12" in r.stderr


def test_bad_vm_name_is_a_clear_error():
    r = labkit("vm", "status", "--name", "../../etc")
    assert r.returncode == 2 and "invalid VM name" in r.stderr and "Traceback" not in r.stderr


def test_run_without_command():
    r = labkit("run")
    assert r.returncode == 2 and "no command given" in r.stderr


def test_parser_defaults():
    args = build_parser().parse_args(["vm", "start"])
    assert (args.name, args.kernel) == ("default", image.DEFAULT_KERNEL)


@pytest.mark.integration
def test_doctor_passes_and_names_the_accelerator():
    r = labkit("doctor", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accelerator" in r.stdout and ("TCG" in r.stdout or "KVM" in r.stdout)
    assert "The lab can run." in r.stdout


@pytest.mark.integration
@pytest.mark.parametrize("kernel", list(image.KERNELS))
@pytest.mark.fresh_guest("`labkit run` boots a throwaway guest")
def test_run_prints_the_kernel_release(kernel):
    r = labkit("run", "--kernel", kernel, "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == image.load_image(kernel).kernel_release


@pytest.mark.integration
@pytest.mark.fresh_guest("`labkit run` boots a throwaway guest")
def test_run_passes_exit_code_and_stdin(tmp_path):
    r = labkit("run", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr
    script = "import sys, platform\nprint('guest', platform.release())\nprint('err', file=sys.stderr)\n" \
             "sys.exit(3)\n"
    r = labkit("run", "--", "python3", "-", stdin=script)
    assert r.returncode == 3
    assert r.stdout.startswith("guest 6.1") and r.stderr.strip() == "err"


@pytest.mark.integration
@pytest.mark.fresh_guest("`labkit lab` starts the lab VM")
def test_lab_starts_jupyterlab_with_a_running_vm(tmp_path):
    """`labkit lab` (what `make lab` ends in): VM up, JupyterLab answering on localhost with a token."""
    import os
    import re
    import signal
    import time
    import urllib.request

    from labkit.machine.process import free_port

    port = free_port()
    env = dict(os.environ, LABKIT_STATE_DIR=str(tmp_path))
    proc = subprocess.Popen(LABKIT + ["lab", "--no-browser", "--port", str(port), "--name", "labtest"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""
    try:
        deadline = time.monotonic() + 240
        token = None
        while time.monotonic() < deadline and token is None:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
            m = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", line)
            token = m.group(1) if m else None
        assert token, out[-3000:]
        assert "VM running" in out
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=10) as r:
                    status = r.status
            except urllib.error.URLError as exc:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited ({exc}): {out[-3000:]}{proc.stdout.read()[-3000:]}")
                time.sleep(0.5)
        assert status == 200, out[-3000:]
        with pytest.raises(urllib.error.HTTPError):   # no token, no access
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        subprocess.run(LABKIT + ["vm", "stop", "--name", "labtest"], env=env, capture_output=True, timeout=120)


def test_matrix_json_of_one_kernel_prints_that_kernels_matrix(monkeypatch, capsys):
    """`labkit matrix --json --kernel K` prints the dictionary `one_matrix` measured on
    a fresh guest of K. The measurement itself is asserted kernel by kernel on live guests
    in tests/test_kernel_73.py (`--kernel all` runs the same `one_matrix` per kernel)."""
    import json

    from labkit import cli
    from labkit.commands import lab as lab_commands
    asked = []

    def one(args, settings, kernel, prefix, quiet=False):
        asked.append((kernel, args.name, prefix))
        return {"kernel": "6.12.0-test", "pins": [], "accel": "tcg"}
    monkeypatch.setattr(lab_commands, "one_matrix", one)
    assert cli.main(["matrix", "--json", "--kernel", "6.12", "--name", "nonexistent"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kernel": "6.12.0-test", "pins": [], "accel": "tcg"}
    assert asked == [("6.12", "nonexistent", "")]


def test_image_build_all_builds_at_once_and_reports_each_failure(monkeypatch, capsys):
    """`labkit image build --kernel all --jobs 3`: every kernel built, each progress line
    names its kernel, and one failed build leaves the others built and says which failed."""
    import threading
    from types import SimpleNamespace

    from labkit import cli
    from labkit.errors import LabError
    inside, most = [0], [0]
    lock = threading.Lock()
    both_in = threading.Barrier(2, timeout=10)

    def build(kernel, force=False, progress=None):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            if kernel in ("6.1", "6.12"):
                both_in.wait()          # the first two really overlap
            progress("downloading packages with apt...")
            if kernel == "6.12":
                raise LabError("mmdebstrap failed")
            return SimpleNamespace(kernel_release=f"{kernel}.0-test", directory=f"/x/{kernel}")
        finally:
            with lock:
                inside[0] -= 1
    monkeypatch.setattr(cli.image, "build_image", build)
    assert cli.main(["image", "build", "--kernel", "all", "--jobs", "2"]) == 2
    out, err = capsys.readouterr()
    assert most[0] == 2
    assert out.splitlines() == ["6.1: 6.1.0-test in /x/6.1", "7.3: 7.3.0-test in /x/7.3",
                                "5.10: 5.10.0-test in /x/5.10"]
    assert "[6.12] downloading packages with apt..." in err and "[7.3] downloading" in err
    assert "image 6.12: mmdebstrap failed" in err and "1 of 4 images failed (6.12)" in err
    assert "labkit image build --kernel 6.12" in err
