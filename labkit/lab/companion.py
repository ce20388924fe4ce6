"""Companion VMs: the second guest, of another kernel, that a comparison
measures next to the lab VM (notebook 06's matrix, notebook 09's ODP story).

One place says what a companion is called and which kernel it runs, for a
given lab VM name and kernel: ``matrices_on_two_kernels`` and
``story_on_two_kernels`` attach to (or start) exactly that VM, and the
summative grader starts exactly that VM outside its sandbox before the
notebook runs, so the notebook attaches instead of booting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from labkit.errors import ConfigError
from labkit.image.kernels import KERNELS, check_kernel


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


# kind -> (the default other kernel for this VM's kernel, the companion's name for (vm name, other kernel))
COMPANION_KINDS: dict[str, tuple[Callable[[str], str], Callable[[str, str], str]]] = {
    "matrix": (_first_other, lambda name, other: f"{name}-other"),
    "odp": (_odp_other, lambda name, other: f"{name}-k{other.replace('.', '')}"),
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
