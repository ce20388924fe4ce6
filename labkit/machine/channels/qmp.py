"""Machine control through QMP, using the ``qemu.qmp`` package's client:
status, graceful quit, migration (warm-start snapshots) and QMP events.

``qemu.qmp`` is asyncio-based; this wrapper runs it on a private event loop in
a thread of its own (so it also works where the caller's thread already runs
a loop, as in a Jupyter kernel) and bounds every step, connect included, with
a timeout. A QEMU monitor serves one client at a time: the VM keeps a single
QMPChannel open on the main monitor (``qmp.sock``, ``vm.qmp``), and the
watchdog asks on a second monitor of its own (``watch.sock``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from labkit.errors import ChannelError, QMPCommandError


class QMPChannel:
    """A connected QMP client on the VM's private UNIX socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="labkit-qmp", daemon=True)
        self._thread.start()
        self._client: QMPClient | None = None
        self._events: EventListener | None = None

    def _sync(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout=timeout), self._loop)
        try:
            return fut.result(timeout + 1.0)
        except concurrent.futures.TimeoutError as exc:
            fut.cancel()
            raise asyncio.TimeoutError() from exc

    def connect(self, timeout: float = 5.0) -> QMPChannel:
        client = self._make_client()
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
        # Every event from now on is queued, so none is missed between a
        # command and the wait for its event.
        self._events = EventListener()
        client.register_listener(self._events)
        return self

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _make_client(self) -> QMPClient:
        async def make() -> QMPClient:    # bound to the private loop
            return QMPClient("labkit")
        return self._sync(make(), 5.0)

    def command(self, name: str, timeout: float = 10.0, **args: Any) -> Any:
        if self._client is None:
            raise ChannelError("QMP is not connected")
        try:
            return self._sync(self._client.execute(name, args or None), timeout)
        except ExecuteError as exc:
            # QEMU answered with an error: keep its class and description.
            raise QMPCommandError(name, exc.error_class, exc.error.error.desc) from exc
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
            raise ChannelError(f"QMP command {name} failed: {exc!r}") from exc

    def wait_event(self, names: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """The next QMP event named one of ``names`` (``{"event": ..., "data": ...}``),
        waiting at most ``timeout`` s; ChannelError if QEMU hangs up first."""
        if self._client is None or self._events is None:
            raise ChannelError("QMP is not connected")
        events = self._events

        async def next_matching() -> dict[str, Any]:
            while True:
                ev = await events.get()
                if ev["event"] in names:
                    data = ev.get("data", {})
                    return {"event": ev["event"], "data": dict(data) if isinstance(data, dict) else {}}

        try:
            return self._sync(next_matching(), timeout)
        except asyncio.TimeoutError as exc:
            raise ChannelError(f"no QMP event {'/'.join(names)} within {timeout:.0f} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise ChannelError(f"QMP connection lost while waiting for {'/'.join(names)}: {exc!r}") from exc

    def status(self) -> str:
        """'running', 'paused', 'shutdown', … as QEMU reports it."""
        return self.command("query-status")["status"]

    def quit(self) -> None:
        try:
            self.command("quit", timeout=5.0)
        except ChannelError:
            pass   # QEMU may hang up before it answers

    def close(self) -> None:
        if self._client is not None and self._events is not None:
            self._client.remove_listener(self._events)
            self._events = None
        if self._client is not None:
            try:
                self._sync(self._client.disconnect(), 2.0)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                pass   # after `quit` QEMU hangs up first; the connection is gone either way
            self._client = None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=2.0)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> QMPChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
