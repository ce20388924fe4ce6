"""Companion VMs: the second guest, of another kernel, that a comparison
measures next to the lab VM (notebook 06's matrix, notebook 09's ODP story).

One place says what a companion is called and which kernel it runs, for a
given lab VM name and kernel: ``matrices_on_two_kernels`` and
``story_on_two_kernels`` attach to (or start) exactly that VM, and the
summative grader starts exactly that VM outside its sandbox before the
notebook runs, so the notebook attaches instead of booting.

One runner, ``beside``, measures here and on the companion at the same time,
and leaves no thread behind: when the time is up (or the measurement here
fails) the companion's QEMU is stopped and the thread joined, within a bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from labkit.errors import ConfigError, GuestTimeout, LabError
from labkit.image.kernels import KERNELS, check_kernel

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
COMPANION_TIMEOUT = 600.0       # the companion's start and measurement
CANCEL_TIMEOUT = 60.0           # stopping it and joining its thread after that


@dataclass(frozen=True)
class Companion:
    """The VM a comparison of kind ``kind`` needs next to a lab VM."""

    kind: str
    name: str
    kernel: str


def _first_other(kernel: str) -> str:
    return next(k for k in KERNELS if k != kernel)


def _odp_other(kernel: str) -> str:
    return "7.3" if kernel != "7.3" else "6.1"     # the kernel with rxe's ODP, or the oldest one to compare


# the kernel before v5.11 moved the fs-dax test into check_vma_flags() (notebook 10)
BEFORE_511 = "5.10"


def _before_511(kernel: str) -> str:
    return BEFORE_511


# kind -> (the default other kernel for this VM's kernel, the companion's name for (vm name, other kernel))
COMPANION_KINDS: dict[str, tuple[Callable[[str], str], Callable[[str, str], str]]] = {
    "matrix": (_first_other, lambda name, other: f"{name}-other"),
    "odp": (_odp_other, lambda name, other: f"{name}-k{other.replace('.', '')}"),
    # notebook 08's second fence: a 7.3 guest of its own, since loading a lab module taints it
    "fences": (lambda kernel: "7.3", lambda name, other: f"{name}-cf{other.replace('.', '')}"),
    "before511": (_before_511, lambda name, other: f"{name}-k{other.replace('.', '')}"),
}


def companion(kind: str, vm_name: str, kernel: str, other_kernel: str | None = None) -> Companion:
    """The companion of kind ``kind`` (a key of ``COMPANION_KINDS``) for the VM
    ``vm_name`` running ``kernel``; ``other_kernel`` overrides its kernel.
    ConfigError for an unknown kind or kernel, or one that equals ``kernel``."""
    if kind not in COMPANION_KINDS:
        raise ConfigError(f"unknown companion kind {kind!r}", hint="one of: " + ", ".join(COMPANION_KINDS))
    default, name = COMPANION_KINDS[kind]
    other = check_kernel(other_kernel or default(kernel))
    if other == kernel:
        raise ConfigError(f"the other kernel must differ from this VM's ({kernel})",
                          hint="choose one of: " + ", ".join(k for k in KERNELS if k != kernel))
    return Companion(kind, name(vm_name, other), other)


def needed(kind: str, kernel: str) -> bool:
    """False when a VM running ``kernel`` is already what a companion of ``kind``
    would run (notebook 10's 5.10 guest, when the lab VM itself runs 5.10)."""
    default, _ = COMPANION_KINDS[kind]
    return default(kernel) != kernel


def attach(kind: str, vm: Any) -> Any:
    """The VM a companion of ``kind`` names for the running ``vm``: ``vm`` itself
    when it already runs that kernel, else the companion, attached when it runs
    (the grader starts it before the notebook) or started (a persistent VM the
    notebook stops at its end)."""
    from labkit.machine import vm as machine

    kernel = vm.describe()["kernel"]
    if not needed(kind, kernel):
        return vm
    peer = companion(kind, vm.name, kernel)
    log.debug("attaching companion %s (%s) of %s", peer.name, peer.kernel, vm.name)
    return machine.connect(name=peer.name, kernel=peer.kernel)


def beside(peer: Companion, here: Callable[[], T], there: Callable[[Any], U],
           timeout: float = COMPANION_TIMEOUT) -> tuple[T, U, Any]:
    """``here()`` in this thread while a thread attaches to (or starts) the
    companion VM ``peer`` and runs ``there(vm)``; returns ``(here, there, vm)``
    and the caller stops ``vm``. When ``there`` has not finished ``timeout``
    seconds after the start, or ``here`` fails, the companion is stopped (a
    boot in progress killed) and the thread joined before this returns:
    GuestTimeout for the time, the original error otherwise."""
    from labkit.machine import vm as machine

    box: dict[str, Any] = {}

    def run_there() -> None:
        try:
            box["vm"] = machine.connect(name=peer.name, kernel=peer.kernel)
            box["result"] = there(box["vm"])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run_there, name=f"labkit-companion-{peer.name}", daemon=True)
    deadline = time.monotonic() + timeout
    thread.start()
    log.debug("companion %s (%s) started in %s", peer.name, peer.kernel, thread.name)
    try:
        mine = here()
        thread.join(max(0.0, deadline - time.monotonic()))
    except BaseException:
        _cancel(peer, thread, box)
        raise
    if thread.is_alive():
        _cancel(peer, thread, box)
        raise GuestTimeout(f"the companion VM {peer.name} (kernel {peer.kernel}) to start and measure", timeout)
    if "error" in box:
        raise box["error"]
    return mine, box["result"], box["vm"]


def _cancel(peer: Companion, thread: threading.Thread, box: dict[str, Any]) -> None:
    """Stop the companion and join its thread, within ``CANCEL_TIMEOUT``."""
    from labkit.machine import vm as machine
    from labkit.settings import from_environment

    # Not box["vm"].stop(): while the thread boots, the VM object is not ours and its lifecycle
    # lock is held; killing the QEMU of that state dir makes the boot (or the measurement) fail.
    settings = from_environment()     # the companion's VM resolves the same (labkit.VM is an edge)
    elsewhere = peer.name in settings.managed_vms
    if elsewhere:
        log.info("companion %s belongs to another process (the grader): not stopping it", peer.name)
    deadline = time.monotonic() + CANCEL_TIMEOUT
    while thread.is_alive() and time.monotonic() < deadline:
        if not elsewhere:
            log.debug("cancelling companion %s: killing its QEMU", peer.name)
            machine.VM(peer.name, kernel=peer.kernel, persistent=True).kill()
        thread.join(2.0)      # again: a QEMU spawned after the kill above is killed on the next round
    if thread.is_alive():
        log.warning("the companion thread for %s did not end within %.0f s", peer.name, CANCEL_TIMEOUT)
        return
    vm = box.get("vm")
    if vm is not None:
        try:
            vm.stop()
        except LabError as exc:
            log.warning("stopping the companion %s after a cancel: %s", peer.name, exc)
