"""Integration: the 5.10 image (bullseye userland, Debian 11's kernel), the kernel
before v5.11 moved the fs-dax test into check_vma_flags(). It boots with what the
lab needs (NVDIMMs, soft-RoCE, vivid, the guest helper on Python 3.9), and the
refusals are traced where 5.10 makes them: __gup_longterm_locked() for GUP (RDMA,
io_uring) and get_vaddr_frames() for V4L2 USERPTR, never check_vma_flags()."""

from __future__ import annotations

import pytest
from conftest import require_image

from labkit.lab import Lab
from labkit.lab.results import traced_function
from labkit.lab.tracing import refusing_functions

pytestmark = pytest.mark.integration

KERNEL = "5.10"


@pytest.fixture(scope="module")
def lab510(pool):
    require_image(KERNEL)
    lab = Lab(pool.get(KERNEL))
    return lab


@pytest.fixture(scope="module")
def matrix510(lab510):
    return lab510.matrix()


def test_runs_the_5_10_kernel_on_bullseye_with_python_3_9(lab510):
    vm = lab510.vm
    img = require_image(KERNEL)
    release = vm.run("uname -r", check=True).stdout.strip()
    assert release.startswith("5.10.") and release == img.kernel_release
    assert img.manifest["suite"] == "bullseye"
    assert "VERSION_CODENAME=bullseye" in vm.run("cat /etc/os-release", check=True).stdout
    assert vm.run("python3 --version", check=True).stdout.startswith("Python 3.9.")


def test_the_traced_functions_are_probe_able_and_check_vma_flags_is_not(lab510):
    """check_vma_flags() exists in 5.10's mm/gup.c but is inlined: no symbol, no kretprobe."""
    vm = lab510.vm
    kallsyms = vm.run(["sh", "-c", "cut -d' ' -f3 /proc/kallsyms"], check=True, timeout=60).stdout.split()
    names = set(kallsyms)
    wanted = refusing_functions(vm.run("uname -r", check=True).stdout)
    assert wanted == ("__gup_longterm_locked", "get_vaddr_frames")
    assert set(wanted) <= names and "check_vma_flags" not in names and "check_dax_vmas" not in names


def _pins(m: dict) -> dict:
    return {(p["mechanism"], p["memory"], p["mapping"]): p for p in m["pins"]}


def test_both_dax_mounts_warn_experimental(matrix510):
    mounts = {mt["fs"]: mt for mt in matrix510["mounts"]}
    assert mounts["xfs"]["ok"] and mounts["ext4"]["ok"]
    assert mounts["xfs"]["dax_active"] and mounts["ext4"]["dax_active"]
    assert mounts["xfs"]["experimental_warning"] and mounts["ext4"]["experimental_warning"]


def test_fsdax_longterm_pins_are_refused_in_the_5_10_functions(matrix510):
    pins = _pins(matrix510)
    where = {"rdma": "__gup_longterm_locked", "io_uring": "__gup_longterm_locked", "v4l2": "get_vaddr_frames"}
    for mech, function in where.items():
        for mem in ("fsdax-xfs", "fsdax-ext4"):
            p = pins[(mech, mem, "shared")]
            assert (p["ok"], p["errno"]) == (False, 95), p
            assert [traced_function(t) for t in p["trace"]] == [function], p["trace"]
            assert "ret=-95" in p["trace"][0]
    assert "refused in __gup_longterm_locked" in pins[("rdma", "fsdax-xfs", "shared")]["why"]
    # refused *after* the pin: the pages were pinned (nr_foll_pin_acquired moved), then unpinned
    for mech in ("rdma", "io_uring"):
        p = pins[(mech, "fsdax-xfs", "shared")]
        assert p["foll_pin_delta"] > 0 and p["vmpin_kb_delta"] == 0, p


def test_device_dax_and_anon_pin_and_o_direct_is_legal(matrix510):
    pins = _pins(matrix510)
    for mech in ("rdma", "v4l2"):
        for mem in ("anon", "devdax"):
            assert pins[(mech, mem, "shared")]["ok"], pins[(mech, mem, "shared")]
    assert pins[("rdma", "anon", "shared")]["vmpin_kb_delta"] == 2048
    for mem in ("anon", "pagecache", "fsdax-xfs", "fsdax-ext4", "devdax"):
        p = pins[("odirect", mem, "shared")]
        assert p["ok"] and not p["trace"], p
    # FOLL_PIN (v5.6) is counted on 5.10: RDMA's and V4L2's pins show in nr_foll_pin_acquired
    assert pins[("rdma", "anon", "shared")]["foll_pin_delta"] > 0
    assert pins[("v4l2", "anon", "shared")]["foll_pin_delta"] > 0


def test_io_uring_refuses_file_mappings_itself_and_fsdax_in_gup(matrix510):
    """5.10's io_sqe_buffer_register() refuses any non-hugetlb file mapping after GUP: page
    cache and device-dax are refused with nothing traced; fs-dax already in GUP (traced)."""
    pins = _pins(matrix510)
    assert pins[("io_uring", "anon", "shared")]["ok"]
    for mem in ("pagecache", "devdax"):
        p = pins[("io_uring", mem, "shared")]
        assert (p["ok"], p["errno"], p["trace"]) == (False, 95, []), p


def test_rdma_without_odp_and_the_truncate_wait(matrix510):
    pins = _pins(matrix510)
    odp = pins[("rdma-odp", "anon", "shared")]
    assert not odp["ok"] and odp["device_odp"] == 0 and not odp["trace"], odp     # rxe has no ODP before v6.15
    tw = matrix510["truncate_wait"]
    assert tw["blocked"] and tw["completed"] and "xfs_break_layouts" in tw["where"], tw


@pytest.mark.parametrize("answer, right", [
    ("r __gup_longterm_locked $retval:s32", True),       # where 5.10 refuses a GUP long-term pin of fs-dax
    ("r:mine __gup_longterm_locked ret=$retval:s64", True),
    ("r check_vma_flags $retval:s32", False),            # v5.11's place: no symbol to probe on 5.10
    ("r get_vaddr_frames $retval:s32", False),           # V4L2's refusal, not RDMA's
])
def test_the_probe_judge_on_5_10_wants_the_function_that_refuses_there(lab510, answer, right):
    """The kretprobe exercise's judge (labkit.course.probe_exercise.check_probe), run live on
    the 5.10 guest around a refused fs-dax reg_mr and an allowed anonymous one."""
    from labkit.course.exercises import Live
    from labkit.course.probe_exercise import check_probe
    ok, why = check_probe(answer, Live(lab510))
    assert ok is right, (answer, why)
