"""Validators: every value that reaches the guest is checked here first, against
a closed set of choices or a strict pattern, so bad input ends in a clear
ConfigError before any guest command runs."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from labkit.errors import ConfigError
from labkit.lab.guest.vocab import FILESYSTEMS, MAPPINGS, MECHANISMS, MEMORY_KINDS, MOUNT_ROOT, PMEM_ROLES, fsdax_kind

log = logging.getLogger(__name__)

Case = tuple[str, str, str]

MAX_PIN_BYTES = 64 * 2**20
MOUNT_OPTION_RE = re.compile(r"^[a-z0-9_]+(=[a-z0-9_]+)?$")
ALLOWED_MOUNT_OPTIONS = {"dax", "dax=always", "dax=inode", "dax=never", "ro", "rw", "noatime",
                         "relatime", "sync", "nodiscard"}
MOUNTPOINT_RE = r"/mnt/[a-zA-Z0-9_-]{1,48}"
DEVICE_RE = r"/dev/(pmem\d{1,3}|dax\d{1,3}\.\d{1,3})"
NAMESPACE_RE = r"namespace\d{1,3}\.\d{1,3}"
BLOCK_SIZES = (1024, 2048, 4096)


def choose(value: object, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {what} {value!r}", hint=f"choose one of: {', '.join(choices)}")
    return value


def check_case(case: object) -> Case:
    """One valid (mechanism, memory, mapping) triple, else a ConfigError."""
    if not isinstance(case, (tuple, list)) or len(case) != 3:
        raise ConfigError(f"each case must be a (mechanism, memory, mapping) triple, "
                          f"not {case!r}; e.g. ('rdma', 'fsdax-xfs', 'shared')")
    mech, mem, mapping = case
    return (choose(mech, MECHANISMS, "pin mechanism"), choose(mem, MEMORY_KINDS, "memory kind"),
            choose(mapping, MAPPINGS, "mapping"))


def check_cases(cases: object) -> list[Case]:
    """``cases`` as a list of valid (mechanism, memory, mapping) triples, else a ConfigError."""
    if isinstance(cases, (str, bytes)) or not isinstance(cases, Iterable):
        raise ConfigError(f"cases must be a list of (mechanism, memory, mapping) triples, not {cases!r}",
                          hint="e.g. [('rdma', 'fsdax-xfs', 'shared')] or labkit.lab.SHORT_CASES")
    out = [check_case(case) for case in cases]
    if not out:
        raise ConfigError("no matrix cases given; pass None for all of them, or e.g. labkit.lab.SHORT_CASES")
    return out


def check_mount_options(options: object) -> str:
    """Mount options from a closed vocabulary (no shell or mount-helper tricks)."""
    hint = "use a comma-separated list of: " + ", ".join(sorted(ALLOWED_MOUNT_OPTIONS))
    if not isinstance(options, str) or len(options) > 200:
        raise ConfigError("mount options must be a short string such as 'dax' or 'dax=always'", hint=hint)
    for opt in filter(None, options.split(",")):
        if not MOUNT_OPTION_RE.match(opt) or opt not in ALLOWED_MOUNT_OPTIONS:
            raise ConfigError(f"mount option {opt!r} is not allowed", hint=hint)
    return options


def check_text(value: object, pattern: str, what: str, hint: str, max_len: int = 64) -> str:
    """``value`` if it is a short str matching ``pattern`` in full (``re.match``
    with ``$`` would let a trailing newline through), else a ConfigError."""
    if not isinstance(value, str) or len(value) > max_len or not re.fullmatch(pattern, value):
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
        raise ConfigError(f"invalid {what} {shown!r}", hint=hint)
    return value


def check_seconds(value: object, what: str, limit: float) -> float:
    """A number of seconds in 0..limit (no strings, NaN or infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not 0 <= value <= limit:
        raise ConfigError(f"{what} {value!r} s is out of range", hint=f"use a number of seconds in 0..{limit:g}")
    return float(value)


def check_mountpoint(mp: object) -> str:
    """A mount point of the form /mnt/NAME."""
    return check_text(mp, MOUNTPOINT_RE, "mount point", "use /mnt/NAME (1-48 letters, digits, - and _)")


def check_mountpoint_for(fs: str, mp: str) -> str:
    """Refuse to put ``fs`` on the mount point the lab reads as another
    filesystem's (ext4 on /mnt/fsdax-xfs would make every "fsdax-xfs" row
    come from ext4)."""
    for other in FILESYSTEMS:
        if other != fs and mp == f"{MOUNT_ROOT}/{fsdax_kind(other)}":
            raise ConfigError(f"{mp} is where the lab looks for {other}; mounting {fs} there would label "
                              f"{fs} results as {fsdax_kind(other)}",
                              hint=f"mount {fs} on {MOUNT_ROOT}/{fsdax_kind(fs)} (the default) or another /mnt/NAME")
    return mp


def check_device(device: object) -> str:
    """A persistent-memory device node: /dev/pmemN or /dev/daxN.M."""
    return check_text(device, DEVICE_RE, "device", "use /dev/pmemN (fsdax) or /dev/daxN.M")


def check_namespace(name: object) -> str:
    return check_text(name, NAMESPACE_RE, "namespace name", "names look like namespace0.0")


def check_block_size(block_size: object) -> int | None:
    if block_size is not None and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
        raise ConfigError(f"block size {block_size!r} is not supported",
                          hint="use 4096 (what DAX needs), 2048 or 1024, or None for mkfs's choice")
    return block_size if block_size is None else int(block_size)


def check_size(size: object, limit: int = MAX_PIN_BYTES) -> int:
    """A buffer size: a positive multiple of 4096 up to ``limit``."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 4096 or size > limit:
        raise ConfigError(f"size {size!r} does not fit",
                          hint=f"use a positive multiple of 4096 bytes up to {limit // 2**20} MiB")
    return size


def check_count(value: object, what: str, low: int, high: int) -> int:
    """An int in low..high (no bools)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{what} {value!r} is out of range", hint=f"use {low}..{high}")
    return value


def check_pid(pid: object) -> int:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ConfigError(f"invalid process id {pid!r}", hint="pass the holder's PID, e.g. held.pid")
    return pid


def check_roles(roles: object) -> dict[str, Any] | None:
    """``roles`` as returned by ``Lab.prepare_pmem()`` (or None), else a ConfigError."""
    from labkit.lab.pmem import Namespace  # here, not at the top: pmem imports this module
    if roles is None:
        return None
    hint = "pass what lab.prepare_pmem() returned, or leave roles out"
    if not isinstance(roles, Mapping):
        raise ConfigError(f"roles must be a dict of namespaces, not {type(roles).__name__}", hint=hint)
    for role, ns in roles.items():
        if role not in PMEM_ROLES:
            raise ConfigError(f"unknown pmem role {role!r}", hint="roles are: " + ", ".join(PMEM_ROLES))
        if not isinstance(ns, Namespace):
            raise ConfigError(f"roles[{role!r}] must be a Namespace, not {ns!r}", hint=hint)
    log.debug("roles checked: %s", {r: ns.dev for r, ns in roles.items()})
    return dict(roles)
