"""The pin matrix on several kernels, side by side, with the rows where the
kernels answer differently marked (``labkit matrix --kernel all``).

Measuring is ``Lab.matrix()`` on one throwaway (or attached) VM per kernel;
this module only schedules those runs and lays the results side by side. The
comparison is pure over the ``matrix()`` dictionaries, so it is unit-tested
without a guest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from labkit.lab.results import traced_function

log = logging.getLogger(__name__)

Matrix = dict[str, Any]
Row = tuple[str, dict[str, str]]       # label, kernel -> cell text
MARK = "<- differs"


# -- measuring ------------------------------------------------------------------

def measure(kernels: list[str], run_one: Callable[[str], Matrix], jobs: int = 2) -> dict[str, Matrix]:
    """``run_one(kernel)`` for every kernel, ``jobs`` at a time; results in the order given.

    Two TCG guests at once use both cores of a small host; a third waits."""
    jobs = max(1, min(jobs, len(kernels)))
    log.debug("matrix on %s, %d at a time", kernels, jobs)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="labkit-matrix") as pool:
        futures = {k: pool.submit(run_one, k) for k in kernels}
        return {k: futures[k].result() for k in kernels}


# -- comparing --------------------------------------------------------------------

def _pin_cells(p: dict) -> dict[str, str]:
    res = "ok" if p["ok"] else f"{p.get('errname') or '?'} ({p.get('errno')})"
    vp, fp = p.get("vmpin_kb_delta"), p.get("foll_pin_delta")
    return {"result": res, "VmPin kB": "-" if vp is None else f"{vp:+d}",
            "foll_pin": "-" if fp is None else f"{fp:+d}",
            "refused in": (traced_function(p["trace"][0]) or "?") if p.get("trace") else "-"}


def _mount_cells(mt: dict) -> dict[str, str]:
    return {"mounted": "yes" if mt.get("ok") else "NO", "dax": "yes" if mt.get("dax_active") else "no",
            "EXPERIMENTAL": "yes" if mt.get("experimental_warning") else "no"}


def _truncate_cells(tw: dict | None) -> dict[str, str]:
    if tw is None:
        return {"truncate": "not measured"}
    # the two innermost frames say where it waits (and are what changed in v6.15)
    where = " <- ".join((tw.get("where") or ["?"])[:2])
    return {"truncate": f"blocked in {where}" if tw.get("blocked") else "not blocked"}


def rows(matrices: dict[str, Matrix]) -> list[tuple[str, dict[str, dict[str, str]]]]:
    """Every row label with, per kernel, its named cells (missing -> 'not measured')."""
    out: list[tuple[str, dict[str, dict[str, str]]]] = []
    mounts: dict[str, dict[str, dict]] = {}
    pins: dict[str, dict[str, dict]] = {}
    for k, m in matrices.items():
        for mt in m.get("mounts") or []:
            mounts.setdefault(f"mount {mt['fs']} -o {mt.get('options', 'dax')}", {})[k] = _mount_cells(mt)
        for p in m.get("pins") or []:
            pins.setdefault(f"{p['mechanism']} {p['memory']} {p['mapping']}", {})[k] = _pin_cells(p)
    for label, cells in list(mounts.items()) + list(pins.items()):
        out.append((label, {k: cells.get(k, {"result": "not measured"}) for k in matrices}))
    if any(m.get("truncate_wait") is not None for m in matrices.values()):
        out.append(("truncate while referenced",
                    {k: _truncate_cells(m.get("truncate_wait")) for k, m in matrices.items()}))
    return out


def differences(matrices: dict[str, Matrix]) -> list[dict[str, Any]]:
    """The rows where the kernels disagree: label, the fields that differ, and every kernel's cells."""
    diffs = []
    for label, per_kernel in rows(matrices):
        measured = [c for c in per_kernel.values() if c.get("result") != "not measured"]
        fields = sorted({f for c in measured for f in c if len({c2.get(f) for c2 in measured}) > 1})
        if len(measured) > 1 and fields:
            diffs.append({"row": label, "fields": fields, "kernels": per_kernel})
    return diffs


def _cell_text(cells: dict[str, str]) -> str:
    parts = [cells.get("result") or cells.get("truncate") or ""]
    for name in ("VmPin kB", "foll_pin"):
        if cells.get(name, "-") != "-":
            parts.append(f"{name.split()[0]} {cells[name]}")
    if "mounted" in cells:
        parts = [f"mounted={cells['mounted']} dax={cells['dax']} EXPERIMENTAL={cells['EXPERIMENTAL']}"]
    if cells.get("refused in", "-") != "-":
        parts.append(f"[{cells['refused in']}]")
    return " ".join(p for p in parts if p)


def side_by_side(matrices: dict[str, Matrix]) -> str:
    """The kernels in columns, one row per mount / pin case / truncate, rows
    that differ marked with ``<- differs: fields`` (and bold on a terminal
    when ``bold`` wraps them)."""
    diff = {d["row"]: d["fields"] for d in differences(matrices)}
    table = [(label, [_cell_text(c) for c in per_kernel.values()]) for label, per_kernel in rows(matrices)]
    width = max([len(label) for label, _ in table] + [9])
    cols = [max([len(cells[i]) for _, cells in table] + [len(_header(k, m))])
            for i, (k, m) in enumerate(matrices.items())]
    head = " | ".join(_header(k, m).ljust(cols[i]) for i, (k, m) in enumerate(matrices.items()))
    lines = [f"{'':{width}s}   {head}".rstrip(), "-" * (width + 3 + sum(cols) + 3 * (len(cols) - 1))]
    for label, cells in table:
        text = " | ".join(c.ljust(cols[i]) for i, c in enumerate(cells))
        mark = f"  {MARK}: {', '.join(diff[label])}" if label in diff else ""
        lines.append(f"{label:{width}s}   {text}{mark}".rstrip())
    lines += ["", f"{len(diff)} of {len(table)} rows differ between kernels. [function]: the kretprobe on "
              "that function saw the refusal; VmPin in kB; foll_pin = nr_foll_pin_acquired delta."]
    return "\n".join(lines)


def _header(kernel: str, m: Matrix) -> str:
    secs = m.get("seconds")
    return f"{kernel}: {m.get('kernel', '?')}" + (f" ({secs} s)" if secs is not None else "")


def as_json(matrices: dict[str, Matrix]) -> dict[str, Any]:
    """``--json`` for several kernels: every kernel's matrix and the differing rows."""
    return {"kernels": matrices, "differences": differences(matrices)}
