"""Thin ipywidgets views over the dashboard models.

A view observes its model's traits and renders with the pure functions of
``render``; its controls set the model's traits (``traitlets.link``) or submit
the model's actions. No state lives here: ``close()`` unhooks the view and
closes the model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import HasTraits, link

from labkit.course.dashboard import render
from labkit.course.dashboard.models import (
    BootProgressModel,
    DashboardModel,
    KernelLogModel,
    MatrixModel,
    PinModel,
    VMPanelModel,
)
from labkit.lab import MEMORY_KINDS

log = logging.getLogger(__name__)


class _Throttle:
    """Call ``fn`` at most every ``interval`` s; the last request always lands."""

    def __init__(self, fn: Callable[[], None], interval: float = 0.25) -> None:
        self.fn, self.interval = fn, interval
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __call__(self, *_: object) -> None:
        with self._lock:
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._fire)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._last = time.monotonic()
        self.fn()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        self.fn()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def _guarded(render_fn: Callable[[], None]) -> Callable[..., None]:
    """A trait observer that renders and never raises into the model: a broken
    view must not break the model (or the thread that changed it)."""
    def on_change(_change: Any = None) -> None:
        try:
            render_fn()
        except Exception:
            log.exception("a dashboard view failed to render")
    return on_change


def _detach(model: HasTraits, handler: Callable[..., None], *links: link) -> None:
    """Stop observing ``model`` (again: ipywidgets calls ``close()`` once more
    from ``__del__``, and traitlets refuses to remove a handler twice)."""
    for ln in links:
        with contextlib.suppress(ValueError):
            ln.unlink()
    with contextlib.suppress(ValueError):
        model.unobserve(handler)


class BootProgress(widgets.VBox):
    """A progress bar and the last console line, over a ``BootProgressModel``."""

    def __init__(self, model: BootProgressModel) -> None:
        self.model = model
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="boot",
                                         layout=widgets.Layout(width="420px"))
        self.text = widgets.HTML()
        super().__init__([self.bar, self.text])
        self.add_class("labkit-boot-progress")
        self._on_change = _guarded(self._render)
        model.observe(self._on_change)
        self._render()

    def _render(self) -> None:
        m = self.model
        self.layout.display = "none" if m.started is None else None   # nothing to show before a boot
        self.bar.value = m.fraction
        self.bar.bar_style = "danger" if m.error else ("success" if m.done else "info")
        self.text.value = render.boot_text_html(started=m.started, elapsed=m.elapsed, stage=m.stage,
                                                last_line=m.last_line, done=m.done, summary=m.summary,
                                                error=m.error)

    def close(self) -> None:
        _detach(self.model, self._on_change)
        self.model.close()
        super().close()


class VMPanel(widgets.VBox):
    """State, kernel, release, accelerator and why; boot progress; Start/Stop/Reset."""

    def __init__(self, model: VMPanelModel) -> None:
        self.model = model
        self.info = widgets.HTML()
        self.start_button = widgets.Button(description="Start", icon="play", tooltip="boot the guest")
        self.stop_button = widgets.Button(description="Stop", icon="stop", tooltip="shut the guest down")
        self.reset_button = widgets.Button(description="Reset", icon="refresh", button_style="warning",
                                           tooltip="vm.reset(): back to a freshly started guest; pmem is kept")
        self.start_button.on_click(lambda _: model.submit_action("start"))
        self.stop_button.on_click(lambda _: model.submit_action("stop"))
        self.reset_button.on_click(lambda _: model.submit_action("reset"))
        self.progress = BootProgress(model.progress)
        self.status = widgets.HTML()
        super().__init__([self.info, widgets.HBox([self.start_button, self.stop_button, self.reset_button]),
                          self.progress, self.status])
        self.add_class("labkit-vm-panel")
        self._on_change = _guarded(self._render)
        model.observe(self._on_change)
        self._render()

    def _render(self) -> None:
        m = self.model
        self.info.value = render.vm_info_html(name=m.name, state=m.state, kernel_release=m.kernel_release,
                                              kernel=m.kernel, accel=m.accel, accel_reason=m.accel_reason,
                                              boot_seconds=m.boot_seconds)
        running = m.state == "running"
        self.start_button.disabled = bool(m.busy) or running
        self.stop_button.disabled = bool(m.busy) or not running
        self.reset_button.disabled = bool(m.busy)
        self.status.value = render.status_html(m.busy, m.message, m.error)

    def close(self) -> None:
        _detach(self.model, self._on_change)
        self.progress.close()
        self.model.close()
        super().close()


class LogPane(widgets.VBox):
    """The live kernel log with the lines that matter highlighted."""

    def __init__(self, model: KernelLogModel, height_px: int = 260, limit: int = 60) -> None:
        self.model = model
        self.limit = limit
        self.height_px = height_px
        self.highlights_only = widgets.Checkbox(value=model.highlights_only, description="highlighted only",
                                                indent=False)
        self._link = link((model, "highlights_only"), (self.highlights_only, "value"))
        self.summary = widgets.HTML()
        self.text = widgets.HTML()
        super().__init__([widgets.HBox([self.summary, self.highlights_only]), self.text])
        self.add_class("labkit-log-pane")
        self._throttle = _Throttle(_guarded(self._render_now))
        model.observe(self._throttle)
        self._render_now()

    def _render_now(self) -> None:
        m = self.model
        self.summary.value = render.log_summary_html(m.counts, m.running, len(m.lines), m.error)
        self.text.value = render.log_html(m.visible(self.limit), self.height_px)

    def close(self) -> None:
        _detach(self.model, self._throttle, self._link)
        self._throttle.cancel()
        self.model.close()
        super().close()


class PinPanel(widgets.VBox):
    """Live pin counters with a small plot; register / release a buffer."""

    def __init__(self, model: PinModel) -> None:
        self.model = model
        self.memory = widgets.Dropdown(options=list(MEMORY_KINDS), value=model.memory, description="memory")
        self._link = link((model, "memory"), (self.memory, "value"))
        self.register_button = widgets.Button(description="Register", icon="lock", button_style="primary",
                                              tooltip="ibv_reg_mr on a 2 MiB buffer of this memory, held")
        self.release_button = widgets.Button(description="Release", icon="unlock",
                                             tooltip="ibv_dereg_mr: the holder exits")
        self.register_button.on_click(lambda _: model.submit_register())
        self.release_button.on_click(lambda _: model.submit_release())
        self.numbers = widgets.HTML()
        self.plot = widgets.HTML()
        self.status = widgets.HTML()
        super().__init__([widgets.HBox([self.memory, self.register_button, self.release_button]),
                          self.numbers, self.plot, self.status])
        self.add_class("labkit-pin-panel")
        self._throttle = _Throttle(_guarded(self._render_now))
        model.observe(self._throttle)
        self._render_now()

    def _render_now(self) -> None:
        m = self.model
        self.numbers.value = render.pin_numbers_html(m.latest, m.counters.pid)
        self.plot.value = render.pin_plots_html(m.history)
        self.register_button.disabled = bool(m.busy)
        self.release_button.disabled = bool(m.busy) or m.held is None
        self.status.value = render.status_html(m.busy, m.message, m.error, message_class="labkit-pin-message")

    def close(self) -> None:
        _detach(self.model, self._throttle, self._link)
        self._throttle.cancel()
        self.model.close()
        super().close()


class MatrixTable(widgets.VBox):
    """The pin matrix as a coloured table; ``Measure`` runs ``lab.matrix()`` when a Lab is given."""

    def __init__(self, model: MatrixModel) -> None:
        self.model = model
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        children: list[widgets.Widget] = [self.table, self.status]
        self.measure_button: widgets.Button | None = None
        if model.lab is not None:
            self.measure_button = widgets.Button(description="Measure now", icon="table",
                                                 tooltip="every mechanism x memory kind on the live guest")
            self.measure_button.on_click(lambda _: model.submit("measure", model.measure))
            children.insert(0, self.measure_button)
        super().__init__(children)
        self.add_class("labkit-matrix-widget")
        self._on_change = _guarded(self._render)
        model.observe(self._on_change)
        self._render()

    def _render(self) -> None:
        m = self.model
        self.table.value = m.html()
        if self.measure_button is not None:
            self.measure_button.disabled = bool(m.busy)
        self.status.value = render.matrix_status_html(m.busy, m.progress_text, m.error)

    def close(self) -> None:
        _detach(self.model, self._on_change)
        self.model.close()
        super().close()


class Dashboard(widgets.VBox):
    """The VM panel above tabs with the kernel log, the pin counters and the pin matrix."""

    def __init__(self, model: DashboardModel, panel: VMPanel, log: LogPane, pins: PinPanel,
                 matrix: MatrixTable) -> None:
        self.model = model
        self.panel_view, self.log_view, self.pin_view, self.matrix_view = panel, log, pins, matrix
        self.tabs = widgets.Tab(children=[log, pins, matrix], titles=("Kernel log", "Pins", "Pin matrix"))
        self.tabs.selected_index = 0
        super().__init__([panel, self.tabs])
        self.add_class("labkit-dashboard")

    def close(self) -> None:
        for w in (self.pin_view, self.log_view, self.matrix_view, self.panel_view):
            w.close()
        self.tabs.close()
        super().close()
