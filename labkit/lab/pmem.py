"""Persistent memory: the guest's NVDIMM namespaces as ndctl reports them, and
their roles in the lab (fs-dax for XFS, fs-dax for ext4, device-dax)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from labkit.errors import CommandFailed, LabError
from labkit.lab.guest.vocab import NS_MODES, PMEM_ROLES
from labkit.lab.protocols import Machine
from labkit.lab.validate import check_namespace, choose

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Namespace:
    """One NVDIMM namespace as ndctl reports it (the facts a learner needs)."""

    dev: str
    region: str
    mode: str
    size: int
    align: int | None = None
    blockdev: str | None = None
    chardev: str | None = None
    map: str | None = None

    @classmethod
    def from_ndctl(cls, region: str, d: dict[str, Any]) -> Namespace:
        chardev = d.get("chardev")
        if not chardev and d.get("daxregion", {}).get("devices"):
            chardev = d["daxregion"]["devices"][0].get("chardev")
        return cls(dev=d.get("dev", ""), region=region, mode=d.get("mode", "?"), size=int(d.get("size", 0)),
                   align=d.get("align"), blockdev=d.get("blockdev"), chardev=chardev, map=d.get("map"))


def parse_ndctl(text: str) -> list[Namespace]:
    """``ndctl list -RNv`` JSON (a region object, or a list of them) -> namespaces."""
    text = text.strip()
    if not text:
        return []
    data = json.loads(text)
    regions = data if isinstance(data, list) else data.get("regions", [data])
    out = []
    for r in regions:
        for ns in r.get("namespaces", []):
            out.append(Namespace.from_ndctl(r.get("dev", "?"), ns))
    return sorted(out, key=lambda n: n.dev)


def explain_ndctl(stderr: str) -> str:
    """ndctl's error with a hint a learner can act on."""
    if "misaligned" in stderr:
        return stderr + ("\n  explanation: the label area left the namespace misaligned; run ndctl "
                         "disable-region, init-labels, enable-region first, or use label-less DIMMs")
    return stderr


class Pmem:
    """The guest's namespaces and the role each plays in the lab."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.roles: dict[str, Namespace] = {}    # cached after prepare(); cleared by set_mode()

    def namespaces(self) -> list[Namespace]:
        r = self.vm.run(["ndctl", "list", "-RNv"])
        return parse_ndctl(r.stdout if r.ok else "")

    def set_mode(self, namespace: str, mode: str) -> Namespace:
        """Reconfigure a namespace (its data is lost, as with ndctl)."""
        choose(mode, NS_MODES, "namespace mode")
        check_namespace(namespace)
        log.debug("namespace %s -> %s", namespace, mode)
        self.roles = {}
        r = self.vm.run(["ndctl", "create-namespace", "-f", "-e", namespace, "-m", mode])
        if r.rc != 0:
            raise CommandFailed(r.command, r.rc, r.stdout, explain_ndctl(r.stderr))
        return Namespace.from_ndctl("?", json.loads(r.stdout))

    def _settled(self) -> list[Namespace]:
        nss = self.namespaces()
        for _ in range(5):      # ndctl can briefly list nothing while a region is still settling
            if len(nss) >= len(PMEM_ROLES):
                break
            time.sleep(1.0)
            nss = self.namespaces()
        if len(nss) < len(PMEM_ROLES):
            raise LabError(f"the guest has {len(nss)} NVDIMM namespaces; the lab needs {len(PMEM_ROLES)} "
                           "(start the VM with three NVDIMMs, the default)")
        return nss

    def prepare(self) -> dict[str, Namespace]:
        """Region 0 -> fsdax (XFS), region 1 -> fsdax (ext4), region 2 -> devdax.
        Only namespaces in the wrong mode are converted, so data survives."""
        roles = {}
        converted = False
        for (role, mode), ns in zip(PMEM_ROLES.items(), self._settled()):
            if ns.mode != mode:
                ns = self.set_mode(ns.dev, mode)
                converted = True
            roles[role] = ns
        fresh = {n.dev: n for n in self.namespaces()} if converted else {}
        self.roles = {role: fresh.get(ns.dev, ns) for role, ns in roles.items()}
        log.debug("pmem roles: %s", {r: ns.dev for r, ns in self.roles.items()})
        return self.roles

    def device_of(self, role: str) -> str | None:
        """The device node the namespace of ``role`` has now (/dev/pmemN or
        /dev/daxN.M), without converting anything; None if it has none."""
        roles = self.roles or dict(zip(PMEM_ROLES, self.namespaces()))
        ns = roles.get(role)
        if ns is None or ns.mode != PMEM_ROLES[role]:
            return None
        node = ns.chardev if PMEM_ROLES[role] == "devdax" else ns.blockdev
        return f"/dev/{node}" if node else None

    def reset(self, namespaces: list[Namespace] | None = None) -> list[Namespace]:
        """Every namespace back to raw mode (erases the persistent memory)."""
        for ns in self.namespaces() if namespaces is None else namespaces:
            if ns.mode != "raw":
                self.set_mode(ns.dev, "raw")
        return self.namespaces()
