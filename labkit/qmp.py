"""Machine control through QMP, using the ``qemu.qmp`` package's client
(status, graceful quit; later snapshots and migration).

``qemu.qmp`` is asyncio-based; this wrapper runs it on a private event loop and
bounds every step, connect included, with a timeout. QEMU's monitor socket
serves one client at a time, so a VM keeps a single QMPChannel open.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from .errors import ChannelError


class QMPChannel:
    """A connected QMP client on the VM's private UNIX socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._client: QMPClient | None = None

    def _sync(self, coro, timeout: float):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout=timeout))
        # Called from a thread whose own loop is running (a Jupyter kernel runs cells inside
        # one): our private loop cannot run there, so run it on a helper thread and wait.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(self._loop.run_until_complete, asyncio.wait_for(coro, timeout=timeout)).result()

    def connect(self, timeout: float = 5.0) -> QMPChannel:
        client = QMPClient("labkit")
        try:
            self._sync(client.connect(str(self.path)), timeout)
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
            try:
                self._sync(client.disconnect(), 2.0)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                pass
            raise ChannelError(f"cannot connect to QMP at {self.path}: {exc!r} (is another client "
                               "attached, or is QEMU gone?)") from exc
        self._client = client
        return self

    def command(self, name: str, timeout: float = 10.0, **args: Any) -> Any:
        if self._client is None:
            raise ChannelError("QMP is not connected")
        try:
            return self._sync(self._client.execute(name, args or None), timeout)
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
            raise ChannelError(f"QMP command {name} failed: {exc!r}") from exc

    def status(self) -> str:
        """'running', 'paused', 'shutdown', … as QEMU reports it."""
        return self.command("query-status")["status"]

    def quit(self) -> None:
        try:
            self.command("quit", timeout=5.0)
        except ChannelError:
            pass   # QEMU may hang up before it answers

    def close(self) -> None:
        if self._client is not None:
            try:
                self._sync(self._client.disconnect(), 2.0)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                pass   # after `quit` QEMU hangs up first; the connection is gone either way
            self._client = None
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> QMPChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
