"""Live observation: the streaming kernel log, pin counters over time, and a
pin held open until released."""

import pytest

from labkit.lab import Lab
from labkit.lab.observe import KernelLog, PinCounters, classify, parse_sample


def test_classify():
    assert classify("XFS (pmem0): DAX enabled. Warning: EXPERIMENTAL, use at your own risk") == "experimental"
    assert classify("rdma_rxe: rxe_mr_init_user: Unable to pin memory region err = -95") == "pin-refused"
    assert classify("labkit_cvf: (__get_user_pages+0x9/0x1 <- check_vma_flags) ret=-95") == "refusal"
    assert classify("virtio_net virtio1 eth0: renamed") is None


def test_parse_sample():
    s = parse_sample("2048 700 188\n", 1.5)
    assert (s.vmpin_kb, s.foll_pin_acquired, s.foll_pin_released, s.foll_pins_held) == (2048, 700, 188, 512)
    assert parse_sample("- 5 6\n", 0).vmpin_kb is None


@pytest.mark.integration
def test_kernel_log_streams(guest):
    with KernelLog(guest) as log:
        guest.run("sleep 0.5; echo labkit-observe-probe > /dev/kmsg", check=True)
        line = log.wait_for("labkit-observe-probe", timeout=15)
    assert "labkit-observe-probe" in line.text


@pytest.mark.integration
def test_held_rdma_pin_stays_up_until_released(guest):
    lab = Lab(guest)
    lab.setup_rdma()
    held = lab.hold_pin("rdma", "anon")
    try:
        assert held.ok and held.pid
        counters = PinCounters(guest, pid=held.pid)
        first = counters.sample()
        second = counters.sample()
        assert first.vmpin_kb == second.vmpin_kb == 2048
    finally:
        rc = held.release()
    assert rc == 0
    after = counters.sample()
    assert after.vmpin_kb is None      # the holder has exited and unpinned
    assert after.foll_pins_held is not None and after.foll_pins_held <= first.foll_pins_held - 512
