"""Where labkit's own files are: the package and the project around it.

The locations a user can move (state, caches, built images, the recipe, the
notebooks) are fields of ``labkit.settings.Settings``, resolved once from the
environment at the edges; this module reads no environment variable.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent

