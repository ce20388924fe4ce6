"""Compatibility name for notebooks: ``from labkit import dashboard``.
The dashboards live in ``labkit.course.dashboard``."""

from labkit.course.dashboard import *  # noqa: F401,F403
