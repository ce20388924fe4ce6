"""The kernel variants the lab can boot: one row per kernel.

Each row names the Debian userland suite, any extra suites the kernel needs,
and the kernel package (a metapackage is fine: the build follows it to the
real image package with the mirror's own metadata, so no ABI string is
written here). Adding the next kernel is adding a row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labkit.errors import ConfigError


@dataclass(frozen=True)
class KernelVariant:
    """One guest kernel and the Debian suites its image is built from."""

    name: str                       # what the learner types: --kernel 7.3
    suite: str                      # the userland's suite (mmdebstrap's SUITE)
    package: str                    # kernel package to resolve and unpack
    extra_suites: tuple[str, ...] = ()
    package_suite: str = ""         # take the kernel from this suite (apt's Default-Release)
    notes: str = ""

    def recipe_key(self) -> str:
        """What of the row goes into the recipe hash (not the notes: editing
        them must not rebuild anything)."""
        key = f"suite={self.suite} kernel={self.name} package={self.package}"
        if self.extra_suites or self.package_suite:
            key += f" extra={','.join(self.extra_suites)} from={self.package_suite}"
        return key

    def release_matches(self, release: str) -> bool:
        """True if ``uname -r`` text belongs to this variant ('6.1' matches
        '6.1.0-37-amd64' but not '6.12.38+deb12-amd64')."""
        return re.match(rf"{re.escape(self.name)}(?:[.+\-]|$)", release) is not None


VARIANTS: tuple[KernelVariant, ...] = (
    KernelVariant("6.1", "bookworm", "linux-image-amd64",
                  notes="Debian 12's own kernel; still prints XFS's EXPERIMENTAL DAX warning"),
    KernelVariant("6.12", "bookworm", "linux-image-6.12-amd64",
                  notes="from bookworm-security (in the host's sources); FOLL_PIN for O_DIRECT"),
    KernelVariant("7.3", "trixie", "linux-image-amd64",
                  extra_suites=("trixie-backports",), package_suite="trixie-backports",
                  notes="trixie userland + trixie-backports kernel; rxe has on-demand paging (v6.15)"),
    # Last, not first: the rows' order is the order tables show them and which kernel is
    # "the other one" beside 6.1; 5.10 came later to the lab, as the kernel before v5.11.
    KernelVariant("5.10", "bullseye", "linux-image-amd64",
                  notes="Debian 11's own kernel, before v5.11 moved the fs-dax test into check_vma_flags(); "
                        "bullseye userland (Python 3.9)"),
)

KERNELS: dict[str, KernelVariant] = {v.name: v for v in VARIANTS}
DEFAULT_KERNEL = "6.1"


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if it names a variant, else a ConfigError listing them."""
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel variant {kernel!r}",
                          hint="choose one of: " + ", ".join(KERNELS))
    return kernel


def variant(kernel: str) -> KernelVariant:
    return KERNELS[check_kernel(kernel)]
