"""Everyone starts at once, through a real hub (issue 26): the hub load test
of deploy/hub/loadtest/ with two learners. Two local Unix learners log in with
their password, spawn their servers (labkit's CgroupSpawner), open a kernel and
run notebook 01's first cells -- ``labkit.connect()`` and the namespaces -- at
the same time, driven by locust; no learner fails, the hub and the proxy log no
error, and the figures have their shape (the times themselves are measured for
docs/performance.md, never asserted). Needs root (useradd, cgroups) like CI;
the venv and the proxy are the run's ``class_tools``, shared with test_hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import psutil
import pytest
from conftest import require_image

from labkit.image import DEFAULT_KERNEL

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("every learner's server boots its own VM")]

RUNNER = Path(__file__).resolve().parent.parent / "deploy/hub/loadtest/run.py"


def _runner():
    spec = importlib.util.spec_from_file_location("hub_loadtest_run", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_learners_start_at_once_through_the_hub(class_tools, artifacts):
    if os.geteuid() != 0:
        pytest.fail("the hub load test creates Unix users and cgroups and needs root (CI runs as root)")
    require_image(DEFAULT_KERNEL)
    run = _runner()
    fig = run.run_load(2, class_tools, DEFAULT_KERNEL, timeout=300, keep_log=artifacts / "hub-load-2")
    (artifacts / "hub-load-figures.json").write_text(json.dumps(fig, indent=1) + "\n")

    assert fig["failures"] == 0 and fig["failure_kinds"] == {}, \
        [r.get("failure") for r in fig["learners"]]
    assert fig["spawn_failures"] == 0
    assert fig["hub"]["http_5xx"] == 0 and fig["hub"]["proxy_errors"] == 0, fig["hub"]["examples"]
    learners = fig["learners"]
    assert len({r["learner"] for r in learners}) == 2
    for r in learners:
        assert set(r["phases"]) == set(run.PHASES), r
        assert all(s > 0 for s in r["phases"].values()), r
        assert r["ready_s"] >= max(r["phases"].values()), r
        res = r["result"]
        assert res["kind"] == "warm", res           # from the instructor's host-wide snapshot
        assert res["release"].startswith(DEFAULT_KERNEL), res
        assert res["namespaces"] >= 1 and res["connect_s"] > 0, res
        assert r["progress"], r                     # the learner saw the spawn's progress
    for figures in [fig["ready_s"], fig["connect_s"], *fig["phases_s"].values()]:
        assert 0 < figures["p50"] <= figures["p95"] <= figures["max"], figures
    assert fig["start_kinds"] == ["warm"]
    host = fig["host"]
    assert host["cpus"] == psutil.cpu_count() and 0 <= host["cpu_before_pct"] <= 100, host
    assert 0 < host["cpu_mean_pct"] <= host["cpu_peak_pct"] <= 100, host
    assert host["mem_peak_gib"] >= host["mem_before_gib"], host
    assert "| 2 |" in run.table([artifacts / "hub-load-figures.json"])
