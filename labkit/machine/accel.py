"""Choose the accelerator: KVM only when a guest really runs under it.

On some hosts ``/dev/kvm`` opens and ``KVM_CREATE_VM`` succeeds, yet a guest
never executes (nested virtualisation without vmx/svm). On others the
firmware runs under KVM (real and 32-bit protected mode) but a 64-bit kernel
stops where it switches to long mode: the kernel prints "Probing EDD" and
nothing more. So the probe boots, for a bounded time, a guest kernel of the
lab's own images under KVM and waits for its first line from long mode
("Linux version"); with no image built yet it can only run QEMU's firmware
(SeaBIOS saying it found no boot device), a weaker verdict that is probed
again once a kernel is there. Anything else means TCG. The verdict is cached
per host kernel, QEMU binary and probe kind.
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit.settings import Settings
from labkit.timeout import Deadline

PROBE_SECONDS = 6.0


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator and why it was chosen (shown to the learner)."""

    accel: str
    reason: str

    def __str__(self) -> str:
        return f"{self.accel.upper()} ({self.reason})"


def probe_argv(qemu: str, kernel: Path | None = None) -> list[str]:
    """QEMU's command line for the probe: a guest kernel on the serial port, or (no kernel) the firmware's
    debug port."""
    base = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-nodefaults", "-no-user-config",
            "-display", "none"]
    if kernel is not None:
        return base + ["-m", "256", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
                       "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"]
    return base + ["-m", "64", "-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]


def probe_kernel(settings: Settings) -> Path | None:
    """A guest kernel of the lab's built images to probe with, if any is built."""
    try:
        found = sorted(settings.images_dir.glob("*/vmlinuz"))
    except OSError:
        return None
    return found[0] if found else None


def probe_kvm(qemu: str = "qemu-system-x86_64", seconds: float = PROBE_SECONDS,
              kernel: Path | None = None) -> AccelChoice:
    """Really run a tiny KVM guest; return kvm only if it got where it must: a kernel's first line from
    64-bit long mode, or (no kernel given) the end of the firmware."""
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "no /dev/kvm on this host")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is not accessible (add yourself to the kvm group)")
    if shutil.which(qemu) is None:
        return AccelChoice("tcg", f"{qemu} not found")
    proc = subprocess.Popen(probe_argv(qemu, kernel), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    goal = b"Linux version" if kernel is not None else b"No bootable device"
    out = b""
    deadline = Deadline(seconds)
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not deadline.expired:
            if not sel.select(timeout=deadline.remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if goal in out:
                what = "booted a kernel to 64-bit mode" if kernel is not None else "ran its firmware"
                return AccelChoice("kvm", f"a KVM test guest {what} in {deadline.elapsed:.1f} s")
    finally:
        proc.kill()
        proc.wait(timeout=5)
    if kernel is not None and out.strip():
        return AccelChoice("tcg", f"KVM runs a guest's firmware, but a 64-bit kernel under it stopped before "
                                  f"its first line for {seconds:.0f} s (nested virtualisation without vmx/svm?); "
                                  "using software emulation")
    if b"Running on KVM" in out:
        return AccelChoice("tcg", f"KVM is present but a test guest hung for {seconds:.0f} s "
                                  "(nested virtualisation without vmx/svm?)")
    text = out.decode(errors="replace").strip().splitlines()
    return AccelChoice("tcg", kvm_failure_words(text[-1] if text else ""))


def kvm_failure_words(last_line: str) -> str:
    """Plain words for why a KVM test guest failed, from QEMU's last line."""
    if not last_line:
        return "KVM is present but a test guest under it printed nothing and stopped; using software emulation"
    if "Assertion" in last_line or "kvm_" in last_line:
        return ("KVM is present but QEMU crashed setting up a guest under it (usually nested virtualisation "
                "that does not pass the CPU features through); using software emulation. QEMU said: "
                + last_line.split(": ", 1)[-1][:160])
    return "KVM is present but a test guest could not run under it; using software emulation. QEMU said: " \
        + last_line[:160]


def _cache_key(qemu: str) -> str:
    path = shutil.which(qemu) or qemu
    try:
        st = os.stat(path)
        ident = f"{path}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        ident = path
    return f"{platform.release()}|{ident}"


def choose_accel(settings: Settings, qemu: str = "qemu-system-x86_64", use_cache: bool = True) -> AccelChoice:
    """The accelerator to use: ``settings.accel`` (``LABKIT_ACCEL``) if set,
    else the probe, cached in ``settings.cache_dir``."""
    if settings.accel:
        return AccelChoice(settings.accel, "set by LABKIT_ACCEL")
    cache = settings.cache_dir / "accel.json"
    kernel = probe_kernel(settings)
    # a verdict from the firmware alone is probed again once a kernel is built
    key = _cache_key(qemu) + ("|kernel" if kernel is not None else "|firmware")
    if use_cache:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return AccelChoice(data["accel"], data["reason"] + " (cached)")
        except (OSError, ValueError, KeyError):
            pass
    choice = probe_kvm(qemu, kernel=kernel)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, **asdict(choice)}))
    except OSError:
        pass
    return choice

