"""A VM's state directory: its file names in one place, the ``vm.json``
record shared between processes, and the checks made before a start.

The record is read defensively: a ``vm.json`` that is not a JSON object, or
holds values of the wrong type, is treated as "nothing recorded" (and kept
aside as ``vm.json.corrupt``) instead of locking the VM out of every command.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from labkit.errors import StateDirError
from labkit.machine.state import RECORDED, VMState, from_record

log = logging.getLogger(__name__)

MIN_FREE_MB = 256          # room for the disk overlay's growth and the logs


@dataclass
class VMInfo:
    """What is recorded about a VM in ``vm.json`` (shared between processes)."""

    name: str
    kernel: str
    state: str = "stopped"          # a VMState of RECORDED, as text (read and written through `lifecycle`)
    pid: int = 0
    qemu_started: float = 0.0       # start of that QEMU in seconds since host boot: its identity beyond the PID
    starter_pid: int = 0            # the process that is starting it (while state == "starting")
    ssh_port: int = 0
    accel: str = ""
    accel_reason: str = ""
    kernel_release: str = ""
    host_key: list[str] = field(default_factory=list)
    base_sha256: str = ""
    nvdimm_mb: list[int] = field(default_factory=list)
    started_at: float = 0.0
    boot_seconds: float = 0.0
    guest_uptime_s: float = 0.0
    persistent: bool = True
    qemu_argv: list[str] = field(default_factory=list)
    start_kind: str = ""           # "cold" or "warm" (restored from a snapshot)
    snapshot: str = ""             # the snapshot's key, for a warm start
    warm_error: str = ""           # why the last warm start fell back to a cold boot
    snapshot_refused: str = ""     # why a snapshot that was there was not trusted (see machine/trust.py)
    phases: dict[str, float] = field(default_factory=dict)   # seconds per start-up phase

    @property
    def lifecycle(self) -> VMState:
        """The recorded state (stopped, starting or running)."""
        return from_record(self.state)

    @lifecycle.setter
    def lifecycle(self, state: VMState) -> None:
        if state not in RECORDED:
            raise ValueError(f"a VM record holds {', '.join(map(str, RECORDED))}, not {state}")
        self.state = state.value

    def described(self) -> dict[str, Any]:
        """The recorded facts ``labkit vm status --json`` prints."""
        return dict(kernel=self.kernel, kernel_release=self.kernel_release, accel=self.accel,
                    accel_reason=self.accel_reason, ssh_port=self.ssh_port, pid=self.pid,
                    boot_seconds=self.boot_seconds, nvdimm_mb=self.nvdimm_mb, start_kind=self.start_kind,
                    snapshot=self.snapshot, warm_error=self.warm_error, snapshot_refused=self.snapshot_refused,
                    phases=self.phases)

    @classmethod
    def from_json(cls, data: Any) -> VMInfo | None:
        """A record from parsed JSON, or None when it is not a usable record."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("kernel"), str):
            return None
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.default is not MISSING:
                default: Any = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = ""
            if not _same_kind(value, default):
                return None
            kw[f.name] = value
        return cls(**kw)

    @classmethod
    def load(cls, path: Path) -> VMInfo | None:
        """The record at ``path``; None if there is none or it is unreadable."""
        try:
            text = path.read_text()
        except OSError:
            return None
        try:
            info = cls.from_json(json.loads(text))
        except ValueError:
            info = None
        if info is None:
            log.warning("%s is not a VM record; keeping it aside as vm.json.corrupt", path)
            try:
                path.replace(path.with_name(path.name + ".corrupt"))
            except OSError:
                pass
        return info

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        tmp.replace(path)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if default is None:
        return True
    return isinstance(value, type(default))


class StateDir:
    """The files of one VM. Only names and simple file operations live here."""

    SOCKETS = ("qemu.pid", "qmp.sock", "watch.sock", "console.sock")

    def __init__(self, path: Path) -> None:
        self.path = path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def info(self) -> Path:
        return self.path / "vm.json"

    @property
    def key(self) -> Path:
        return self.path / "id_ed25519"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def watch_socket(self) -> Path:
        """The watchdog's own QMP monitor (``qmp.sock`` may be held by ``vm.qmp``)."""
        return self.path / "watch.sock"

    @property
    def console_socket(self) -> Path:
        return self.path / "console.sock"

    @property
    def overlay(self) -> Path:
        return self.path / "root.qcow2"

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    def pmem(self, index: int) -> Path:
        return self.path / f"pmem{index}.img"

    def pmem_files(self) -> list[Path]:
        return sorted(self.path.glob("pmem*.img"))

    def load_info(self) -> VMInfo | None:
        return VMInfo.load(self.info)

    def record_stopped(self) -> None:
        info = self.load_info()
        if info is not None:
            info.lifecycle, info.pid, info.starter_pid = VMState.STOPPED, 0, 0
            info.save(self.info)

    def read_pid(self) -> int:
        """The PID QEMU wrote to its pidfile, 0 if none."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return 0

    def clear_sockets(self) -> None:
        for f in self.SOCKETS:
            (self.path / f).unlink(missing_ok=True)

    def keep_last_console_log(self) -> None:
        """The next boot starts console.log afresh: keep the last one (it may
        hold a kernel panic the learner has not read yet)."""
        if self.console_log.exists() and self.console_log.stat().st_size:
            self.console_log.replace(self.path / "console.prev.log")

    def console_tail(self, chars: int = 3000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def qemu_log_tail(self, chars: int = 1000) -> str:
        try:
            return self.qemu_log.read_text(errors="replace").strip()[-chars:]
        except OSError:
            return ""

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise StateDirError(self.path, f"cannot be written ({exc.strerror})") from exc

    def check_writable(self, min_free_mb: int = MIN_FREE_MB) -> None:
        """Refuse to start with a state dir that cannot be written or is
        nearly full: a clear error now instead of a QEMU that dies later."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.path / ".write-test"
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
            st = os.statvfs(self.path)
        except OSError as exc:
            raise StateDirError(self.path, f"cannot be written ({exc.strerror})") from exc
        free_mb = st.f_bavail * st.f_frsize // 2**20
        if free_mb < min_free_mb:
            raise StateDirError(self.path, f"has only {free_mb} MiB free; the VM needs at least "
                                           f"{min_free_mb} MiB for its disk overlay and logs")


_THROWAWAY_RE = re.compile(r"^labkit-.+-(\d+)-[A-Za-z0-9_]{8}$")


def sweep_stale_throwaways() -> list[Path]:
    """Remove throwaway VM state dirs (with their private keys) left in the
    temporary directory by a process that was killed; returns what was removed."""
    from labkit.machine.process import pid_alive  # (process imports nothing from here)

    removed = []
    for d in Path(tempfile.gettempdir()).glob("labkit-*"):
        m = _THROWAWAY_RE.match(d.name)
        try:
            mine = d.is_dir() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if m and mine and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            log.debug("removed %s, left behind by PID %s", d, m.group(1))
    return removed
