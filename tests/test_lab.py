"""Integration: the lab's subject on live guests of every kernel. These assert
the kernel behaviour the course teaches, measured now (the lab itself never
prints a remembered answer)."""

from __future__ import annotations

import pytest

from labkit.errors import ConfigError, LabError
from labkit.lab import SHORT_CASES, Lab, compare_matrices
from labkit.lab.tracing import refusing_functions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(guest):
    lab = Lab(guest)
    lab.prepare_mounts()
    lab.setup_rdma()
    lab.setup_vivid()
    return lab


def is_61(lab) -> bool:
    return lab.vm.boot.kernel_release.startswith("6.1.")


def test_namespaces_configured(lab):
    modes = [n.mode for n in lab.namespaces()]
    assert modes[:3] == ["fsdax", "fsdax", "devdax"]


def is_510(lab) -> bool:
    return lab.vm.boot.kernel_release.startswith("5.10.")


def test_mount_warning_depends_on_kernel_and_fs(lab):
    res = {m.fs: m for m in lab.prepare_mounts()}
    assert res["xfs"].ok and res["ext4"].ok
    assert res["xfs"].dax_active and res["ext4"].dax_active
    # ext4 dropped its EXPERIMENTAL DAX message in v5.17, XFS in v6.8
    assert res["ext4"].experimental_warning is is_510(lab)
    assert res["xfs"].experimental_warning is (is_61(lab) or is_510(lab))
    for fs in ("xfs", "ext4"):
        if res[fs].experimental_warning:
            assert any("DAX enabled. Warning: EXPERIMENTAL" in ln for ln in res[fs].kernel_log)


@pytest.mark.parametrize("mechanism", ["rdma", "v4l2"])
def test_longterm_pins_refused_on_fsdax(lab, mechanism):
    for mem in ("fsdax-xfs", "fsdax-ext4"):
        r = lab.pin(mechanism, mem)
        assert not r.ok and r.errno == 95 and r.errname == "EOPNOTSUPP", r
        assert any("ret=-95" in t for t in r.trace), r.trace


def test_rdma_anon_and_devdax_pin(lab):
    for mem in ("anon", "devdax"):
        r = lab.pin("rdma", mem)
        assert r.ok, r
    r = lab.pin("rdma", "anon")
    assert r.vmpin_kb_delta == 2048


def test_rdma_refusal_is_logged(lab):
    r = lab.pin("rdma", "fsdax-xfs")
    assert not r.ok and r.errname == "EOPNOTSUPP", r
    # 6.1: "rxe_mr_init_user: Unable to pin memory region err = -95"; later: "rxe_reg_user_mr: returned err = -95"
    assert any("-95" in ln and "rxe" in ln for ln in r.kernel_log), r.kernel_log
    if is_61(lab):
        assert any("Unable to pin memory region" in ln for ln in r.kernel_log), r.kernel_log


def test_v4l2_anon_raises_foll_pin(lab):
    r = lab.pin("v4l2", "anon")
    assert r.ok and r.foll_pin_delta and r.foll_pin_delta > 0, r


def test_odirect_into_fsdax_is_legal(lab):
    for mem in ("fsdax-xfs", "fsdax-ext4"):
        r = lab.pin("odirect", mem)
        assert r.ok, r


def test_io_uring_registration_refused_on_fsdax(lab):
    assert lab.pin("io_uring", "anon").ok
    r = lab.pin("io_uring", "fsdax-xfs")
    assert not r.ok and r.errno == 95, r


def test_truncate_waits_for_referenced_dax_page(lab):
    tw = lab.truncate_wait("xfs", hold=2.0)
    assert tw.blocked and tw.completed, tw
    assert tw.seconds >= 1.5


def test_short_matrix_measures_exactly_the_cases_asked(lab):
    """``Lab.matrix(cases=SHORT_CASES, truncate=False)``: what notebook 06
    compares across kernels."""
    steps: list[str] = []
    m = lab.matrix(progress=steps.append, cases=SHORT_CASES, truncate=False)
    assert m["kernel"] == lab.vm.boot.kernel_release and m["truncate_wait"] is None
    assert [(p["mechanism"], p["memory"], p["mapping"]) for p in m["pins"]] == SHORT_CASES
    pins = {(p["mechanism"], p["memory"]): p for p in m["pins"]}
    assert pins[("rdma", "fsdax-xfs")]["errno"] == 95 and pins[("rdma", "devdax")]["ok"]
    assert pins[("odirect", "fsdax-xfs")]["ok"]
    assert steps[0].startswith("preparing") and any(f"{len(SHORT_CASES)} pin attempts" in s for s in steps)
    text = compare_matrices(m, m)
    assert "differs" not in text and len(text.splitlines()) == 3 + len(SHORT_CASES)


