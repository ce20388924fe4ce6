"""The lab's vocabulary, defined once: memory kinds, pin mechanisms, mappings,
filesystems, where each fs-dax kind is mounted, and the "ok / ERRNAME (n)"
cell that every table, summary and check prints.

Standard library only and no imports from labkit: it lives with the code that
runs in the guest, is packed into the guest helper (``labkit.lab.guest.bundle``)
and is imported by the host's lab layer, so the guest and the host use the same
names.
"""

from __future__ import annotations

import errno as _errno

FILESYSTEMS = ("xfs", "ext4")
MEMORY_KINDS = ("anon", "pagecache", "fsdax-xfs", "fsdax-ext4", "devdax")
MECHANISMS = ("rdma", "rdma-odp", "v4l2", "odirect", "io_uring")
MAPPINGS = ("shared", "private")
MR_KINDS = ("odp", "pinned")            # an RDMA memory region: on demand (ODP) or pinned
RDMA_OPS = ("write", "read")            # the RDMA operation posted through an MR
SHRINK_OPS = ("truncate", "punch")      # what frees a file's blocks: truncate, or a hole punch (fallocate)
NS_MODES = ("fsdax", "devdax", "raw", "sector")

# The namespace role of each kind of persistent memory (``Lab.prepare_pmem``):
# region 0 -> fsdax for XFS, region 1 -> fsdax for ext4, region 2 -> devdax.
PMEM_ROLES = {"fsdax-xfs": "fsdax", "fsdax-ext4": "fsdax", "devdax": "devdax"}

MOUNT_ROOT = "/mnt"

# The kretprobes the lab puts on the functions that refuse a long-term pin of
# fs-dax memory are all named with this prefix (``labkit_cvf``, ``labkit_cvf_1``,
# ...), so that the guest and the host pick their lines out of the trace alike.
KPROBE = "labkit_cvf"

# A few pin attempts that tell the story (long-term vs transient, fs-dax vs
# device-dax, and the page cache, where v6.5 added a rule of its own) for
# comparing kernels quickly; ``Lab.matrix(cases=SHORT_CASES)``.
# The page cache only for RDMA: that row differs between the kernels (v6.5's
# dirty-tracking rule, 8ac268436e6d), and notebook 03 sends learners to it; the
# other mechanisms' page-cache answers are exercises (04, 07) no cell prints.
SHORT_CASES = [(mech, mem, "shared") for mech in ("rdma", "v4l2", "io_uring", "odirect")
               for mem in ("anon", "fsdax-xfs", "devdax")] + [("rdma", "pagecache", "shared")]

# Every case ``Lab.matrix()`` measures by default: all shared mappings, and
# private ones where they teach something (RDMA on anon and fs-dax).
ALL_CASES = [(mech, mem, mapping) for mech in MECHANISMS for mem in MEMORY_KINDS for mapping in MAPPINGS
             if mapping == "shared" or (mech.startswith("rdma") and mem in ("anon", "fsdax-xfs", "fsdax-ext4"))]


def fsdax_kind(fs: str) -> str:
    """The memory kind of a DAX file on ``fs`` ("xfs" -> "fsdax-xfs")."""
    return f"fsdax-{fs}"


def fs_of_kind(memory: str) -> str | None:
    """The filesystem of an fs-dax memory kind, None for the other kinds."""
    return memory[len("fsdax-"):] if memory.startswith("fsdax-") else None


def mountpoint_for(fs: str) -> str:
    """Where the lab mounts its DAX filesystem ``fs``."""
    return f"{MOUNT_ROOT}/{fsdax_kind(fs)}"


# errno.errorcode picks one name for aliased values; use the names the kernel
# sources use for the errors learners will look up (95 is ENOTSUP == EOPNOTSUPP).
PREFERRED_ERRNAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP", _errno.EAGAIN: "EAGAIN", _errno.EDEADLK: "EDEADLK"}


def errname(err: int | None) -> str | None:
    """The symbolic name of errno ``err`` as the kernel sources spell it."""
    if err is None:
        return None
    return PREFERRED_ERRNAMES.get(err) or _errno.errorcode.get(err, f"E{err}")


def result_cell(ok: bool, errno: int | None, name: str | None) -> str:
    """The kernel's answer to one attempt: "ok" or "ERRNAME (n)"."""
    return "ok" if ok else f"{name or 'errno'} ({errno})"
