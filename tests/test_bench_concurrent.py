"""`labkit bench --concurrent`: learners' guests started at one instant. The
integration test runs one small round on real guests (two learners, the
host's start queue forced to one slot so that the second must wait, say its
place and then start); the rest checks the figures' arithmetic and the
failure kinds without guests. Speed is reported by the bench, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from labkit.errors import ChannelError, GuestPanic, GuestTimeout, LaunchError, StartQueueTimeout
from labkit.tools import bench_concurrent as conc


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.fresh_guest("it starts two learners' guests at once, as a class does, through the start queue")
def test_two_learners_at_once_one_waits_its_turn_and_both_run_the_first_cells(tmp_path):
    env = dict(os.environ, LABKIT_START_SLOTS="1", LABKIT_START_QUEUE_DIR=str(tmp_path / "queue"))
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--concurrent", "2", "--kernel", "6.1",
                        "--json"], capture_output=True, text=True, timeout=560, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    b = json.loads(r.stdout)
    (row,) = b["concurrent"]
    assert (row["n"], row["ok"], row["failed"], row["errors"]) == (2, 2, 0, []), row
    assert set(row["failures"]) == set(conc.KINDS) and not any(row["failures"].values())
    assert 0 < row["ready_p50_s"] <= row["ready_p95_s"] <= row["ready_max_s"]
    assert row["work_p50_s"] > 0 and row["p95_over_single"] is None        # no N=1 round here
    assert 0 <= row["cpu_mean_pct"] <= row["cpu_peak_pct"] <= 100 and row["load1_peak"] >= 0
    assert 0 < row["mem_used_peak_mb"] and 0 < row["mem_available_min_mb"]
    assert b["start_slots"] == 1 and b["accel"] in ("tcg", "kvm")
    # One slot: the second learner waited, was told its place, then started.
    assert row["queued"] == 1 and 0 < row["queue_wait_max_s"] < row["ready_max_s"]
    assert row["told"] == ["labkit: 2 guests starting on this host (1 at a time); yours is 2nd in line"]
    assert list((tmp_path / "queue").iterdir()) == []            # every turn was given up
    text = conc.format_report(b)
    assert "ready p50" in text and "\n    2 " in text


# -- the figures without guests ----------------------------------------------------------------

def test_percentiles_are_nearest_rank():
    assert conc.percentile([], 50) is None
    assert conc.percentile([3.0], 95) == 3.0
    xs = [8.0, 1.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]
    assert (conc.percentile(xs, 50), conc.percentile(xs, 95), conc.percentile(xs, 100)) == (4.0, 8.0, 8.0)


@pytest.mark.parametrize("exc, kind", [
    (StartQueueTimeout(600, 5, 12, 2), "queue timeout"),
    (GuestPanic("[ 1.2] Oops: int3: 0000 [#1] SMP\n"), "int3 oops"),
    (LaunchError("the guest died", output="Oops: int3"), "int3 oops"),
    (LaunchError("QEMU exited during start-up", exitcode=1), "QEMU exit"),
    (GuestTimeout("SSH on 127.0.0.1:2222 (timed out)", 120), "SSH timeout"),
    (ChannelError("the SSH connection to the guest is not open"), "SSH timeout"),
    (GuestTimeout("the restored guest to report its new SSH host key", 20), "SSH timeout"),
    (GuestTimeout("QEMU to create its console socket", 120), "other"),
    (RuntimeError("boom"), "other"),
])
def test_failures_are_classified(exc, kind):
    assert conc.classify(exc) == kind


def test_what_recovered_is_read_from_the_progress_lines():
    assert conc.recovered(["labkit: the guest kernel stopped on an int3 while patching its own code under TCG "
                           "emulation (a known emulation race, not a kernel bug); booting again",
                           "labkit: warm start failed (x); booting cold"]) == \
        ["int3 oops, booted again", "warm start fell back to a cold boot"]
    assert conc.recovered(["labkit: ready 6.1.0 (warm start in 2.0 s)"]) == []


def test_a_row_counts_failures_by_kind_and_the_ratio_is_over_the_single_start():
    host = {"cpu_mean_pct": 50.0, "cpu_peak_pct": 100.0, "load1_peak": 2.0, "mem_used_peak_mb": 3000,
            "mem_available_min_mb": 20000}
    ok = [{"ok": True, "ready_s": s, "work_s": 5.0, "queue_s": q, "queue_place": q > 0, "recovered": []}
          for s, q in ((2.0, 0.0), (4.0, 1.5), (6.0, 3.0))]
    bad = {"ok": False, "kind": "SSH timeout", "error": "start: timed out", "recovered": ["int3 oops, booted again"]}
    row = conc.summarize(4, [*ok, bad], host)
    assert (row["ok"], row["failed"], row["failures"]["SSH timeout"], row["queued"]) == (3, 1, 1, 2)
    assert (row["ready_p50_s"], row["ready_p95_s"], row["ready_max_s"], row["queue_wait_max_s"]) == \
        (4.0, 6.0, 6.0, 3.0)
    assert row["recovered"] == {"int3 oops, booted again": 1} and row["errors"] == ["start: timed out"]
    single = conc.summarize(1, ok[:1], host)
    rows = conc.with_ratios([single, row])
    assert [r["p95_over_single"] for r in rows] == [1.0, 3.0]
    text = conc.format_report({"kernel": "6.1", "accel": "tcg", "start_slots": 2, "date": "now",
                               "machine": {"cpu": "x", "cores": 2, "qemu": "QEMU 7.2"}, "concurrent": rows})
    assert "N=4: failed: SSH timeout 1; recovered: int3 oops, booted again 1" in text
