"""Commands in the guest over SSH (paramiko): exit code, stdout and stderr,
streaming, stdin, file upload; the guest's host key is pinned.

Kernel messages never appear here: they go to the serial console.
"""

from __future__ import annotations

import io
import logging
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from labkit.errors import ChannelError, CommandFailed, GuestTimeout, HostKeyMismatch, SSHDropped
from labkit.timeout import Deadline

# paramiko logs a traceback for every refused connection attempt (sshd still
# starting or restarting) through logging's last-resort handler; the lab
# reports those failures itself, with a clear message.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

RUN_TAG = "LC_LABKIT_RUN"


@dataclass(frozen=True)
class CommandResult:
    """What a guest command did."""

    command: str
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> CommandResult:
        if self.rc != 0:
            raise CommandFailed(self.command, self.rc, self.stdout, self.stderr)
        return self


def quote_command(cmd: str | Sequence[str]) -> str:
    """A list is quoted word by word (nothing in it is interpreted by the
    guest's shell); a string is passed as a shell command on purpose."""
    if isinstance(cmd, str):
        return cmd
    return " ".join(shlex.quote(str(c)) for c in cmd)


class SSHChannel:
    """One authenticated SSH connection to the guest."""

    def __init__(self, port: int, key_path: Path, host_key: tuple[str, str], host: str = "127.0.0.1",
                 user: str = "root") -> None:
        self.host, self.port, self.user = host, port, user
        self.key_path = key_path
        self.host_key = host_key
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

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
        command = quote_command(cmd)
        deadline = Deadline(timeout)
        # The guest's sshd accepts LC_* variables: the tag finds this command's
        # processes again if it has to be interrupted.
        tag = uuid.uuid4().hex
        chan = self.open_channel(command, timeout=min(10.0, timeout), env={RUN_TAG: tag})
        out, err = io.BytesIO(), io.BytesIO()
        last_data = last_watch = time.monotonic()
        try:
            if stdin is not None:
                chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
            chan.shutdown_write()
            chan.settimeout(0.1)
            while True:
                progressed = False
                if chan.recv_ready():
                    data = chan.recv(65536)
                    out.write(data)
                    if on_stdout:
                        on_stdout(data.decode(errors="replace"))
                    progressed = True
                if chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    err.write(data)
                    if on_stderr:
                        on_stderr(data.decode(errors="replace"))
                    progressed = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if chan.closed and not progressed:
                    break
                if deadline.expired:
                    raise GuestTimeout(f"guest command {command!r}", timeout,
                                       out.getvalue().decode(errors="replace"))
                now = time.monotonic()
                if progressed:
                    last_data = now
                elif watchdog is not None and now - last_watch >= 1.0:
                    watchdog(now - last_data)
                    last_watch = time.monotonic()
                if not progressed:
                    time.sleep(0.005)
            rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except socket.timeout as exc:
            raise GuestTimeout(f"guest command {command!r}", timeout) from exc
        except KeyboardInterrupt:
            chan.close()
            self.interrupt_tagged(tag)
            raise
        finally:
            chan.close()
        if rc == -1:
            raise SSHDropped(command)
        result = CommandResult(command, rc, out.getvalue().decode(errors="replace"),
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
        except (ChannelError, OSError, EOFError, paramiko.SSHException, socket.timeout):
            pass    # best effort: the connection may be what was interrupted

    def run_passthrough(self, cmd: str | Sequence[str], stdin: BinaryIO | None = None,
                        stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                        timeout: float | None = None) -> int:
        """Like ``ssh host cmd``: stream stdin/stdout/stderr, return the exit code.
        Ctrl-C (KeyboardInterrupt) interrupts the guest command too, as in ``run``."""
        stdout = stdout or sys.stdout.buffer
        stderr = stderr or sys.stderr.buffer
        tag = uuid.uuid4().hex
        chan = self.open_channel(quote_command(cmd), timeout=10.0, env={RUN_TAG: tag})
        deadline = Deadline(timeout) if timeout else None

        def feed() -> None:
            try:
                if stdin is not None:
                    while chunk := stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(65536):
                        chan.sendall(chunk)
            except (OSError, EOFError):
                pass
            finally:
                try:
                    chan.shutdown_write()
                except (OSError, EOFError):
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            while True:
                busy = False
                if chan.recv_ready():
                    stdout.write(chan.recv(65536))
                    stdout.flush()
                    busy = True
                if chan.recv_stderr_ready():
                    stderr.write(chan.recv_stderr(65536))
                    stderr.flush()
                    busy = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    return chan.recv_exit_status()
                if chan.closed and not busy:
                    raise ChannelError("SSH connection lost while the command ran")
                if deadline and deadline.expired:
                    raise GuestTimeout("guest command", deadline.seconds)
                if not busy:
                    time.sleep(0.005)
        except KeyboardInterrupt:
            chan.close()
            self.interrupt_tagged(tag)
            raise
        finally:
            chan.close()

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
