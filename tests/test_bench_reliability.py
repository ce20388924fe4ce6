"""`labkit bench --reliability` on real guests, with tiny counts: every trial
is counted once, in the file and in the summary (the rates themselves are
measured by the bench, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from labkit.tools.reliability_count import KINDS, OUTCOMES


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.fresh_guest("it counts cold boots and warm starts of its own, and loads a module")
def test_reliability_counts_every_trial(tmp_path):
    out = tmp_path / "rel.json"
    argv = [sys.executable, "-m", "labkit", "bench", "--reliability", "--kernel", "6.1", "--cold", "1", "--warm", "1",
            "--cycles", "2", "--out", str(out), "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=280, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["this_run"] == 4 and set(s["kernels"]) == {"6.1"}
    rows = s["kernels"]["6.1"]
    assert set(rows) == set(KINDS) and all(row["trials"] == 1 for row in rows.values())
    for row in rows.values():
        assert set(row["by_outcome"]) <= set(OUTCOMES) - {"ok"}
        assert sum(row["by_outcome"].values()) == row["failures"] >= row["recovered"]
        assert 0 <= row["unrecovered_rate"] <= row["failure_rate"] <= 1 and row["mean_s"] > 0
    trials = json.loads(out.read_text())["trials"]
    assert sorted(t["kind"] for t in trials) == sorted(KINDS)
    assert all(t["outcome"] in OUTCOMES and t["kernel"] == "6.1" and t["seconds"] > 0 for t in trials)
    # a second chunk adds to the same file; its report covers both
    r2 = subprocess.run(argv[:-1] + ["--cold", "0", "--warm", "0", "--cycles", "2"], capture_output=True, text=True,
                        timeout=200, env=dict(os.environ))
    assert r2.returncode == 0, r2.stderr
    assert "6.1     kprobe       2" in r2.stdout and "6.1     cold         1" in r2.stdout
    assert len(json.loads(out.read_text())["trials"]) == 6
