"""The hidden checks of the nbgrader assignments: the same checks as ``labkit check``.

Each auto-graded exercise of an instructor source is followed by a locked
nbgrader test cell whose hidden part is::

    from labkit.course.autograde import assert_right
    assert_right("ex1.1", answer)

nbgrader's autograde runs the submission in a Jupyter kernel and restores that
hidden part; a check that fails raises ``AssertionError``, which nbgrader scores
0, and one that passes scores the cell's points. The answer goes through
:func:`labkit.course.payload.answer_payload` first and then to the judge of
``labkit check`` (:func:`labkit.course.judge.judge`), so it is judged as the
JSON ``labkit check`` would read (sets become lists, a blank ``...`` is "not
answered"), and the message, like ``labkit check``'s, never shows the expected
value. The lab guest is ``labkit.connect()``'s (``LABKIT_VM``), connected once
per kernel; the live measurements are shared by the checks of one notebook.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_live: dict[str, Any] = {}      # notebook number -> its Live (one per kernel, i.e. per graded notebook)


class NotRight(AssertionError):
    """The exercise's check did not pass (nbgrader scores the test cell 0)."""


def _live_for(notebook: str) -> Any:
    if notebook not in _live:
        from labkit.course.exercises import Live, for_notebook
        from labkit.lab import Lab
        from labkit.machine import connect
        log.debug("connecting to the lab guest for notebook %s's checks", notebook)
        live = Live(Lab(connect()))
        live.wanted = {n for e in for_notebook(notebook) for n in e.needs}
        _live[notebook] = live
    return _live[notebook]


def assert_right(exercise_id: str, answer: Any) -> None:
    """Judge ``answer`` with the exercise's check; raise :class:`NotRight` (an
    AssertionError) unless it passes.

    A passing check leaves no output: nbgrader reads a test cell's output as
    its grade (anything on stderr scores 0, a number is partial credit), so
    whatever the lab writes to stderr while measuring goes to stdout instead."""
    from labkit.course.exercises import BY_ID
    from labkit.course.judge import answered, judge
    from labkit.course.payload import answer_payload
    ex = BY_ID.get(exercise_id)
    if ex is None:
        raise NotRight(f"{exercise_id}: no such exercise in this version of labkit")
    given = {exercise_id: answer_payload(exercise_id, answer)}    # blank or unreadable: judge says so
    with contextlib.redirect_stderr(sys.stdout):
        live = _live_for(ex.notebook) if ex.guest and answered(given[exercise_id]) else None   # no guest for a blank
        result = judge([ex], given, live=live).results[0]
    if not result.passed:
        raise NotRight(f"{exercise_id}: {result.message}")
