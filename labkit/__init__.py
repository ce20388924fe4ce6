"""labkit: an interactive lab about long-term page pins and DAX in Linux.

Start with ``labkit.VM`` (a QEMU guest with emulated NVDIMMs) or the
``labkit`` command line (``labkit --help``).
"""

from labkit.errors import LabError
from labkit.machine import VM, VMState, connect

__all__ = ["VM", "VMState", "LabError", "connect"]
__version__ = "0.1.0"
