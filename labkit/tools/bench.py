"""``labkit bench``: the lab's speed and memory, measured one after the other
on this machine, so the figures in the README can be reproduced.

Per run: a cold boot to SSH-ready (and where its seconds go), a warm start (restore of the snapshot) to
SSH-ready, a reset, SSH round trips, the full pin matrix on the warm guest
and QEMU's resident memory. Medians and min-max over the runs are reported
next to the targets; the targets are figures to compare, not pass/fail.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from labkit.image.build import ensure_image
from labkit.machine import snapshot
from labkit.machine.vm import VM

TARGETS = {"cold_boot_s": 6.0, "warm_start_s": 1.0, "reset_s": 1.0, "matrix_s": 15.0, "qemu_rss_mb": 400.0}
LABELS = {
    "cold_boot_s": ("cold boot to SSH-ready", "s"),
    "cold_host_s": ("  host: image check, disk overlay, spawn", "s"),
    "cold_qemu_s": ("  QEMU start and firmware", "s"),
    "cold_kernel_s": ("  kernel, to /init", "s"),
    "cold_initramfs_s": ("  initramfs, to the root filesystem", "s"),
    "cold_init_s": ("  init: network, nvdimm modules, sshd", "s"),
    "cold_ssh_s": ("  first SSH connect", "s"),
    "warm_start_s": ("warm start to SSH-ready", "s"),
    "warm_disk_s": ("  disk overlay", "s"),
    "warm_qemu_s": ("  QEMU start", "s"),
    "warm_restore_s": ("  restore of the saved state", "s"),
    "warm_ssh_s": ("  SSH connect", "s"),
    "warm_nvdimm_s": ("  NVDIMMs probed, clock set", "s"),
    "reset_s": ("reset (running guest -> prepared)", "s"),
    "ssh_rtt_ms": ("SSH round trip (`true`)", "ms"),
    "matrix_first_s": ("pin matrix, fresh pmem (mkfs included)", "s"),
    "matrix_s": ("pin matrix, warm guest, lab prepared", "s"),
    "qemu_rss_mb": ("QEMU resident memory at the end", "MB"),
    "qemu_rss_peak_mb": ("QEMU peak resident memory", "MB"),
    "qemu_rss_anon_mb": ("  of which anonymous (guest RAM, TCG cache)", "MB"),
    "qemu_rss_file_mb": ("  of which file-backed (NVDIMM pages, binaries)", "MB"),
}


def _rss_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile (+RssShmem) of a process in MB, from /proc."""
    vals = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                vals[key] = int(rest.split()[0]) / 1024
    return {"qemu_rss_mb": round(vals["VmRSS"], 1), "qemu_rss_peak_mb": round(vals["VmHWM"], 1),
            "qemu_rss_anon_mb": round(vals["RssAnon"], 1),
            "qemu_rss_file_mb": round(vals["RssFile"] + vals.get("RssShmem", 0), 1)}


# Kernel messages that end a cold boot's phases (both kernels print them).
INIT_STARTED = "Run /init as init process"
ROOT_MOUNTED = "EXT4-fs (vda): mounted filesystem"


WARM_PHASES = {"disk overlay": "warm_disk_s", "qemu start": "warm_qemu_s", "restore": "warm_restore_s",
               "ssh connect": "warm_ssh_s", "nvdimms ready": "warm_nvdimm_s"}


def _stamp(dmesg: str, text: str) -> float | None:
    """The printk time (seconds since the kernel started) of the first line containing ``text``."""
    for line in dmesg.splitlines():
        if text in line and line.startswith("[") and "]" in line:
            try:
                return float(line[1:line.index("]")])
            except ValueError:
                return None
    return None


def cold_phases(total_s: float, boot_to_ready_s: float, ssh_connect_s: float, uptime_at_ready_s: float,
                dmesg: str) -> dict[str, float]:
    """Where a cold boot's ``total_s`` seconds go, from the host's clock
    (spawn to the guest's ready marker, then the SSH connect) and the guest's
    own (printk times, uptime when init said ready). Phases that cannot be
    found are left out."""
    out = {"cold_host_s": total_s - boot_to_ready_s - ssh_connect_s,
           "cold_qemu_s": boot_to_ready_s - uptime_at_ready_s, "cold_ssh_s": ssh_connect_s}
    t_init, t_root = _stamp(dmesg, INIT_STARTED), _stamp(dmesg, ROOT_MOUNTED)
    if t_init is not None:
        out["cold_kernel_s"] = t_init
        if t_root is not None and t_root >= t_init:
            out["cold_initramfs_s"] = t_root - t_init
            out["cold_init_s"] = uptime_at_ready_s - t_root
    return {k: round(max(v, 0.0), 3) for k, v in out.items()}


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "host_kernel": platform.release(),
            "qemu": snapshot.qemu_version()}


