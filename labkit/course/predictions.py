"""Prediction beside observation: the learner's recorded prediction (an
exercise of kind "prediction", graded for being written down, never for being
right) shown next to what the live kernel did, row by row.

A prediction is either a mapping (memory kind or case -> "ok" / an errno name
or number / free words) or free text. Rows are the observed cases; a mapping's
entry for a case is compared with the kernel's answer ("ok" with "ok"; an
errno by number, so ENOTSUP and 95 match EOPNOTSUPP (95)); free words and free
text are shown as written, uncompared. Nothing here knows an expected value:
the observation is the live result passed in.

A prediction earns its completion point only when it is a *well-formed*
prediction of what its exercise asks (:func:`well_formed`): an outcome ("ok"
or an errno) for each case of an outcome prediction, a yes/no for a yes/no
question, a number for a count, filesystem names for "which filesystems".
Whether it is right is never graded; "wrong-answer" or a blank earns nothing,
and the feedback says which form is expected, never the answer.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from labkit.course.answers import errno_number

OK_WORDS = frozenset({"ok", "yes", "succeeds", "success", "allowed", "pinned", "works", "true"})
FAIL_WORDS = frozenset({"fails", "refused", "error", "no", "false"})
YES_WORDS = frozenset({"yes", "y", "true", "waits", "blocks", "it waits", "it blocks"})
NO_WORDS = frozenset({"no", "n", "false", "does not wait", "doesn't wait", "returns at once", "no wait"})


@dataclass(frozen=True)
class Row:
    case: str
    predicted: str          # "" when the prediction says nothing about this case
    observed: str           # the kernel's answer, as the lab shows it ("ok" or "ERRNAME (n)")
    match: bool | None      # None: not comparable (no entry, or free words)


@dataclass(frozen=True)
class Comparison:
    rows: tuple[Row, ...]
    free_text: str = ""     # a prediction written as prose, shown above the table

    @property
    def compared(self) -> int:
        return sum(r.match is not None for r in self.rows)

    @property
    def matched(self) -> int:
        return sum(r.match is True for r in self.rows)


def observed_cells(observed: Any) -> dict[str, str]:
    """Case -> the kernel's answer, from pin results (``.memory``/``.cell``)
    or from a mapping of case -> answer text."""
    if isinstance(observed, Mapping):
        return {str(k): str(v) for k, v in observed.items()}
    if isinstance(observed, Iterable) and not isinstance(observed, (str, bytes)):
        rows = list(observed)
        for r in rows:
            if getattr(r, "memory", None) is None or getattr(r, "cell", None) is None:
                raise TypeError("observations must be pin results (with .memory and .cell) or a mapping "
                                f"of case -> answer, not {type(r).__name__}")
        # One mechanism: a case is its memory kind ("fsdax-xfs"); several: "odirect fsdax-xfs".
        several = len({getattr(r, "mechanism", "") for r in rows}) > 1
        return {(f"{r.mechanism} {r.memory}" if several else str(r.memory)): str(r.cell) for r in rows}
    raise TypeError(f"observations must be pin results or a mapping, not {type(observed).__name__}")


def _same(predicted: Any, observed: str) -> bool | None:
    """True/False when the prediction can be compared with the kernel's answer, None otherwise."""
    obs_ok = observed.strip().lower() == "ok"
    obs_errno = None if obs_ok else errno_number(observed.split("(")[-1].rstrip(") ").strip() or observed)
    if isinstance(predicted, bool):
        return predicted == obs_ok
    if isinstance(predicted, str) and predicted.strip().lower() in OK_WORDS:
        return obs_ok
    number = errno_number(predicted)
    if number is not None:
        return (not obs_ok) and obs_errno == number
    if isinstance(predicted, str) and predicted.strip().lower() in FAIL_WORDS:
        return not obs_ok
    return None


def compare(prediction: Any, observed: Any) -> Comparison:
    """Each observed case with the prediction's entry for it."""
    cells = observed_cells(observed)
    if isinstance(prediction, Mapping):
        wanted = {str(k).strip().lower(): v for k, v in prediction.items()}
        rows = []
        for case, obs in cells.items():
            entry = wanted.get(case.lower())
            shown = "" if entry is None else str(entry)[:80]
            rows.append(Row(case, shown, obs, None if entry is None else _same(entry, obs)))
        return Comparison(tuple(rows))
    text = "" if prediction is None or prediction is Ellipsis else str(prediction)[:2000]
    return Comparison(tuple(Row(case, "", obs, None) for case, obs in cells.items()), free_text=text)


