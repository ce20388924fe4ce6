"""Host side of the ODP experiments, without a guest: the helper's JSON turned
into results, the "why" told from the evidence alone, the invalidation probe
installed only where the kernel has the callback, and the side-by-side text."""

from __future__ import annotations

import json

import pytest

from labkit.errors import ConfigError, LabError
from labkit.lab import Lab, PinResult
from labkit.lab.odp import INVALIDATE_EVENT, OdpStory, RdmaOp, compare_stories, parse_revoke
from labkit.lab.results import pin_why
from labkit.testing.fakes import FakeVM

CVF = "python3-1 [000] 1.0: labkit_cvf: (__get_user_pages+0x98/0x660 <- check_vma_flags) ret=-95"

# What the guest helper printed on 7.3 (trimmed), and on 6.12 for the same call.
ODP_FSDAX_73 = {
    "mechanism": "rdma-odp", "memory": "file", "mapping": "shared", "ok": True, "errno": None, "errname": None,
    "registered": True, "odp_general_caps": 1, "odp_rc_caps": 63, "vmpin_kb_delta": 0,
    "before": {"op": "write", "status": 0, "status_name": "IBV_WC_SUCCESS", "vendor_err": 0, "seconds": 0.01},
    "revoke": {"action": "truncate", "seconds": 0.013, "where": [], "killed": False, "completed": True},
    "invalidations": 3,
    "after": {"op": "write", "status": 10, "status_name": "IBV_WC_REM_ACCESS_ERR", "vendor_err": 0, "seconds": 0.01},
    "visible_to_process": None, "kernel": "7.3.4+deb13-amd64"}
ODP_FSDAX_612 = {"mechanism": "rdma-odp", "memory": "file", "ok": False, "errno": 95, "errname": "EOPNOTSUPP",
                 "registered": False, "odp_general_caps": 0, "vmpin_kb_delta": 0, "before": None, "revoke": None,
                 "after": None, "invalidations": None, "kernel": "6.12.117+deb12-amd64"}


def test_parse_revoke_keeps_what_the_live_kernel_did():
    r = parse_revoke("fsdax-xfs", "odp", ODP_FSDAX_73)
    assert (r.registered, r.device_odp, r.vmpin_kb_delta, r.action, r.invalidations) == (True, 1, 0, "truncate", 3)
    assert r.before == RdmaOp("write", 0, "IBV_WC_SUCCESS", 0.01, 0) and r.before.ok
    assert r.after is not None and (r.after.status, r.after.ok) == (10, False)
    assert not r.action_waited and r.action_seconds == 0.013
    text = r.summary()
    assert "IBV_WC_REM_ACCESS_ERR" in text and "invalidations 3" in text and "truncate took 0.013 s" in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["after"]["ok"] is False and d["before"]["ok"] is True and "detail" not in d


def test_parse_revoke_of_a_refused_registration():
    r = parse_revoke("fsdax-xfs", "odp", ODP_FSDAX_612)
    assert not r.registered and (r.errno, r.device_odp, r.before, r.after) == (95, 0, None, None)
    assert "registration refused, EOPNOTSUPP (95); device ODP caps 0x0" in r.summary()


def test_parse_revoke_error_is_a_lab_error():
    with pytest.raises(LabError, match="no RDMA device"):
        parse_revoke("anon", "odp", {"error": "no RDMA device"})


@pytest.mark.parametrize("mech, ok, caps, trace, says", [
    ("rdma", False, 0, [CVF], "check_vma_flags"),              # the fs-dax rule, whatever the device
    ("rdma-odp", False, 0, [], "no on-demand paging"),          # 6.12's EOPNOTSUPP: the device
    ("rdma-odp", False, None, [], "did not refuse"),            # caps unknown: say only what is known
    ("rdma-odp", True, 1, [], "no page pinned"),
    ("rdma", True, 1, [], ""),
])
def test_why_comes_from_the_evidence(mech, ok, caps, trace, says):
    why = pin_why(mech, ok, caps, trace)
    assert says in why if says else why == ""
    assert "95" not in why and "EOPNOTSUPP" not in why    # never a remembered errno


