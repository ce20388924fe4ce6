"""The polite half of stopping a guest: flush its disks over SSH, ask QEMU
to quit over QMP. The hard half (SIGTERM/SIGKILL) is ``process.terminate``."""

from __future__ import annotations

import logging

from labkit.errors import LabError
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.channels.ssh import SSHChannel

log = logging.getLogger(__name__)


def polite_quit(ssh: SSHChannel | None, qmp: QMPChannel, timeout: float) -> None:
    """``sync`` in the guest (if SSH is open), then QMP ``quit``; failures are
    logged, never raised: the caller kills QEMU if it does not go."""
    if ssh is not None and ssh.is_open:
        try:
            ssh.run("sync", timeout=min(5.0, timeout))
            log.debug("guest synced")
        except LabError as exc:
            log.debug("sync before stop failed: %s", exc)
    try:
        if not qmp.connected:
            qmp.connect(timeout=2.0)
        qmp.quit()
        log.debug("QMP quit sent")
    except LabError as exc:
        log.debug("QMP quit failed: %s", exc)
    finally:
        qmp.close()
