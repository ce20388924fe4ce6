"""The one way the host finds the files it ships into the guest: through
``importlib.resources`` on this package, so a source tree, an editable install
and a wheel (``pip install .``) all work the same.

What the guest gets from here:

* the pin probes (``pinprobe/`` and the shared ``vocab.py``), packed into one
  zipapp by ``bundle``, and ``precompile.py``, which the guest's Python runs once
  on that zipapp after the upload;
* ``counterfactual.py``, the guest side of the experiments with the rules
  switched off (``labkit.lab.counterfactual``);
* the sources of the lab's kernel modules (``modules/``: ``Kbuild``,
  ``Makefile``, one ``.c`` per module), which the image recipe builds against
  each guest kernel (``labkit.image.build`` stages them as the recipe's
  ``modules/``) and which the notebook shows (``module_excerpt``).
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable

PACKAGE = "labkit.lab.guest"
PINPROBE = "pinprobe"
COUNTERFACTUAL = "counterfactual.py"
PRECOMPILE = "precompile.py"
MODULES = "modules"


def _root() -> Traversable:
    return resources.files(PACKAGE)


def precompile_source() -> str:
    """The guest-side script that adds compiled modules to the uploaded helper zipapp."""
    return _root().joinpath(PRECOMPILE).read_text()


def pinprobe_sources() -> dict[str, str]:
    """Package-relative path -> source text of every module of the guest helper
    (``pinprobe/*.py`` and ``vocab.py``)."""
    out = {"vocab.py": _root().joinpath("vocab.py").read_text()}
    for entry in sorted(_root().joinpath(PINPROBE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            out[f"{PINPROBE}/{entry.name}"] = entry.read_text()
    return out


def counterfactual_script() -> bytes:
    """The guest side of the counterfactual experiments (run as ``python3 FILE``)."""
    return _root().joinpath(COUNTERFACTUAL).read_bytes()


def module_sources() -> dict[str, bytes]:
    """File name -> contents of the lab's kernel module sources (Kbuild, Makefile, *.c)."""
    return {e.name: e.read_bytes() for e in sorted(_root().joinpath(MODULES).iterdir(), key=lambda e: e.name)
            if e.is_file() and not e.name.startswith(".")}


def module_source(module: str) -> str:
    """The C source of one lab module (``labkit_no_longterm_check``)."""
    return _root().joinpath(MODULES, f"{module}.c").read_text()