def run(kernel: str, runs: int = 3, matrix: bool = True,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure; returns medians, min/max, raw values and the machine."""
    say = progress or (lambda s: None)
    ensure_image(kernel)
    raw: dict[str, list[float]] = {k: [] for k in LABELS}
    say(f"making sure the warm-start snapshot for {kernel} exists (not timed)")
    with VM("bench-prime", kernel=kernel) as vm:
        accel = vm.accel.accel if vm.accel else None
        release = vm.boot.kernel_release if vm.boot else None
    for i in range(1, runs + 1):
        step = functools.partial(_say_run, say, f"run {i}/{runs}")
        _cold_run(kernel, raw, step)
        _warm_run(kernel, raw, matrix, step)
    return _summary(raw, kernel, runs, accel, release)


def _say_run(say: Callable[[str], None], prefix: str, what: str) -> None:
    say(f"{prefix}: {what}")


def _cold_run(kernel: str, raw: dict[str, list[float]], step: Callable[[str], None]) -> None:
    """One cold boot to SSH-ready, and where its seconds went."""
    step("cold boot")
    t = time.monotonic()
    with VM("bench-cold", kernel=kernel, warm=False) as cold:
        raw["cold_boot_s"].append(time.monotonic() - t)
        if cold.record.phases and cold.boot:      # not timed: read the guest's own clock
            dmesg = cold.run(["dmesg"], timeout=30, check=True).stdout
            for k, v in cold_phases(raw["cold_boot_s"][-1], cold.record.phases["boot to ready marker"],
                                    cold.record.phases["ssh connect"], cold.boot.guest_uptime_s, dmesg).items():
                raw[k].append(v)


def _warm_run(kernel: str, raw: dict[str, list[float]], matrix: bool, step: Callable[[str], None]) -> None:
    """A warm start, SSH round trips, the matrix, a reset, the matrix again, QEMU's memory."""
    step("warm start")
    t = time.monotonic()
    vm = VM("bench-warm", kernel=kernel).start()
    try:
        raw["warm_start_s"].append(time.monotonic() - t)
        for name, v in (vm.record.phases or {}).items():
            if name in WARM_PHASES:
                raw[WARM_PHASES[name]].append(v)
        step("SSH round trips")
        raw["ssh_rtt_ms"].append(_ssh_rtt_ms(vm))
        if matrix:
            step("pin matrix on fresh persistent memory")
            raw["matrix_first_s"].append(_timed_matrix(vm))
        step("reset (persistent memory kept)")
        t = time.monotonic()
        vm.reset()
        raw["reset_s"].append(time.monotonic() - t)
        if matrix:
            step("pin matrix on the reset guest (namespaces and filesystems kept)")
            raw["matrix_s"].append(_timed_matrix(vm))
        for k, v in _rss_mb(vm.record.pid).items():
            raw[k].append(v)
    finally:
        vm.finish()


def _ssh_rtt_ms(vm: VM, n: int = 20) -> float:
    rtts = []
    for _ in range(n):
        t = time.monotonic()
        vm.run("true", timeout=10, check=True)
        rtts.append(time.monotonic() - t)
    return statistics.median(rtts) * 1000


def _timed_matrix(vm: VM) -> float:
    from labkit.lab import Lab
    t = time.monotonic()
    Lab(vm).matrix()
    return time.monotonic() - t


def _summary(raw: dict[str, list[float]], kernel: str, runs: int, accel: str | None,
             release: str | None) -> dict[str, Any]:
    med = {k: round(statistics.median(v), 3 if k.endswith("_s") else 1) for k, v in raw.items() if v}
    out: dict[str, Any] = dict(med)
    out.update(
        accel=accel, kernel=kernel, kernel_release=release, runs=runs,
        cold_warm_ratio=round(med["cold_boot_s"] / med["warm_start_s"], 1) if med.get("warm_start_s") else None,
        min={k: round(min(v), 3) for k, v in raw.items() if v},
        max={k: round(max(v), 3) for k, v in raw.items() if v},
        raw={k: [round(x, 3) for x in v] for k, v in raw.items() if v},
        targets=TARGETS, machine=machine())
    return out


W = max(len(label) for label, _ in LABELS.values())      # the label column


def format_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"labkit bench: kernel {r['kernel_release']} ({r['kernel']}), accelerator {r['accel']}, "
             f"{r['runs']} run(s)",
             f"machine: {m['cpu']}, {m['cores']} cores, host {m['host_kernel']}, {m['qemu']}", "",
             f"  {'':{W}s} {'median':>10s} {'min - max':>19s}  target"]
    for key, (label, unit) in LABELS.items():
        if key not in r:
            continue
        tgt = TARGETS.get(key)
        mark = "" if tgt is None else (f"<= {tgt:g} {unit}  " + ("met" if r[key] <= tgt else "MISSED"))
        if key == "qemu_rss_mb" and "matrix_s" not in r:
            mark = "(target is after the matrix; --no-matrix given)"
        lines.append(f"  {label:{W}s} {r[key]:>7.4g} {unit:2s} {r['min'][key]:>9.4g} - {r['max'][key]:<9.4g} {mark}")
    if r.get("cold_warm_ratio"):
        lines.append(f"  {'cold / warm':{W}s} {r['cold_warm_ratio']:>7g} x{'':22s} >= 6 x  "
                     + ("met" if r["cold_warm_ratio"] >= 6 else "MISSED"))
    return "\n".join(lines)
