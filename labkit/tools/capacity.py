"""`labkit doctor --capacity`: how many learners this host holds at once.

Memory decides it: each learner's lab VM (QEMU with a 1 GiB guest, of which
a warm-started guest touches a few hundred MiB) plus their Jupyter server and
kernel. The per-learner cost is measured on this host when lab VMs are
running (their QEMU's RSS/USS, or the whole learner's cgroup peak under the
hub's CgroupSpawner), else the reference figure measured by the hub test.
CPU decides how many can *work* at the same moment: under TCG a busy guest
keeps about one core busy, an idle one costs little (measured, too).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

# Measured by tests/test_hub.py on a 2-core TCG host (2026-12-01): the peak of a
# learner's whole cgroup (server, kernel, QEMU, pmem page cache) after a warm
# start and one pin experiment was 508-520 MiB over three runs; QEMU alone
# 346-357 MiB RSS, 324-336 MiB USS. Used when no lab VM runs here to measure.
REFERENCE_LEARNER_MB = 520
REFERENCE_SOURCE = "reference: a learner's cgroup peak measured by the hub test (warm start + one pin)"
SERVER_OVERHEAD_MB = 150    # Jupyter server + one kernel with labkit imported, added to a bare QEMU's RSS
HOST_RESERVE_MB = 1024      # the hub, the proxy, the page cache of the shared images
SAFETY = 1.25               # learners' VMs grow as they work (page cache, pmem pages written)


@dataclass(frozen=True)
class VMSample:
    """One running lab VM, measured."""

    pid: int
    name: str
    rss_mb: float
    uss_mb: float | None
    cpu_cores: float
    cgroup_peak_mb: float | None

    @property
    def learner_mb(self) -> float:
        """The whole learner: their cgroup's peak when there is one, else QEMU plus a server's overhead."""
        if self.cgroup_peak_mb:
            return self.cgroup_peak_mb
        return self.rss_mb + SERVER_OVERHEAD_MB


@dataclass(frozen=True)
class Capacity:
    cores: int
    memory_mb: int
    per_learner_mb: float
    source: str
    idle_cpu_cores: float | None

    @property
    def by_memory(self) -> int:
        usable = self.memory_mb - HOST_RESERVE_MB
        return max(0, int(usable // (self.per_learner_mb * SAFETY)))

    @property
    def working_at_once(self) -> int:
        """Learners whose guests can all be busy at the same moment (one core each)."""
        return self.cores

    def text(self) -> str:
        idle = (f"the running VMs use {self.idle_cpu_cores:.2f} core each now (measured)"
                if self.idle_cpu_cores is not None else "no VM running to measure its CPU use")
        return "\n".join([
            f"host: {self.cores} cores, {self.memory_mb} MiB memory ({HOST_RESERVE_MB} MiB kept for the hub "
            "and the page cache)",
            f"per learner: {self.per_learner_mb:.0f} MiB ({self.source}); x{SAFETY} for growth",
            f"concurrent learners by memory: {self.by_memory}",
            f"learners running an experiment at the same moment without slowing each other: "
            f"{self.working_at_once} (a busy TCG guest keeps about one core busy); {idle}",
            f"=> this host holds {self.by_memory} logged-in learners; beyond that add hosts "
            "(docs/slurm-and-kubernetes.md)",
        ])


def sample_running(interval: float = 1.0) -> list[VMSample]:
    """Every running lab VM's QEMU on this host (any user's, as far as this user may see)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if argv and "qemu-system" in os.path.basename(argv[0]) and "-name" in argv:
            at = argv.index("-name")
            if at + 1 < len(argv) and argv[at + 1].startswith("labkit-"):
                procs.append((p, argv[at + 1]))
    for p, _ in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    if procs:
        time.sleep(interval)      # cpu_percent measures over this interval
    out = []
    for p, name in procs:
        try:
            rss = p.memory_info().rss / 2**20
            try:
                uss: float | None = p.memory_full_info().uss / 2**20
            except psutil.AccessDenied:
                uss = None
            cpu = p.cpu_percent(None) / 100
        except psutil.Error:
            continue
        out.append(VMSample(p.pid, name, rss, uss, cpu, _cgroup_peak_mb(p.pid)))
    return out


def _cgroup_peak_mb(pid: int) -> float | None:
    """The peak memory of the learner's hub cgroup (``/labkit-hub*/<learner>``) that holds ``pid``, if any."""
    from labkit.cgroups import peak_of

    peak = peak_of(pid, "labkit-hub")       # not a learner's group (a session's, a job's): None
    return None if peak is None else peak / 2**20


def capacity(samples: list[VMSample] | None = None) -> Capacity:
    samples = sample_running() if samples is None else samples
    cores = os.cpu_count() or 1
    memory_mb = psutil.virtual_memory().total // 2**20
    if samples:
        worst = max(samples, key=lambda s: s.learner_mb)
        how = "cgroup peak" if worst.cgroup_peak_mb else f"QEMU RSS + {SERVER_OVERHEAD_MB} MiB for the server"
        return Capacity(cores, memory_mb, worst.learner_mb,
                        f"measured now: the largest of {len(samples)} running lab VM(s), {how}",
                        sum(s.cpu_cores for s in samples) / len(samples))
    return Capacity(cores, memory_mb, REFERENCE_LEARNER_MB, REFERENCE_SOURCE, None)
