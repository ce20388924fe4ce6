"""`labkit bench` measures real guests and prints the figures (values are
checked for consistency, never against speed targets: those are reported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_bench_json_has_the_figures():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--runs", "1", "--no-matrix", "--json"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    for key in ("cold_boot_s", "warm_start_s", "reset_s", "ssh_rtt_ms", "qemu_rss_mb", "accel"):
        assert key in b, key
    assert b["accel"] in ("tcg", "kvm")
    assert 0 < b["warm_start_s"] < b["cold_boot_s"]       # a restore is no boot
    assert 0 < b["ssh_rtt_ms"] < 5000 and 0 < b["qemu_rss_mb"] < 8192
    assert b["cold_warm_ratio"] == pytest.approx(b["cold_boot_s"] / b["warm_start_s"], rel=0.05)
    assert "matrix_s" not in b                          # --no-matrix


def test_bench_rejects_bad_runs():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--runs", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--runs 0" in r.stderr and "Traceback" not in r.stderr
