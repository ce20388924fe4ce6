"""The helper's subcommands, found rather than listed: every module of this
package that defines ``COMMANDS`` (a tuple of ``Command``) contributes its
subcommands, so a new pin mechanism is one module here (plus its name in
``vocab.MECHANISMS`` and one row on the host, ``labkit.lab.probes``).

Discovery uses ``pkgutil.iter_modules`` over the package's ``__path__``, which
works both from a source tree and from inside the zipapp (zipimport)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..vocab import MECHANISMS

Run = Callable[[argparse.Namespace], "dict[str, Any] | None"]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one line of help, its options and what runs it."""

    name: str
    help: str
    arguments: Arguments
    run: Run
    pins: bool = False      # a pin mechanism of ``vocab.MECHANISMS`` (the matrix measures it)


def _package() -> Any:
    return importlib.import_module(__package__ or "labkit.lab.guest.pinprobe")


def commands() -> list[Command]:
    """Every module's ``COMMANDS``: pin mechanisms first (in ``MECHANISMS`` order), then the others."""
    pkg = _package()
    found: list[Command] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("cli", "registry"):
            continue
        found.extend(getattr(importlib.import_module(f"{pkg.__name__}.{info.name}"), "COMMANDS", ()))
    names = [c.name for c in found]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"pinprobe subcommands defined twice: {', '.join(sorted(dup))}")
    order = {name: i for i, name in enumerate(MECHANISMS)}
    return sorted(found, key=lambda c: (not c.pins, order.get(c.name, len(order)), c.name))


def mechanisms() -> list[str]:
    """The pin mechanisms the guest helper has (what ``vocab.MECHANISMS`` must name)."""
    return [c.name for c in commands() if c.pins]
