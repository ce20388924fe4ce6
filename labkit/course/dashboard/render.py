"""Pure HTML/SVG rendering for the dashboards: values in, a string out.

No widget is imported here; every function is tested by comparing strings
(``tests/test_dashboard_render.py``). Every value from the guest is escaped
with ``html.escape`` before it reaches the page.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labkit.course.dashboard.models.matrix import MatrixModel
    from labkit.lab.observe import LogLine, PinSample

HIGHLIGHT_LABELS = {
    "experimental": "EXPERIMENTAL DAX warning",
    "pin-refused": "pin refused",
    "refusal": "check_vma_flags refused",
    "dax": "DAX",
}
LOG_COLOURS = {"experimental": "#b45309", "pin-refused": "#b91c1c", "refusal": "#7c3aed", "dax": "#1d4ed8"}
STATE_COLOURS = {"running": "#15803d", "stopped": "#6b7280", "dead": "#b91c1c"}
OTHER_STATE_COLOUR = "#b45309"
OK_BG, REFUSED_BG, MISSING_BG = "#dcfce7", "#fee2e2", "#f3f4f6"
ERROR_COLOUR = "#b91c1c"
_PAD = 4    # sparkline padding in pixels


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


# -- status lines ------------------------------------------------------------

def error_html(error: str) -> str:
    """An action's error message, kept as written (several lines)."""
    return f'<pre style="color:{ERROR_COLOUR};white-space:pre-wrap">{html.escape(error)}</pre>'


def status_html(busy: str, message: str, error: str, message_class: str = "") -> str:
    """The line under a panel's buttons: the running action, a message, an error."""
    parts = []
    if busy:
        parts.append(f"<i>{html.escape(busy)} ...</i>")
    if message:
        text = html.escape(message)
        parts.append(f'<span class="{message_class}">{text}</span>' if message_class else text)
    if error:
        parts.append(error_html(error))
    return "<br>".join(parts)


# -- boot progress and the VM panel -----------------------------------------

def boot_text_html(*, started: float | None, elapsed: float, stage: str, last_line: str, done: bool,
                   summary: str, error: str) -> str:
    """The text under the boot progress bar: the stage and the last console
    line while booting, the summary when done, the error if it failed."""
    if error:
        return error_html(error)
    if done:
        return f'<span class="labkit-boot-summary">{html.escape(summary or "done")}</span>'
    if started is not None:
        return (f'<span style="font:12px sans-serif">[{elapsed:5.1f} s] {html.escape(stage)}'
                f'</span><br><code style="font-size:11px">{html.escape(last_line)}</code>')
    return ""


def vm_info_html(*, name: str, state: str, kernel_release: str, kernel: str, accel: str, accel_reason: str,
                 boot_seconds: float | None) -> str:
    """The VM panel's table: name, state, release (and image), accelerator and why."""
    colour = STATE_COLOURS.get(state, OTHER_STATE_COLOUR)
    rows = [("VM", html.escape(name)),
            ("state", f'<b class="labkit-vm-state" style="color:{colour}">{html.escape(state)}</b>'),
            ("kernel", (f'<span class="labkit-vm-release">{html.escape(kernel_release or "-")}</span>'
                        f' (image {html.escape(kernel or "?")})')),
            ("accelerator", (f'<b class="labkit-vm-accel">{html.escape(accel.upper() or "-")}</b>'
                             f' <span style="color:#4b5563">{html.escape(accel_reason)}</span>'))]
    if boot_seconds:
        rows.append(("boot", f"SSH-ready {boot_seconds:.1f} s after QEMU started"))
    return ('<table class="labkit-vm-info" style="font:13px sans-serif">' + "".join(
        f'<tr><td style="padding-right:12px;color:#4b5563">{k}</td><td>{v}</td></tr>' for k, v in rows)
        + "</table>")


# -- the kernel log ----------------------------------------------------------

