"""``labkit matrix --kernel all``: kernels side by side, differences marked (no guest)."""

from __future__ import annotations

import threading

from labkit.cli import build_parser
from labkit.tools import kernel_matrix


def _pin(mech, mem, ok, errno=None, vmpin=None, fp=None, trace=()):
    return {"mechanism": mech, "memory": mem, "mapping": "shared", "ok": ok, "errno": errno,
            "errname": None if ok else {95: "EOPNOTSUPP", 14: "EFAULT"}[errno],
            "vmpin_kb_delta": vmpin, "foll_pin_delta": fp, "kernel_log": [], "trace": list(trace)}


def _matrix(release, pins, warning=False, blocked=True):
    return {"kernel": release, "accel": "tcg", "seconds": 20.0,
            "mounts": [{"fs": "xfs", "options": "dax", "ok": True, "dax_active": True,
                        "experimental_warning": warning, "kernel_log": [], "error": ""}],
            "pins": pins,
            "truncate_wait": {"fs": "xfs", "blocked": blocked, "seconds": 1.0, "where": ["xfs_break_dax_layouts", "xfs_break_layouts", "xfs_vn_setattr"],
                              "completed": True}}


CVF = "python3-1 [000] 1.0: labkit_cvf: (__get_user_pages+0x98/0x660 <- check_vma_flags) ret=-95"
GUP510 = "python3-1 [000] 1.0: labkit_cvf: (internal_get_user_pages_fast+0x274/0xde0 <- __gup_longterm_locked) ret=-95"

M = {
    "6.1": _matrix("6.1.0-37-amd64", [_pin("rdma", "anon", True, vmpin=2048, fp=0),
                                      _pin("rdma", "fsdax-xfs", False, 95, trace=[CVF]),
                                      _pin("rdma", "pagecache", True, vmpin=2048)], warning=True),
    "7.3": _matrix("7.3.4+deb13-amd64", [_pin("rdma", "anon", True, vmpin=2048, fp=0),
                                         _pin("rdma", "fsdax-xfs", False, 95, trace=[CVF]),
                                         _pin("rdma", "pagecache", False, 14)]),
}


def test_only_rows_that_differ_are_reported_with_their_fields():
    diffs = {d["row"]: d["fields"] for d in kernel_matrix.differences(M)}
    assert diffs == {"mount xfs -o dax": ["EXPERIMENTAL"], "rdma pagecache shared": ["VmPin kB", "result"]}


def test_side_by_side_has_a_column_per_kernel_and_marks_differences():
    text = kernel_matrix.side_by_side(M)
    lines = text.splitlines()
    assert "6.1: 6.1.0-37-amd64" in lines[0] and "7.3: 7.3.4+deb13-amd64" in lines[0]
    row = next(ln for ln in lines if ln.startswith("rdma pagecache"))
    assert "ok" in row and "EFAULT (14)" in row and row.endswith("<- differs: VmPin kB, result")
    same = next(ln for ln in lines if ln.startswith("rdma fsdax-xfs"))
    assert "differs" not in same and same.count("EOPNOTSUPP (95) [check_vma_flags]") == 2
    assert "2 of 5 rows differ" in text
    assert "blocked in xfs_break_dax_layouts <- xfs_break_layouts |" in text


def test_a_case_measured_on_one_kernel_only_is_shown_not_compared():
    m = {"6.1": M["6.1"], "7.3": dict(M["7.3"], pins=M["7.3"]["pins"] + [_pin("rdma", "devdax", True, vmpin=4096)])}
    row = next(ln for ln in kernel_matrix.side_by_side(m).splitlines() if ln.startswith("rdma devdax"))
    assert "not measured" in row and "differs" not in row


def test_json_carries_every_kernel_and_the_differences():
    out = kernel_matrix.as_json(M)
    assert list(out["kernels"]) == ["6.1", "7.3"] and out["kernels"]["7.3"]["kernel"].startswith("7.3")
    assert {d["row"] for d in out["differences"]} == {"mount xfs -o dax", "rdma pagecache shared"}


def test_measure_keeps_the_kernel_order_and_bounds_parallel_guests():
    running, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(2)

    def run(k):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if k != "7.3":
            gate.wait(timeout=5)     # the first two run at the same time
        with lock:
            running[0] -= 1
        return {"kernel": k}
    out = kernel_matrix.measure(["6.1", "6.12", "7.3"], run, jobs=2)
    assert list(out) == ["6.1", "6.12", "7.3"] and peak[0] == 2


def test_cli_accepts_every_kernel_and_all():
    p = build_parser()
    for k in ("6.1", "6.12", "7.3", "all"):
        assert p.parse_args(["matrix", "--kernel", k]).kernel == k
    assert p.parse_args(["image", "build", "--kernel", "7.3"]).kernel == "7.3"


def test_a_refusal_traced_in_another_function_is_a_difference():
    """5.10 refuses the same pin with the same errno, in __gup_longterm_locked (before v5.11's move)."""
    m = dict(M, **{"5.10": _matrix("5.10.0-46-amd64", [_pin("rdma", "anon", True, vmpin=2048, fp=0),
                                                        _pin("rdma", "fsdax-xfs", False, 95, trace=[GUP510]),
                                                        _pin("rdma", "pagecache", True, vmpin=2048)], warning=True)})
    diffs = {d["row"]: d for d in kernel_matrix.differences(m)}
    assert diffs["rdma fsdax-xfs shared"]["fields"] == ["refused in"]
    cells = diffs["rdma fsdax-xfs shared"]["kernels"]
    assert [cells[k]["refused in"] for k in ("6.1", "7.3", "5.10")] == ["check_vma_flags", "check_vma_flags",
                                                                      "__gup_longterm_locked"]
    row = next(ln for ln in kernel_matrix.side_by_side(m).splitlines() if ln.startswith("rdma fsdax-xfs"))
    assert "[__gup_longterm_locked]" in row and row.endswith("<- differs: refused in")
