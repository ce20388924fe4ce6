"""The counterfactual layer without a guest: module switching against a fake
kernel (taint, marker, refusals shown), the result verdicts, the plot and
the guest helper's pure parts."""

from __future__ import annotations

import pytest

from labkit.errors import ConfigError
from labkit.lab import counterfactual as cf
from labkit.lab.guest import counterfactual as guest
from labkit.testing.counterfactual import TAINT_OOT_UNSIGNED, FakeKernelGuest


def test_context_loads_marks_and_unloads():
    g = FakeKernelGuest()
    with cf.counterfactual(g, "no-longterm-check", "no-layout-wait") as c:
        assert g.modules == ["labkit_no_longterm_check", "labkit_no_layout_wait"]
        assert cf.loaded(g) == ["no-longterm-check", "no-layout-wait"]
    assert g.modules == []
    assert [(s.action, s.module) for s in c.switches] == [
        ("load", "labkit_no_longterm_check"), ("load", "labkit_no_layout_wait"),
        ("unload", "labkit_no_layout_wait"), ("unload", "labkit_no_longterm_check")]
    # the taint stays after the unload, and so does the "modified" marker (until a reset)
    assert c.taint == TAINT_OOT_UNSIGNED and c.taint_before == 0
    assert "O (out-of-tree module)" in c.report() and "E (unsigned module)" in c.report()
    assert [ln.split()[0] for ln in cf.modified(g)] == ["no-longterm-check", "no-layout-wait"]
    assert any("loading out-of-tree module" in ln for ln in c.switches[0].kernel_log)


def test_missing_symbol_is_shown_and_nothing_stays_loaded():
    g = FakeKernelGuest(missing_symbol={"labkit_no_layout_wait"})
    with pytest.raises(cf.ModuleLoadError) as ei:
        with cf.counterfactual(g, "no-longterm-check", "no-layout-wait"):
            pytest.fail("the block must not run")
    err = ei.value
    assert "cannot probe check_vma_flags" in str(err) and err.kernel_log
    assert "does not apply here" in err.hint
    assert g.modules == []          # the first module was unloaded again
    assert [ln.split()[0] for ln in cf.modified(g)] == ["no-longterm-check"]   # it did run, the refused one did not


def test_module_absent_from_image_hints_rebuild():
    g = FakeKernelGuest(absent={"labkit_no_longterm_check"})
    with pytest.raises(cf.ModuleLoadError) as ei:
        cf.counterfactual(g, "no-longterm-check").__enter__()
    assert "labkit image build" in ei.value.hint


def test_names_are_checked_before_the_guest_is_touched():
    g = FakeKernelGuest()
    with pytest.raises(ConfigError):
        cf.counterfactual(g, "no-check; reboot")
    with pytest.raises(ConfigError):
        cf.counterfactual(g)
    assert g.commands == []
    with pytest.raises(ConfigError):
        cf.hold_and_truncate(g, hold=-1)
    with pytest.raises(ConfigError):
        cf.stale_mr_write(g, fs="btrfs")


def test_decode_taint_and_problems():
    assert cf.decode_taint(0) == "not tainted"
    assert cf.decode_taint(12800) == "W (kernel warning (WARN)), O (out-of-tree module), E (unsigned module)"
    assert "other bits 0x2" in cf.decode_taint(2)
    lines = ["[1] ok", "[2] WARNING: CPU: 0 PID: 9 at fs/dax.c:371 dax_disassociate_entry+0x4f/0x60", "[3] x"]
    assert cf.kernel_problems(lines) == [lines[1]]


def hold_answer(**kw):
    d = {"kernel": "6.1.0-57-amd64", "hold": 4.0, "registered": True, "errno": None, "errname": None,
         "vmpin_kb_delta": 2048, "truncate_started": 0.01, "truncate_finished": 4.05, "truncate_seconds": 4.04,
         "deregistered_at": 4.0, "truncate_completed": True, "truncate_where": ["xfs_break_dax_layouts"]}
    d.update(kw)
    return d


class UploadingGuest(FakeKernelGuest):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.vm = self

    def run(self, argv, check=False, **_):
        self.commands.append(" ".join(argv))

    @property
    def ssh(self):
        return self

    def upload(self, data, remote, mode=0o644):
        self.uploaded = remote


def test_hold_truncate_verdicts_follow_the_evidence():
    g = UploadingGuest(helper_answers=[hold_answer(), hold_answer(truncate_finished=0.02, truncate_seconds=0.01),
                                       hold_answer(registered=False, errno=95, errname="EOPNOTSUPP",
                                                   deregistered_at=None, truncate_seconds=0.003)],
                       script_present=False)
    waited = cf.hold_and_truncate(g, 4.0)
    assert g.uploaded == cf.SCRIPT_PATH
    assert waited.waited_for_mr and waited.after_deregistration == pytest.approx(0.05)
    assert "truncate waited 4.04 s" in waited.verdict()
    early = cf.hold_and_truncate(g, 4.0)
    assert not early.waited_for_mr and "not what the story predicts" in early.verdict()
    refused = cf.hold_and_truncate(g, 4.0)
    assert refused.verdict().startswith("ibv_reg_mr refused: EOPNOTSUPP (95)")
    svg = cf.wait_plot_svg([waited, early, refused])
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and "MR lifetime" in svg


def test_guest_error_is_a_lab_error():
    g = UploadingGuest(helper_answers=[{"error": "no RDMA device"}])
    with pytest.raises(cf.LabError, match="no RDMA device"):
        cf.hold_and_truncate(g, 1.0)


