"""Where a file really lives: the mount that holds it (/proc/self/mountinfo),
its filesystem and device, and whether it is DAX (statx STATX_ATTR_DAX).

A probe of fs-dax memory checks its target with these before it pins
anything: a lab that reports the live kernel must never report the wrong
memory (e.g. a file on the root disk after the DAX mount went away).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
from typing import Any

from ..vocab import FILESYSTEMS
from .common import SetupError, libc
from .registry import Command

AT_FDCWD = -100
STATX_BASIC_STATS = 0x7FF
STATX_ATTR_DAX = 0x00200000
CHECK_NAME = ".labkit-daxcheck"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[dict[str, str]]:
    """/proc/self/mountinfo lines -> mountpoint, fs, device, options, in order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mounts.append({"mountpoint": _unescape(fields[4]), "fs": fields[sep + 1],
                       "device": _unescape(fields[sep + 2]), "options": fields[5] + "," + fields[sep + 3]})
    return mounts


def mount_of(path: str, mountinfo: str | None = None) -> dict[str, str]:
    """The mount holding ``path`` (which need not exist): the longest mount
    point that contains it; the later of two equal ones (it is on top)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    real = os.path.realpath(path)
    best: dict[str, str] = {"mountpoint": "/", "fs": "?", "device": "?", "options": ""}
    for m in parse_mountinfo(mountinfo):
        mp = m["mountpoint"]
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(best["mountpoint"]):
            best = m
    return best


def statx_attributes(path: str) -> int | None:
    """stx_attributes of ``path`` (None if statx fails)."""
    buf = ctypes.create_string_buffer(256)
    if libc.statx(AT_FDCWD, os.fsencode(path), 0, STATX_BASIC_STATS, buf) != 0:
        return None
    return int.from_bytes(buf.raw[8:16], "little")


def is_dax(path: str) -> bool:
    attrs = statx_attributes(path)
    return attrs is not None and bool(attrs & STATX_ATTR_DAX)


def new_file_is_dax(directory: str) -> bool:
    """Whether a file created in ``directory`` now is DAX (the mount's effective state)."""
    probe = os.path.join(directory, CHECK_NAME)
    try:
        open(probe, "w").close()
    except OSError:
        return False
    try:
        return is_dax(probe)
    finally:
        os.unlink(probe)


def proc_mounts_line(mountpoint: str) -> str:
    """The last /proc/mounts line for ``mountpoint`` ("" if none)."""
    found = ""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and _unescape(fields[1]) == mountpoint:
                found = line.strip()
    return found


def describe(path: str) -> dict[str, Any]:
    """The mount holding ``path``; DAX state of a new file if ``path`` is its mount point."""
    m = mount_of(path)
    here = m["mountpoint"] == os.path.realpath(path)
    return {"path": path, **m, "dax_active": here and new_file_is_dax(path),
            "proc_mounts": proc_mounts_line(m["mountpoint"]) if here else ""}


def check_dax_dir(path: str, fs: str, device: str | None) -> None:
    """Before creating ``path``: its directory must be the mount point of ``fs`` (on ``device``)."""
    directory = os.path.dirname(os.path.abspath(path))
    m = mount_of(directory)
    where = f"{m['mountpoint']} ({m['fs']} on {m['device']})"
    if m["mountpoint"] != os.path.realpath(directory):
        raise SetupError(f"{directory} is not a mount point: {os.path.basename(path)} would be on {where}, "
                         f"not on a DAX mount of {fs}; mount it first (lab.prepare_mounts())")
    if m["fs"] != fs:
        raise SetupError(f"{directory} holds {m['fs']} (on {m['device']}), not {fs}: the result would not be "
                         f"{fs}'s; mount {fs} there (lab.prepare_mounts())")
    if device and os.path.realpath(m["device"]) != os.path.realpath(device):
        raise SetupError(f"{directory} is {fs} on {m['device']}, not on {device} (the lab's {fs} namespace)")


def check_dax_file(path: str, fs: str) -> None:
    """After creating ``path``: statx must say its pages are DAX."""
    if not is_dax(path):
        m = mount_of(path)
        raise SetupError(f"{path} is on {fs} ({m['device']}, options {m['options']}) but is not DAX "
                         "(statx STATX_ATTR_DAX is clear): its pages would be page cache, not persistent "
                         "memory; mount with -o dax on an fsdax namespace")


def cmd_mountinfo(args: Any) -> dict[str, Any]:
    return describe(args.path)


def cmd_mount(args: Any) -> dict[str, Any]:
    """mkdir, umount what is there, mount; report the mount and its DAX state."""
    mp = args.mountpoint
    try:
        os.makedirs(mp, exist_ok=True)
    except OSError as e:
        raise SetupError(f"cannot create {mp}: {e}") from e
    if mount_of(mp)["mountpoint"] == os.path.realpath(mp):
        subprocess.run(["umount", mp], capture_output=True, timeout=60, check=False)
    r = subprocess.run(["mount", "-t", args.fs, "-o", args.options, args.device, mp],
                       capture_output=True, text=True, timeout=120, check=False)
    ok = r.returncode == 0
    return {"ok": ok, "mount_error": "" if ok else (r.stderr or r.stdout).strip(),
            "mount": describe(mp) if ok else {}}


def _mount_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--fs", choices=FILESYSTEMS, required=True)
    sp.add_argument("--device", required=True)
    sp.add_argument("--mountpoint", required=True)
    sp.add_argument("--options", default="dax")


def _mountinfo_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--path", required=True)


COMMANDS = (Command("mount", "mount a filesystem; report the mount and its DAX state", _mount_arguments, cmd_mount),
            Command("mountinfo", "the mount holding --path, and its DAX state", _mountinfo_arguments,
                    cmd_mountinfo))