def log_html(lines: Iterable[LogLine], height_px: int = 260) -> str:
    """The log as HTML: highlighted lines coloured and labelled, newest last."""
    rows = []
    for ln in lines:
        text = html.escape(ln.text)
        if ln.kind:
            colour = LOG_COLOURS.get(ln.kind, "#111827")
            label = html.escape(HIGHLIGHT_LABELS.get(ln.kind, ln.kind))
            rows.append(f'<div class="labkit-log-line labkit-log-{ln.kind}" style="color:{colour};'
                        f'font-weight:bold" title="{label}">{text}</div>')
        else:
            rows.append(f'<div class="labkit-log-line">{text}</div>')
    body = "".join(rows) or '<div class="labkit-log-empty" style="color:#6b7280">(no kernel log lines yet)</div>'
    # column-reverse keeps the newest line in view without any script
    return (f'<div class="labkit-log" style="font-family:monospace;font-size:11px;line-height:1.35;'
            f'white-space:pre-wrap;max-height:{height_px}px;overflow-y:auto;display:flex;'
            f'flex-direction:column-reverse;border:1px solid #d1d5db;padding:4px">'
            f'<div>{body}</div></div>')


def log_summary_html(counts: Mapping[str, int], running: bool, n_lines: int, error: str) -> str:
    """The line above the log: following or not, how many lines, the highlight counts."""
    shown = ", ".join(f'<span style="color:{LOG_COLOURS[k]}">{HIGHLIGHT_LABELS[k]}: {n}</span>'
                      for k, n in counts.items() if k != "dax")
    state = "following" if running else "not following"
    err = f' <span style="color:{ERROR_COLOUR}">{html.escape(error)}</span>' if error else ""
    return (f'<span style="font:12px sans-serif">kernel log ({state}, '
            f'<span class="labkit-log-count">{n_lines}</span> lines) · {shown}{err}</span>')


# -- pins --------------------------------------------------------------------

def pin_numbers_html(sample: PinSample | None, pid: int | None) -> str:
    """The latest pin sample as a table (``-`` for a value not read)."""
    s = sample
    holder = f"PID {pid}" if pid else "no holder"
    return ('<table class="labkit-pin-numbers" style="font:13px sans-serif">'
            f'<tr><td>VmPin of the holder ({holder})</td><td class="labkit-vmpin"><b>'
            f'{_num(s.vmpin_kb if s else None)}</b> kB</td></tr>'
            f'<tr><td>nr_foll_pin_acquired</td><td>{_num(s.foll_pin_acquired if s else None)}</td></tr>'
            f'<tr><td>nr_foll_pin_released</td><td>{_num(s.foll_pin_released if s else None)}</td></tr>'
            f'<tr><td>FOLL_PIN pins held (acquired - released)</td><td>'
            f'{_num(s.foll_pins_held if s else None)}</td></tr></table>')


def pin_plots_html(history: Sequence[PinSample]) -> str:
    """VmPin of the holder and the FOLL_PIN pins held over time, side by side."""
    # no holder process means nothing pinned by it: plotted as 0
    vmpin = sparkline_svg([(x.t, x.vmpin_kb or 0) for x in history], "VmPin of the holder", "kB", "#2563eb")
    held = sparkline_svg([(x.t, x.foll_pins_held) for x in history], "FOLL_PIN held", "pages", "#db2777")
    return f'<div style="display:flex;gap:12px"><div>{vmpin}</div><div>{held}</div></div>'


def _plot_segments(points: Sequence[tuple[float, float | None]], width: int, height: int, lo: float,
                   hi: float) -> list[list[str]]:
    """Runs of "x,y" pixel coordinates between the gaps (values of None)."""
    t0, t1 = points[0][0], points[-1][0]

    def xy(t: float, v: float) -> str:
        x = _PAD + (width - 2 * _PAD) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        y = height - _PAD - (height - 2 * _PAD) * (v - lo) / (hi - lo)
        return f"{x:.1f},{y:.1f}"
    segments: list[list[str]] = []
    cur: list[str] = []
    for t, v in points:
        if v is None:
            if cur:
                segments.append(cur)
            cur = []
        else:
            cur.append(xy(t, v))
    if cur:
        segments.append(cur)
    return segments


def _segment_svg(segment: list[str], colour: str) -> str:
    """A line through a run of points, or a dot for a single point."""
    if len(segment) > 1:
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(segment)}"/>'
    x, y = segment[0].split(",")
    return f'<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"/>'