def stale_answer(**kw):
    d = {"kernel": "6.1", "stage": "written", "registered": True, "truncate_seconds": 0.002, "block_size": 4096,
         "blocks_before_truncate": [{"logical": 0, "physical": 40960, "length": 8192}],
         "victim_blocks": [{"logical": 0, "physical": 40960, "length": 8192}],
         "reused": [{"physical": 40960, "length": 8192, "victim_offset": 0, "mr_offset": 0}],
         "victim_sha256_before": "a" * 64, "victim_sha256_after": "b" * 64, "changed_bytes": 8192,
         "changed_ranges": [[0, 8192]], "changed_sample": "LABKIT stale-MR",
         "rdma_write": {"completed": True, "wc_status": 0, "wc_ok": True}}
    d.update(kw)
    return d


def test_stale_write_reports_corruption_and_warnings():
    warn = "[5.0] WARNING: CPU: 1 PID: 77 at fs/dax.c:352 dax_disassociate_entry"
    g = UploadingGuest(helper_answers=[stale_answer(), stale_answer(victim_sha256_after="a" * 64, changed_bytes=0,
                                                                    changed_ranges=[])],
                       helper_log=[[warn], []])
    r = cf.stale_mr_write(g)
    assert r.corrupted and r.warnings == [warn]
    assert "8192 bytes differ" in r.verdict()
    assert "10" in r.blocks_table() and "B reuses" in r.blocks_table()
    same = cf.stale_mr_write(g)
    assert not same.corrupted and "unchanged" in same.verdict()


def test_stale_write_stages():
    base = cf.Observed(0, "", "", [], 0)
    waited = cf.StaleWrite.from_guest(stale_answer(stage="truncate waited"), base, "xfs", [])
    assert "layout wait is in force" in waited.verdict()
    refused = cf.StaleWrite.from_guest(stale_answer(registered=False, errno=95, errname="EOPNOTSUPP",
                                                    stage="registration refused"), base, "xfs", [])
    assert refused.verdict().startswith("ibv_reg_mr refused") and not refused.rdma_write == {}


def test_module_excerpt_shows_the_handler():
    text = cf.module_excerpt("no-longterm-check")
    assert "cvf_return" in text and "FOLL_LONGTERM" in text and "regs_set_return_value" in text
    assert "busy_return" in cf.module_excerpt("no-layout-wait")


def test_guest_overlap_and_changed_ranges():
    a = [{"logical": 0, "physical": 1000, "length": 100}]
    b = [{"logical": 4096, "physical": 950, "length": 100}, {"logical": 0, "physical": 5000, "length": 10}]
    assert guest.overlap(a, b) == [{"physical": 1000, "length": 50, "victim_offset": 4146, "mr_offset": 0}]
    n, ranges = guest.changed_ranges(b"aaaaaaaa", b"abbaaaba")
    assert n == 3 and ranges == [[1, 3], [6, 7]]


def test_guest_parser_errors_are_json(capsys):
    with pytest.raises(SystemExit) as ei:
        guest.build_parser().parse_args(["hold-truncate"])
    assert ei.value.code == 2 and '"error"' in capsys.readouterr().out


def fence_answer(**kw):
    """What the guest's fence-trace reported on 7.3 with module 1 (3 s, KVM), as the hist triggers count it."""
    d = {"kernel": "7.3.4+deb13-amd64", "size": 2 * 2**20, "deadline": 3.0, "completed": False,
         "registered": False, "errno": None, "errname": None, "seconds": 3.0, "not_probed": [], "overrides": 923,
         "counts": {"__gup_longterm_locked": {"-4": 1}, "__get_user_pages": {"512": 922, "-4": 1},
                    "check_vma_flags": {"0": 923}, "collect_longterm_unpinnable_folios": {"512": 922},
                    "folio_isolate_lru": {"0": 472064}, "migrate_longterm_unpinnable_folios": {"-11": 922}}}
    d.update(kw)
    return d


def test_fence_trace_tells_two_fences_from_one():
    g = UploadingGuest(helper_answers=[
        fence_answer(),
        fence_answer(completed=True, registered=True, seconds=0.6, counts={
            "__gup_longterm_locked": {"512": 1}, "check_vma_flags": {"0": 1}}, not_probed=[
            "collect_longterm_unpinnable_folios", "migrate_longterm_unpinnable_folios"]),
        fence_answer(completed=True, errno=95, errname="EOPNOTSUPP", seconds=0.9,
                     counts={"check_vma_flags": {"-95": 1}, "__gup_longterm_locked": {"-95": 1}})])
    looped = cf.fence_trace(g)
    assert looped.second_fence and looped.retries == 922 and looped.pages == 512
    assert looped.verdict().startswith("two fences") and "-EAGAIN (-11) 922 times" in looped.verdict()
    assert "folio_isolate_lru" in looped.table() and "472064" in looped.table()
    one = cf.fence_trace(g)
    assert not one.second_fence and "one fence" in one.verdict() and "(not probe-able here)" in one.table()
    refused = cf.fence_trace(g)
    assert refused.verdict() == ("ibv_reg_mr refused: EOPNOTSUPP (95) in 0.90 s; "
                                 "refused by check_vma_flags() -EOPNOTSUPP (-95)")
    with pytest.raises(ConfigError):
        cf.fence_trace(g, seconds=0)


def test_a_registration_that_never_returns_is_reported_not_waited_for():
    g = UploadingGuest(helper_answers=[hold_answer(registered=False, register_completed=False, hold=None,
                                                   register_seconds=15.0, overrides=39135, truncate_seconds=None,
                                                   deregistered_at=None)])
    r = cf.hold_and_truncate(g, 1.0)
    assert not r.register_completed and "did not return within 15.0 s" in r.verdict() and "39135" in r.verdict()
