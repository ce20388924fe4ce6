"""The dashboards' pure renderers, by string comparison: values in, HTML out,
no widget and no guest."""

from __future__ import annotations

import ast
from pathlib import Path

from labkit.course.dashboard import render
from labkit.course.dashboard.models import MatrixModel
from labkit.lab.observe import HIGHLIGHTS, LogLine, PinSample

ERR_PRE = '<pre style="color:#b91c1c;white-space:pre-wrap">{}</pre>'


def test_render_imports_no_widgets_and_no_models():
    tree = ast.parse(Path(render.__file__).read_text())
    runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in runtime if isinstance(n, ast.Import) for a in n.names} | \
            {n.module or "" for n in runtime if isinstance(n, ast.ImportFrom)}
    assert names == {"__future__", "html", "collections.abc", "typing"}, names


def test_every_highlight_kind_has_a_label_and_a_colour():
    assert list(render.HIGHLIGHT_LABELS) == list(HIGHLIGHTS) == list(render.LOG_COLOURS)


def test_error_and_status_lines_escape_and_join():
    assert render.error_html("a <b>\nline 2") == ERR_PRE.format("a &lt;b&gt;\nline 2")
    assert render.status_html("", "", "") == ""
    assert render.status_html("start", "", "") == "<i>start ...</i>"
    assert render.status_html("", "x & y", "") == "x &amp; y"
    assert render.status_html("reset", "m", "E") == "<i>reset ...</i><br>m<br>" + ERR_PRE.format("E")
    assert render.status_html("", "m", "", message_class="labkit-pin-message") == \
        '<span class="labkit-pin-message">m</span>'


def test_boot_text_by_stage():
    kw: dict = {"started": None, "elapsed": 0.0, "stage": "not started", "last_line": "", "done": False,
                "summary": "", "error": ""}
    assert render.boot_text_html(**kw) == ""
    kw.update(started=1.0, elapsed=2.25, stage="sshd is starting", last_line="labkit: hostkey <k>")
    assert render.boot_text_html(**kw) == ('<span style="font:12px sans-serif">[  2.2 s] sshd is starting</span>'
                                           '<br><code style="font-size:11px">labkit: hostkey &lt;k&gt;</code>')
    kw.update(done=True)
    assert render.boot_text_html(**kw) == '<span class="labkit-boot-summary">done</span>'
    kw.update(summary="booted in 7.5 s: kernel 6.1")
    assert render.boot_text_html(**kw) == '<span class="labkit-boot-summary">booted in 7.5 s: kernel 6.1</span>'
    kw.update(error="QEMU exited")
    assert render.boot_text_html(**kw) == ERR_PRE.format("QEMU exited")


def test_vm_info_table():
    kw: dict = {"name": "lab<1>", "state": "running", "kernel_release": "6.1.0-99-amd64", "kernel": "6.1",
                "accel": "kvm", "accel_reason": "/dev/kvm usable", "boot_seconds": None}
    row = '<tr><td style="padding-right:12px;color:#4b5563">{}</td><td>{}</td></tr>'
    assert render.vm_info_html(**kw) == (
        '<table class="labkit-vm-info" style="font:13px sans-serif">'
        + row.format("VM", "lab&lt;1&gt;")
        + row.format("state", '<b class="labkit-vm-state" style="color:#15803d">running</b>')
        + row.format("kernel", '<span class="labkit-vm-release">6.1.0-99-amd64</span> (image 6.1)')
        + row.format("accelerator", '<b class="labkit-vm-accel">KVM</b> <span style="color:#4b5563">'
                                    '/dev/kvm usable</span>')
        + "</table>")
    kw.update(state="starting", kernel_release="", kernel="", accel="", boot_seconds=7.25)
    out = render.vm_info_html(**kw)
    assert 'style="color:#b45309">starting</b>' in out
    assert '<span class="labkit-vm-release">-</span> (image ?)' in out and '"labkit-vm-accel">-</b>' in out
    assert out.endswith(row.format("boot", "SSH-ready 7.2 s after QEMU started") + "</table>")


