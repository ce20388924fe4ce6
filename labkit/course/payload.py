"""Answer payloads, in one tested place: what ``record`` stores in a cell's
output (the answer as bounded JSON, a blank marker, or why it cannot be
recorded), how a payload read from a notebook file is validated, and the
literal ``answer = ...`` fallback. Nothing here raises for any answer value:
an answer is a learner's (or an attacker's) input to the grader."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

MIME = "application/vnd.labkit.answer+json"

# Bounds on what an answer may be: an answer is a name, a number, a short
# list or dict, or a few sentences; anything bigger is a mistake or an attack
# on the grader, and is reported as such instead of being carried around.
MAX_ITEMS = 2_000          # values visited while converting one answer
MAX_DEPTH = 16             # nesting of lists/dicts
MAX_CHARS = 20_000         # the answer's JSON text


class AnswerTooLarge(ValueError):
    """An answer beyond MAX_ITEMS/MAX_DEPTH/MAX_CHARS (see :func:`answer_payload`)."""


def _jsonable(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """``value`` as plain JSON (sets sorted, tuples as lists, NaN/inf and other
    objects as their repr); raises AnswerTooLarge past the bounds above and
    never anything else, whatever the value (a hostile ``__repr__`` included)."""
    budget = [MAX_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise AnswerTooLarge("too large or too deeply nested")
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
            return str(value)[:40]
        return value[:MAX_CHARS] if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)      # NaN is not JSON
    if isinstance(value, (set, frozenset)):
        items = [_jsonable(v, depth + 1, budget) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))   # mixed types sort too
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1, budget) for v in value]
    if isinstance(value, dict):
        return {_safe_repr(k) if not isinstance(k, str) else k: _jsonable(v, depth + 1, budget)
                for k, v in value.items()}
    return _safe_repr(value)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)[:200]
    except Exception:       # noqa: BLE001 - a learner's object whose __repr__ raises is still an answer
        return f"<{type(value).__name__} object>"


def answer_payload(exercise_id: str, answer: Any) -> dict:
    """What ``record`` stores: the answer as JSON, a blank marker, or an
    ``invalid`` reason for an answer that cannot be recorded."""
    if answer is Ellipsis or answer is None:
        return {"id": exercise_id, "blank": True}
    try:
        value = _jsonable(answer)
        if len(json.dumps(value, allow_nan=False)) > MAX_CHARS:
            raise AnswerTooLarge("too large")
    except (AnswerTooLarge, RecursionError, ValueError, TypeError) as exc:
        return {"id": exercise_id, "blank": False, "invalid": f"the answer is {exc or 'not readable'}"}
    return {"id": exercise_id, "blank": False, "value": value}


def checked_payload(raw: Any, exercise: str) -> dict | None:
    """A payload read from a notebook file, validated: None unless it is a
    dict recorded for ``exercise``; ``invalid`` set if its value is not a
    bounded JSON value (a saved notebook is only a file the learner hands in)."""
    if not isinstance(raw, dict) or raw.get("id") != exercise:
        return None
    if raw.get("blank") is True:
        return {"id": exercise, "blank": True}
    if "invalid" in raw:
        return {"id": exercise, "blank": False, "invalid": str(raw["invalid"])[:200]}
    if "value" not in raw:
        return {"id": exercise, "blank": False, "invalid": "the recorded answer has no value"}
    p = answer_payload(exercise, raw["value"])
    return p if not p["blank"] else {"id": exercise, "blank": False, "invalid": "the recorded answer is empty"}


def literal_answer(source: str) -> dict | None:
    """The answer from a literal ``answer = ...`` in the cell source, if any
    (a source too large or too nested to parse is no answer)."""
    if len(source) > 4 * MAX_CHARS:
        return None
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    found = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "answer" for t in node.targets):
            try:
                found = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return None
    if found is None and not any(isinstance(n, ast.Assign) for n in tree.body):
        return None
    return answer_payload("?", found)
