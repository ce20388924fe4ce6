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
import os
import re
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

def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def answer_payload(exercise_id: str, answer: Any) -> dict:
    """What ``record`` stores: the answer as JSON, or a blank marker."""
    if answer is Ellipsis or answer is None:
        return {"id": exercise_id, "blank": True}
    return {"id": exercise_id, "blank": False, "value": _jsonable(answer)}


def record(exercise_id: str, answer: Any) -> None:
    """Record the learner's answer in the cell's output (``labkit check`` reads it)."""
    from IPython.display import display
    p = answer_payload(exercise_id, answer)
    text = (f"{exercise_id}: no answer yet (replace the ... with yours)" if p["blank"] else
            f"{exercise_id}: answer recorded: {p['value']!r} - grade it with `labkit check`")
    display({MIME: p, "text/plain": text}, raw=True)


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
    """The answer from a literal ``answer = ...`` in the cell source, if any."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    found = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "answer" for t in node.targets):
            try:
                found = ast.literal_eval(node.value)
            except ValueError:
                return None
    if found is None and not any(isinstance(n, ast.Assign) for n in tree.body):
        return None
    return answer_payload("?", found)


def answers(nb) -> dict[str, dict]:
    """exercise id -> recorded payload (or literal fallback, or a 'not run' marker)."""
    out: dict[str, dict] = {}
    for cell in nb.cells:
        ex = exercise_id(cell)
        if ex is None:
            continue
        got = None
        # a hidden record cell may follow (the nbclient path); so look in this cell and at recorded payloads below
        for o in cell.get("outputs", []):
            if MIME in o.get("data", {}):
                got = dict(o["data"][MIME])
        if got is None:
            got = literal_answer(cell.source)
        out[ex] = got if got is not None else {"id": ex, "not_run": True}
    for cell in nb.cells:      # hidden record cells added before execution
        if cell.get("metadata", {}).get("labkit_record"):
            for o in cell.get("outputs", []):
                if MIME in o.get("data", {}):
                    out[o["data"][MIME]["id"]] = dict(o["data"][MIME])
    return out


def execute(nb, path: Path, timeout: float = 600.0) -> list[str]:
    """Run the notebook headless (nbclient) in memory; returns the errors raised by cells."""
    import nbformat
    from nbclient import NotebookClient
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        ex = exercise_id(cell)
        if ex and "record(" not in cell.source:
            rec = nbformat.v4.new_code_cell(f"from labkit.grading import record as _labkit_record\n"
                                            f"_labkit_record({ex!r}, globals().get('answer', ...))")
            rec.metadata["labkit_record"] = True
            cells.append(rec)
    nb.cells = cells
    NotebookClient(nb, timeout=int(timeout), kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    errors = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if o.get("output_type") == "error":
                errors.append(f"cell {i}: {o.get('ename')}: {o.get('evalue', '')[:200]}")
    return errors


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
    """Grade each notebook; ``lab`` is connected on first need (LABKIT_VM)."""
    from labkit.course.exercises import BY_ID, Live, for_notebook
    say = progress or (lambda s: None)
    loaded = []
    for p in paths:     # validate every path before any slow work
        nb = load(p)
        number = notebook_number(p, nb)
        exercises = for_notebook(number)
        tagged = {exercise_id(c) for c in nb.cells} - {None}
        if not exercises and not tagged:
            raise NotebookError(p, "not a labkit course notebook (no exercise cells)",
                                hint="check the notebooks in notebooks/ (00-...07-)")
        loaded.append((Path(p), nb, number, exercises, tagged))
    live = None
    results = []
    for path, nb, number, exercises, _tagged in loaded:
        res = NotebookResult(str(path), number, executed=False)
        if execute_blank and not has_outputs(nb):
            say(f"{path.name}: no outputs, executing it headless against the lab VM")
            res.executed = True
            res.cell_errors = execute(nb, path)
        given = answers(nb)
        for ex in exercises:
            ans = given.get(ex.id)
            if ans is None:
                res.checks.append(CheckResult(ex.id, ex.title, 0, ex.points, False,
                                              f"exercise cell tagged {ex.id} not found in the notebook"))
            elif ans.get("not_run"):
                res.checks.append(CheckResult(ex.id, ex.title, 0, ex.points, False,
                                              "no recorded answer: run the cell (it ends with record(...)) and "
                                              "save the notebook, or write answer = <a literal value>"))
            elif ans.get("blank"):
                res.checks.append(CheckResult(ex.id, ex.title, 0, ex.points, False,
                                              "not answered yet (answer is still ...)"))
            else:
                if live is None and ex.guest:
                    say("connecting to the lab VM for the live checks")
                    live = Live(lab or _connect_lab())
                    live.wanted = {n for e in BY_ID.values() for n in e.needs
                                   if given_or_none(loaded, e.id)}
                res.checks.append(judge(ex, ans["value"], live))
        results.append(res)
    return results


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


def given_or_none(loaded, ex_id: str) -> bool:
    """True if some notebook being graded has a non-blank answer for ``ex_id``
    (so its live measurements go into the shared batch)."""
    for _path, nb, _n, _e, tagged in loaded:
        if ex_id in tagged:
            a = answers(nb).get(ex_id)
            if a and not a.get("blank") and not a.get("not_run"):
                return True
    return False


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
