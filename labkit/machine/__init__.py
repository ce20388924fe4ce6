"""The machine layer: one QEMU guest with emulated NVDIMMs and its three
channels (serial console, SSH, QMP).

``config`` and ``argv`` are pure (a frozen config and the command line built
from it); ``accel`` chooses KVM or TCG; ``snapshot`` saves and restores warm
starts; ``vm`` is the facade the lab layer and the command line use;
``channels/`` holds the console, SSH, QMP and key handling.

``VM``, ``VMState`` and ``connect`` are loaded on first use (PEP 562): a layer
above that needs only a small type of this one (``accel.AccelChoice``,
``state.VMState``) does not load paramiko, qemu.qmp and pexpect with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labkit.machine.state import VMState
    from labkit.machine.vm import VM, connect

__all__ = ["VM", "VMState", "connect"]


def __getattr__(name: str) -> Any:
    if name == "VMState":
        from labkit.machine.state import VMState
        return VMState
    if name in ("VM", "connect"):
        from labkit.machine import vm
        return getattr(vm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