def test_pitfall_ext4_small_blocks_refuse_dax(lab):
    """mkfs.ext4 left to choose picks 1 KiB blocks on a ~500 MiB device: no DAX."""
    dev = "/dev/" + lab.prepare_pmem()["fsdax-ext4"].blockdev
    lab.umount("/mnt/fsdax-ext4")
    try:
        lab.mkfs("ext4", dev, block_size=None, force=True)
        m = lab.mount("ext4", dev)
        assert not m.ok and not m.dax_active, m
        assert any("blocksize" in ln for ln in m.kernel_log), m.kernel_log
        assert "-b 4096" in m.error
    finally:
        lab.umount("/mnt/fsdax-ext4")
        lab.mkfs("ext4", dev, block_size=4096, force=True)
        assert lab.mount("ext4", dev).dax_active


def test_pitfall_raw_namespace_has_no_dax(lab):
    ns = lab.prepare_pmem()["fsdax-ext4"]
    lab.umount("/mnt/fsdax-ext4")
    try:
        raw = lab.set_mode(ns.dev, "raw")
        assert raw.mode == "raw"
        dev = "/dev/" + raw.blockdev
        lab.mkfs("ext4", dev, force=True)
        m = lab.mount("ext4", dev)
        assert not m.dax_active, m
    finally:
        lab.umount("/mnt/fsdax-ext4")
        back = lab.set_mode(ns.dev, "fsdax")
        lab.mkfs("ext4", "/dev/" + back.blockdev, force=True)
        assert [(m.fs, m.dax_active) for m in lab.prepare_mounts()] == [("xfs", True), ("ext4", True)]


def test_vivid_writes_into_pinned_user_memory(lab):
    r = lab.v4l2_stream("anon", frames=3)
    assert r.ok and r.detail.get("frames") == 3, r.detail


def test_reset_and_prepare_again(lab):
    assert {n.mode for n in lab.reset_pmem()} == {"raw"}
    roles = lab.prepare_pmem()
    assert [roles[r].mode for r in ("fsdax-xfs", "fsdax-ext4", "devdax")] == ["fsdax", "fsdax", "devdax"]
    for fs in ("xfs", "ext4"):
        lab.mkfs(fs, "/dev/" + roles[f"fsdax-{fs}"].blockdev, force=True)
    assert [(m.fs, m.dax_active) for m in lab.prepare_mounts()] == [("xfs", True), ("ext4", True)]


def test_no_result_from_the_wrong_memory_when_the_dax_mount_is_gone(lab):
    """Issue 11 item 5: after umount the file would be on the root disk; with
    ext4 mounted where the lab reads xfs it would be ext4. The guest helper
    refuses both instead of reporting ok or a truncate that did not block."""
    lab.umount("/mnt/fsdax-xfs")
    try:
        with pytest.raises(LabError, match="not a mount point"):
            lab.pin("rdma", "fsdax-xfs")
        with pytest.raises(LabError, match="not a mount point"):
            lab.pin_many([("rdma", "fsdax-xfs", "shared")])
        with pytest.raises(LabError, match="not a mount point"):
            lab.truncate_wait("xfs", hold=0.5)
        assert lab.sh("ls /mnt/fsdax-xfs").stdout.strip() == ""      # nothing created on the root disk
        with pytest.raises(ConfigError, match="fsdax-xfs"):
            lab.mount("ext4", "/dev/" + lab.prepare_pmem()["fsdax-ext4"].blockdev, "/mnt/fsdax-xfs")
        ext4_dev = "/dev/" + lab.prepare_pmem()["fsdax-ext4"].blockdev
        lab.sh(f"mount -t ext4 -o dax {ext4_dev} /mnt/fsdax-xfs")   # behind the lab's back
        with pytest.raises(LabError, match="holds ext4"):
            lab.pin("io_uring", "fsdax-xfs")
        with pytest.raises(LabError, match="holds ext4"):
            lab.truncate_wait("xfs", hold=0.5)
    finally:
        lab.umount("/mnt/fsdax-xfs")
        assert [(m.fs, m.dax_active) for m in lab.prepare_mounts()] == [("xfs", True), ("ext4", True)]
    r = lab.pin("rdma", "fsdax-xfs")
    assert not r.ok and r.errno == 95, r


def test_mount_info_reads_the_live_mount(lab):
    info = lab.mount_info("/mnt/fsdax-xfs")
    assert info.is_mountpoint and info.fs == "xfs" and info.dax_active and info.device.startswith("/dev/pmem")
    assert not lab.mount_info("/mnt/nothing-here").is_mountpoint


