"""``labkit course release``: the student notebooks, made from the instructor sources.

An instructor edits ONE file per notebook, ``instructor/source/NN-title.ipynb``
(outside the package and outside ``notebooks/``). It is an nbgrader source
notebook:

* an exercise cell (tags ``exercise`` and ``exN.M``, as ``labkit check`` reads
  them) holds its reference solution between ``### BEGIN SOLUTION`` and
  ``### END SOLUTION``; nbgrader metadata marks it an autograded answer cell, or,
  for an "explain why" exercise, a manually graded answer cell worth the
  exercise's rubric points (``instructor/rubrics.md``);
* right after each auto-graded exercise comes a locked test cell whose check,
  between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``, calls the same
  check as ``labkit check`` against the live guest (:mod:`labkit.course.autograde`).

Release runs nbgrader's own preprocessors, in the order ``nbgrader
generate_assignment`` runs them (without its database), so what this command
writes to ``notebooks/`` is what nbgrader releases to students: solutions
replaced by ``answer = ...``, hidden checks and outputs removed, nbgrader
metadata and checksums kept. ``reference`` does the opposite (solutions in,
markers out) for the tests and for an instructor who wants the answer key.

nbgrader is an instructor tool, not something a learner needs: it is the
``course`` extra (``pip install 'labkit[course]'``).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

from labkit import paths
from labkit.errors import LabError
from labkit.settings import from_environment

log = logging.getLogger(__name__)

# What a student sees where the solution was; labkit check reads it as "not answered yet".
CODE_STUB = "answer = ..."
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
NOTEBOOK_GLOB = "[0-9][0-9]-*.ipynb"


class ReleaseError(LabError):
    """The instructor sources cannot be released (missing nbgrader, bad source, bad directory)."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


def source_dir() -> Path:
    """The instructor sources (``instructor/source`` of the project)."""
    return paths.PROJECT_DIR / "instructor" / "source"


def configure(c: Any) -> None:
    """The nbgrader settings labkit's course needs; ``instructor/nbgrader_config.py``
    calls this, and release uses the same values, so both produce the same notebooks."""
    c.ClearSolutions.code_stub = {"python": CODE_STUB}
    c.ClearSolutions.begin_solution_delimeter = BEGIN_SOLUTION.removeprefix("### ")
    c.ClearSolutions.end_solution_delimeter = END_SOLUTION.removeprefix("### ")
    c.ClearHiddenTests.begin_test_delimeter = BEGIN_HIDDEN.removeprefix("### ")
    c.ClearHiddenTests.end_test_delimeter = END_HIDDEN.removeprefix("### ")
    # A hidden check measures on the guest (pins, mounts): the 30 s nbgrader default is too short under TCG.
    c.Execute.timeout = 600


def _preprocessors() -> list[Any]:
    try:
        from nbgrader import preprocessors as pp
        from traitlets.config import Config
    except ImportError as exc:
        raise ReleaseError("nbgrader is not installed (labkit course release uses its preprocessors)",
                           hint="pip install 'labkit[course]'  (or: make test, which installs it)") from exc
    cfg = Config()
    configure(cfg)
    # generate_assignment's pipeline minus IncludeHeaderFooter/InstantiateTests (unused here) and SaveCells (its DB).
    order = [pp.LockCells, pp.ClearSolutions, pp.ClearOutput, pp.CheckCellMetadata, pp.ComputeChecksums,
             pp.ClearHiddenTests, pp.ClearMarkScheme, pp.ComputeChecksums, pp.CheckCellMetadata]
    return [cls(config=cfg) for cls in order]


def student_notebook(nb: Any) -> Any:
    """The student version of one instructor source notebook (a new notebook; ``nb`` is untouched)."""
    out = copy.deepcopy(nb)
    resources: dict[str, Any] = {}
    for pre in _preprocessors():
        try:
            out, resources = pre.preprocess(out, resources)
        except Exception as exc:    # nbgrader raises RuntimeError/ValidationError with the cell's problem
            raise ReleaseError(f"nbgrader's {type(pre).__name__} rejected the source: {exc}",
                               hint="fix the cell's nbgrader metadata or its BEGIN/END markers") from exc
    return out


def reference_source(source: str) -> str:
    """A cell's source with its solution kept and the marker lines dropped (hidden tests stay out)."""
    lines, hidden = [], False
    for line in source.splitlines():
        bare = line.strip()
        if bare in (BEGIN_HIDDEN, END_HIDDEN):
            hidden = bare == BEGIN_HIDDEN
        elif bare not in (BEGIN_SOLUTION, END_SOLUTION) and not hidden:
            lines.append(line)
    return "\n".join(lines)


def solutions(src: Path | None = None) -> dict[str, str]:
    """exercise id -> the reference source of its exercise cell, from the instructor sources."""
    import nbformat

    from labkit.course.grading import exercise_id
    out: dict[str, str] = {}
    for path in sorted((src or source_dir()).glob(NOTEBOOK_GLOB)):
        for cell in nbformat.read(path, as_version=4).cells:
            ex = exercise_id(cell)
            if ex is not None:
                out[ex] = reference_source(cell.source)
    return out


def release(out_dir: Path | None = None, src: Path | None = None) -> list[Path]:
    """Write the student notebook of every instructor source into ``out_dir``
    (default ``notebooks/``); returns the paths written."""
    import nbformat
    src = src or source_dir()
    out_dir = out_dir or from_environment().notebooks_dir
    sources = sorted(src.glob(NOTEBOOK_GLOB))
    if not sources:
        raise ReleaseError(f"{src}: no instructor source notebooks (NN-title.ipynb)",
                           hint="run from a labkit checkout; the sources are in instructor/source/")
    if out_dir.resolve() == src.resolve():
        raise ReleaseError(f"{out_dir}: refusing to release over the instructor sources",
                           hint="give another --out directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ReleaseError(f"{out_dir}: not a directory", hint="give a directory with --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sources:
        log.debug("releasing %s", path.name)
        student = student_notebook(nbformat.read(path, as_version=4))
        target = out_dir / path.name
        nbformat.write(student, target)
        written.append(target)
    return written


def leaks(student: Any, instructor: Any) -> list[str]:
    """What of the instructor source reached a student notebook: solution lines,
    hidden-test lines, markers. Empty when the release is clean."""
    secret: set[str] = set()
    for cell in instructor.cells:
        inside = False
        for line in cell.source.splitlines():
            bare = line.strip()
            if bare in (BEGIN_SOLUTION, BEGIN_HIDDEN):
                inside = True
            elif bare in (END_SOLUTION, END_HIDDEN):
                inside = False
            elif inside and bare and bare != CODE_STUB and not re.fullmatch(r"record\(.*\)", bare):
                secret.add(bare)
    found = []
    for i, cell in enumerate(student.cells):
        for line in cell.source.splitlines():
            bare = line.strip()
            if bare in secret or "BEGIN SOLUTION" in bare or "HIDDEN TESTS" in bare:
                found.append(f"cell {i}: {bare[:80]}")
    return found
