"""``labkit check``: grade a learner's notebook, in the spirit of MIT's ``make grade``.

How a notebook is read (the decision, also in ``labkit check --help``):

* An exercise is a code cell tagged ``exercise`` and its id (``ex3.1``); the
  learner assigns ``answer``. My notebooks end that cell with
  ``record("ex3.1", answer)``, which leaves the answer in the cell's output as
  ``application/vnd.labkit.answer+json``.
* A notebook that has outputs (run in JupyterLab and saved) is graded from
  those outputs; nothing is re-run and the file is never modified. If a cell
  has no recorded answer, a literal ``answer = ...`` in its source is used.
* A notebook without any outputs (fresh from the course, or cleared) is first
  executed headless with nbclient, against the running lab VM (``LABKIT_VM``),
  in memory; after any exercise cell that does not call ``record`` a hidden
  ``record`` cell is added so its answer is seen.
* Then each check compares the answer with the live guest
  (:func:`labkit.course.judge.judge`, the judge of every grading path).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labkit.course.judge import ExerciseResult, answered, judge
from labkit.course.payload import (  # noqa: F401 - the payload names are grading's public interface too
    MAX_CHARS,
    MAX_DEPTH,
    MAX_ITEMS,
    MIME,
    AnswerTooLarge,
    _safe_repr,
    answer_payload,
    checked_payload,
    literal_answer,
)
from labkit.errors import LabError

BLANK = {"blank": True}


class NotebookError(LabError):
    """A path given to ``labkit check`` is not a gradable course notebook."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str = "") -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.hint = hint


# -- in the notebook ---------------------------------------------------------

_RECORDED: dict[str, Any] = {}


def record(exercise_id: str, answer: Any) -> None:
    """Record the learner's answer in the cell's output (``labkit check`` reads it)."""
    from IPython.display import display
    _RECORDED[exercise_id] = answer
    p = answer_payload(exercise_id, answer)
    text = (f"{exercise_id}: no answer yet (replace the ... with yours)" if p["blank"] else
            f"{exercise_id}: {p['invalid']}: give a name, a number, a short list or a few sentences"
            if "invalid" in p else
            f"{exercise_id}: answer recorded: {_safe_repr(p['value'])} - grade it with `labkit check`")
    display({MIME: p, "text/plain": text}, raw=True)


def recorded(exercise_id: str) -> Any:
    """What this kernel last recorded for ``exercise_id`` (None if nothing yet):
    a later cell shows a prediction beside the measurement with it."""
    return _RECORDED.get(exercise_id)


# -- reading notebooks -------------------------------------------------------

def load(path: str | os.PathLike):
    """The notebook at ``path`` (nbformat v4), or a NotebookError saying why not."""
    import nbformat
    p = Path(path)
    if not p.exists():
        raise NotebookError(p, "no such file", hint="give the path of a notebook, e.g. notebooks/03-rdma-pins.ipynb")
    if p.is_dir():
        raise NotebookError(p, "is a directory", hint="give notebook files, or no argument for all of notebooks/")
    try:
        nb = nbformat.read(p, as_version=4)
    except Exception as exc:   # nbformat raises several unrelated types for bad input
        raise NotebookError(p, f"not a Jupyter notebook ({type(exc).__name__}: {str(exc)[:200]})",
                            hint="labkit check reads .ipynb files saved by Jupyter") from exc
    return _checked_shape(p, nb)


def loads(data: bytes, path: str | os.PathLike):
    """The notebook in ``data`` (the bytes read from ``path``), or a NotebookError."""
    import nbformat
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception as exc:   # UnicodeDecodeError, JSON errors, nbformat's own
        raise NotebookError(path, f"not a Jupyter notebook ({type(exc).__name__}: {str(exc)[:200]})",
                            hint="submit the .ipynb file as Jupyter saved it") from exc
    return _checked_shape(path, nb)


def _checked_shape(path: str | os.PathLike, nb):
    """What the readers below rely on: a dict with a list of dict cells (nbformat
    does not enforce it; anything inside may still be of any type)."""
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) \
            or not all(isinstance(c, dict) for c in nb["cells"]) or not isinstance(nb.get("metadata", {}), dict):
        raise NotebookError(path, "not a Jupyter notebook (no list of cells)",
                            hint="submit the .ipynb file as Jupyter saved it")
    return nb


def _dict(value: Any) -> dict:
    """``value`` if it is a dict, else {} (metadata in a file can be anything)."""
    return value if isinstance(value, dict) else {}


def notebook_number(path: str | os.PathLike, nb) -> str:
    meta = _dict(_dict(nb.get("metadata")).get("labkit")).get("notebook")
    if isinstance(meta, (str, int)) and not isinstance(meta, bool) and re.fullmatch(r"\d\d", str(meta)):
        return str(meta)
    m = re.match(r"^(\d\d)-", Path(path).name)
    return m.group(1) if m else ""


def exercise_id(cell) -> str | None:
    tags = _dict(cell.get("metadata")).get("tags", [])
    if cell.get("cell_type") != "code" or not isinstance(tags, list) or "exercise" not in tags:
        return None
    return next((t for t in tags if isinstance(t, str) and re.match(r"^ex\d+\.\d+$", t)), None)


