"""One cgroup, on cgroup v1 or v2: make it, limit it, put processes in it,
kill everything in it, wait until it is empty, remove it.

Two users: the grader's sandbox gives each submission's Jupyter kernel a
group (``labkit.course.sandbox``), and the hub's ``CgroupSpawner`` gives each
learner's server one (``labkit.deploy.spawner``), so that a server and
everything it starts (kernels, terminals, the lab VM's QEMU) are limited and
killed together.

Which hierarchy a host has is read from the files, not assumed:
``<root>/cgroup.controllers`` exists on the unified (v2) hierarchy, where a
group is one directory and the controllers are switched on for children in
each ancestor's ``cgroup.subtree_control``; without it, each v1 controller is
a hierarchy of its own (``<root>/memory``, ``<root>/cpu``, ...), and a group is
one directory per controller. A hybrid host (v1 controllers with an empty
v2 tree at ``<root>/unified``) is v1 here.

One set of units for both (:class:`Limits`): memory in bytes, CPU as a
fraction of the host's CPUs' time (1.5 = one and a half cores, 0 = no quota)
and a relative weight on v2's scale (1..10000, 100 the default; v1's
``cpu.shares`` are ``weight * 1024 / 100``), processes and threads as a count.

One way to empty a group (:meth:`Group.kill`): freeze it (nothing in it can
fork while the signals go out; v2's ``cgroup.kill`` does all of it in the
kernel when there is one), SIGKILL every member, thaw, and wait on each
member's pidfd until it is gone, again until no member is left or the
deadline passes. A freezer's state change has no event on either version,
so that one wait is a short poll bounded by the same deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import LabError
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "pids", "freezer")     # v1 hierarchies; on v2 the freezer is in every group
V2_CONTROLLERS = ("memory", "cpu", "pids")              # what v2 must delegate to a child (subtree_control)
CFS_PERIOD_US = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class CgroupError(LabError):
    """A cgroup could not be made, limited, joined or emptied."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Limits:
    """What one group may use: ``memory_bytes`` (swap is no way out),
    ``cpus`` a quota in cores (0 = none), ``pids`` the processes and threads
    at once, ``cpu_weight`` its share against its siblings when the CPUs are
    busy (v2's scale: 100 is the default)."""

    memory_bytes: int
    cpus: float = 0.0
    pids: int = 1024
    cpu_weight: int = 100

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.pids <= 0 or self.cpus < 0 or not 1 <= self.cpu_weight <= 10000:
            raise CgroupError(f"impossible cgroup limits {self}",
                              hint="memory and pids above 0, cpus 0 (no quota) or more, cpu_weight 1..10000")


def version(root: Path = ROOT) -> int:
    """2 on the unified hierarchy, else 1."""
    return 2 if (root / "cgroup.controllers").exists() else 1


def missing_controllers(root: Path = ROOT) -> list[str]:
    """The controllers this host's hierarchy lacks for a limited group (empty when all are there)."""
    if version(root) == 2:
        try:
            have = set((root / "cgroup.controllers").read_text().split())
        except OSError:
            have = set()
        return [c for c in V2_CONTROLLERS if c not in have]
    return [c for c in CONTROLLERS if not (root / c / "cgroup.procs").exists()]


