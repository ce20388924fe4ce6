"""``Lab.matrix()`` results for one kernel, or ``{label: matrix}`` for several,
and the questions the table asks of them (rows, columns, a cell, differences)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traitlets import Dict, Unicode

from labkit.course.dashboard import render
from labkit.course.dashboard.models.base import Model
from labkit.course.dashboard.protocols import MatrixLab
from labkit.errors import LabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One mechanism x memory kind x mapping answer of one kernel."""

    ok: bool
    errno: int | None
    errname: str | None
    vmpin_kb_delta: int | None
    foll_pin_delta: int | None
    traced: bool

    @property
    def label(self) -> str:
        return "ok" if self.ok else f"{self.errname or 'errno'} ({self.errno})"


def _as_matrices(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One ``Lab.matrix()`` result, or ``{label: result}``, as ``{label: result}``."""
    if "pins" in results:
        return {str(results.get("kernel", "kernel")): dict(results)}
    matrices = {str(k): dict(v) for k, v in results.items()}
    for label, m in matrices.items():
        if "pins" not in m:
            raise LabError(f"matrix_table: {label!r} is not a Lab.matrix() result (no 'pins')")
    return matrices


class MatrixModel(Model):
    """``Lab.matrix()`` output for one kernel, or ``{label: matrix}`` for several."""

    matrices = Dict(help="{label: Lab.matrix() result}")
    progress_text = Unicode("")

    def __init__(self, results: Mapping[str, Any] | None = None, lab: MatrixLab | None = None) -> None:
        super().__init__()
        self.lab = lab
        if results:
            self.set_results(results)

    def set_results(self, results: Mapping[str, Any]) -> None:
        """Show ``results`` (LabError if one of them is not a ``Lab.matrix()`` result)."""
        self.matrices = _as_matrices(results)
        log.debug("matrix: showing %s", ", ".join(self.matrices))

    @property
    def labels(self) -> list[str]:
        return list(self.matrices)

    def rows(self) -> list[tuple[str, str]]:
        """(mechanism, mapping) in first-seen order over all kernels."""
        seen: dict[tuple[str, str], None] = {}
        for m in self.matrices.values():
            for p in m["pins"]:
                seen[(p["mechanism"], p["mapping"])] = None
        return list(seen)

    def memories(self) -> list[str]:
        """The memory kinds (columns) in first-seen order over all kernels."""
        seen: dict[str, None] = {}
        for m in self.matrices.values():
            for p in m["pins"]:
                seen[p["memory"]] = None
        return list(seen)

    def cell(self, label: str, mechanism: str, memory: str, mapping: str = "shared") -> Cell | None:
        """The answer of kernel ``label``, or None if it was not measured."""
        for p in self.matrices[label]["pins"]:
            if (p["mechanism"], p["memory"], p["mapping"]) == (mechanism, memory, mapping):
                return Cell(bool(p["ok"]), p.get("errno"), p.get("errname"), p.get("vmpin_kb_delta"),
                            p.get("foll_pin_delta"), bool(p.get("trace")))
        return None

    def differs(self, mechanism: str, memory: str, mapping: str = "shared") -> bool:
        """True if the kernels answered differently (ok vs errno, or another errno)."""
        answers = {(c.ok, c.errno) for label in self.labels
                   if (c := self.cell(label, mechanism, memory, mapping)) is not None}
        return len(answers) > 1

    def measure(self) -> None:
        """Run ``lab.matrix()`` on the live guest and show it (about half a minute under TCG)."""
        if self.lab is None:
            raise LabError("no Lab to measure with; pass lab= or use Lab(vm).matrix()")

        def say(text: str) -> None:
            self.progress_text = text
        log.debug("matrix: measuring")
        m = self.lab.matrix(progress=say)
        self.progress_text = f"measured in {m.get('seconds')} s"
        self.set_results(m)

    def html(self) -> str:
        """The table as HTML (``render.matrix_html``)."""
        return render.matrix_html(self)