def has_outputs(nb) -> bool:
    return any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.get("cell_type") == "code")


def _payloads(cell) -> list[Any]:
    outputs = cell.get("outputs", [])
    return [o["data"].get(MIME) for o in (outputs if isinstance(outputs, list) else [])
            if isinstance(o, dict) and isinstance(o.get("data"), dict) and MIME in o["data"]]


def answers(nb, marker: str | None = None) -> dict[str, dict]:
    """exercise id -> payload: what the notebook really answered.

    * A cell's recorded payload counts only if the cell was executed (it has
      an execution count) and the payload names that cell's own exercise: an
      output pasted into a cell that never ran, or recorded under another
      exercise's id, is not an answer.
    * ``marker``: the run's nonce of the hidden record cells ``execute`` added
      after each exercise cell. Their payload (the value of ``answer`` when
      the cell had run) comes first; a hidden cell saved in the notebook file
      (any other marker) is ignored.
    * Else a literal ``answer = ...`` in the source; else a "not run" marker.
    """
    out: dict[str, dict] = {}
    current: str | None = None
    hidden: dict[str, dict] = {}
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        rec = _dict(cell.get("metadata")).get("labkit_record")
        if rec is not None:
            if marker is not None and rec == marker and current is not None:
                for raw in _payloads(cell):
                    p = checked_payload(raw, current)
                    if p is not None:
                        hidden[current] = p
            continue
        ex = exercise_id(cell)
        current = ex
        if ex is None:
            continue
        got = None
        if isinstance(cell.get("execution_count"), int):
            for raw in _payloads(cell):
                got = checked_payload(raw, ex) or got
        if got is None:
            source = cell.get("source", "")
            got = literal_answer(source) if isinstance(source, str) else None
            got = dict(got, id=ex) if got is not None else None
        out[ex] = got if got is not None else {"id": ex, "not_run": True}
    for ex, p in hidden.items():       # the run's own record wins, unless it saw nothing and the cell recorded
        if not (p.get("blank") and not out.get(ex, {}).get("blank", True)):
            out[ex] = p
    return out


def hidden_record_source(exercise: str) -> str:
    """The grader's record cell after an exercise cell: records ``answer`` as
    the cell left it, then removes it, so an exercise whose cell failed is not
    credited with the previous exercise's answer."""
    return (f"from labkit.grading import record as _labkit_record\n"
            f"_labkit_record({exercise!r}, globals().pop('answer', ...))")


def prepare_for_execution(nb) -> str:
    """Ready ``nb`` (in place) for a re-execution from the top: saved outputs
    and any record cells saved in the file dropped, a hidden record cell after
    every exercise cell. Returns the run's marker for :func:`answers`."""
    import nbformat
    marker = secrets.token_hex(8)
    cells = []
    for cell in nb.cells:
        if _dict(cell.get("metadata")).get("labkit_record") is not None:
            continue
        _tidy(cell)
        if cell.get("cell_type") == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
        ex = exercise_id(cell)
        if ex:
            rec = nbformat.v4.new_code_cell(hidden_record_source(ex))
            rec.metadata["labkit_record"] = marker
            cells.append(rec)
    nb.cells = cells
    return marker


def _tidy(cell) -> None:
    """What nbclient itself reads of a cell, in the shapes it expects (it
    raised TypeError on a cell's ``"tags": 5``): metadata a dict, tags a list
    of strings, source a string. Only the copy in memory is changed."""
    import nbformat
    meta = cell.get("metadata")
    cell["metadata"] = meta if isinstance(meta, dict) else nbformat.NotebookNode()
    tags = cell["metadata"].get("tags")
    if tags is not None:
        cell["metadata"]["tags"] = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    if not isinstance(cell.get("source", ""), str):
        cell["source"] = ""


def cell_errors(nb) -> list[str]:
    errors = []
    for i, cell in enumerate(nb.cells):
        outputs = cell.get("outputs") if cell.get("cell_type") == "code" else []
        for o in outputs if isinstance(outputs, list) else []:
            if isinstance(o, dict) and o.get("output_type") == "error":
                errors.append(f"cell {i}: {o.get('ename')}: {str(o.get('evalue', ''))[:200]}")
    return errors