def test_the_refusing_line_in_the_running_kernels_own_source(lab):
    """The kretprobe's return value, looked up in Debian's linux-source of exactly
    the running kernel, marks the fs-dax test's return line (among any other
    line returning the same errno). Fetches the source once per kernel."""
    import re

    from labkit.course import source
    from labkit.lab.tracing import refusal_sites
    r = lab.pin("rdma", "fsdax-xfs")
    assert not r.ok and r.trace, r
    m = re.search(r"<-\s*(\w+)\).*ret=(-?\d+)", r.trace[0])
    assert m, r.trace
    src = source.for_lab(lab)
    release = lab.sh("uname -r").stdout.strip()
    assert src.release == release
    sites = {s.function: s for s in refusal_sites(release)}
    listing = src.function(m.group(1))
    fsdax = listing.matching(sites[m.group(1)].test)
    assert len(fsdax) == 1, listing.text()
    # the return that follows the test: the next line (check_vma_flags), or the `rc = -EOPNOTSUPP;`
    # after the unpin loop (5.10's __gup_longterm_locked)
    after = {"check_vma_flags": 1, "__gup_longterm_locked": 6}[m.group(1)]
    assert fsdax[0] + after in listing.returning(int(m.group(2))), listing.text(listing.returning(int(m.group(2))))
    # the V4L2 path of the cover letter: get_vaddr_frames asks for a long-term pin, or (before
    # 04769cb1c45a) refuses fs-dax itself
    if "get_vaddr_frames" in sites:
        vf = src.function("get_vaddr_frames")
        test = vf.matching(sites["get_vaddr_frames"].test)
        assert len(test) == 1 and test[0] + 1 in vf.returning(-95), vf.text()
    else:
        assert src.grep(r"FOLL_LONGTERM", "drivers/media/common/videobuf2/frame_vector.c")


def test_a_written_private_mapping_of_an_fsdax_file_is_pinned_by_gup_fast(lab):
    """MAP_PRIVATE of an fs-dax file with every page written first (the probe
    faults each page in for writing): copy-on-write made the pages anonymous,
    gup-fast pins present anonymous pages without looking at the VMA, and the
    slow path's check_vma_flags() (where vma_is_fsdax() would refuse) is never
    asked. The MAP_SHARED mapping of the same kind of file is refused."""
    for mem in ("fsdax-xfs", "fsdax-ext4"):
        r = lab.pin("rdma", mem, "private")
        assert r.ok and (r.vmpin_kb_delta or 0) > 0, r
        assert not any("check_vma_flags" in t for t in r.trace), r.trace
        shared = lab.pin("rdma", mem, "shared")
        assert not shared.ok and shared.errname == "EOPNOTSUPP", shared


def test_the_slow_path_refuses_the_same_private_mapping_untouched(lab):
    """vma_is_fsdax() does not ask whether the VMA is shared: a MAP_PRIVATE mapping
    of the fs-dax file whose pages nobody wrote goes to GUP's slow path, and
    check_vma_flags() refuses it with the shared mapping's errno (notebook 03)."""
    shared = lab.pin("rdma", "fsdax-xfs", "shared")
    r = lab.pin_untouched("fsdax-xfs", "private")
    assert not r.ok and r.errno == shared.errno, r
    refusing = refusing_functions(lab.vm.boot.kernel_release)        # check_vma_flags from v5.11
    assert any(f"<- {fn})" in t and f"ret=-{shared.errno}" in t for t in r.trace for fn in refusing), r.trace


@pytest.mark.parametrize("fs", ["xfs", "ext4"])
def test_a_hole_punch_waits_in_the_break_layouts_step_like_truncate(lab, fs):
    """fallocate(PUNCH_HOLE) of a mapped fs-dax file with a referenced page sleeps until
    the reference goes, in the filesystem's break-layouts step, entered from fallocate."""
    pw = lab.truncate_wait(fs, hold=1.5, op="punch")
    assert pw.op == "punch" and pw.blocked and pw.completed, pw
    assert any("fallocate" in f for f in pw.where), pw.where
    assert any("layout" in f or "wait_dax" in f for f in pw.where), pw.where
    assert not any("truncate" in f for f in pw.where), pw.where


def test_a_second_mount_of_the_device_does_not_hide_the_mount_warning(lab):
    """A capstone's second mount of the XFS device keeps its superblock alive, so a new
    mount would print nothing: prepare_mounts takes it down and puts it back (ex2.1)."""
    before = {m.fs: m for m in lab.prepare_mounts()}
    dev = before["xfs"].device
    assert lab.mount("xfs", dev, "/mnt/second", options="dax").ok
    try:
        again = {m.fs: m for m in lab.prepare_mounts()}
        # XFS still warns on 6.1 and 5.10 (a kernel that warns must warn on every mount)
        assert again["xfs"].experimental_warning is before["xfs"].experimental_warning is (is_61(lab) or is_510(lab))
        info = lab.mount_info("/mnt/second")
        assert info.is_mountpoint and info.fs == "xfs" and info.dax_active, info
    finally:
        lab.umount("/mnt/second")


def test_ex6_6_hole_punch_judged_live(lab):
    """Exercise 6.6 on the live guest: the frame the learner measured passes, a blank and
    the system call's own frame do not."""
    from labkit.course.exercises import BY_ID, Live
    pe = lab.truncate_wait("ext4", hold=1.5, op="punch")
    answer = next(f for f in pe.where if "layout" in f or "wait_dax" in f)
    ex, live = BY_ID["ex6.6"], Live(lab)
    assert ex.check(answer, live) == (True, ""), pe.where
    assert not ex.check("", live)[0] and not ex.check("ext4_fallocate", live)[0]
