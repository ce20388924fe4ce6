"""labkit: an interactive lab about long-term page pins and DAX in Linux.

Start with ``labkit.connect()`` / ``labkit.VM`` (a QEMU guest with emulated
NVDIMMs) or the ``labkit`` command line (``labkit --help``).

This is the package's face and it loads nothing on import: the names below
(and the subpackages, e.g. ``labkit.course``) are imported on first use
(PEP 562), so ``import labkit.errors`` or the guest's vocabulary does not pull
in paramiko, qemu.qmp or pexpect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from labkit.version import __version__

if TYPE_CHECKING:
    from labkit.errors import LabError
    from labkit.machine import VM, VMState, connect

__all__ = ["VM", "VMState", "LabError", "connect", "__version__"]

_SUBMODULES = ("cli", "command", "commands", "course", "dashboard", "deploy", "errors", "grading", "image", "lab",
               "machine", "paths", "settings", "testing", "timeout", "tools", "version")


def __getattr__(name: str) -> Any:
    if name == "LabError":
        from labkit.errors import LabError
        return LabError
    if name in ("VM", "VMState", "connect"):
        from labkit import machine
        return getattr(machine, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
