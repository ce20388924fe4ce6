"""Compatibility name for notebooks: ``from labkit.grading import record``.
Grading lives in ``labkit.course.grading``."""

from labkit.course.grading import record, recorded  # noqa: F401
