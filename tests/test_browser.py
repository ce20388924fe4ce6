"""Notebook 0 in a real browser: JupyterLab started by ``labkit lab`` on a free
localhost port (token-protected, with its own VM), Debian's chromium driven by
Playwright (no browser download), all cells run, and the dashboard widgets
checked for live values read from the guest. A screenshot is kept in
tests/artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from labkit.timeout import Deadline
from labkit.machine.process import free_port
from labkit.machine.vm import VM

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "00-welcome.ipynb"
VM_NAME = "test-browser"


def start_lab(tmp_path: Path, port: int) -> tuple[subprocess.Popen, str, list[str]]:
    """``labkit lab --no-browser`` with private state, notebook and Jupyter dirs;
    returns the process, its token and the output read so far."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    # A copy: the browser's autosave must never write outputs into the committed notebook.
    shutil.copy(NOTEBOOK, nbdir / NOTEBOOK.name)
    jdir = tmp_path / "jupyter"
    # the VM's sockets live in its state dir: keep that path short (a unix socket path has at most
    # 107 bytes, and pytest-xdist's basetemp of a long-lived machine, pytest-100/popen-gw1/..., came close)
    state = Path(tempfile.mkdtemp(prefix="lk-browser-"))
    env = dict(os.environ, LABKIT_STATE_DIR=str(state), LABKIT_NOTEBOOKS_DIR=str(nbdir),
               JUPYTER_CONFIG_DIR=str(jdir / "config"), JUPYTER_RUNTIME_DIR=str(jdir / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(jdir / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(jdir / "workspaces"))
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "lab", "--no-browser", "--port", str(port),
                             "--name", VM_NAME], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out: list[str] = []
    deadline = Deadline(300)
    token = None
    while not deadline.expired and token is None:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        m = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", line)
        token = m.group(1) if m else None
    if token is None:
        stop_lab(proc, env)
        pytest.fail("labkit lab printed no JupyterLab URL:\n" + "".join(out)[-3000:])
    while not deadline.expired:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=10) as r:
                if r.status == 200:
                    break
        except urllib.error.URLError:
            if proc.poll() is not None:
                stop_lab(proc, env)
                pytest.fail("JupyterLab exited:\n" + "".join(out)[-3000:])
            time.sleep(0.5)
    return proc, token, [env]


def stop_lab(proc: subprocess.Popen, env: dict) -> None:
    """JupyterLab (its process group: the server and its kernels), then the VM."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    subprocess.run([sys.executable, "-m", "labkit", "vm", "stop", "--name", VM_NAME], env=env,
                   capture_output=True, timeout=120)


@pytest.mark.integration
@pytest.mark.fresh_guest("JupyterLab's notebook starts the lab VM itself")
def test_notebook0_dashboard_renders_live_values_in_chromium(tmp_path, artifacts):
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: `make test` installs Debian's chromium"
    t0 = time.monotonic()
    port = free_port()
    proc, token, (env,) = start_lab(tmp_path, port)
    try:
        # What the guest itself says, asked independently of the notebook.
        vm = VM.attach(VM_NAME, state_dir=Path(env["LABKIT_STATE_DIR"]) / "vms" / VM_NAME)
        try:
            release = vm.run("uname -r", check=True).stdout.strip()
            accel = vm.accel.accel.upper()
        finally:
            vm.close()

        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1000})
            try:
                page = ctx.new_page()
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
                # JupyterLab renders cells out of view lazily: read text_content(), not inner_text().
                # the kernel is up before Run All (the status bar names it and says Idle)
                page.wait_for_selector(".jp-StatusBar-TextItem:text-matches('Python 3.*\\| Idle')",
                                       timeout=120_000)
                news = page.locator(".jp-toast-button", has_text=re.compile(r"^No$"))
                if news.count():       # JupyterLab's "notify about news?" toast would cover the screenshot
                    news.first.click()

                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

                # The VM panel: running, the release read from the guest, the accelerator.
                page.wait_for_selector(".labkit-vm-state:text-is('running')", timeout=240_000)
                panel = page.locator(".labkit-vm-panel").first
                assert panel.locator(".labkit-vm-release").text_content() == release
                assert panel.locator(".labkit-vm-accel").text_content() == accel
                # The live kernel log has lines.
                page.wait_for_function(
                    "() => document.querySelectorAll('.labkit-log-pane .labkit-log-line').length > 20",
                    timeout=60_000)
                # All cells ran (the last code cell has an execution count) and none raised.
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=240_000)
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                    ".every(e => /\\[\\d+\\]/.test(e.textContent))", timeout=240_000)
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                texts = errors.all_text_contents()
                assert not [t for t in texts if "Traceback" in t or "Error" in t], texts
                # The boot progress bar finished with the guest's own values.
                summary = page.locator(".labkit-boot-summary").first.text_content()
                assert release in summary and accel in summary
                # The pin cell measured a live registration and printed it.
                outputs = page.locator(".jp-OutputArea-output").all_text_contents()
                assert any("registered 2048 KiB of anon memory" in o for o in outputs), outputs

                dash = page.locator(".labkit-dashboard").first
                dash.scroll_into_view_if_needed()
                page.wait_for_timeout(500)
                page.screenshot(path=str(artifacts / "browser-00-welcome.png"))
                dash.screenshot(path=str(artifacts / "browser-00-dashboard.png"))

                # The Pins tab: live counters from /proc/vmstat and the plot over time.
                dash.locator(".lm-TabBar-tabLabel", has_text=re.compile(r"^Pins$")).click()
                numbers = dash.locator(".labkit-pin-numbers")
                numbers.wait_for(state="visible")
                page.wait_for_function(
                    "() => { const t = document.querySelector('.labkit-pin-numbers');"
                    " return t && /nr_foll_pin_acquired\\s*\\d+/.test(t.textContent); }", timeout=30_000)
                assert dash.locator(".labkit-pin-panel polyline").count() >= 1
                dash.screenshot(path=str(artifacts / "browser-00-pins.png"))
            finally:
                ctx.close()
    finally:
        stop_lab(proc, env)
    wall = time.monotonic() - t0
    (artifacts / "browser.seconds").write_text(f"{wall:.1f}\n")
    assert VM(VM_NAME, persistent=True, state_dir=Path(env["LABKIT_STATE_DIR"]) / "vms" / VM_NAME).status() \
        .value == "stopped"
    shutil.rmtree(env["LABKIT_STATE_DIR"], ignore_errors=True)
