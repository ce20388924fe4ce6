"""Pin counters over time and one long-term (RDMA) pin held on request."""

from __future__ import annotations

import logging
from typing import Any, cast

from traitlets import Bool, Instance, Unicode, validate

from labkit.course.dashboard.models.base import Model, message
from labkit.course.dashboard.protocols import GuestMachine, HeldPinHandle, PinLab
from labkit.errors import LabError
from labkit.lab import MEMORY_KINDS
from labkit.lab.observe import PinCounters, PinSample

log = logging.getLogger(__name__)


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


class PinModel(Model):
    """Pin counters over time and one long-term (RDMA) pin held on request.

    The sampler reads VmPin of the holder process and nr_foll_pin_acquired /
    nr_foll_pin_released from /proc/vmstat every ``interval`` seconds;
    ``history`` keeps the last samples for the plot, ``latest`` is the newest.
    """

    memory = Unicode("anon", help="the memory kind Register uses")
    held = Instance(object, allow_none=True, help="the HeldPin while a registration is held")
    latest = Instance(PinSample, allow_none=True)
    message = Unicode("")
    sampling = Bool(False)

    def __init__(self, vm: GuestMachine, lab: PinLab, interval: float = 1.0, history: int = 120) -> None:
        super().__init__()
        self.vm = vm
        self.lab = lab
        self.interval = interval
        self.counters = PinCounters(vm, maxlen=history)
        self.counters.callbacks.append(self._sampled)
        self.last_result: dict[str, Any] | None = None
        self._ready: set[str] = set()

    @validate("memory")
    def _valid_memory(self, proposal: Any) -> str:
        memory = proposal["value"]
        if memory not in MEMORY_KINDS:
            raise LabError(f"unknown memory kind {memory!r}; choose one of: {', '.join(MEMORY_KINDS)}")
        return str(memory)

    @property
    def history(self) -> list[PinSample]:
        return list(self.counters.samples)

    @property
    def summary(self) -> str:
        """The latest sample in words (what the Pins tab shows)."""
        s = self.latest
        if s is None:
            return "no sample yet"
        holder = f"holder PID {self.counters.pid}" if self.counters.pid else "no holder"
        return (f"VmPin ({holder}): {_num(s.vmpin_kb)} kB; nr_foll_pin_acquired {_num(s.foll_pin_acquired)}, "
                f"nr_foll_pin_released {_num(s.foll_pin_released)}")

    def _sampled(self, sample: PinSample) -> None:
        self.latest = sample

    def start(self) -> PinModel:
        """Start sampling (one sample now, then every ``interval`` s)."""
        try:
            self.counters.sample()
        except LabError as exc:
            self.error = message(exc)
        self.counters.start(self.interval)
        self.sampling = True
        log.debug("pins: sampling every %.2f s", self.interval)
        return self

    def set_memory(self, memory: str) -> None:
        """Choose the memory kind (LabError for an unknown one)."""
        self.memory = memory

    def _prepare(self, memory: str) -> None:
        """Set up what a registration on ``memory`` needs, once per boot."""
        if "rdma" not in self._ready:
            self.message = "setting up soft-RoCE (rdma_rxe) on the guest NIC ..."
            self.lab.setup_rdma()
            self._ready.add("rdma")
        if memory.startswith("fsdax-") and "mounts" not in self._ready:
            self.message = "preparing the fs-dax namespaces and DAX mounts ..."
            self.lab.prepare_mounts()
            self._ready.add("mounts")
        if memory == "devdax" and "devdax" not in self._ready:
            self.message = "preparing the device-dax namespace ..."
            self.lab.prepare_pmem()
            self._ready.add("devdax")

    def register(self, memory: str | None = None, size: int = 2 * 2**20) -> dict[str, Any]:
        """Register ``size`` bytes of ``memory`` with RDMA and hold it; returns
        what the kernel answered (the pin probe's JSON)."""
        memory = memory or self.memory
        self.set_memory(memory)
        if self.held is not None:
            self.release()
        self._prepare(memory)
        log.debug("pins: registering %d bytes of %s", size, memory)
        held: HeldPinHandle = self.lab.hold_pin("rdma", memory, size=size)
        info = dict(held.info)
        self.last_result = info
        if held.ok:
            self.counters.pid = held.pid
            self.held = held
            self.message = (f"registered {size // 1024} KiB of {memory} memory (ibv_reg_mr): ok; "
                            f"the holder (PID {held.pid}) keeps it pinned until Release")
        else:
            held.release()
            name, num = info.get("errname") or "?", info.get("errno")
            self.message = f"ibv_reg_mr on {memory} memory was refused by the kernel: {name} ({num})"
        log.debug("pins: %s", self.message)
        self._sample_quietly()
        return info

    def release(self) -> int | None:
        """Deregister and let the holder exit; returns its exit code."""
        held = cast("HeldPinHandle | None", self.held)
        self.held = None
        if held is None:
            return None
        rc = held.release()
        self.message = f"released (the holder exited with {rc})"
        log.debug("pins: %s", self.message)
        self._sample_quietly()
        return rc

    def _sample_quietly(self) -> None:
        try:
            self.counters.sample()
        except LabError as exc:
            self.error = message(exc)

    def submit_register(self, memory: str | None = None) -> bool:
        """``register`` on the worker (what the Register button does)."""
        return self.submit("register", lambda: self.register(memory))

    def submit_release(self) -> bool:
        """``release`` on the worker (what the Release button does)."""
        return self.submit("release", self.release)

    def stop(self) -> None:
        """Stop sampling and release a held pin (before the VM goes away)."""
        try:
            if self.held is not None:
                self.release()
        except LabError:
            pass
        self.counters.stop()
        self.sampling = False
        log.debug("pins: stopped")

    def restart(self) -> None:
        """After the VM was (re)started: everything set up before is gone."""
        self._ready.clear()
        self.held = None
        self.counters.pid = None
        self.start()

    def close(self) -> None:
        self.stop()
        super().close()
