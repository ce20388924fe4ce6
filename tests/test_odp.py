"""Integration: on-demand paging on every kernel the lab runs, against the
live guest. Where rxe has ODP (7.3): registration of every memory kind pins
nothing, truncate under a live ODP MR does not wait, the driver's
invalidation callback runs, and the device's next RDMA WRITE into the
truncated range completes with an error; a pinned MR on anonymous memory
keeps its pages instead. Where it has not (6.1, 6.12): the ODP refusal is
told apart from the fs-dax refusal (device caps 0, no check_vma_flags trace)."""

from __future__ import annotations

import pytest

from labkit.lab import Lab
from labkit.lab.guest.vocab import MEMORY_KINDS
from labkit.lab.results import traced_function
from labkit.lab.tracing import refusing_functions

pytestmark = pytest.mark.integration

IBV_WC_SUCCESS, IBV_WC_REM_ACCESS_ERR = 0, 10


@pytest.fixture(scope="module")
def lab(guest):
    lab = Lab(guest)
    lab.prepare_mounts()
    lab.setup_rdma()
    return lab


def _has_odp(guest) -> bool:
    return guest.kernel == "7.3"


def test_odp_registration_on_every_memory_kind(guest, lab):
    pins = lab.pin_many([("rdma-odp", k, "shared") for k in MEMORY_KINDS] + [("rdma", "fsdax-xfs", "shared")])
    odp, plain = pins[:-1], pins[-1]
    # the fs-dax rule refuses the pinned registration on every kernel, in check_vma_flags
    # (in __gup_longterm_locked before v5.11)
    assert (plain.ok, plain.errno) == (False, 95) and plain.trace
    refuser = traced_function(plain.trace[0])
    assert refuser in refusing_functions(guest.describe()["kernel_release"]) and refuser in plain.why
    for p in odp:
        assert not p.trace, p.summary()                     # never the fs-dax rule
        if _has_odp(guest):
            assert p.ok and p.vmpin_kb_delta == 0 and p.device_odp == 1, p.summary()
        else:
            assert not p.ok and p.device_odp == 0, p.summary()
            assert p.errno == {"6.1": 22, "6.12": 95, "5.10": 22}[guest.kernel], p.summary()
            assert "no on-demand paging" in p.why
    if guest.kernel == "6.12":      # the same errno as the fs-dax refusal, told apart by the evidence
        fsdax_odp = odp[MEMORY_KINDS.index("fsdax-xfs")]
        assert fsdax_odp.errno == plain.errno and fsdax_odp.why != plain.why


def test_truncate_under_an_odp_mr(guest, lab):
    r = lab.odp_revoke("fsdax-xfs", kind="odp")
    if not _has_odp(guest):
        assert not r.registered and r.device_odp == 0 and r.invalidations is None, r.summary()
        return
    assert r.registered and r.vmpin_kb_delta == 0 and r.before and r.before.status == IBV_WC_SUCCESS, r.summary()
    assert r.action == "truncate" and not r.action_waited and r.action_seconds is not None
    assert r.action_seconds < 1.0, r.summary()               # no wait for the device
    assert r.invalidations and r.invalidations > 0, r.summary()
    assert r.after is not None and r.after.status == IBV_WC_REM_ACCESS_ERR, r.summary()


def test_pinned_mr_keeps_the_pages_odp_follows_the_process(guest, lab):
    pinned = lab.odp_revoke("anon", kind="pinned")
    assert pinned.registered and pinned.vmpin_kb_delta == 2048, pinned.summary()
    assert pinned.after is not None and pinned.after.ok and not pinned.invalidations, pinned.summary()
    assert pinned.visible_to_process is False, pinned.summary()    # the device wrote into the old pages
    if _has_odp(guest):
        odp = lab.odp_revoke("anon", kind="odp")
        assert odp.invalidations and odp.after is not None and odp.after.ok, odp.summary()
        assert odp.visible_to_process is True, odp.summary()
