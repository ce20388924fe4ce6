"""The lab layer: persistent memory, DAX mounts, long-term pins and their
refusals, measured on a live guest through a machine's command channel.

``from labkit.lab import Lab`` is what the notebooks use.
"""

from labkit.lab.core import *  # noqa: F401,F403  (the public names of the lab layer)
from labkit.lab.core import Lab, compare_matrices, matrices_on_two_kernels

__all__ = ["Lab", "compare_matrices", "matrices_on_two_kernels"]
