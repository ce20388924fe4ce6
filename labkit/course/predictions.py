"""Prediction beside observation: the learner's recorded prediction (an
exercise of kind "prediction", graded for being written down, never for being
right) shown next to what the live kernel did, row by row.

A prediction is either a mapping (memory kind or case -> "ok" / an errno name
or number / free words) or free text. Rows are the observed cases; a mapping's
entry for a case is compared with the kernel's answer ("ok" with "ok"; an
errno by number, so ENOTSUP and 95 match EOPNOTSUPP (95)); free words and free
text are shown as written, uncompared. Nothing here knows an expected value:
the observation is the live result passed in.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from labkit.course.answers import errno_number

OK_WORDS = frozenset({"ok", "yes", "succeeds", "success", "allowed", "pinned", "works", "true"})


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
    if isinstance(predicted, str) and predicted.strip().lower() in ("fails", "refused", "error", "no", "false"):
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
