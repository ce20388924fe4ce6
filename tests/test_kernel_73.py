"""Integration: the 7.3 image (trixie userland, trixie-backports kernel) boots
and has what the lab needs: its own kernel, the NVDIMMs through nfit, and the
rdma_rxe and vivid modules (7.x ships them in the split linux-modules package)."""

from __future__ import annotations

import pytest
from conftest import require_image

from labkit.machine.vm import VM

pytestmark = pytest.mark.integration


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
