"""Integration: the 7.3 image (trixie userland, trixie-backports kernel) boots
and has what the lab needs: its own kernel, the NVDIMMs through nfit, and the
rdma_rxe and vivid modules (7.x ships them in the split linux-modules package)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import require_image

from labkit import image
from labkit.machine.vm import VM

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("a cold boot of the 7.3 image, and `labkit matrix --kernel all` on fresh guests")]


@pytest.fixture(scope="module")
def guest73():
    img = require_image("7.3")
    # Cold: a warm start restores a guest that already loaded rxe and vivid.
    with VM("test-k73", kernel="7.3", warm=False) as vm:
        yield vm, img


def test_runs_the_7_3_kernel_on_trixie(guest73):
    vm, img = guest73
    release = vm.run("uname -r", check=True).stdout.strip()
    assert release.startswith("7.3") and release == img.kernel_release
    assert img.manifest["suite"] == "trixie"
    assert img.manifest["kernel_package"]["name"] == f"linux-image-{release}"
    assert "VERSION_CODENAME=trixie" in vm.run("cat /etc/os-release", check=True).stdout


def test_nvdimms_are_present_through_nfit(guest73):
    vm, _ = guest73
    r = vm.run("modprobe nfit && ls /sys/bus/nd/devices && ndctl list -R", check=True, timeout=60)
    assert "ndbus" in r.stdout and "region" in r.stdout
    assert "nfit " in vm.run("cat /proc/modules", check=True).stdout     # ACPI_NFIT=m on 7.3


def test_rxe_and_vivid_load(guest73):
    vm, _ = guest73
    assert vm.info.start_kind == "cold"
    vm.run("modprobe rdma_rxe && modprobe vivid", check=True, timeout=60)
    mods = vm.run("cat /proc/modules", check=True).stdout
    assert "rdma_rxe " in mods and "vivid " in mods
    # one rxe device per netdev: add it unless something in the guest already did
    r = vm.run("test -e /sys/class/infiniband/rxe0 || rdma link add rxe0 type rxe netdev eth0; "
               "rdma link show rxe0/1 && for i in $(seq 50); do ls /dev/video* >/dev/null 2>&1 && break; "
               "sleep 0.1; done; ls /dev/video*", check=True, timeout=60)
    assert "netdev eth0" in r.stdout and "ACTIVE" in r.stdout and "/dev/video" in r.stdout


def test_the_second_fence_sends_gup_round_until_killed(guest73):
    """With module 1 loaded, 7.3 lets the fs-dax pin past check_vma_flags() and then finds the
    folios not long-term pinnable (e5cb23256347): migration answers -EAGAIN every round and the
    registration never returns; the lab reports that, bounded, instead of hanging. Last in the
    file's guest73 tests: it taints that guest."""
    import errno

    from labkit.lab import Lab
    from labkit.lab import counterfactual as cf
    vm, _ = guest73
    lab = Lab(vm)
    cf.prepare(lab)
    real = cf.fence_trace(lab, seconds=2.0)
    assert real.completed and not real.registered and real.returned("check_vma_flags", -errno.EOPNOTSUPP), real
    with cf.counterfactual(lab, "no-longterm-check"):
        ft = cf.fence_trace(lab, seconds=2.0)
        held = cf.hold_and_truncate(lab, 1.0)
    assert not ft.completed and ft.second_fence, ft.table()
    rounds = ft.retries
    assert rounds >= 2 and ft.returned("check_vma_flags", 0) >= rounds, ft.table()
    assert ft.returned("collect_longterm_unpinnable_folios", ft.pages) == rounds, ft.table()
    assert "two fences" in ft.verdict()
    assert not held.register_completed and not held.registered and "did not return" in held.verdict(), held


def test_ex8_2_second_fence_probe_judged_live(guest73):
    """Exercise 8.2's judge on the live 7.3 kernel (without the reset it does after grading):
    the reference probe catches the loop's answer, a probe on check_vma_flags does not."""
    from labkit.course.exercises import BY_ID, Live
    from labkit.course.fence_exercise import _measure
    from labkit.lab import Lab
    from labkit.lab import counterfactual as cf
    vm, _ = guest73
    lab = Lab(vm)
    cf.prepare(lab)
    ex = BY_ID["ex8.2"]

    def judged(answer):
        return ex.check(answer, Live(lab, fence_runner=_measure))

    assert judged("r migrate_longterm_unpinnable_folios $retval:s32") == (True, "")
    assert not judged("r check_vma_flags $retval:s32")[0]
    assert not judged("")[0]