def test_log_lines_and_summary():
    lines = [LogLine("a <b>", None, 0.0), LogLine("Unable to pin", "pin-refused", 0.0)]
    out = render.log_html(lines, height_px=100)
    assert '<div class="labkit-log-line">a &lt;b&gt;</div>' in out
    assert ('<div class="labkit-log-line labkit-log-pin-refused" style="color:#b91c1c;font-weight:bold" '
            'title="pin refused">Unable to pin</div>') in out
    assert "max-height:100px" in out and out.index("a &lt;b&gt;") < out.index("Unable to pin")
    counts = {"experimental": 1, "pin-refused": 2, "refusal": 0, "dax": 9}
    assert render.log_summary_html(counts, True, 12, "") == (
        '<span style="font:12px sans-serif">kernel log (following, <span class="labkit-log-count">12</span> lines)'
        ' · <span style="color:#b45309">EXPERIMENTAL DAX warning: 1</span>, <span style="color:#b91c1c">'
        'pin refused: 2</span>, <span style="color:#7c3aed">check_vma_flags refused: 0</span></span>')
    assert render.log_summary_html({}, False, 0, "gone <x>").endswith(
        '(not following, <span class="labkit-log-count">0</span> lines) · '
        ' <span style="color:#b91c1c">gone &lt;x&gt;</span></span>')


def test_pin_numbers_with_and_without_a_sample():
    row = "<tr><td>{}</td><td>{}</td></tr>"
    assert render.pin_numbers_html(None, None) == (
        '<table class="labkit-pin-numbers" style="font:13px sans-serif">'
        '<tr><td>VmPin of the holder (no holder)</td><td class="labkit-vmpin"><b>-</b> kB</td></tr>'
        + row.format("nr_foll_pin_acquired", "-") + row.format("nr_foll_pin_released", "-")
        + row.format("FOLL_PIN pins held (acquired - released)", "-") + "</table>")
    out = render.pin_numbers_html(PinSample(1.0, 2048, 1212, 188), 4242)
    assert '(PID 4242)</td><td class="labkit-vmpin"><b>2048</b> kB' in out
    assert row.format("FOLL_PIN pins held (acquired - released)", "1024") in out


def test_pin_plots_side_by_side():
    hist = [PinSample(0.0, None, 10, 10), PinSample(1.0, 2048, 522, 10)]
    out = render.pin_plots_html(hist)
    assert out.startswith('<div style="display:flex;gap:12px"><div><div style="font:12px sans-serif">VmPin of')
    assert out.count("<polyline") == 2 and "max 2048" in out and "max 512" in out


def test_sparkline_exact_geometry():
    assert render.sparkline_svg([(0, 0), (10, 100)], "VmPin", "kB", "red") == (
        '<div style="font:12px sans-serif">VmPin: <b class="labkit-latest">100 kB</b></div>'
        '<svg width="320" height="90" style="background:#f9fafb">'
        '<polyline fill="none" stroke="red" stroke-width="2" points="4.0,86.0 316.0,4.0"/>'
        '<text x="316" y="12" font-size="10" text-anchor="end" fill="#6b7280">max 100</text>'
        '<text x="316" y="84" font-size="10" text-anchor="end" fill="#6b7280">10 s</text></svg>')
    # one instant and a flat zero line: no division by zero, the scale is 0..1
    flat = render.sparkline_svg([(0, 0), (0, 0)], "x", "u", "c", width=20, height=20)
    assert 'points="16.0,16.0 16.0,16.0"' in flat and "max 1<" in flat


def test_matrix_cells_tooltips_and_missing():
    pins = [{"mechanism": "rdma", "memory": "anon", "mapping": "shared", "ok": True, "vmpin_kb_delta": 2048,
             "foll_pin_delta": 512},
            {"mechanism": "odirect", "memory": "devdax", "mapping": "shared", "ok": False, "errno": 14,
             "errname": "EFAULT", "vmpin_kb_delta": None, "foll_pin_delta": None, "trace": ["x"]}]
    m = MatrixModel({"kernel": "6.1<", "pins": pins})
    out = render.matrix_html(m)
    assert 'kernel 6.1&lt;</div>' in out and "<ul" not in out and "border:3px" not in out
    assert ('<td class="labkit-ok" title="VmPin +2048 kB, foll_pin +512" style="background:#dcfce7;'
            'padding:2px 6px;text-align:center">ok</td>') in out
    assert ('<td class="labkit-refused" title="VmPin -, refusal traced in check_vma_flags" '
            'style="background:#fee2e2;padding:2px 6px;text-align:center">EFAULT (14)</td>') in out
    assert out.count('<td style="background:#f3f4f6;padding:2px 6px">&nbsp;</td>') == 2
    assert render.matrix_html(MatrixModel()) == \
        '<div class="labkit-matrix" style="color:#6b7280">(no matrix measured yet)</div>'
    m.close()


def test_matrix_status_line():
    assert render.matrix_status_html("", "", "") == ""
    assert render.matrix_status_html("measure", "preparing <pmem>", "") == "preparing &lt;pmem&gt;"
    assert render.matrix_status_html("", "measured in 25.0 s", "E") == \
        "measured in 25.0 s<br>" + ERR_PRE.format("E")
