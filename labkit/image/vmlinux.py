"""Turn Debian's compressed ``vmlinuz`` into an ELF ``vmlinux`` that QEMU can
start through the kernel's PVH entry point.

Under TCG, SeaBIOS loading a bzImage and the kernel decompressing itself take
about five seconds of a cold boot; starting the ELF directly takes under one.
If the kernel has no PVH note (or the compression is unknown) the build keeps
using ``vmlinuz``.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from pathlib import Path

XEN_ELFNOTE_PHYS32_ENTRY = 18
MAGICS = (("xz", b"\xfd7zXZ\x00"), ("zstd", b"\x28\xb5\x2f\xfd"), ("gzip", b"\x1f\x8b\x08\x00"))


def decompress_payload(bzimage: bytes) -> bytes | None:
    """The ELF image inside a bzImage, trying each compression it may use."""
    for kind, magic in MAGICS:
        start = bzimage.find(magic)
        while start >= 0:
            try:
                out = _decompress(kind, bzimage[start:])
            except Exception:   # a false magic match: keep looking
                out = None
            if out and out[:4] == b"\x7fELF":
                return out
            start = bzimage.find(magic, start + 1)
    return None


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    import zstandard
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit ELF carries the Xen PVH entry note QEMU boots from."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:     # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract(vmlinuz: Path, out: Path) -> bool:
    """Write ``out`` if ``vmlinuz`` holds a PVH-bootable ELF; return whether it did."""
    elf = decompress_payload(vmlinuz.read_bytes())
    if elf is None or not has_pvh_note(elf):
        return False
    out.write_bytes(elf)
    return True
