"""``CgroupSpawner``: JupyterHub's LocalProcessSpawner with each learner's
server in a cgroup of its own (``labkit.cgroups``: v1 or v2).

Everything the server starts inherits the group: kernels, terminals and the
lab VM's QEMU, so the memory limit covers the VM too, and stopping or culling
the server kills the whole group (no orphaned VM, whatever the VM's session
or parent). It is for hosts whose PID 1 is not systemd; where it is,
``deploy/hub/jupyterhub_config.py`` uses SystemdSpawner (a transient scope
per server gives the same limits and kill-on-stop).

The limits are JupyterHub's own ``mem_limit`` and ``cpu_limit`` (which
LocalProcessSpawner otherwise ignores) plus ``pids_limit``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from traitlets import Integer, Unicode

from labkit.cgroups import Group, Limits

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CgroupSpawner(LocalProcessSpawner):
    """A local Unix user's server, limited and killed as one cgroup."""

    pids_limit = Integer(1024, help="Most processes and threads a learner's server may run at once.").tag(
        config=True)
    cgroup_root = Unicode("/sys/fs/cgroup", help="Where the cgroup hierarchy is mounted (v2) or its v1 controllers are.").tag(config=True)
    cgroup_parent = Unicode("labkit-hub", help="The group under which each server gets its own.").tag(config=True)

    @property
    def group(self) -> Group:
        name = _UNSAFE.sub("_", f"{self.user.name}-{self.name or 'default'}")
        return Group(name, parent=self.cgroup_parent, root=Path(self.cgroup_root))

    def limits(self) -> Limits:
        if not self.mem_limit:
            raise ValueError("CgroupSpawner needs c.Spawner.mem_limit (a learner's VM is ~1 GiB of guest RAM)")
        return Limits(memory_bytes=int(self.mem_limit), cpus=float(self.cpu_limit or 0), pids=self.pids_limit)

    async def start(self) -> Any:
        group = self.group
        group.remove()            # a group left by a hub that was killed: its processes go first
        group.create(self.limits())
        self.log.info("cgroup %s/%s for %s: %s", group.parent, group.name, self.user.name, self.limits())
        try:
            return await super().start()
        except BaseException:
            group.remove()
            raise

    def make_preexec_fn(self, name: str) -> Any:
        setuid = super().make_preexec_fn(name)
        group = self.group

        def preexec() -> None:   # in the child, as root, before it becomes the learner
            group.add(os.getpid())
            setuid()

        return preexec

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)
        finally:
            self._remove_group()

    async def poll(self) -> int | None:
        status = await super().poll()
        if status is not None:    # the server died (OOM, crash): the hub will not call stop()
            self._remove_group()
        return status

    def _remove_group(self) -> None:
        group = self.group
        if group.exists():
            killed = group.kill()
            group.remove()
            self.log.info("cgroup %s/%s removed (%d processes killed)", group.parent, group.name, killed)