def test_same_errno_two_reasons():
    fsdax = PinResult.from_probe(("rdma", "fsdax-xfs", "shared"),
                                 {"ok": False, "errno": 95, "errname": "EOPNOTSUPP", "odp_general_caps": 0}, [], [CVF])
    odp = PinResult.from_probe(("rdma-odp", "fsdax-xfs", "shared"),
                               {"ok": False, "errno": 95, "errname": "EOPNOTSUPP", "odp_general_caps": 0}, [], [])
    assert fsdax.cell == odp.cell and fsdax.why != odp.why
    assert odp.device_odp == 0 and "no on-demand paging" in odp.summary()
    other = PinResult.from_probe(("v4l2", "anon", "shared"), {"ok": True, "odp_general_caps": True}, [], [])
    assert other.device_odp is None and other.why == ""


def _lab(has_callback: bool) -> tuple[Lab, FakeVM]:
    vm = FakeVM([(r"available_filter_functions", "", 0 if has_callback else 3),
                 (r"odp-revoke", json.dumps(ODP_FSDAX_73 if has_callback else ODP_FSDAX_612), 0)])
    lab = Lab(vm)
    lab.pmem.device_of = lambda kind: "/dev/pmem0"      # type: ignore[method-assign]
    return lab, vm


def test_revoke_counts_invalidations_only_where_the_kernel_has_the_callback():
    lab, vm = _lab(True)
    r = lab.odp_revoke("fsdax-xfs")
    cmd = next(c for c in vm.ssh.commands if "odp-revoke" in c)
    assert f"--trace-event {INVALIDATE_EVENT}" in cmd and "--kind odp" in cmd and "--dax-fs xfs" in cmd
    assert r.invalidations == 3
    lab, vm = _lab(False)
    lab.odp_revoke("anon", kind="pinned")
    cmd = next(c for c in vm.ssh.commands if "odp-revoke" in c)
    assert "--trace-event" not in cmd and "--mapping private" in cmd and "--kind pinned" in cmd


@pytest.mark.parametrize("kw", [{"memory": "hugetlb"}, {"kind": "lease"}, {"op": "atomic"}])
def test_revoke_validates_before_the_guest_is_touched(kw):
    lab, vm = _lab(True)
    with pytest.raises(ConfigError):
        lab.odp_revoke(**kw)
    assert vm.ssh.commands == []


def _story(kernel: str, data: dict, caps: int, ok: bool) -> OdpStory:
    pin = PinResult.from_probe(("rdma-odp", "anon", "shared"),
                               {"ok": ok, "errno": None if ok else 22, "errname": None if ok else "EINVAL",
                                "odp_general_caps": caps, "vmpin_kb_delta": 0}, [], [])
    return OdpStory(kernel, [pin], [parse_revoke("fsdax-xfs", "odp", data)])


def test_compare_stories_marks_answers_not_timings():
    a = _story("6.1.0-57-amd64", ODP_FSDAX_612, 0, False)
    b = _story("7.3.4+deb13-amd64", ODP_FSDAX_73, 1, True)
    text = compare_stories(a, b)
    assert text.count("<- differs") == 2 and "IBV_WC_REM_ACCESS_ERR" in text and "truncate under an ODP MR on fsdax-xfs" in text
    c = _story("7.3.4+deb13-amd64", dict(ODP_FSDAX_73, revoke=dict(ODP_FSDAX_73["revoke"], seconds=0.5)), 1, True)
    assert "<- differs" not in compare_stories(b, c)


def test_caps_mark_only_the_odp_rows():
    def plain(caps):
        return PinResult.from_probe(("rdma", "fsdax-xfs", "shared"),
                                    {"ok": False, "errno": 95, "errname": "EOPNOTSUPP", "odp_general_caps": caps},
                                    [], [CVF])
    a = OdpStory("6.1", [plain(0)], [])
    b = OdpStory("7.3", [plain(1)], [])
    assert "<- differs" not in compare_stories(a, b)
