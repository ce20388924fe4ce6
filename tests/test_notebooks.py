"""Every notebook executes headless (nbclient) against a real guest, and is
committed without outputs. All notebooks share one persistent VM (LABKIT_VM),
booted once; each notebook's run time goes to tests/artifacts/NAME.seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labkit.machine.vm import VM

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
VM_NAME = "test-nb"


def test_there_are_notebooks():
    names = [p.name[:3] for p in NOTEBOOKS]
    assert names == [f"{i:02d}-" for i in range(10)], names


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


@pytest.fixture(scope="module")
def shared_vm():
    """One persistent VM for all notebooks (each notebook attaches to it through
    labkit.connect()); stopped, with notebook 6's second-kernel VM, at the end."""
    from conftest import require_image
    from labkit import image
    for k in image.KERNELS:
        require_image(k)
    yield VM_NAME
    for name in (VM_NAME, f"{VM_NAME}-other", f"{VM_NAME}-k73"):
        VM(name, persistent=True).stop()


@pytest.mark.integration
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, shared_vm, monkeypatch, artifacts):
    monkeypatch.setenv("LABKIT_VM", shared_vm)
    nb = nbformat.read(path, as_version=4)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,     # collect, then assert
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.monotonic() - t0
    (artifacts / f"{path.stem}.seconds").write_text(f"{seconds:.1f}\n")
    nbformat.write(nb, artifacts / path.name)
    errors = [f"{o.get('ename')}: {o.get('evalue', '')[:300]}" for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


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
