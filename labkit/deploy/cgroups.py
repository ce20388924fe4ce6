"""One learner's cgroup-v1 group: a memory, CPU and PIDs limit and a freezer,
one directory per controller, so that a learner's Jupyter server and
everything it starts (kernels, terminals, the lab VM's QEMU) are limited
together and can be killed together.

This is what SystemdSpawner gets from a systemd scope, for hosts whose PID 1
is not systemd but which mount the cgroup-v1 controllers (the hub's spawner
in ``labkit.deploy.spawner`` uses it). Killing a group freezes it first, so
nothing in it can fork while the signals go out, then SIGKILLs every member
and waits for each to be gone (on its pidfd) before the directories are
removed. Everything here runs as root (the hub).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import LabError
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids", "freezer")
CFS_PERIOD_US = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class CgroupError(LabError):
    """A cgroup could not be made, limited, joined or emptied."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Limits:
    """What one learner may use. ``cpus`` is a CFS quota in cores (1.5 = one
    and a half cores; 0 = no quota); ``cpu_shares`` weighs learners against
    each other when the host is busy."""

    memory_bytes: int
    cpus: float = 1.0
    pids: int = 1024
    cpu_shares: int = 1024


def missing_controllers(root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """The cgroup-v1 controllers this host does not mount (empty when all are there)."""
    return [c for c in CONTROLLERS if not (root / c / "cgroup.procs").exists()]


class Group:
    """``<root>/<controller>/<parent>/<name>`` for every controller."""

    def __init__(self, name: str, parent: str = "labkit-hub", root: Path = Path("/sys/fs/cgroup")) -> None:
        for part in (name, parent):
            if not _NAME_RE.match(part) or part in (".", ".."):
                raise CgroupError(f"{part!r} cannot name a cgroup (letters, digits, '_', '.', '-' only)")
        self.name, self.parent, self.root = name, parent, root

    def dir(self, controller: str) -> Path:
        return self.root / controller / self.parent / self.name

    def exists(self) -> bool:
        return any(self.dir(c).is_dir() for c in CONTROLLERS)

    # -- set up ------------------------------------------------------------------
    def create(self, limits: Limits) -> None:
        """Make the group's directories and set its limits (idempotent)."""
        missing = missing_controllers(self.root)
        if missing:
            raise CgroupError(f"the cgroup-v1 controllers {', '.join(missing)} are not mounted under {self.root}",
                              hint="use SystemdSpawner on hosts whose PID 1 is systemd (cgroup v2), or mount "
                                   "the v1 controllers")
        try:
            for c in CONTROLLERS:
                self.dir(c).mkdir(parents=True, exist_ok=True)
            self._write("memory", "memory.limit_in_bytes", limits.memory_bytes)
            if (self.dir("memory") / "memory.memsw.limit_in_bytes").exists():   # swap must not be a way out
                self._write("memory", "memory.memsw.limit_in_bytes", limits.memory_bytes)
            self._write("cpu", "cpu.shares", limits.cpu_shares)
            self._write("cpu", "cpu.cfs_period_us", CFS_PERIOD_US)
            self._write("cpu", "cpu.cfs_quota_us", int(limits.cpus * CFS_PERIOD_US) if limits.cpus > 0 else -1)
            self._write("pids", "pids.max", limits.pids)
        except OSError as exc:
            raise CgroupError(f"cannot set up the cgroup {self.parent}/{self.name}: {exc}",
                              hint="the hub must run as root to give learners their own cgroups") from exc
        log.debug("cgroup %s/%s: %s", self.parent, self.name, limits)

    def add(self, pid: int) -> None:
        """Put ``pid`` (and so everything it starts later) into the group.
        Safe to call between fork and exec (plain writes, no allocation-heavy work)."""
        for c in CONTROLLERS:
            with open(self.dir(c) / "cgroup.procs", "w") as f:
                f.write(str(pid))

    def _write(self, controller: str, knob: str, value: int | str) -> None:
        (self.dir(controller) / knob).write_text(str(value))

    def read(self, controller: str, knob: str) -> str:
        return (self.dir(controller) / knob).read_text().strip()

    # -- look ----------------------------------------------------------------------
    def pids(self) -> set[int]:
        """Every process in the group (in any of its controllers)."""
        out: set[int] = set()
        for c in CONTROLLERS:
            try:
                out.update(int(x) for x in (self.dir(c) / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return out

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed (``oom_kill`` in memory.oom_control)."""
        try:
            for line in self.read("memory", "memory.oom_control").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    # -- tear down -------------------------------------------------------------------
    def kill(self, timeout: float = 20.0) -> int:
        """SIGKILL every process in the group (frozen first, so none escapes by
        forking) and wait until the group is empty. Returns how many were killed."""
        deadline = Deadline(timeout)
        killed = 0
        while True:
            members = self.pids()
            if not members:
                return killed
            if deadline.expired:
                raise CgroupError(f"processes {sorted(members)} of cgroup {self.parent}/{self.name} "
                                  f"survived SIGKILL for {timeout:.0f} s")
            self._freeze(deadline)
            fds = []
            for pid in members:
                try:
                    fds.append(os.pidfd_open(pid))
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    continue
            self._thaw()
            _wait_pidfds(fds, deadline)

    def _freeze(self, deadline: Deadline) -> None:
        try:
            self._write("freezer", "freezer.state", "FROZEN")
            # FREEZING until every task stopped; no event for it in v1, so a short bounded poll.
            while self.read("freezer", "freezer.state") != "FROZEN" and not deadline.expired:
                time.sleep(0.01)
        except OSError:
            pass   # a group without a freezer directory: kill anyway

    def _thaw(self) -> None:
        try:
            self._write("freezer", "freezer.state", "THAWED")   # frozen tasks die only once thawed
        except OSError:
            pass

    def remove(self, timeout: float = 20.0) -> None:
        """Kill what is left and remove the group's directories."""
        if not self.exists():
            return
        self.kill(timeout)
        for c in CONTROLLERS:
            d = self.dir(c)
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot remove {d}: {exc}") from exc
            try:
                d.parent.rmdir()         # the last learner's group takes the parent with it
            except OSError:
                pass                     # other learners' groups are still in it
        log.debug("cgroup %s/%s removed", self.parent, self.name)


def _wait_pidfds(fds: list[int], deadline: Deadline) -> None:
    """Wait until each process is gone (a zombie counts: its parent reaps it)."""
    import select

    try:
        for fd in fds:
            select.select([fd], [], [], max(0.0, deadline.remaining))
    finally:
        for fd in fds:
            os.close(fd)


def group_of(pid: int) -> dict[str, str]:
    """The cgroup path of ``pid`` per v1 controller (from /proc/PID/cgroup)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _num, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c] = path
    return out