def comparison_html(c: Comparison) -> str:
    """A small table: case, your prediction, the kernel's answer, and a mark."""
    mark = {True: ("&#10003;", "#1a7f37"), False: ("&#10007;", "#cf222e"), None: ("", "#57606a")}
    head = ""
    if c.free_text:
        head = f"<p><b>Your prediction:</b> {html.escape(c.free_text)}</p>"
    elif not any(r.predicted for r in c.rows):
        head = "<p><b>No prediction recorded</b> - write it in the prediction cell before you measure.</p>"
    body = "".join(
        f"<tr><td>{html.escape(r.case)}</td><td>{html.escape(r.predicted) or '&ndash;'}</td>"
        f"<td>{html.escape(r.observed)}</td>"
        f"<td style='color:{mark[r.match][1]};text-align:center'>{mark[r.match][0]}</td></tr>"
        for r in c.rows)
    summary = (f"<p>{c.matched} of {c.compared} compared predictions matched what the kernel did "
               "(predictions count for being written down, not for being right).</p>") if c.compared else ""
    return (f"<div class='labkit-prediction'>{head}<table><thead><tr><th>case</th><th>you predicted</th>"
            f"<th>the kernel did</th><th></th></tr></thead><tbody>{body}</tbody></table>{summary}</div>")


def show(prediction: Any, observed: Any) -> Any:
    """The comparison as a displayable HTML widget (``.comparison`` holds the rows)."""
    import ipywidgets as w
    c = compare(prediction, observed)
    out = w.HTML(comparison_html(c))
    out.comparison = c
    return out


# -- well-formed predictions (the completion point) --------------------------------

def is_outcome(value: Any) -> bool:
    """An outcome of one attempt: an "ok" word, a failure word, or an errno (name or number)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, str) and value.strip().lower() in OK_WORDS | FAIL_WORDS:
        return True
    return errno_number(value) is not None


def is_yes_no(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in YES_WORDS | NO_WORDS)


def is_count(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return isinstance(value, str) and bool(re.fullmatch(r"\s*\d+(\.\d+)?\s*", value))


def _names(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [w for w in re.split(r"[\s,]+", value.strip().lower()) if w]
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return [v.strip().lower() for v in value]
    return None


@dataclass(frozen=True)
class Form:
    """What a well-formed prediction of one exercise looks like."""

    describe: str                                    # shown when the prediction is not of this form
    accepts: Callable[[Any], bool]


def _outcomes_for(cases: tuple[str, ...]) -> Callable[[Any], bool]:
    """A mapping with an outcome for every one of ``cases`` (keys case-insensitive)."""
    def accepts(value: Any) -> bool:
        if not isinstance(value, Mapping):
            return False
        got = {str(k).strip().lower(): v for k, v in value.items()}
        return all(c in got and is_outcome(got[c]) for c in cases)
    return accepts


def _filesystems(value: Any) -> bool:
    """Names among the filesystems, [] / "none" / "neither" for none, or "both"."""
    names = _names(value)
    if names is None:
        return False
    if names in (["none"], ["neither"], ["both"]):
        return True
    words = [n for n in names if n not in ("only", "and")]
    return all(n in ("xfs", "ext4") for n in words) and (bool(words) or not isinstance(value, str))


def _yes_no_first(value: Any) -> bool:
    """A yes/no, or a mapping whose first entry is one (further entries free)."""
    if isinstance(value, Mapping):
        return bool(value) and is_yes_no(next(iter(value.values())))
    return is_yes_no(value)


def _v4l2_prediction(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return False
    got = {str(k).strip().lower(): v for k, v in value.items()}
    return (is_count(got.get("pages")) and is_count(got.get("vmpin_kb"))
            and all(k in got and is_outcome(got[k]) for k in ("fsdax-xfs", "devdax")))


def form_outcomes(cases: tuple[str, ...], example_key: str) -> Form:
    return Form(f"a dict with an outcome for each of {', '.join(cases)}: \"ok\", \"fails\" or an errno name "
                f"or number (e.g. {{\"{example_key}\": ...}})", _outcomes_for(cases))


FORM_FILESYSTEMS = Form("a list of filesystem names (\"xfs\", \"ext4\"), [] for none", _filesystems)
FORM_YES_NO = Form("True or False (or \"yes\"/\"no\")", _yes_no_first)
FORM_V4L2 = Form("a dict: {\"pages\": a number, \"vmpin_kb\": a number, \"fsdax-xfs\": an outcome, "
                 "\"devdax\": an outcome} (an outcome is \"ok\", \"fails\" or an errno)", _v4l2_prediction)


def _odp_prediction(value: Any) -> bool:
    """Will truncate wait under a live ODP MR (yes/no), or outcomes per memory kind."""
    if isinstance(value, Mapping):
        return bool(value) and all(is_yes_no(v) or is_outcome(v) for v in value.values())
    return is_yes_no(value)


FORM_ODP = Form("True or False (will truncate wait under a live ODP registration?), or a dict of memory kind -> "
                "outcome (\"ok\", \"fails\" or an errno)", _odp_prediction)


def well_formed(form: Form, answer: Any) -> tuple[bool, str]:
    """(True, "") for a prediction of ``form``'s shape, else (False, what the form is)."""
    if form.accepts(answer):
        return True, ""
    return False, "write your prediction as " + form.describe
