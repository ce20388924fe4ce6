"""`labkit bench` measures real guests and prints the figures (values are
checked for consistency, never against speed targets: those are reported)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from labkit.tools import bench_class
from labkit.tools.bench import cold_phases, format_report, ratios

COLD = ("cold_host_s", "cold_qemu_s", "cold_kernel_s", "cold_initramfs_s", "cold_init_s", "cold_ssh_s")
WARM = ("warm_disk_s", "warm_qemu_s", "warm_restore_s", "warm_ssh_s", "warm_nvdimm_s")


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.fresh_guest("it times cold boots, warm starts and resets")
def test_bench_json_has_the_figures():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--runs", "1", "--no-matrix", "--json",
                        "--learners", "1"], capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    for key in ("cold_boot_s", "warm_start_s", "reset_s", "ssh_rtt_ms", "qemu_rss_mb", "accel", "warm_floor_s",
                "warm_over_floor", "reset_over_warm", "reset_minus_warm_s", "date"):
        assert key in b, key
    # the floor is part of the warm start, measured in the same start
    assert 0 < b["warm_floor_s"] < b["warm_start_s"]
    assert b["warm_over_floor"] == pytest.approx(b["warm_start_s"] / b["warm_floor_s"], rel=0.05)
    assert b["reset_over_warm"] == pytest.approx(b["reset_s"] / b["warm_start_s"], rel=0.05)
    assert 0 <= b["reset_stop_s"] < b["reset_s"]
    # one learner after the matrix, then one more: a guest after the matrix holds
    # well over 64 MB of its own, and no more than everything together
    assert b["learners"] == 1
    assert 64 < b["learner_uss_mb"] <= b["learner_pss_mb"] + 1 <= b["learners_total_pss_mb"] + 1
    assert 64 < b["learner_marginal_mb"] < b["learners_total_pss_mb"]
    assert b["accel"] in ("tcg", "kvm")
    assert 0 < b["warm_start_s"] < b["cold_boot_s"]       # a restore is no boot
    assert 0 < b["ssh_rtt_ms"] < 5000 and 0 < b["qemu_rss_mb"] < 8192
    assert b["cold_warm_ratio"] == pytest.approx(b["cold_boot_s"] / b["warm_start_s"], rel=0.05)
    assert "matrix_s" not in b                          # --no-matrix
    # Where the seconds go. The host-clock phases are always there; the guest-clock
    # ones come from dmesg and are left out when the boot messages are not found
    # (seen once in CI, cause unknown). What is there never exceeds the total.
    host_side = ("cold_host_s", "cold_qemu_s", "cold_ssh_s")
    assert all(b[k] >= 0 for k in host_side + WARM), {k: b.get(k) for k in COLD + WARM}
    found = [k for k in COLD if k in b["raw"]]
    assert sum(b["raw"][k][0] for k in found) <= b["raw"]["cold_boot_s"][0] + 0.05
    if len(found) == len(COLD):
        assert sum(b["raw"][k][0] for k in COLD) == pytest.approx(b["raw"]["cold_boot_s"][0], abs=0.05)
        assert b["cold_kernel_s"] > 0 and b["cold_init_s"] > 0
    assert sum(b["raw"][k][0] for k in WARM) <= b["raw"]["warm_start_s"][0] + 0.05
    report = subprocess.run([sys.executable, "-c", "import json, sys; from labkit.tools.bench import format_report; "
                             "print(format_report(json.load(sys.stdin)))"], input=r.stdout,
                            capture_output=True, text=True, timeout=60)
    assert "kernel, to /init" in report.stdout and "restore of the saved state" in report.stdout


DMESG = """[    0.000000] Linux version 6.1.0-x
[    3.512001] Freeing unused kernel image (initmem) memory: 2920K
[    3.520000] Run /init as init process
[    4.100000] EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.
[    9.000000] rxe0: something later
"""


def test_cold_phases_add_up_to_the_total():
    p = cold_phases(12.0, 10.5, 1.2, 8.6, DMESG)
    assert p == {"cold_host_s": 0.3, "cold_qemu_s": 1.9, "cold_kernel_s": 3.52, "cold_initramfs_s": 0.58,
                 "cold_init_s": 4.5, "cold_ssh_s": 1.2}
    assert sum(p.values()) == pytest.approx(12.0)


def test_cold_phases_leave_out_what_the_log_lacks():
    p = cold_phases(12.0, 10.5, 1.2, 8.6, "[    1.0] nothing of interest\nno stamp here Run /init as init process")
    assert set(p) == {"cold_host_s", "cold_qemu_s", "cold_ssh_s"}


def test_bench_rejects_bad_runs():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--runs", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--runs 0" in r.stderr and "Traceback" not in r.stderr


RUN = {"cold_boot_s": [6.0, 8.0, 7.0], "warm_start_s": [1.0, 2.0, 0.5], "warm_floor_s": [0.25, 0.5, 0.5],
       "reset_s": [1.1, 2.5, 0.6]}


def test_ratios_are_taken_within_each_run():
    r = ratios(RUN)
    # medians of 6/4/14 (cold/warm), 4/4/1, 1.1/1.25/1.2, 0.1/0.5/0.1 - not ratios of medians (7/1, 1/0.5)
    assert r == {"cold_warm_ratio": 6.0, "warm_over_floor": 4.0, "reset_over_warm": 1.2, "reset_minus_warm_s": 0.1}
    assert ratios({"warm_start_s": [1.0]})["warm_over_floor"] is None


def test_report_puts_ratios_first_then_figures_with_machine_and_date():
    r = {k: statistics.median(v) for k, v in RUN.items()}
    r.update(ratios(RUN), kernel="6.1", kernel_release="6.1.0-x", accel="tcg", runs=3, date="2026-12-01 18:00 UTC",
             machine={"cpu": "Test CPU", "cores": 2, "host_kernel": "6.18", "qemu": "QEMU 7.2"},
             min={k: min(v) for k, v in RUN.items()}, max={k: max(v) for k, v in RUN.items()},
             learners=3, learner_marginal_mb=700.0, ksm_run=0, matrix_all_over_one=2.69)
    text = format_report(r)
    ratio_at, abs_at = text.index("Ratios"), text.index("Absolute figures, 2026-12-01 18:00 UTC: Test CPU, 2 cores")
    assert ratio_at < abs_at < text.index("Class figures")
    lines = {ln.split("  ")[1]: ln.split() for ln in text.splitlines() if ln.startswith("  ") and "  " in ln[2:]}
    # retired targets (issue 26): the ratio is printed, with why it is not a target, never met/MISSED
    floor = " ".join(lines["warm start / its floor (QEMU start + restore)"])
    assert "restore) 4 not a target: " in floor and "MISSED" not in floor and " met" not in floor
    matrix = " ".join(lines["matrix on every kernel / on one kernel"])
    assert "kernel 2.69 not a target: " in matrix and "MISSED" not in matrix
    assert lines["reset - warm start, s"][-4:] == ["0.1", "<=", "0.2", "met"]
    assert "3 learners' VMs" in text and "KSM off" in text and "MISSED" in text.split("one more learner")[1]


def test_smaps_of_a_real_process():
    m = bench_class.smaps_mb(os.getpid())
    assert 0 < m["uss"] <= m["pss"] <= m["rss"] + 0.01


@pytest.mark.parametrize("args, expect", [(["--learners", "-1"], "--learners -1"),
                                          (["--grade", "/nonexistent.ipynb"], "no such notebook")])
def test_bench_rejects_bad_class_options(args, expect):
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr


def test_doctor_recommends_ksm_for_a_class_host(tmp_path):
    from labkit.tools.doctor import ksm_check
    run = tmp_path / "run"
    run.write_text("0\n")
    off = ksm_check(str(run))
    assert not off.ok and not off.required and f"echo 1 | sudo tee {run}" in off.detail
    run.write_text("1\n")
    assert ksm_check(str(run)).ok
    assert ksm_check(str(tmp_path / "absent")).ok      # no KSM in the host kernel: nothing to advise


SMAPS = """7f0000000000-7f0040000000 rw-p 00000000 00:00 0 
Size:            1048576 kB
Rss:              409600 kB
7f1000000000-7f1040000000 rwxp 00000000 00:00 0 
Size:            1048576 kB
Rss:              262144 kB
7f2000000000-7f2020000000 rw-s 00000000 08:01 1234                       /s/pmem0.img
Size:             524288 kB
Rss:               10240 kB
55d000000000-55d000100000 r-xp 00000000 08:01 99                         /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                1024 kB
"""


def test_qemu_memory_split_by_mapping():
    assert bench_class.qemu_memory_split(SMAPS, 1024) == {"guest_ram": 400.0, "tcg_cache": 256.0, "other": 11.0}


def test_first_run_counts_received_bytes_of_every_interface_but_loopback(tmp_path):
    from labkit.tools.first_run import received_bytes
    dev = tmp_path / "dev"
    dev.write_text("Inter-|   Receive                                                |  Transmit\n"
                   " face |bytes    packets errs drop fifo frame compressed multicast|bytes\n"
                   "    lo: 5000      10    0    0    0     0          0         0     5000\n"
                   "  eth0: 1048576  900    0    0    0     0          0         0     77\n"
                   "  eth1:12345     3    0    0    0     0          0         0     0\n")
    assert received_bytes(str(dev)) == 1048576 + 12345


def test_first_run_needs_a_git_checkout(tmp_path):
    from labkit.errors import ConfigError
    from labkit.tools.first_run import measure
    with pytest.raises(ConfigError, match="not one; run it from a git checkout"):
        measure(lambda s: None, source=tmp_path)
