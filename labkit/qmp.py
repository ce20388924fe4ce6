"""Machine control through QMP, using the ``qemu.qmp`` package's synchronous
client (status, graceful quit; later snapshots and migration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .errors import ChannelError


class QMPChannel:
    """A connected QMP client on the VM's private UNIX socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._qmp: QEMUMonitorProtocol | None = None

    def connect(self, timeout: float = 5.0) -> QMPChannel:
        try:
            self._qmp = QEMUMonitorProtocol(str(self.path))
            self._qmp.settimeout(timeout)
            self._qmp.connect(negotiate=True)
        except (QMPError, OSError) as exc:
            self._qmp = None
            raise ChannelError(f"cannot connect to QMP at {self.path}: {exc}") from exc
        return self

    def command(self, name: str, timeout: float = 10.0, **args: Any) -> Any:
        if self._qmp is None:
            raise ChannelError("QMP is not connected")
        try:
            self._qmp.settimeout(timeout)
            return self._qmp.cmd(name, **args)
        except (QMPError, OSError) as exc:
            raise ChannelError(f"QMP command {name} failed: {exc}") from exc

    def status(self) -> str:
        """'running', 'paused', 'shutdown', … as QEMU reports it."""
        return self.command("query-status")["status"]

    def quit(self) -> None:
        try:
            self.command("quit", timeout=5.0)
        except ChannelError:
            pass   # QEMU may close the socket before it answers

    def close(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except (QMPError, OSError):
                pass
            self._qmp = None

    def __enter__(self) -> QMPChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