def execute(nb, path: Path, timeout: float = 600.0) -> tuple[list[str], str]:
    """Run the notebook headless (nbclient) in memory; returns the errors
    raised by cells and the marker of the hidden record cells."""
    from nbclient import NotebookClient
    marker = prepare_for_execution(nb)
    NotebookClient(nb, timeout=int(timeout), kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    return cell_errors(nb), marker


def slowest_cells(nb, n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` code cells that took longest in the last execution (nbclient
    records when each began and ended in the cell's metadata), with their
    first line: where a notebook's minutes go."""
    from datetime import datetime
    timed: list[tuple[float, int, str]] = []
    for i, cell in enumerate(nb.cells):
        meta = cell.get("metadata") if cell.get("cell_type") == "code" else None
        ex: Any = meta.get("execution") if isinstance(meta, dict) else None
        try:
            began = datetime.fromisoformat(str(ex["iopub.execute_input"]).replace("Z", "+00:00"))
            ended = datetime.fromisoformat(str(ex["shell.execute_reply"]).replace("Z", "+00:00"))
        except (TypeError, KeyError, ValueError):
            continue
        first = next((ln for ln in str(cell.get("source", "")).splitlines() if ln.strip()), "")
        timed.append((round((ended - began).total_seconds(), 1), i, first[:80]))
    timed.sort(key=lambda t: -t[0])
    return [{"cell": i, "seconds": secs, "first_line": first} for secs, i, first in timed[:n]]


# -- grading -----------------------------------------------------------------

@dataclass
class NotebookResult:
    path: str
    notebook: str
    executed: bool
    cell_errors: list[str] = field(default_factory=list)
    checks: list[ExerciseResult] = field(default_factory=list)
    execute_s: float = 0.0          # running the notebook headless (0 when graded from saved outputs)
    judge_s: float = 0.0            # the checks, live ones included
    slowest: list[dict[str, Any]] = field(default_factory=list)    # see slowest_cells

    @property
    def score(self) -> int:
        return sum(c.points for c in self.checks)

    @property
    def max(self) -> int:
        return sum(c.max for c in self.checks)


def _connect_lab():
    from labkit.lab import Lab
    from labkit.machine import connect
    return Lab(connect())


def grade(paths: list[str | os.PathLike], lab=None, execute_blank: bool = True,
          progress=None) -> list[NotebookResult]:
    """Grade each notebook; ``lab`` is connected on first need (LABKIT_VM).

    Every notebook is judged on its own: its checks get a fresh :class:`Live`
    (nothing measured for one notebook, and no guest state another notebook
    prepared or reset, is reused for the next), so the order of ``paths``
    does not change any score."""
    say = progress or (lambda s: None)
    loaded = [_load_course_notebook(p) for p in paths]     # validate every path before any slow work
    results = []
    connected = lab
    for path, nb, number, exercises in loaded:
        res = NotebookResult(str(path), number, executed=False)
        marker = None
        if execute_blank and not has_outputs(nb):
            say(f"{path.name}: no outputs, executing it headless against the lab VM")
            res.executed = True
            t0 = time.monotonic()
            res.cell_errors, marker = execute(nb, path)
            res.execute_s = round(time.monotonic() - t0, 1)
            res.slowest = slowest_cells(nb)
        given = answers(nb, marker)
        t0 = time.monotonic()
        if connected is None and any(ex.guest and answered(given.get(ex.id)) for ex in exercises):
            say("connecting to the lab VM for the live checks")
            connected = _connect_lab()
        res.checks = judge(exercises, given, connected).results    # a Live of this notebook alone
        res.judge_s = round(time.monotonic() - t0, 1)
        results.append(res)
    return results


def _load_course_notebook(p: str | os.PathLike) -> tuple[Path, Any, str, list]:
    from labkit.course.exercises import for_notebook
    nb = load(p)
    number = notebook_number(p, nb)
    exercises = for_notebook(number)
    tagged = {exercise_id(c) for c in nb.cells} - {None}
    if not exercises and not tagged:
        raise NotebookError(p, "not a labkit course notebook (no exercise cells)",
                            hint="check the notebooks in notebooks/ (00-...09-)")
    return Path(p), nb, number, exercises


def report(results: list[NotebookResult]) -> str:
    lines = []
    for r in results:
        how = (f"executed now with nbclient in {r.execute_s:.0f} s" if r.executed
               else "graded from its saved outputs") + f"; checked in {r.judge_s:.0f} s"
        lines.append(f"{r.path} ({how})")
        for e in r.cell_errors:
            lines.append(f"  note: {e}")
        for c in r.checks:
            lines.append(f"  {'PASS' if c.passed else 'FAIL'} {c.id:6s} {c.points}/{c.max}  {c.title}: {c.message}")
        lines.append(f"  notebook score: {r.score}/{r.max}")
    total, top = sum(r.score for r in results), sum(r.max for r in results)
    lines.append(f"Score: {total}/{top}")
    return "\n".join(lines)


def as_json(results: list[NotebookResult]) -> dict:
    """Machine-readable results (per check: id, points, max, passed, message)."""
    return {
        "notebooks": [{"path": r.path, "notebook": r.notebook, "executed": r.executed,
                       "cell_errors": r.cell_errors, "score": r.score, "max": r.max,
                       "seconds": {"execute": r.execute_s, "judge": r.judge_s, "slowest_cells": r.slowest},
                       "checks": [asdict(c) for c in r.checks]} for r in results],
        "score": sum(r.score for r in results),
        "max": sum(r.max for r in results),
        "passed": all(c.passed for r in results for c in r.checks),
    }


def default_notebooks() -> list[Path]:
    from labkit.settings import from_environment
    return sorted(from_environment().notebooks_dir.glob("[0-9][0-9]-*.ipynb"))


def dumps(results: list[NotebookResult]) -> str:
    return json.dumps(as_json(results), indent=2)
