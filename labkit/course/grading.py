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
* Then each check compares the answer with the live guest (see labkit.course).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labkit.errors import LabError

MIME = "application/vnd.labkit.answer+json"
BLANK = {"blank": True}


class NotebookError(LabError):
    """A path given to ``labkit check`` is not a gradable course notebook."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str = "") -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.hint = hint


# -- in the notebook ---------------------------------------------------------

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


def record(exercise_id: str, answer: Any) -> None:
    """Record the learner's answer in the cell's output (``labkit check`` reads it)."""
    from IPython.display import display
    p = answer_payload(exercise_id, answer)
    text = (f"{exercise_id}: no answer yet (replace the ... with yours)" if p["blank"] else
            f"{exercise_id}: {p['invalid']}: give a name, a number, a short list or a few sentences"
            if "invalid" in p else
            f"{exercise_id}: answer recorded: {_safe_repr(p['value'])} - grade it with `labkit check`")
    display({MIME: p, "text/plain": text}, raw=True)


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
    return nb


def notebook_number(path: str | os.PathLike, nb) -> str:
    meta = nb.metadata.get("labkit", {}).get("notebook")
    if meta:
        return str(meta)
    m = re.match(r"^(\d\d)-", Path(path).name)
    return m.group(1) if m else ""


def exercise_id(cell) -> str | None:
    tags = cell.get("metadata", {}).get("tags", [])
    if cell.get("cell_type") != "code" or "exercise" not in tags:
        return None
    return next((t for t in tags if re.match(r"^ex\d+\.\d+$", t)), None)


def has_outputs(nb) -> bool:
    return any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")


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


def _payloads(cell) -> list[Any]:
    return [o.get("data", {}).get(MIME) for o in cell.get("outputs", [])
            if isinstance(o.get("data"), dict) and MIME in o["data"]]


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
        rec = cell.get("metadata", {}).get("labkit_record")
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
            got = literal_answer(cell.get("source", ""))
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
        if cell.get("metadata", {}).get("labkit_record") is not None:
            continue
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
        ex = exercise_id(cell)
        if ex:
            rec = nbformat.v4.new_code_cell(hidden_record_source(ex))
            rec.metadata["labkit_record"] = marker
            cells.append(rec)
    nb.cells = cells
    return marker


def cell_errors(nb) -> list[str]:
    errors = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if o.get("output_type") == "error":
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


# -- grading -----------------------------------------------------------------

@dataclass
class CheckResult:
    id: str
    title: str
    points: int
    max: int
    passed: bool
    message: str


@dataclass
class NotebookResult:
    path: str
    notebook: str
    executed: bool
    cell_errors: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def score(self) -> int:
        return sum(c.points for c in self.checks)

    @property
    def max(self) -> int:
        return sum(c.max for c in self.checks)


def _connect_lab():
    import labkit
    from labkit.lab import Lab
    return Lab(labkit.connect())


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
            res.cell_errors, marker = execute(nb, path)
        given = answers(nb, marker)
        if connected is None and any(ex.guest and _answered(given.get(ex.id)) for ex in exercises):
            say("connecting to the lab VM for the live checks")
            connected = _connect_lab()
        res.checks = judge_notebook(exercises, given, connected)
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


def _answered(ans: dict | None) -> bool:
    return ans is not None and not ans.get("blank") and not ans.get("not_run") and "invalid" not in ans


def judge_notebook(exercises: list, given: dict[str, dict], lab) -> list[CheckResult]:
    """The results of one notebook's exercises, measured on ``lab`` with a
    Live of this notebook alone (its batch of pins is this notebook's)."""
    from labkit.course.exercises import Live
    live = Live(lab)
    live.wanted = {n for e in exercises if _answered(given.get(e.id)) for n in e.needs}
    return [_one_check(ex, given.get(ex.id), live) for ex in exercises]


def _one_check(ex, ans: dict | None, live) -> CheckResult:
    if ans is None:
        return CheckResult(ex.id, ex.title, 0, ex.points, False,
                           f"exercise cell tagged {ex.id} not found in the notebook")
    if ans.get("not_run"):
        return CheckResult(ex.id, ex.title, 0, ex.points, False,
                           "no recorded answer: run the cell (it ends with record(...)) and "
                           "save the notebook, or write answer = <a literal value>")
    if ans.get("blank"):
        return CheckResult(ex.id, ex.title, 0, ex.points, False, "not answered yet (answer is still ...)")
    if "invalid" in ans:
        return CheckResult(ex.id, ex.title, 0, ex.points, False,
                           f"{ans['invalid']}: give a name, a number, a short list or a few sentences")
    return judge(ex, ans["value"], live)


def judge(ex, value, live) -> CheckResult:
    """One exercise's result. The message says right or wrong (with the first
    hint), never the expected value; explanations are recorded for the
    instructor, predictions for completion."""
    try:
        ok, why = ex.check(value, live)
    except LabError:
        raise
    except Exception as exc:   # a malformed answer must fail its check, not the grader
        ok, why = False, f"that answer could not be read ({type(exc).__name__})"
    if ex.kind == "explain":
        msg = (f"recorded for your instructor (graded by hand, {ex.manual_points} points)" if ok
               else ex.feedback(False, why))
    elif ex.kind == "prediction":
        msg = "prediction recorded (completion counts, not correctness)" if ok else ex.feedback(False, why)
    else:
        msg = ex.feedback(ok, why)
    return CheckResult(ex.id, ex.title, ex.points if ok else 0, ex.points, ok, msg)


def report(results: list[NotebookResult]) -> str:
    lines = []
    for r in results:
        how = "executed now with nbclient" if r.executed else "graded from its saved outputs"
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
                       "checks": [asdict(c) for c in r.checks]} for r in results],
        "score": sum(r.score for r in results),
        "max": sum(r.max for r in results),
        "passed": all(c.passed for r in results for c in r.checks),
    }


def default_notebooks() -> list[Path]:
    from labkit import paths
    return sorted(Path(paths.notebooks_dir()).glob("[0-9][0-9]-*.ipynb"))


def dumps(results: list[NotebookResult]) -> str:
    return json.dumps(as_json(results), indent=2)
