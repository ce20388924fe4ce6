"""The machine layer: one QEMU guest with emulated NVDIMMs and its three
channels (serial console, SSH, QMP).

``config`` and ``argv`` are pure (a frozen config and the command line built
from it); ``accel`` chooses KVM or TCG; ``snapshot`` saves and restores warm
starts; ``vm`` is the facade the lab layer and the command line use;
``channels/`` holds the console, SSH, QMP and key handling.
"""

from labkit.machine.vm import VM, VMState, connect

__all__ = ["VM", "VMState", "connect"]
