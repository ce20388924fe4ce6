"""Build the guest's tiny initramfs: busybox, an init script, and the modules
needed to mount the root disk, in dependency order.

Used by ``images/customize.sh`` during an image build (``python -m
labkit.initramfs``). The module resolution is a pure function over the text of
``modules.dep`` so it can be unit-tested without a kernel at hand. The archive
is written with Debian's ``cpio`` so files are owned by root without needing
root.
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from labkit.errors import ImageBuildError

# What mounts the root disk, in load order. A trailing '?' marks a module that
# is loaded when the kernel has it as a module and skipped when it does not:
# 6.x's ext4 asks the crypto API for crc32c at mount time (nothing in the
# initramfs could modprobe it then), while 7.x computes crc32c in the built-in
# CRC library and has no crc32c_generic at all.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic?", "ext4")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (relative path, [dependency paths]) from modules.dep."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[module_name(path)] = (path.strip(), deps.split())
    return table


def module_name(path: str) -> str:
    """'kernel/fs/ext4/ext4.ko.xz' -> 'ext4' (dashes and underscores are one)."""
    base = os.path.basename(path.strip())
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def load_order(dep_text: str, builtin_text: str, wanted: list[str]) -> list[str]:
    """Paths of the modules to insmod, dependencies first, each once.

    Names that are built into the kernel (modules.builtin) need no loading;
    an unknown name is an error naming it, unless it ends in '?' (optional).
    """
    table = parse_modules_dep(dep_text)
    builtin = {module_name(p) for p in builtin_text.split()}
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path, deps = table[name]
        # modules.dep lists direct and indirect dependencies; the last entry
        # has to be loaded first.
        for dep in reversed(deps):
            visit(by_path.get(dep, module_name(dep)))
        order.append(path)

    for raw in wanted:
        optional = raw.endswith("?")
        name = raw.removesuffix("?").replace("-", "_")
        if name in builtin or (optional and name not in table):
            continue
        if name not in table:
            raise ImageBuildError(f"kernel module {raw!r} is neither built in nor in modules.dep")
        visit(name)
    return order


def _decompress(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if src.suffix == ".xz":
        data = lzma.decompress(data)
    elif src.suffix in (".zst", ".gz"):
        raise ImageBuildError(f"{src.name}: only plain and .xz modules are supported")
    dst.write_bytes(data)


def build(root: Path, release: str, init: Path, output: Path, wanted: list[str]) -> list[str]:
    """Write the initramfs for ``release`` from the unpacked guest tree ``root``."""
    moddir = root / "lib/modules" / release
    order = load_order(
        (moddir / "modules.dep").read_text(),
        (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else "",
        wanted,
    )
    busybox = root / "bin/busybox"
    if not busybox.exists():
        raise ImageBuildError("busybox-static is missing from the guest tree (images/packages.txt)")
    with tempfile.TemporaryDirectory(prefix="labkit-initramfs-") as tmp:
        t = Path(tmp)
        for d in ("bin", "dev", "proc", "newroot", "lib/modules"):
            (t / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, t / "bin/busybox")
        shutil.copy2(init, t / "init")
        (t / "init").chmod(0o755)
        names = []
        for rel in order:
            name = module_name(rel) + ".ko"
            _decompress(moddir / rel, t / "lib/modules" / name)
            names.append(name)
        (t / "lib/modules/load.order").write_text("".join(n + "\n" for n in names))
        files = sorted(str(p.relative_to(t)) for p in t.rglob("*"))
        with open(output, "wb") as out:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0", "--reproducible"],
                input="\n".join(files).encode(), stdout=out, cwd=t, check=True,
            )
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="unpacked guest tree")
    ap.add_argument("--release", required=True, help="kernel release (uname -r)")
    ap.add_argument("--init", type=Path, required=True, help="init script for the initramfs")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("modules", nargs="*", default=list(ROOT_MODULES),
                    help="modules needed to mount the root disk ('name?': only if it exists; "
                         f"default: {' '.join(ROOT_MODULES)})")
    args = ap.parse_args(argv)
    try:
        names = build(args.root, args.release, args.init, args.output, args.modules)
    except ImageBuildError as exc:
        print(f"labkit.image.initramfs: {exc}", file=sys.stderr)
        return 1
    print(f"labkit-build: initramfs modules: {' '.join(names) or '(all built in)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
