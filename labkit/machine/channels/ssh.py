"""Commands in the guest over SSH (paramiko): exit code, stdout and stderr,
streaming, stdin, file upload; the guest's host key is pinned.

Kernel messages never appear here: they go to the serial console.
"""

from __future__ import annotations

import io
import logging
import select
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import paramiko

from labkit.command import CommandResult, quote_command
from labkit.errors import ChannelError, GuestTimeout, HostKeyMismatch, SSHDropped
from labkit.timeout import Deadline

# paramiko logs a traceback for every refused connection attempt (sshd still
# starting or restarting) through logging's last-resort handler; the lab
# reports those failures itself, with a clear message.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

RUN_TAG = "LC_LABKIT_RUN"


class SSHChannel:
    """One authenticated SSH connection to the guest."""

    def __init__(self, port: int, key_path: Path, host_key: tuple[str, str], host: str = "127.0.0.1",
                 user: str = "root") -> None:
        self.host, self.port, self.user = host, port, user
        self.key_path = key_path
        self.host_key = host_key
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout: float = 10.0) -> SSHChannel:
        """Connect, retrying until ``timeout`` while sshd is still coming up."""
        deadline = Deadline(timeout)
        last: Exception | None = None
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        while not deadline.expired:
            client = paramiko.SSHClient()
            ktype, blob = self.host_key
            client.get_host_keys().add(f"[{self.host}]:{self.port}", ktype,
                                       paramiko.PKey.from_type_string(ktype, _b64(blob)))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(self.host, port=self.port, username=self.user, pkey=pkey,
                               timeout=max(0.5, min(5.0, deadline.remaining)),
                               banner_timeout=max(0.5, min(5.0, deadline.remaining)),
                               auth_timeout=max(0.5, min(5.0, deadline.remaining)),
                               allow_agent=False, look_for_keys=False)
                client.get_transport().set_keepalive(5)
                self._client = client
                return self
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise HostKeyMismatch(f"{ktype} {blob}", f"{exc.key.get_name()} {exc.key.get_base64()}") \
                    from exc
            except (OSError, paramiko.SSHException, EOFError) as exc:
                client.close()
                last = exc
                time.sleep(0.1)
        raise GuestTimeout(f"SSH on 127.0.0.1:{self.port} ({last})", timeout)

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None or not self._client.get_transport() \
                or not self._client.get_transport().is_active():
            raise ChannelError("the SSH connection to the guest is not open")
        return self._client

    @property
    def is_open(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SSHChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_channel(self, command: str, timeout: float = 10.0,
                     env: dict[str, str] | None = None) -> paramiko.Channel:
        """Start ``command`` on a new session channel; the caller reads and closes it."""
        try:
            chan = self.client.get_transport().open_session(timeout=timeout)
            if env:
                chan.update_environment(env)
            # surrogateescape: bytes that are not UTF-8 (from argv or a file
            # name) reach the guest as the same bytes instead of a traceback.
            chan.exec_command(command.encode("utf-8", "surrogateescape"))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ChannelError(f"could not start guest command over SSH: {exc}") from exc
        return chan

    def responsive(self, timeout: float = 5.0) -> bool:
        """True if the guest's sshd answers a new session within ``timeout``
        (a stopped or starved guest cannot)."""
        try:
            chan = self.client.get_transport().open_session(timeout=timeout)
        except (ChannelError, paramiko.SSHException, OSError, EOFError):
            return False
        chan.close()
        return True

    def start(self, cmd: str | Sequence[str], timeout: float = 10.0) -> GuestProcess:
        """Start ``cmd`` in the guest and return its handle (the caller closes it).
        A list is quoted word by word; a string is a shell command on purpose."""
        # The guest's sshd accepts LC_* variables: the tag finds this command's
        # processes again if it has to be interrupted.
        tag = uuid.uuid4().hex
        command = quote_command(cmd)
        return GuestProcess(self, command, self.open_channel(command, timeout=timeout, env={RUN_TAG: tag}), tag)

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            stdin: bytes | str | None = None,
            on_stdout: Callable[[str], None] | None = None,
            on_stderr: Callable[[str], None] | None = None,
            watchdog: Callable[[float], None] | None = None) -> CommandResult:
        """Run ``cmd`` and wait at most ``timeout`` seconds for it.

        ``on_stdout``/``on_stderr`` receive text as it arrives (streaming).
        ``watchdog(quiet_seconds)`` is called about once a second while no
        output arrives; it raises to end the wait early (dead or hung guest).
        On KeyboardInterrupt the guest command is sent SIGINT and its channel
        closed, so the connection stays usable.
        """
        deadline = Deadline(timeout)
        out, err = io.BytesIO(), io.BytesIO()

        def to(buf: io.BytesIO, cb: Callable[[str], None] | None) -> Callable[[bytes], None]:
            def sink(data: bytes) -> None:
                buf.write(data)
                if cb:
                    cb(data.decode(errors="replace"))
            return sink

        with self.start(cmd, timeout=min(10.0, timeout)) as proc:
            if stdin is not None:
                proc.send(stdin.encode() if isinstance(stdin, str) else stdin)
            proc.close_stdin()
            try:
                rc = proc.pump(to(out, on_stdout), to(err, on_stderr), deadline, watchdog)
            except GuestTimeout as exc:
                exc.output = exc.output or out.getvalue().decode(errors="replace")
                raise
        result = CommandResult(proc.command, rc, out.getvalue().decode(errors="replace"),
                               err.getvalue().decode(errors="replace"), deadline.elapsed)
        return result.check() if check else result

    def interrupt_tagged(self, tag: str, timeout: float = 5.0) -> None:
        """SIGINT (then SIGKILL) every guest process started by the command
        tagged ``tag``, as Ctrl-C would in a terminal. (The SSH "signal"
        request would be simpler, but the guest's sshd refuses it.)"""
        script = (f"pids=$(grep -lz '^{RUN_TAG}={tag}$' /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); "
                  "[ -n \"$pids\" ] || exit 0; kill -INT $pids 2>/dev/null; sleep 0.5; "
                  "kill -KILL $pids 2>/dev/null; exit 0")
        try:
            chan = self.open_channel(quote_command(["sh", "-c", script]), timeout=timeout)
            chan.settimeout(timeout)
            chan.recv_exit_status()
            chan.close()
        except (TimeoutError, ChannelError, OSError, EOFError, paramiko.SSHException):
            pass    # best effort: the connection may be what was interrupted

    def run_passthrough(self, cmd: str | Sequence[str], stdin: BinaryIO | None = None,
                        stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                        timeout: float | None = None,
                        watchdog: Callable[[float], None] | None = None) -> int:
        """Like ``ssh host cmd``: stream stdin/stdout/stderr, return the exit code.
        Ctrl-C (KeyboardInterrupt) interrupts the guest command too, as in ``run``."""
        out = stdout or sys.stdout.buffer
        err = stderr or sys.stderr.buffer

        def to(stream: BinaryIO) -> Callable[[bytes], None]:
            def sink(data: bytes) -> None:
                stream.write(data)
                stream.flush()
            return sink

        with self.start(cmd) as proc:
            feeder = threading.Thread(target=proc.feed_from, args=(stdin,), daemon=True)
            feeder.start()
            return proc.pump(to(out), to(err), Deadline(timeout) if timeout else None, watchdog)

    def upload(self, data: bytes | Path, remote: str, mode: int = 0o644) -> None:
        """Write ``data`` (bytes or a local file) to ``remote`` in the guest."""
        payload = data.read_bytes() if isinstance(data, Path) else data
        try:
            with self.client.open_sftp() as sftp:
                with sftp.open(remote, "wb") as f:
                    f.write(payload)
                sftp.chmod(remote, mode)
        except (OSError, paramiko.SSHException) as exc:
            raise ChannelError(f"upload to {remote} failed: {exc}") from exc


