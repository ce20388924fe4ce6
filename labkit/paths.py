"""Where labkit keeps things: the image recipe, built images, VM state.

Every location can be moved with an environment variable, so tests and
classrooms with shared machines can keep runs apart.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent


def _env_path(name: str, default: Path | str) -> Path:
    """``$name`` as an absolute path (an empty value counts as unset; a
    relative one is taken from the current directory, once, here), else ``default``."""
    return Path(os.environ.get(name) or default).absolute()


def recipe_dir() -> Path:
    """The image recipe (``images/`` of the project)."""
    return _env_path("LABKIT_RECIPE_DIR", PROJECT_DIR / "images")


def images_dir() -> Path:
    """Built images, one sub-directory per kernel variant."""
    return _env_path("LABKIT_IMAGES_DIR", recipe_dir() / "build")


def state_root() -> Path:
    """Per-VM state directories (disk overlay, pmem files, keys, sockets, logs)."""
    return _env_path("LABKIT_STATE_DIR", _env_path("XDG_STATE_HOME", Path.home() / ".local/state") / "labkit")


def cache_dir() -> Path:
    """Small caches (accelerator probe result)."""
    return _env_path("LABKIT_CACHE_DIR", _env_path("XDG_CACHE_HOME", Path.home() / ".cache") / "labkit")


def shared_cache_dir() -> Path | None:
    """The host-wide cache an instructor fills once (warm-start snapshots)
    and every learner reads: ``LABKIT_SHARED_CACHE_DIR``, else
    ``/var/cache/labkit``; an empty value turns it off. Learners never need
    to write here: what they cannot find in it they make in ``cache_dir()``."""
    value = os.environ.get("LABKIT_SHARED_CACHE_DIR", "/var/cache/labkit")
    return Path(value) if value else None


def notebooks_dir() -> Path:
    return _env_path("LABKIT_NOTEBOOKS_DIR", PROJECT_DIR / "notebooks")