def settings(limits: Limits, v: int) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write for ``limits`` on cgroup version ``v`` (pure)."""
    quota = int(limits.cpus * CFS_PERIOD_US) if limits.cpus > 0 else None
    if v == 2:
        return [("memory", "memory.max", str(limits.memory_bytes)),
                ("memory", "memory.swap.max", "0"),
                ("cpu", "cpu.weight", str(limits.cpu_weight)),
                ("cpu", "cpu.max", f"{quota if quota is not None else 'max'} {CFS_PERIOD_US}"),
                ("pids", "pids.max", str(limits.pids))]
    return [("memory", "memory.limit_in_bytes", str(limits.memory_bytes)),
            ("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes)),
            ("cpu", "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100))),
            ("cpu", "cpu.cfs_period_us", str(CFS_PERIOD_US)),
            ("cpu", "cpu.cfs_quota_us", str(quota if quota is not None else -1)),
            ("pids", "pids.max", str(limits.pids))]


# Files a kernel may lack (no swap accounting; swap off): skipped when absent, never created.
_OPTIONAL = {"memory.memsw.limit_in_bytes", "memory.swap.max"}


class Group:
    """The group ``<parent>/<name>``: on v1 one directory per mounted controller
    (``<root>/<controller>/<parent>/<name>``), on v2 ``<root>/<parent>/<name>``."""

    def __init__(self, name: str, parent: str = "labkit-hub", root: Path = ROOT) -> None:
        for part in (name, parent):
            if not _NAME_RE.match(part) or part in (".", ".."):
                raise CgroupError(f"{part!r} cannot name a cgroup (letters, digits, '_', '.', '-' only)")
        self.name, self.parent, self.root = name, parent, root
        self.version = version(root)

    def __repr__(self) -> str:
        return f"Group({self.parent}/{self.name}, v{self.version})"

    def dir(self, controller: str) -> Path:
        """Where ``controller``'s files of this group are (on v2 one directory for all)."""
        if self.version == 2:
            return self.root / self.parent / self.name
        return self.root / controller / self.parent / self.name

    def dirs(self) -> list[Path]:
        """Every directory of the group on this host (each gets a process's pid)."""
        if self.version == 2:
            return [self.dir("")]
        return [self.dir(c) for c in CONTROLLERS if (self.root / c / "cgroup.procs").exists()]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs())

    # -- set up ------------------------------------------------------------------
    def create(self, limits: Limits, require: bool = True) -> list[Path]:
        """Make the group and set its limits (idempotent); its directories.
        ``require``: every controller must be there (else CgroupError); without
        it, the group gets the controllers the host has."""
        missing = missing_controllers(self.root)
        if missing and require:
            raise CgroupError(f"the cgroup-v{self.version} controllers {', '.join(missing)} are not available "
                              f"under {self.root}",
                              hint="on a systemd host use SystemdSpawner, or give labkit a delegated cgroup "
                                   "subtree with those controllers (v1: mount them)")
        try:
            if self.version == 2:
                self._delegate()
            for d in self.dirs():
                d.mkdir(parents=True, exist_ok=True)
            for controller, knob, value in settings(limits, self.version):
                if controller in missing:
                    continue
                path = self.dir(controller) / knob
                if knob in _OPTIONAL and not path.exists():
                    continue
                path.write_text(value)
        except OSError as exc:
            raise CgroupError(f"cannot set up the cgroup {self.parent}/{self.name}: {exc}",
                              hint="making cgroups needs root (or a cgroup subtree delegated to this user)") from exc
        log.debug("cgroup %r: %s", self, limits)
        return self.dirs()

    def _delegate(self) -> None:
        """v2: switch the controllers on for the children of the root and of
        the parent (a controller a group's parent has not delegated has no files in it)."""
        have = set((self.root / "cgroup.controllers").read_text().split())
        parent = self.root / self.parent
        parent.mkdir(exist_ok=True)
        for d in (self.root, parent):
            enabled = set((d / "cgroup.subtree_control").read_text().split()) \
                if (d / "cgroup.subtree_control").exists() else set()
            todo = [f"+{c}" for c in V2_CONTROLLERS if c in have and c not in enabled]
            if todo:
                (d / "cgroup.subtree_control").write_text(" ".join(todo))

    def add(self, pid: int) -> None:
        """Put ``pid`` (and so everything it starts later) into the group.
        Safe to call between fork and exec (plain writes, no allocation-heavy work)."""
        for d in self.dirs():
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(pid))

    def read(self, controller: str, knob: str) -> str:
        return (self.dir(controller) / knob).read_text().strip()

    # -- look ----------------------------------------------------------------------
    def pids(self) -> set[int]:
        """Every process in the group (in any of its directories)."""
        return members(self.dirs())

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed."""
        knob = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in self.read("memory", knob).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def memory_peak(self) -> int | None:
        """The most memory the group has used, in bytes (None where the kernel does not say)."""
        knob = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int(self.read("memory", knob))
        except (OSError, ValueError):
            return None

    # -- tear down -------------------------------------------------------------------
    def kill(self, timeout: float = 20.0) -> int:
        """SIGKILL every process in the group and wait until it is empty (see
        the module's docstring). Returns how many were signalled; CgroupError
        if some survive ``timeout``."""
        deadline = Deadline(timeout)
        killed = 0
        while True:
            found = self.pids()
            if not found:
                return killed
            if deadline.expired:
                raise CgroupError(f"processes {sorted(found)} of cgroup {self.parent}/{self.name} "
                                  f"survived SIGKILL for {timeout:.0f} s")
            killed += self._kill_round(found, deadline)

    def _kill_round(self, found: set[int], deadline: Deadline) -> int:
        fds: list[int] = []
        if self.version == 2 and (self.dir("") / "cgroup.kill").exists():
            fds = _pidfds(found)
            (self.dir("") / "cgroup.kill").write_text("1")       # the kernel kills it all, forks included
            _wait_pidfds(fds, deadline)
            return len(fds)
        self._freeze(True, deadline)
        try:
            fds = _pidfds(found | self.pids())
            for fd in fds:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            self._freeze(False, deadline)                     # v1: frozen tasks die only once thawed
        _wait_pidfds(fds, deadline)
        return len(fds)

    def _freeze(self, frozen: bool, deadline: Deadline) -> None:
        if self.version == 2:
            knob, value = self.dir("") / "cgroup.freeze", "1" if frozen else "0"
            done = _events_say(self.dir("") / "cgroup.events", "frozen", value)
        else:
            knob, value = self.dir("freezer") / "freezer.state", "FROZEN" if frozen else "THAWED"
            done = _file_says(knob, value)
        try:
            knob.write_text(value)
        except OSError:
            return                      # no freezer (a kernel or host without one): kill anyway
        if frozen:
            poll_until(done, deadline)

    def remove(self, timeout: float = 20.0) -> None:
        """Kill what is left and remove the group's directories (and the parent,
        once the last group in it is gone)."""
        if not self.exists():
            return
        self.kill(timeout)
        for d in self.dirs():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot remove {d}: {exc}") from exc
            with contextlib.suppress(OSError):
                d.parent.rmdir()         # other groups are still in it
        log.debug("cgroup %r removed", self)


def members(dirs: list[Path]) -> set[int]:
    """The processes in these cgroup directories."""
    out: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError, ValueError):
            out.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return out


def poll_until(done: Callable[[], bool], deadline: Deadline, interval: float = 0.01) -> bool:
    """For the one state with no event (a freezer settling): poll, bounded by ``deadline``."""
    while not done():
        if deadline.expired:
            return False
        time.sleep(interval)
    return True


def _file_says(path: Path, value: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return path.read_text().strip() == value
        except OSError:
            return True
    return check


def _events_say(path: Path, key: str, value: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return f"{key} {value}" in path.read_text().splitlines()
        except OSError:
            return True
    return check


def _pidfds(pids: set[int]) -> list[int]:
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    return fds


def _wait_pidfds(fds: list[int], deadline: Deadline) -> None:
    """Wait until each process is gone (a zombie counts: its parent reaps it); closes the fds.
    With none to wait on (members that exited before their pidfd was opened)
    it pauses briefly, so that a group the kernel has yet to update is not spun on."""
    if not fds:
        time.sleep(min(0.05, deadline.remaining))
    try:
        for fd in fds:
            select.select([fd], [], [], deadline.remaining)
    finally:
        for fd in fds:
            os.close(fd)


def group_of(pid: int) -> dict[str, str]:
    """The cgroup path of ``pid`` per controller (see :func:`parse_proc_cgroup`)."""
    return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller -> path from the text of /proc/PID/cgroup; on v2 (one line
    ``0::PATH``) every controller of :data:`CONTROLLERS` maps to that path."""
    out: dict[str, str] = {}
    unified = None
    for line in text.splitlines():
        num, controllers, path = line.split(":", 2)
        if num == "0" and controllers == "":
            unified = path
            continue
        for c in controllers.split(","):
            out[c] = path
    if unified is not None and not any(c in out for c in CONTROLLERS):
        out.update({c: unified for c in CONTROLLERS})
    return out


