"""The counterfactual modules on a real 6.1 guest: without the v4.15 rule an
fs-dax MR registers and truncate waits for as long as it lives; without the
layout wait too, an RDMA WRITE through the stale MR changes another file; and
after unloading (and after a reset) the refusal is back. Measured figures go
to tests/artifacts/counterfactual-6.1.json."""

from __future__ import annotations

import dataclasses
import json

import pytest

from labkit.lab import Lab
from labkit.lab import counterfactual as cf
from labkit.machine.vm import VM

HOLD = 3.0
TOLERANCE = 0.3          # seconds: scheduling and the 50 ms sampling of the guest helper
KERNEL = "6.1"


@pytest.fixture(scope="module")
def lab():
    from conftest import require_image
    require_image(KERNEL)
    with VM("test-cf-6-1", kernel=KERNEL) as vm:
        lab = Lab(vm)
        cf.prepare(lab)
        yield lab


@pytest.fixture(scope="module")
def figures():
    from conftest import ARTIFACTS
    out: dict = {}
    yield out
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"counterfactual-{KERNEL}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")


def _keep(figures, key, result):
    figures[key] = dict(dataclasses.asdict(result), verdict=result.verdict())


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.fresh_guest("it loads modules that change the kernel's rules")
def test_real_kernel_refuses(lab, figures):
    r = cf.hold_and_truncate(lab, 0.5)
    _keep(figures, "real", r)
    assert not r.registered and r.errno == 95, r.verdict()
    assert r.truncate_completed and r.truncate_seconds < 1.0
    assert cf.loaded(lab) == []


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.fresh_guest("it loads modules that change the kernel's rules")
def test_mr_holds_truncate_for_its_lifetime(lab, figures):
    with cf.counterfactual(lab, "no-longterm-check") as c:
        r = cf.hold_and_truncate(lab, HOLD)
    _keep(figures, "no-longterm-check", r)
    figures["taint_after_module_1"] = c.taint
    assert r.registered, r.verdict()
    assert r.vmpin_kb_delta == 2048
    assert r.truncate_completed, r.verdict()
    assert r.truncate_seconds >= HOLD - TOLERANCE, r.verdict()
    assert -TOLERANCE <= r.after_deregistration <= 2.0, r.verdict()
    assert any(fn.endswith("break_dax_layouts") or fn.endswith("break_layouts") or "wait" in fn
               for fn in r.where), r.where
    assert c.taint & (1 << 12), cf.decode_taint(c.taint)          # O: out-of-tree module
    assert any("allowed a long-term pin" in ln for ln in r.kernel_log), r.kernel_log
    again = cf.hold_and_truncate(lab, 0.5)
    assert not again.registered and again.errno == 95, again.verdict()


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.fresh_guest("it loads modules that change the kernel's rules")
def test_stale_mr_write_changes_another_file(lab, figures):
    with cf.counterfactual(lab, "no-longterm-check", "no-layout-wait") as c:
        r = cf.stale_mr_write(lab)
    _keep(figures, "stale-write", r)
    figures["taint_after_modules_1_2"] = c.taint
    figures["switch_report"] = c.report()
    assert r.registered and r.truncate_seconds is not None and r.truncate_seconds < 1.0, r.verdict()
    assert r.reused, r.verdict()
    assert r.rdma_write.get("completed") and r.rdma_write.get("wc_ok"), r.verdict()
    assert r.corrupted and r.changed_bytes > 0, r.verdict()
    assert r.detail.get("written_bytes_found") == sum(x["length"] for x in r.reused), r.verdict()


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.fresh_guest("it loads modules that change the kernel's rules")
def test_refusal_back_after_unload_and_reset(lab, figures):
    r = cf.hold_and_truncate(lab, 0.5)
    assert not r.registered and r.errno == 95, r.verdict()
    assert cf.modified(lab), "the guest must stay marked modified until a reset"
    figures["taint_before_reset"] = cf.tainted(lab)
    lab.vm.reset()
    fresh = Lab(lab.vm)
    assert cf.modified(fresh) == []
    figures["taint_after_reset"] = cf.tainted(fresh)
    cf.prepare(fresh)
    r = cf.hold_and_truncate(fresh, 0.5)
    assert not r.registered and r.errno == 95, r.verdict()
