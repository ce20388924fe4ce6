"""Which kernel packages an image build unpacks, resolved with the mirror's
own metadata (``apt-cache depends`` in the build chroot).

A metapackage (``linux-image-amd64``) is followed to the real image package
(``linux-image-<release>``). Up to Linux 6.x that one package holds the kernel
and its modules; from 7.x Debian splits it, and ``linux-image-<release>``
depends on ``linux-base-<release>`` (modules.order, modules.builtin, config,
System.map), ``linux-binary-<release>`` (vmlinuz) and
``linux-modules-<release>`` (the modules). All of them are unpacked.

Used by ``images/customize.sh`` (``python -m labkit.image.kernelpkg``); the
selection is a pure function over a ``depends`` lookup so it is unit-tested.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from labkit.errors import ImageBuildError

SPLIT_PARTS = ("base", "binary", "modules")
MAX_HOPS = 4

Depends = Callable[[str], list[str]]


def parse_depends(text: str) -> list[str]:
    """Hard dependencies from ``apt-cache depends`` output (alternatives marked
    '|' and virtual '<names>' are left out)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Depends:", "PreDepends:") and not parts[1].startswith("<"):
            out.append(parts[1])
    return out


def image_package(requested: str, depends: Depends) -> str:
    """Follow metapackages from ``requested`` to the package named after a release."""
    pkg = requested
    for _ in range(MAX_HOPS):
        nxt = next((d for d in depends(pkg) if d.startswith("linux-image-")), None)
        if nxt is None:
            return pkg
        pkg = nxt
    raise ImageBuildError(f"{requested}: more than {MAX_HOPS} linux-image- metapackages in a row")


def split_parts(image_pkg: str, deps: list[str]) -> list[str]:
    """The split-kernel packages of ``image_pkg`` among its dependencies, in a fixed order."""
    suffix = image_pkg.removeprefix("linux-image-")
    wanted = [f"linux-{part}-{suffix}" for part in SPLIT_PARTS]
    return [w for w in wanted if w in deps]


def kernel_debs(requested: str, depends: Depends) -> list[str]:
    """Every package to unpack for ``requested``, the image package first."""
    pkg = image_package(requested, depends)
    return [pkg, *split_parts(pkg, depends(pkg))]


def chroot_depends(root: Path, suite: str = "") -> Depends:
    """A ``depends`` lookup that asks apt inside the build chroot."""
    opts = ["-o", f"APT::Default-Release={suite}"] if suite else []

    def depends(pkg: str) -> list[str]:
        r = subprocess.run(["chroot", str(root), "apt-cache", *opts, "depends", "--important", pkg],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ImageBuildError(f"apt-cache depends {pkg} failed: {r.stderr.strip()}")
        return parse_depends(r.stdout)
    return depends


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the build chroot")
    ap.add_argument("--suite", default="", help="take the kernel from this suite")
    ap.add_argument("package", help="kernel package or metapackage")
    args = ap.parse_args(argv)
    try:
        debs = kernel_debs(args.package, chroot_depends(args.root, args.suite))
    except ImageBuildError as exc:
        print(f"labkit.image.kernelpkg: {exc}", file=sys.stderr)
        return 1
    print("\n".join(debs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
