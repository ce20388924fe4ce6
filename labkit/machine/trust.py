"""Whether a file on the host can be trusted: only root or this user can have
put it there or changed it.

The warm-start cache may be shared by a class (a host-wide directory an
instructor fills). A snapshot is a whole guest: whoever can replace one
decides what every learner who restores it talks to. So, like OpenSSH's
``StrictModes`` for ``authorized_keys``, a snapshot is used only if the file
and every directory above it are owned by root or by the current user and
writable by no one else. A root-owned sticky directory (``/tmp``) counts as
safe: others may create entries there but not replace ours.

Pure functions of ``os.stat``; the callers decide what an untrusted file
means (the snapshot module refuses it and boots cold).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

CHUNK = 1 << 20


def untrusted(path: Path, uid: int | None = None) -> str:
    """'' if ``path`` and every directory above it can be changed only by
    root or ``uid`` (default: this process's user), else the first reason it
    cannot be trusted, in words (which path, what is wrong)."""
    uid = os.geteuid() if uid is None else uid
    try:
        real = Path(os.path.realpath(path))
        chain = [real, *real.parents]
        for p in chain:
            reason = _unsafe(p, os.stat(p), uid)
            if reason:
                return reason
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror or exc}"
    return ""


def _unsafe(p: Path, st: os.stat_result, uid: int) -> str:
    if st.st_uid not in (0, uid):
        return f"{p} belongs to uid {st.st_uid}, not to root or to you"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not writable:
        return ""
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return ""       # /tmp: others may add entries, not replace ours
    who = "others" if st.st_mode & stat.S_IWOTH else "its group"
    return f"{p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# QEMU reads a snapshot's migration stream through this program (its
# ``exec:`` migration URI): it copies the file to stdout while hashing it and
# holds the last HOLD bytes back until the whole file's hash is known. A file
# that does not match the manifest never reaches QEMU whole, so the migration
# fails and the guest never runs, and the check costs no second read: QEMU
# loads the stream while it is hashed. HOLD is large on purpose: QEMU stops
# reading at the stream's end-of-state marker, and what follows it (the JSON
# description of the devices, several KiB) it never needs, so holding back
# only the file's last partial read let a changed stream load whenever that
# piece fell inside the description (it did, once in a whole test run). The
# last 8 MiB always hold the device state after the RAM, which QEMU needs.
# Standard library only; run with ``python -I -S`` (no site, no environment)
# so it starts in milliseconds.
VERIFYING_CAT = r"""
import hashlib, sys
path, want = sys.argv[1], sys.argv[2]
HOLD = 8 << 20
h = hashlib.sha256()
held, size = [], 0
out = sys.stdout.buffer
with open(path, "rb") as fh:
    while True:
        chunk = fh.read(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        held.append(chunk)
        size += len(chunk)
        while size - len(held[0]) >= HOLD:
            size -= len(held[0])
            out.write(held.pop(0))
out.flush()
if h.hexdigest() != want:
    sys.stderr.write("labkit: %s does not match its manifest; not loading it\n" % path)
    sys.exit(3)
for chunk in held:
    out.write(chunk)
out.flush()
"""