def sparkline_svg(points: list[tuple[float, float | None]], title: str, unit: str, colour: str,
                  width: int = 320, height: int = 90) -> str:
    """A small line plot (inline SVG) of (t, value) points; gaps where value is None."""
    vals = [v for _, v in points if v is not None]
    latest = points[-1][1] if points else None
    head = (f'<div style="font:12px sans-serif">{html.escape(title)}: '
            f'<b class="labkit-latest">{"-" if latest is None else f"{latest:g} {unit}"}</b></div>')
    if len(points) < 2 or not vals:
        return head + f'<svg width="{width}" height="{height}" style="background:#f9fafb"></svg>'
    lo, hi = min([*vals, 0]), max(vals)
    if hi == lo:
        hi = lo + 1
    lines = "".join(_segment_svg(s, colour) for s in _plot_segments(points, width, height, lo, hi) if s)
    span = points[-1][0] - points[0][0]
    axis = (f'<text x="{width - _PAD}" y="12" font-size="10" text-anchor="end" fill="#6b7280">'
            f'max {hi:g}</text><text x="{width - _PAD}" y="{height - 6}" font-size="10" text-anchor="end" '
            f'fill="#6b7280">{span:.0f} s</text>')
    return head + (f'<svg width="{width}" height="{height}" style="background:#f9fafb">'
                   f'{lines}{axis}</svg>')


# -- the pin matrix ----------------------------------------------------------

def _matrix_cell_html(model: MatrixModel, label: str, mech: str, mem: str, mapping: str, several: bool) -> str:
    c = model.cell(label, mech, mem, mapping)
    if c is None:
        return f'<td style="background:{MISSING_BG};padding:2px 6px">&nbsp;</td>'
    bg = OK_BG if c.ok else REFUSED_BG
    border = "border:3px solid #111827;" if several and model.differs(mech, mem, mapping) else ""
    tip = (f"VmPin {c.vmpin_kb_delta:+d} kB" if c.vmpin_kb_delta is not None else "VmPin -") + \
          (f", foll_pin {c.foll_pin_delta:+d}" if c.foll_pin_delta is not None else "") + \
          (", refusal traced in check_vma_flags" if c.traced else "")
    cls = "labkit-ok" if c.ok else "labkit-refused"
    return (f'<td class="{cls}" title="{html.escape(tip)}" style="background:{bg};{border}'
            f'padding:2px 6px;text-align:center">{html.escape(c.label)}</td>')


def _mounts_html(mounts: Iterable[Mapping[str, Any]]) -> str:
    """The DAX mounts of one matrix as a list ('' without mounts)."""
    items = "".join(
        f'<li>{html.escape(mt["fs"])} -o {html.escape(str(mt.get("options", "dax")))}: '
        f'{"mounted" if mt.get("ok") else "NOT mounted"}, DAX {"on" if mt.get("dax_active") else "off"}, '
        f'EXPERIMENTAL warning {"printed" if mt.get("experimental_warning") else "not printed"}</li>'
        for mt in mounts)
    return f'<ul style="font:11px sans-serif;margin:4px 0 0 0;padding-left:16px">{items}</ul>' if items else ""


def _kernel_table_html(model: MatrixModel, label: str, several: bool) -> str:
    """One kernel's table with its mounts below."""
    m = model.matrices[label]
    memories = model.memories()
    head = "".join(f'<th style="padding:2px 6px">{html.escape(mem)}</th>' for mem in memories)
    body = []
    for mech, mapping in model.rows():
        cells = "".join(_matrix_cell_html(model, label, mech, mem, mapping, several) for mem in memories)
        rowname = mech if mapping == "shared" else f"{mech} ({mapping})"
        body.append(f'<tr><th style="text-align:left;padding:2px 6px">{html.escape(rowname)}</th>{cells}</tr>')
    return (f'<div style="margin-right:16px"><div style="font:bold 13px sans-serif">kernel '
            f'{html.escape(str(m.get("kernel", label)))}</div>'
            f'<table class="labkit-matrix-table" style="border-collapse:collapse;font:12px sans-serif">'
            f'<tr><th></th>{head}</tr>{"".join(body)}</table>' + _mounts_html(m.get("mounts", [])) + "</div>")


def matrix_html(model: MatrixModel) -> str:
    """The pin matrix: one coloured table per kernel, side by side; cells where
    the kernels disagree get a thick border."""
    if not model.matrices:
        return '<div class="labkit-matrix" style="color:#6b7280">(no matrix measured yet)</div>'
    several = len(model.matrices) > 1
    tables = "".join(_kernel_table_html(model, label, several) for label in model.labels)
    return f'<div class="labkit-matrix" style="display:flex;flex-wrap:wrap">{tables}</div>'


def matrix_status_html(busy: str, progress_text: str, error: str) -> str:
    """The line under the matrix: progress while measuring, then how long it took."""
    parts = [html.escape(progress_text)] if busy or progress_text else []
    if error:
        parts.append(error_html(error))
    return "<br>".join(parts)
