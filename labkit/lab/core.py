"""Import shim: the lab layer used to live in this one module. Its names now
come from ``labkit.lab`` (``from labkit.lab import Lab``); this keeps
``from labkit.lab.core import Lab`` working for code not yet moved."""

from labkit.lab import *
from labkit.lab import __all__  # noqa: F401  (re-exported)
