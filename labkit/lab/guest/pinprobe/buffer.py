"""The buffer a probe pins: anonymous memory, a file mapping (page cache or
fs-dax) or a device-dax mapping, made with libc mmap so its address is known."""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
from typing import Any

from .common import MAP_FAILED, MIB2, PAGE, SetupError, errname, libc
from .target import check_dax_dir, check_dax_file

BUFFER_KINDS = ("anon", "file", "devdax")     # what a probe maps (the lab's kinds map onto these)


def devdax_align(path: str) -> int:
    """device-dax mappings must be sized (and placed) at the device's alignment."""
    name = os.path.basename(os.path.realpath(path))
    try:
        with open(f"/sys/bus/dax/devices/{name}/align") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return MIB2


def _prepare_file(path: str, size: int) -> int:
    """Open (create) ``path`` with every page written, so blocks / page-cache
    pages really exist (no holes, no unwritten extents) before it is mapped."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        page = b"\x5a" * PAGE
        for off in range(0, size, PAGE):
            os.pwrite(fd, page, off)
        os.fsync(fd)
        return fd
    except OSError as e:
        raise SetupError(f"cannot prepare {path}: {e}") from e


def _open_devdax(path: str, size: int, mapping: str) -> int:
    if mapping != "shared":
        # device-dax refuses private mappings; that's a usage error, not a pin result
        raise SetupError("--memory devdax supports only --mapping shared")
    align = devdax_align(path)
    if size % align:
        raise SetupError(f"--size must be a multiple of the device-dax alignment ({align} bytes) for {path}, "
                         f"got {size}")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise SetupError(f"cannot open {path}: {e}") from e
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        raise SetupError(f"{path} is not a device-dax character device")
    return fd


class Buffer:
    """A mapping made with libc mmap (not the mmap module) so that we know its
    address for the pinning calls and can munmap it exactly when we choose.

    ``dax_fs`` (and ``dax_device``): a file must be on a DAX-active mount of
    that filesystem (device), checked before and after it is created."""

    def __init__(self, memory: str, size: int, mapping: str = "shared", path: str | None = None,
                 dax_fs: str | None = None, dax_device: str | None = None, touch: str = "write") -> None:
        if size <= 0 or size % PAGE:
            raise SetupError(f"--size must be a positive multiple of {PAGE}, got {size}")
        self.memory, self.size, self.mapping, self.path = memory, size, mapping, path
        self.fd = -1
        self.mapped = False
        flags = self._open(dax_fs, dax_device)
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, self.fd, 0)
        if addr is None or addr == MAP_FAILED:
            err = ctypes.get_errno()
            self._close_fd()
            raise SetupError(f"mmap of {memory} ({path or 'anonymous'}, {size} bytes) failed: "
                             f"{errname(err)} {os.strerror(err)}")
        self.addr: int = addr
        self.mapped = True
        if touch == "none":     # the pin itself faults the pages in (a private mapping's are still the file's)
            return
        # Fault every page in for writing: pins of not-yet-present pages would
        # measure page-fault behaviour rather than pinning.
        for off in range(0, size, PAGE):
            ctypes.memset(self.addr + off, 0x5A, 1)
        # A recognisable first 16 bytes, so a device write into the buffer is visible.
        ctypes.memset(self.addr, 0xAA, 16)

    def _open(self, dax_fs: str | None, dax_device: str | None) -> int:
        """Open what is to be mapped; the mmap flags."""
        share = mmap.MAP_SHARED if self.mapping == "shared" else mmap.MAP_PRIVATE
        if self.memory == "anon":
            return share | mmap.MAP_ANONYMOUS
        if self.memory == "file":
            if not self.path:
                raise SetupError("--memory file needs --path FILE")
            if dax_fs:
                check_dax_dir(self.path, dax_fs, dax_device)
            self.fd = _prepare_file(self.path, self.size)
            if dax_fs:
                try:
                    check_dax_file(self.path, dax_fs)
                except SetupError:
                    self._close_fd()
                    raise
            return share
        if self.memory == "devdax":
            if not self.path:
                raise SetupError("--memory devdax needs --path /dev/daxX.Y")
            self.fd = _open_devdax(self.path, self.size, self.mapping)
            return mmap.MAP_SHARED
        raise SetupError(f"unknown memory kind {self.memory!r}; valid: {', '.join(BUFFER_KINDS)}")

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable memoryview over (part of) the mapping, e.g. for os.preadv."""
        length = self.size - offset if length is None else length
        return memoryview((ctypes.c_char * length).from_address(self.addr + offset)).cast("B")

    def head(self, n: int = 16, offset: int = 0) -> str:
        return ctypes.string_at(self.addr + offset, n).hex()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if self.mapped:
            libc.munmap(self.addr, self.size)
            self.mapped = False
        self._close_fd()

    def describe(self) -> dict[str, Any]:
        return {"memory": self.memory, "mapping": self.mapping, "size": self.size, "path": self.path}