def check_one_kernels_matrix(kernel: str, m: dict) -> None:
    """One kernel's full matrix, as `labkit matrix --json` measures it on a fresh guest
    (this used to be a `labkit matrix --kernel K` run per kernel in tests/test_lab.py)."""
    assert m["kernel"] == image.load_image(kernel).kernel_release and m["accel"] in ("kvm", "tcg"), m["kernel"]
    pins = {(p["mechanism"], p["memory"], p["mapping"]): p for p in m["pins"]}
    assert pins[("rdma", "fsdax-xfs", "shared")]["errno"] == 95
    assert pins[("rdma", "anon", "shared")]["ok"]
    # rdma-odp: never the fs-dax rule; it registers exactly where the device has ODP (bit 0 of its caps)
    odp = pins[("rdma-odp", "fsdax-xfs", "shared")]
    assert not odp["trace"] and isinstance(odp["device_odp"], int) and odp["why"]
    assert odp["ok"] == bool(odp["device_odp"] & 1) and odp["vmpin_kb_delta"] == 0
    assert {"blocked", "seconds", "where"} <= set(m["truncate_wait"])


def check_every_kernels_matrix(out: dict) -> None:
    """What `labkit matrix --kernel all --json` must show, kernel by kernel."""
    assert list(out["kernels"]) == list(image.KERNELS)
    for k, m in out["kernels"].items():
        assert image.KERNELS[k].release_matches(m["kernel"]), (k, m["kernel"])
        check_one_kernels_matrix(k, m)
    pins = {k: {(p["mechanism"], p["memory"], p["mapping"]): p for p in m["pins"]} for k, m in out["kernels"].items()}
    warned = {k: {mt["fs"] for mt in m["mounts"] if mt["experimental_warning"]} for k, m in out["kernels"].items()}
    # XFS dropped its EXPERIMENTAL DAX message in v6.8 (ext4 in v5.17)
    assert warned == {"6.1": {"xfs"}, "6.12": set(), "7.3": set(), "5.10": {"xfs", "ext4"}}
    # the same refusal everywhere, traced where each kernel makes it (v5.11's 52650c8b466b moved it)
    refused_in = {"6.1": "check_vma_flags", "6.12": "check_vma_flags", "7.3": "check_vma_flags",
                  "5.10": "__gup_longterm_locked"}
    for k in out["kernels"]:
        p = pins[k][("rdma", "fsdax-xfs", "shared")]
        assert (p["ok"], p["errno"]) == (False, 95) and p["trace"], (k, p)
        assert f"<- {refused_in[k]})" in p["trace"][0], (k, p["trace"])
    # v6.5 (8ac268436e6d): writable long-term pins of a dirty-tracked file mapping are refused with EFAULT
    got = {k: pins[k][("rdma", "pagecache", "shared")]["errno"] for k in out["kernels"]}
    assert got == {"6.1": None, "6.12": 14, "7.3": 14, "5.10": None}, got
    rows = {d["row"]: d for d in out["differences"]}
    assert "result" in rows["rdma pagecache shared"]["fields"]
    assert "EXPERIMENTAL" in rows["mount xfs -o dax"]["fields"]
    assert "EXPERIMENTAL" in rows["mount ext4 -o dax"]["fields"]
    # 5.10 refuses after the pin (check_dax_vmas, then unpin): its refused registration still counts
    # FOLL_PIN acquisitions; since v5.11 the VMA is refused before any page is pinned
    assert rows["rdma fsdax-xfs shared"]["fields"] == ["foll_pin", "refused in"]
    assert {k: c["refused in"] for k, c in rows["rdma fsdax-xfs shared"]["kernels"].items()} == refused_in
    assert {k: c["foll_pin"] != "+0" for k, c in rows["rdma fsdax-xfs shared"]["kernels"].items()} == {
        "6.1": False, "6.12": False, "7.3": False, "5.10": True}
    assert rows["v4l2 fsdax-xfs shared"]["kernels"]["5.10"]["refused in"] == "get_vaddr_frames"


@pytest.mark.timeout(1200)
def test_matrix_of_all_kernels_side_by_side():
    for k in image.KERNELS:
        require_image(k)
    r = subprocess.run([sys.executable, "-m", "labkit", "matrix", "--kernel", "all", "--json", "--name", "none"],
                       capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stderr
    check_every_kernels_matrix(json.loads(r.stdout))