def _b64(blob: str) -> bytes:
    import base64
    return base64.b64decode(blob)


class GuestProcess:
    """A command running in the guest: its output is pumped to callbacks by
    one loop that waits on the channel's file descriptor (``select``), never
    by polling. No paramiko type leaves this class."""

    def __init__(self, ssh: SSHChannel, command: str, chan: paramiko.Channel, tag: str) -> None:
        self.ssh, self.command, self.tag = ssh, command, tag
        self._chan = chan

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """Readable when output, EOF or the end of the channel arrives."""
        return self._chan.fileno()

    def send(self, data: bytes) -> None:
        self._chan.sendall(data)

    def close_stdin(self) -> None:
        try:
            self._chan.shutdown_write()
        except (OSError, EOFError):
            pass

    def feed_from(self, stream: BinaryIO | None) -> None:
        """Copy ``stream`` to the command's stdin until EOF, then close it."""
        try:
            if stream is not None:
                while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
                    self._chan.sendall(chunk)
        except (OSError, EOFError):
            pass
        finally:
            self.close_stdin()

    def read_available(self) -> tuple[bytes, bytes]:
        """Whatever stdout and stderr output has arrived (without waiting)."""
        out = self._chan.recv(65536) if self._chan.recv_ready() else b""
        err = self._chan.recv_stderr(65536) if self._chan.recv_stderr_ready() else b""
        return out, err

    def wait_readable(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.fileno()], [], [], max(0.0, timeout))
        return bool(readable)

    @property
    def finished(self) -> bool:
        """The command's output has ended (EOF) or the channel is closed."""
        return self._chan.eof_received or self._chan.closed

    def exit_status(self, timeout: float) -> int | None:
        """The exit status once it arrives within ``timeout``; None otherwise."""
        if self._chan.status_event.wait(max(0.0, timeout)):
            return self._chan.recv_exit_status()
        return None

    def pump(self, on_stdout: Callable[[bytes], None], on_stderr: Callable[[bytes], None],
             deadline: Deadline | None, watchdog: Callable[[float], None] | None = None) -> int:
        """Deliver output until the command exits; return its exit status.
        GuestTimeout when ``deadline`` passes, SSHDropped when the connection
        ends without one; ``watchdog(quiet_seconds)`` about once a second of silence."""
        last_data = last_watch = time.monotonic()
        try:
            while True:
                out, err = self.read_available()
                if out:
                    on_stdout(out)
                if err:
                    on_stderr(err)
                now = time.monotonic()
                if out or err:
                    last_data = now
                    continue
                if self.finished:
                    rc = self.exit_status(min(1.0, deadline.remaining if deadline else 1.0))
                    if rc is not None and rc != -1:
                        return rc
                    if self._chan.closed:     # no exit status: the connection ended under the command
                        raise SSHDropped(self.command)
                elif not self.wait_readable(min(1.0, deadline.remaining if deadline else 1.0)):
                    now = time.monotonic()
                if deadline is not None and deadline.expired:
                    raise GuestTimeout(f"guest command {self.command!r}", deadline.seconds)
                if watchdog is not None and now - last_watch >= 1.0 and now - last_data >= 1.0:
                    watchdog(now - last_data)
                    last_watch = time.monotonic()
        except KeyboardInterrupt:
            self.close()
            self.ssh.interrupt_tagged(self.tag)
            raise

    def interrupt(self) -> None:
        """End the guest command itself (SIGINT, then SIGKILL), not only our channel to it."""
        self.close()
        self.ssh.interrupt_tagged(self.tag)

    def close(self) -> None:
        self._chan.close()