def peak_of(pid: int, parent_prefix: str, root: Path = ROOT) -> int | None:
    """The peak memory (bytes) of the group ``<parent>/<name>`` holding ``pid``,
    when its parent's name starts with ``parent_prefix``; else None."""
    try:
        parts = group_of(pid).get("memory", "/").strip("/").split("/")
    except OSError:
        return None
    if len(parts) != 2 or not parts[0].startswith(parent_prefix):
        return None
    try:
        return Group(parts[1], parent=parts[0], root=root).memory_peak()
    except CgroupError:
        return None


# -- what this process may use ------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """The CPUs and memory this process may use, and what bounded each: the
    smallest of the host, the CPU affinity mask, the process's own cgroup
    limits (v1 or v2, each ancestor's) and, inside a Slurm job, the job's
    request (a site without Slurm's cgroup plugin enforces nothing, but the
    job still asked for no more)."""

    cpus: int
    memory_bytes: int
    cpus_from: str
    memory_from: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_bounds(root: Path, groups: dict[str, str]) -> tuple[float | None, int | None]:
    """(cores, bytes): the tightest limits the process's groups and their
    ancestors set (memory: the limit less what the group already uses), None
    where nothing limits."""
    cores: list[float] = []
    memory: list[int] = []
    v2 = version(root) == 2
    for controller in ("cpu", "memory"):
        path = groups.get(controller)
        if path is None:
            continue
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(parts), -1, -1):
            base = (root if v2 else root / controller).joinpath(*parts[:depth])
            if controller == "cpu":
                if v2:
                    quota, _, period = (_read(base / "cpu.max") or "max").partition(" ")
                    if quota != "max" and period:
                        cores.append(int(quota) / int(period))
                else:
                    quota_s, period_s = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
                    if quota_s and period_s and int(quota_s) > 0:
                        cores.append(int(quota_s) / int(period_s))
            else:
                limit = _read(base / ("memory.max" if v2 else "memory.limit_in_bytes"))
                if limit and limit != "max" and int(limit) < 2**60:    # v1's "unlimited" is a huge number
                    usage = _read(base / ("memory.current" if v2 else "memory.usage_in_bytes"))
                    memory.append(max(0, int(limit) - int(usage or 0)))
    return (min(cores) if cores else None), (min(memory) if memory else None)


def _slurm_bounds(env: dict[str, str]) -> tuple[int | None, int | None]:
    """(CPUs, bytes) a Slurm job or array task asked for, from the variables Slurm sets in it."""
    if "SLURM_JOB_ID" not in env:
        return None, None
    cpus = None
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if env.get(key, "").isdigit():
            cpus = int(env[key])
            break
    memory = None
    if env.get("SLURM_MEM_PER_NODE", "").isdigit():
        memory = int(env["SLURM_MEM_PER_NODE"]) * 2**20
    elif env.get("SLURM_MEM_PER_CPU", "").isdigit():
        memory = int(env["SLURM_MEM_PER_CPU"]) * 2**20 * (cpus or 1)
    return cpus, memory


def allocation(root: Path = ROOT, groups: dict[str, str] | None = None, env: dict[str, str] | None = None,
               host_cpus: int | None = None, host_available: int | None = None) -> Allocation:
    """What this process may use now: see :class:`Allocation`. The arguments
    stand in for this process's groups, environment and host (tests).
    Used to size parallel guests (a grading task given one CPU of a 32-core
    node starts one guest at a time, not 32)."""
    import psutil

    env = dict(os.environ) if env is None else env
    cpus_from, memory_from = "the host", "the host's available memory"
    cpus = host_cpus if host_cpus is not None else (os.cpu_count() or 1)
    memory = host_available if host_available is not None else psutil.virtual_memory().available
    if host_cpus is None:
        try:
            affinity = len(os.sched_getaffinity(0))
            if affinity < cpus:
                cpus, cpus_from = affinity, "the CPU affinity mask"
        except OSError:
            pass
    if groups is None:
        try:
            groups = group_of(os.getpid())
        except OSError:
            groups = {}
    cg_cores, cg_memory = _cgroup_bounds(root, groups)
    if cg_cores is not None and max(1, int(cg_cores)) < cpus:
        cpus, cpus_from = max(1, int(cg_cores)), "the cgroup's CPU quota"
    if cg_memory is not None and cg_memory < memory:
        memory, memory_from = cg_memory, "the cgroup's memory limit"
    slurm_cpus, slurm_memory = _slurm_bounds(env)
    if slurm_cpus is not None and slurm_cpus < cpus:
        cpus, cpus_from = slurm_cpus, "the Slurm job's CPUs"
    if slurm_memory is not None and slurm_memory < memory:
        memory, memory_from = slurm_memory, "the Slurm job's memory"
    return Allocation(max(1, cpus), memory, cpus_from, memory_from)
