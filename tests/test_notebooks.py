"""The notebooks' shape: committed without outputs, objectives and a prediction
up front, ``record`` imported before use. That every notebook executes headless
against a real guest with no cell raising is asserted once, where the blank
notebooks are graded: tests/test_check.py::test_blank_notebooks_score_zero."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
VM_NAME = "test-nb"


def test_there_are_notebooks():
    names = [p.name[:3] for p in NOTEBOOKS]
    assert names == [f"{i:02d}-" for i in range(11)], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS[1:], ids=lambda p: p.name)
def test_course_notebook_shape(path):
    """Objectives and time up front, a prediction prompt, an exercise, a later-kernels note."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0].source
    assert "Learning objectives" in first and "Estimated time" in first
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Predict first" in text and "What changed in later kernels" in text
    assert any("exercise" in c.metadata.get("tags", []) for c in nb.cells)


def test_record_is_imported_before_any_cell_uses_it():
    """A prediction cell that comes before the set-up cell needs record imported by a cell of its own:
    the grader replaces an exercise cell's source with the learner's (or the reference) answer."""
    from labkit.course.grading import exercise_id
    for p in NOTEBOOKS:
        imported = False
        for i, cell in enumerate(nbformat.read(p, as_version=4).cells):
            if cell.cell_type != "code":
                continue
            imported = imported or ("from labkit.grading import" in cell.source and exercise_id(cell) is None)
            assert "record(" not in cell.source or imported, f"{p.name} cell {i} uses record() before importing it"
