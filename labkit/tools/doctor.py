"""`labkit doctor`: can this host run the lab, and if not, what to fix."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

from labkit.image import build as image
from labkit.machine import snapshot
from labkit.machine.accel import choose_accel
from labkit.settings import Settings, resolve

MIN_QEMU = (7, 0)
MIN_FREE_GB = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def qemu_version(binary: str = "qemu-system-x86_64") -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def run_checks(kernels: tuple[str, ...] = (image.DEFAULT_KERNEL,), settings: Settings | None = None) -> list[Check]:
    settings = resolve(settings)     # an entry point: the command line passes the settings it resolved
    checks: list[Check] = []
    ver = qemu_version()
    if ver is None:
        checks.append(Check("qemu", False, "qemu-system-x86_64 not found",
                            "sudo apt-get install qemu-system-x86 qemu-utils (or run `make lab`)"))
    else:
        vs = ".".join(map(str, ver))
        checks.append(Check("qemu", ver >= MIN_QEMU, f"qemu-system-x86_64 {vs}",
                            f"QEMU {'.'.join(map(str, MIN_QEMU))} or newer is needed"))
    checks.append(Check("qemu-img", shutil.which("qemu-img") is not None, "disk overlays",
                        "sudo apt-get install qemu-utils"))
    choice = choose_accel(settings)
    checks.append(Check("accelerator", True, str(choice)))
    checks.append(_builder_check())
    for k, v in image.KERNELS.items():
        status, img = image.image_status(k, settings)
        detail = f"kernel {k} ({v.suite}): {status}" + (f" ({img.kernel_release})" if img else "")
        if status == "missing" and k not in kernels:
            detail += ("; built on first use (about a minute)" if settings.auto_build
                       else "; not built here (LABKIT_AUTO_BUILD=0): notebooks that start it stop with that error")
        fix = f"labkit image build --kernel {k}" + (" --force" if status == "corrupt" else "")
        if not settings.auto_build and status != "ok":
            fix = f"ask whoever runs this host to install it (e.g. labkit class install --kernels {k})"
        checks.append(Check(f"image {k}", status == "ok", detail, fix, required=k in kernels))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        checks.append(Check("ports", True, "can bind a free port on 127.0.0.1 for SSH forwarding"))
    except OSError as exc:
        checks.append(Check("ports", False, f"cannot bind on 127.0.0.1: {exc}", "check the loopback interface"))
    state = settings.state_dir
    probe = state if state.exists() else next((p for p in state.parents if p.exists()), state.anchor)
    free_gb = shutil.disk_usage(probe).free / 2**30
    newest: dict[str, snapshot.Snapshot] = {}
    for sn in snapshot.list_snapshots(settings):
        k = str(sn.meta.get("kernel"))
        if k in kernels and sn.meta.get("created_at", 0) >= newest.get(k, sn).meta.get("created_at", 0):
            newest[k] = sn
    checks.append(Check("warm start", True,
                        "; ".join(f"{k}: snapshot of {sn.meta.get('kernel_release')}, "
                                  f"{sn.meta.get('state_bytes', 0) // 2**20} MiB, in {settings.cache_dir}"
                                  for k, sn in sorted(newest.items()))
                        or ("no snapshot yet: the first VM start boots cold and makes one, "
                            "later starts restore it in about a second" if settings.warm_start
                            else "off (LABKIT_WARM_START=0): every VM start boots cold"), required=False))
    checks.append(_snapshot_space_check(settings))
    checks.append(ksm_check())
    checks.append(Check("disk", free_gb >= MIN_FREE_GB, f"{free_gb:.1f} GiB free for VM state in {state}",
                        f"free at least {MIN_FREE_GB:.0f} GiB or set LABKIT_STATE_DIR elsewhere"))
    return checks


def _builder_check() -> Check:
    """mmdebstrap builds the image; as a normal user it needs newuidmap (package uidmap)."""
    if shutil.which("mmdebstrap") is None:
        return Check("mmdebstrap", False, "not installed: cannot build the guest image",
                     "sudo apt-get install mmdebstrap", required=False)
    if os.geteuid() != 0 and shutil.which("newuidmap") is None:
        return Check("mmdebstrap", False, "installed, but a build as a normal user needs newuidmap "
                     "(user namespaces), which is missing", "sudo apt-get install uidmap", required=False)
    mode = "as root" if os.geteuid() == 0 else "as this user (unshare mode, newuidmap present)"
    return Check("mmdebstrap", True, f"builds the guest image {mode}", required=False)


def _snapshot_space_check(settings: Settings) -> Check:
    """Room for warm-start snapshots; half-written ones of killed processes are removed first."""
    where = snapshot.snapshots_dir(settings)
    swept = snapshot.sweep_stale_tmp(settings) if where.exists() else []
    free = snapshot.free_mb(where)
    note = f" (removed {len(swept)} half-written snapshot(s) left by killed processes)" if swept else ""
    return Check("snapshots", free >= snapshot.NEEDS_MB,
                 f"{free} MiB free in {where} (a warm-start snapshot needs about {snapshot.NEEDS_MB} MiB){note}",
                 f"free space there or set LABKIT_CACHE_DIR to a disk with {snapshot.NEEDS_MB} MiB free; "
                 "until then every start boots cold")


KSM_RUN = "/sys/kernel/mm/ksm/run"


def ksm_check(run_file: str = KSM_RUN) -> Check:
    """KSM: learners' VMs restored from one snapshot start with the same RAM
    (kernel, page cache, modules) and QEMU marks guest RAM mergeable, so on a
    class host KSM turns those copies into one. Advice, never required."""
    try:
        with open(run_file) as fh:
            run = fh.read().strip()
    except OSError:
        return Check("ksm", True, "this host kernel has no KSM (one learner per host is fine without it)",
                     required=False)
    if run == "1":
        return Check("ksm", True, "on: learners' VMs restored from one snapshot share their identical pages",
                     required=False)
    fix = f"echo 1 | sudo tee {run_file}"
    return Check("ksm", False, "off: fine for one learner; on a class host (several learners' VMs) turn it on "
                 f"(`{fix}`) to merge the pages their guests share; docs/performance.md says how to "
                 "measure what it saves", fix, required=False)


def report(checks: list[Check]) -> tuple[str, bool]:
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{mark}] {c.name:12s} {c.detail}")
    problems = [c for c in checks if not c.ok and c.required]
    if problems:
        lines.append("")
        lines.append("To fix:")
        lines += [f"  - {c.name}: {c.fix}" for c in problems]
    else:
        lines.append("")
        lines.append("The lab can run.")
    return "\n".join(lines), not problems
