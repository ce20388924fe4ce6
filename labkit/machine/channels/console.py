"""The guest's serial console, through pexpect over QEMU's console socket.

Used for the boot log, the readiness and host-key markers printed by the
labkit init, kernel panic detection, and interactive emergency use. QEMU also
copies everything to ``console.log`` in the VM's state dir, so nothing is lost
while nobody is connected.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from labkit.errors import ChannelError, GuestPanic, GuestTimeout, LaunchError
from labkit.timeout import Deadline

READY_RE = r"labkit: ready (\S+) uptime=(\S+)"
HOSTKEY_RE = r"labkit: hostkey (ssh-\S+) (\S+)"
PANIC_RE = r"Kernel panic - not syncing[^\r\n]*"
RESCUE_RE = r"labkit-initramfs: ([^\r\n]+)"


@dataclass(frozen=True)
class BootInfo:
    """What the console said during boot."""

    kernel_release: str
    guest_uptime_s: float
    host_key: tuple[str, str] | None


class ConsoleChannel:
    """pexpect over the console socket (``fdspawn`` on a connected UNIX socket)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.child: pexpect.fdpexpect.fdspawn | None = None

    def connect(self, timeout: float = 5.0) -> ConsoleChannel:
        deadline = Deadline(timeout)
        last: OSError | None = None
        while not deadline.expired:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                self.child = pexpect.fdpexpect.fdspawn(s.fileno(), timeout=timeout, encoding="utf-8",
                                                        codec_errors="replace")
                return self
            except OSError as exc:
                s.close()
                last = exc
                time.sleep(0.05)
        qemu_log = self.path.parent / "qemu.log"
        if qemu_log.exists() and qemu_log.stat().st_size:
            # The socket was made but nobody listens: QEMU exited during
            # start-up (e.g. it could not bind the SSH port); say why.
            raise LaunchError(f"cannot connect to the serial console at {self.path}: {last}; QEMU exited",
                              output=qemu_log.read_text(errors="replace"))
        raise ChannelError(f"cannot connect to the serial console at {self.path}: {last}")

    def expect(self, patterns: list[str], timeout: float) -> int:
        if self.child is None:
            raise ChannelError("console not connected")
        return self.child.expect(patterns, timeout=timeout)

    def wait_boot(self, timeout: float, on_line=None) -> BootInfo:
        """Wait for the init's readiness marker; detect panics and rescue shells."""
        if self.child is None:
            raise ChannelError("console not connected")
        deadline = Deadline(timeout)
        host_key = None
        seen = ""
        while True:
            try:
                self.child.expect(r"[^\r\n]*\r?\n", timeout=max(0.01, deadline.remaining))
            except pexpect.TIMEOUT as exc:
                raise GuestTimeout("the guest to boot (readiness marker on the console)", timeout,
                                   seen + (self.child.before or "")) from exc
            except (pexpect.EOF, OSError) as exc:
                # EOF or ECONNRESET: QEMU exited (e.g. it could not bind the SSH port) or crashed.
                raise LaunchError("QEMU closed the console before the guest was ready "
                                  "(it exited or crashed)", output=seen + (self.child.before or "")) from exc
            line = self.child.after.rstrip("\r\n")
            seen = (seen + line + "\n")[-20000:]
            if on_line and line.strip():
                on_line(line)
            if m := re.search(READY_RE, line):
                return BootInfo(m.group(1), float(m.group(2)), host_key)
            if m := re.search(HOSTKEY_RE, line):
                host_key = (m.group(1), m.group(2))
            elif re.search(PANIC_RE, line):
                try:   # the panic message is followed by a backtrace; keep some of it
                    self.child.expect([r"end Kernel panic[^\r\n]*", pexpect.EOF, pexpect.TIMEOUT], timeout=2)
                    seen += (self.child.before or "")
                except pexpect.ExceptionPexpect:
                    pass
                raise GuestPanic(seen)
            elif m := re.search(RESCUE_RE, line):
                raise LaunchError("the guest's initramfs could not mount the root disk: " + m.group(1),
                                  output=seen)

    def sendline(self, text: str) -> None:
        """Type ``text`` and Enter on the console (root's shell there)."""
        if self.child is None:
            raise ChannelError("console not connected")
        self.child.sendline(text)

    def interact(self) -> None:
        """Hand the console to the user's terminal (Ctrl-] leaves)."""
        if self.child is None:
            raise ChannelError("console not connected")
        self.child.interact(escape_character=chr(29))

    def close(self) -> None:
        if self.child is not None:
            try:
                self.child.close()      # closes the socket's file descriptor
            except (OSError, pexpect.ExceptionPexpect):
                pass
            self.child = None
            if self.sock is not None:
                self.sock.detach()
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def __enter__(self) -> ConsoleChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

