"""pinprobe: try to pin user memory in the guest, and measure what happened.

This package runs *inside* the Debian lab guest, as root, with the guest's
python3 and only the standard library (plus ``pyverbs``, imported lazily by the
rdma subcommand). The host packs it into one zipapp
(``labkit.lab.guest.bundle``), uploads it to ``/run/labkit/pinprobe.pyz`` and
runs::

    python3 /run/labkit/pinprobe.pyz SUBCOMMAND [ARGS...]

Subcommands (each pins a buffer a different way, one module each):

    rdma           RDMA memory registration (ibv_reg_mr via pyverbs), long-term pin
    rdma-odp       the same with IBV_ACCESS_ON_DEMAND: no pin; reports the device's ODP caps
    v4l2           V4L2 USERPTR buffer queued on the vivid capture device, long-term pin
    odirect        an O_DIRECT read into the buffer, a short-lived (transient) pin
    io_uring       io_uring fixed-buffer registration, long-term pin
    truncate-wait  a truncate that has to wait until DAX pages held by a pipe are idle
    odp-revoke     an MR (ODP or pinned), a loopback RDMA op, truncate/DONTNEED, the op again
    status         VmPin of a process and the global FOLL_PIN counters
    mount          mount a filesystem and report the mount and its DAX state
    mountinfo      the mount holding a path and its DAX state
    batch          many probes, each in a forked child, observed

The buffer (``--memory``) is anonymous memory, a file mapping (page cache or
fs-dax, depending on where ``--path`` lives), or a device-dax char device.
With ``--dax-fs FS [--dax-device DEV]`` a file must be on a DAX-active mount of
FS (on DEV): otherwise the probe refuses instead of measuring the wrong memory.

Contract with the host: every subcommand prints exactly ONE JSON object on
stdout (its last line).  Exit status 0 means "the probe ran" -- including when
the kernel *refused* the pin, because a refusal (e.g. EOPNOTSUPP for a
long-term pin of fs-dax memory) is the result the lab wants to show.  Exit 2
with ``{"error": ...}`` means bad arguments or a setup problem (no such
device, mmap failed, not a DAX mount, ...); exit 1 with ``{"error": ...}``
means a bug here. Human-oriented chatter goes to stderr only.
Structure layouts and ioctl numbers are for x86-64.
"""
