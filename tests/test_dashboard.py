"""The dashboards: plain models driven through their widgets' traits and
buttons (``.click()``) without a browser, with fakes where a guest is not the
point; then the same models against real booted guests."""

from __future__ import annotations

import re
import threading
import time

import pytest

from labkit.course import dashboard as dash
from labkit.machine.accel import AccelChoice
from labkit.errors import LabError, LaunchError
from labkit.testing.fakes import FakeVM
from labkit.lab import Lab
from labkit.lab.observe import LogLine
from labkit.lab.results import traced_function
from labkit.lab.tracing import refusing_functions
from labkit.timeout import Deadline
from labkit.machine.vm import VM, VMState


def eventually(cond, timeout: float = 10.0, what: str = "condition"):
    """Poll ``cond`` (bounded): the views render on a throttle thread."""
    deadline = Deadline(timeout)
    while not deadline.expired:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------
# Fakes: a VM with a lifecycle, a Lab that holds pins
# --------------------------------------------------------------------------

BOOT_LINES = ["[    0.000000] Linux version 6.1.0-99-amd64 (debian-kernel@lists.debian.org)",
              "[    3.317252] Run /init as init process",
              "[    5.514754] EXT4-fs (vda): mounted filesystem with ordered data mode.",
              "labkit: hostkey ssh-ed25519 AAAAfake",
              "labkit: ready 6.1.0-99-amd64 uptime=7.5"]


class LifecycleVM(FakeVM):
    """FakeVM (whose start/stop/reset/status keep the real VM's signatures and
    VMState values) whose start feeds console lines and may fail."""

    def __init__(self, running: bool = True, fail_start: Exception | None = None) -> None:
        super().__init__([(r"uname -r", "6.1.0-99-amd64\n", 0)])
        self.accel = AccelChoice("tcg", "no KVM in this fake")
        self.on_console_line = None
        self.state = VMState.RUNNING if running else VMState.STOPPED
        self.fail_start = fail_start

    stopped_outside = False

    def status(self) -> VMState:     # what the host says (vm.json and /proc)
        return VMState.STOPPED if self.stopped_outside else self.state

    def describe(self) -> dict:
        return {"name": self.name, "state": str(self.status()), "kernel": self.kernel,
                "kernel_release": "6.1.0-99-amd64", "accel": "tcg", "accel_reason": "no KVM in this fake",
                "boot_seconds": 0.2}

    def start(self) -> LifecycleVM:
        self.calls.append("start")
        for line in BOOT_LINES:
            if self.on_console_line:
                self.on_console_line(line)
        if self.fail_start:
            raise self.fail_start
        self.state = VMState.RUNNING
        return self

    def stop(self, timeout: float = 15.0) -> bool:
        super().stop(timeout)
        self.stopped_outside = False
        return False


class FakeHeld:
    def __init__(self, info: dict) -> None:
        self.info = info
        self.pid = info.get("pid")
        self.released = False

    @property
    def ok(self) -> bool:
        return bool(self.info.get("ok"))

    def release(self, timeout: float = 15.0) -> int:
        self.released = True
        return 0


class FakeLab:
    """Records set-up calls; ``hold_pin`` answers with the given probe JSON."""

    def __init__(self, answer: dict) -> None:
        self.answer = answer
        self.calls: list[str] = []
        self.held: list[FakeHeld] = []

    def setup_rdma(self) -> str:
        self.calls.append("setup_rdma")
        return "rxe0"

    def prepare_mounts(self) -> list:
        self.calls.append("prepare_mounts")
        return []

    def prepare_pmem(self) -> dict:
        self.calls.append("prepare_pmem")
        return {}

    def hold_pin(self, mechanism: str, memory: str, size: int = 2 * 2**20, **_: object) -> FakeHeld:
        self.calls.append(f"hold_pin {mechanism} {memory} {size}")
        held = FakeHeld(dict(self.answer))
        self.held.append(held)
        return held


def pin_vm(values: dict) -> FakeVM:
    """A FakeVM whose pin sampler reads ``values['line']`` ('VmPin acquired released')."""
    vm = FakeVM()
    vm.ssh.rules = _DynamicRules(values)
    return vm


class _DynamicRules(list):
    """FakeSSH rules whose answer is read on each command, so a test can move the counters."""

    def __init__(self, values: dict) -> None:
        super().__init__()
        self.values = values

    def __iter__(self):
        return iter([(r"VmPin", self.values["line"], 0)])


MATRIX_61 = {
    "kernel": "6.1.0-99-amd64", "accel": "tcg", "seconds": 25.0,
    "mounts": [{"fs": "xfs", "ok": True, "dax_active": True, "experimental_warning": True, "options": "dax",
                "kernel_log": [], "error": ""}],
    "pins": [
        {"mechanism": "rdma", "memory": "anon", "mapping": "shared", "ok": True, "errno": None, "errname": None,
         "vmpin_kb_delta": 2048, "foll_pin_delta": 512, "kernel_log": [], "trace": []},
        {"mechanism": "rdma", "memory": "fsdax-xfs", "mapping": "shared", "ok": False, "errno": 95,
         "errname": "EOPNOTSUPP", "vmpin_kb_delta": 0, "foll_pin_delta": 0, "kernel_log": [],
         "trace": ["labkit_cvf: (__get_user_pages+0x98/0x660 <- check_vma_flags) ret=-95"]},
        {"mechanism": "rdma", "memory": "anon", "mapping": "private", "ok": True, "errno": None, "errname": None,
         "vmpin_kb_delta": 2048, "foll_pin_delta": 512, "kernel_log": [], "trace": []},
        {"mechanism": "odirect", "memory": "fsdax-xfs", "mapping": "shared", "ok": True, "errno": None,
         "errname": None, "vmpin_kb_delta": 0, "foll_pin_delta": 0, "kernel_log": [], "trace": []},
    ]}


def matrix_612() -> dict:
    m = {**MATRIX_61, "kernel": "6.12.99-amd64", "pins": [dict(p) for p in MATRIX_61["pins"]]}
    m["pins"][1].update(errno=22, errname="EINVAL")   # a made-up difference to see it marked
    return m


# --------------------------------------------------------------------------
# Unit tests: models through widgets
# --------------------------------------------------------------------------

def test_boot_progress_follows_console_milestones_and_only_moves_forward():
    w = dash.boot_progress(expected_seconds=1000)
    m = w.model
    seen = []
    for line in BOOT_LINES:
        m.on_console_line(line)
        seen.append(m.fraction)
    assert seen == sorted(seen) and seen[0] == pytest.approx(0.10) and seen[-1] == pytest.approx(0.95)
    m.on_console_line("[    0.0] Linux version again")    # an early milestone later does not go back
    assert m.fraction == pytest.approx(0.95)
    assert w.bar.value == pytest.approx(0.95) and "the guest is ready" in w.text.value
    m.finish(LifecycleVM())
    assert m.done and w.bar.value == 1.0 and w.bar.bar_style == "success"
    assert "6.1.0-99-amd64" in m.summary and "TCG" in m.summary and "booted" in m.summary
    w.close()


def test_boot_progress_says_attached_when_no_console_lines_came():
    w = dash.boot_progress()
    w.model.finish(LifecycleVM())
    assert w.model.summary.startswith("attached")
    w.close()


def test_vm_panel_shows_what_the_vm_reports():
    vm = LifecycleVM()
    w = dash.vm_panel(vm, poll_interval=None)
    m = w.model
    assert (m.state, m.kernel_release, m.accel, m.accel_reason) == \
        ("running", "6.1.0-99-amd64", "tcg", "no KVM in this fake")
    assert any(re.search(r"uname -r", c) for c in vm.ssh.commands)   # asked the guest, not the record
    assert "6.1.0-99-amd64" in w.info.value and "TCG" in w.info.value and "no KVM in this fake" in w.info.value
    assert w.start_button.disabled and not w.stop_button.disabled and not w.reset_button.disabled
    w.close()


def test_vm_panel_buttons_stop_start_reset_with_progress_and_hooks():
    vm = LifecycleVM()
    w = dash.vm_panel(vm, poll_interval=None)
    m = w.model
    hooks = []
    m.before_stop.append(lambda: hooks.append("before_stop"))
    m.after_start.append(lambda: hooks.append("after_start"))

    w.stop_button.click()
    m.wait(10)
    assert vm.calls == ["stop"] and m.state == "stopped" and hooks == ["before_stop"]
    eventually(lambda: not w.start_button.disabled and w.stop_button.disabled, what="buttons after stop")

    w.start_button.click()
    m.wait(10)
    assert vm.calls == ["stop", "start"] and m.state == "running"
    assert m.progress.done and m.progress.lines == len(BOOT_LINES) and w.progress.bar.value == 1.0
    assert hooks == ["before_stop", "after_start"] and vm.on_console_line is None   # hook removed again

    w.reset_button.click()
    m.wait(10)
    assert vm.calls == ["stop", "start", "reset", "start"] and m.state == "running" and not m.error
    assert hooks == ["before_stop", "after_start", "before_stop", "after_start"]
    assert m.message.startswith("reset:")
    w.close()


def test_vm_panel_start_failure_is_shown_not_raised_into_the_kernel():
    vm = LifecycleVM(running=False, fail_start=LaunchError("QEMU exited during start-up", exitcode=1))
    w = dash.vm_panel(vm, poll_interval=None)
    w.start_button.click()
    w.model.wait(10)
    assert "QEMU exited during start-up" in w.model.error
    assert "QEMU exited during start-up" in w.status.value and w.progress.bar.bar_style == "danger"
    assert not w.start_button.disabled      # the learner can try again
    w.close()


def test_vm_panel_poller_notices_an_outside_stop_and_stops_on_close():
    vm = LifecycleVM()
    w = dash.vm_panel(vm, poll_interval=0.05)
    hooks = []
    w.model.before_stop.append(lambda: hooks.append("before_stop"))
    vm.stopped_outside = True                # e.g. `labkit vm stop` in a terminal
    eventually(lambda: w.model.state == "stopped", what="the panel to notice the stop")
    assert hooks == ["before_stop"] and "stopped" in w.model.message    # observers let go of their channels
    eventually(lambda: not w.start_button.disabled, what="Start enabled")
    w.start_button.click()                   # this VM object still thinks it runs: cleaned up, then started
    w.model.wait(10)
    assert vm.calls == ["stop", "start"] and w.model.state == "running" and not w.model.error
    poller = w.model._poller
    w.close()
    assert not poller.is_alive() and w.model.closed


def test_log_pane_highlights_and_filters_through_the_checkbox():
    model = dash.KernelLogModel(FakeVM())
    w = dash.LogPane(model)
    model.add("[   13.6] XFS (pmem0): DAX enabled. Warning: EXPERIMENTAL, use at your own risk")
    model.add("[   14.0] virtio_net virtio1 eth0: renamed <script>")
    model.add("[   31.1] rdma_rxe: rxe_mr_init_user: Unable to pin memory region err = -95")
    model.add(LogLine("[trace] labkit_cvf: (__get_user_pages+0x98/0x660 <- check_vma_flags) ret=-95", "refusal",
                      time.time()))
    assert model.counts["experimental"] == 1 and model.counts["pin-refused"] == 1 and model.counts["refusal"] == 1
    eventually(lambda: "labkit-log-pin-refused" in w.text.value and "labkit-log-refusal" in w.text.value,
               what="highlighted lines rendered")
    assert "&lt;script&gt;" in w.text.value and "<script>" not in w.text.value
    w.highlights_only.value = True            # the trait drives the model
    assert model.highlights_only and [ln.kind for ln in model.visible()] == ["experimental", "pin-refused",
                                                                             "refusal"]
    eventually(lambda: "renamed" not in w.text.value, what="ordinary lines hidden")
    w.close()
    assert model.closed


def test_log_html_limits_and_empty():
    assert "no kernel log lines yet" in dash.log_html([])
    lines = [LogLine(f"line {i}", None, 0.0) for i in range(100)]
    model = dash.KernelLogModel(FakeVM())
    for ln in lines:
        model.add(ln)
    assert [ln.text for ln in model.visible(5)] == [f"line {i}" for i in range(95, 100)]
    model.close()


def test_pin_panel_register_and_release_through_buttons_and_dropdown():
    values = {"line": "- 700 188\n"}
    vm = pin_vm(values)
    lab = FakeLab({"ok": True, "pid": 4242, "errno": None, "errname": None, "vmpin_kb": 2048})
    w = dash.PinPanel(dash.PinModel(vm, lab, interval=0.05).start())
    m = w.model
    assert m.latest.vmpin_kb is None and m.latest.foll_pin_acquired == 700

    w.memory.value = "devdax"                  # the dropdown drives the model
    assert m.memory == "devdax"
    values["line"] = "2048 1212 188\n"
    w.register_button.click()
    m.wait(10)
    assert lab.calls == ["setup_rdma", "prepare_pmem", f"hold_pin rdma devdax {2 * 2**20}"]
    assert m.held is lab.held[0] and m.counters.pid == 4242 and not m.error
    assert "registered" in m.message and "devdax" in m.message and "4242" in m.message
    eventually(lambda: m.latest.vmpin_kb == 2048 and m.latest.foll_pins_held == 1024, what="a sample")
    eventually(lambda: "2048" in w.numbers.value and "<polyline" in w.plot.value and not w.release_button.disabled,
               what="the counters and the plot rendered")
    assert "PID 4242" in m.summary and "2048 kB" in m.summary

    values["line"] = "- 1212 700\n"
    w.release_button.click()
    m.wait(10)
    assert lab.held[0].released and m.held is None and "released" in m.message
    eventually(lambda: w.release_button.disabled, what="Release disabled without a held pin")

    w.memory.value = "fsdax-xfs"
    w.register_button.click()
    m.wait(10)
    assert "prepare_mounts" in lab.calls and lab.calls.count("setup_rdma") == 1   # set up once per boot
    thread = m.counters._thread
    w.close()
    assert not thread.is_alive() and lab.held[-1].released


def test_pin_panel_reports_the_kernels_refusal_from_the_probe():
    lab = FakeLab({"ok": False, "errno": 95, "errname": "EOPNOTSUPP"})
    m = dash.PinModel(pin_vm({"line": "- 1 1\n"}), lab)
    info = m.register("fsdax-ext4")
    assert info["errno"] == 95 and m.held is None and lab.held[0].released
    assert "refused" in m.message and "EOPNOTSUPP (95)" in m.message
    m.close()


def test_pin_model_rejects_unknown_memory_kind():
    m = dash.PinModel(pin_vm({"line": "- 1 1\n"}), FakeLab({}))
    with pytest.raises(LabError, match="unknown memory kind"):
        m.set_memory("floppy")
    m.close()


def test_matrix_table_cells_colours_and_errno_from_the_result():
    w = dash.matrix_table(MATRIX_61)
    m = w.model
    assert m.labels == ["6.1.0-99-amd64"]
    assert m.rows() == [("rdma", "shared"), ("rdma", "private"), ("odirect", "shared")]
    assert m.memories() == ["anon", "fsdax-xfs"]
    c = m.cell("6.1.0-99-amd64", "rdma", "fsdax-xfs")
    assert (c.ok, c.label, c.traced) == (False, "EOPNOTSUPP (95)", True)
    assert m.cell("6.1.0-99-amd64", "odirect", "anon") is None
    html = w.table.value
    assert "EOPNOTSUPP (95)" in html and dash.REFUSED_BG in html and dash.OK_BG in html
    assert "rdma (private)" in html and "EXPERIMENTAL warning printed" in html
    assert w.measure_button is None            # no Lab: nothing to measure with
    w.close()


def test_matrix_table_side_by_side_marks_differences():
    w = dash.matrix_table({"6.1": MATRIX_61, "6.12": matrix_612()})
    m = w.model
    assert m.labels == ["6.1", "6.12"]
    assert m.differs("rdma", "fsdax-xfs") and not m.differs("rdma", "anon")
    assert "EINVAL (22)" in w.table.value and "border:3px" in w.table.value
    with pytest.raises(LabError, match="not a Lab.matrix"):
        m.set_results({"x": {"kernel": "?"}})
    w.close()


class MatrixLab:
    def matrix(self, progress=None):
        progress("preparing persistent memory and DAX mounts")
        return MATRIX_61


def test_matrix_measure_button_runs_lab_matrix_in_the_background():
    w = dash.matrix_table(None, lab=MatrixLab())
    assert "no matrix measured yet" in w.table.value
    w.measure_button.click()
    w.model.wait(10)
    assert "EOPNOTSUPP (95)" in w.table.value and "measured in 25.0 s" in w.status.value


def test_sparkline_svg_gaps_and_empty():
    assert "<polyline" not in dash.sparkline_svg([], "VmPin", "kB", "blue")
    svg = dash.sparkline_svg([(0, 0), (1, 2048), (2, None), (3, 2048), (4, 0)], "VmPin", "kB", "blue")
    assert svg.count("<polyline") == 2 and "<b class=\"labkit-latest\">0 kB" in svg and "max 2048" in svg
    svg = dash.sparkline_svg([(0, 1), (1, None), (2, 5), (3, None)], "x", "pages", "red")
    assert svg.count("<circle") == 2 and "<polyline" not in svg and "<b class=\"labkit-latest\">-</b>" in svg


def test_only_one_action_at_a_time():
    m = dash.Model()
    gate = threading.Event()
    assert m.submit("slow", gate.wait)
    assert not m.submit("other", lambda: None)      # a double click does not start a second one
    gate.set()
    m.wait(5)
    assert m.busy == "" and m.submit("other", lambda: None)
    m.wait(5)
    m.close()


def test_models_drive_their_controls_too():
    log = dash.LogPane(dash.KernelLogModel(FakeVM()))
    log.model.set_highlights_only(True)          # from code: the checkbox follows
    assert log.highlights_only.value is True
    pins = dash.PinPanel(dash.PinModel(pin_vm({"line": "- 1 1\n"}), FakeLab({})))
    pins.model.set_memory("fsdax-ext4")
    assert pins.memory.value == "fsdax-ext4"
    with pytest.raises(LabError, match="unknown memory kind"):
        pins.model.memory = "floppy"             # the trait itself refuses it
    assert pins.memory.value == "fsdax-ext4"
    for w in (log, pins):
        w.close()
        w.close()                                # ipywidgets closes once more from __del__: harmless


def test_a_broken_view_does_not_break_the_model():
    w = dash.vm_panel(LifecycleVM(), poll_interval=None)
    w.info = None                                # rendering now raises inside the view
    w.model.message = "still works"              # the model's change goes through
    assert w.model.message == "still works"
    w.close()


def test_worker_ends_on_close_even_from_inside_an_action():
    m = dash.Model()
    assert m.submit("close itself", m.close)
    m.wait(5)
    assert m.closed and not m.submit("after close", lambda: None)
    worker = m._worker
    assert worker is not None and worker.name.startswith("labkit-Model")
    eventually(lambda: not worker.is_alive(), timeout=5, what="the worker thread to end")


def test_action_timeout_is_reported():
    m = dash.Model()
    gate = threading.Event()
    m.submit("stuck", gate.wait)
    with pytest.raises(LabError, match="stuck"):
        m.wait(0.1)
    gate.set()
    m.wait(5)


# --------------------------------------------------------------------------
# Integration: the models against real booted guests
# --------------------------------------------------------------------------

def _guest_followers(vm) -> str:
    return vm.run(["sh", "-c", "ps -eo args | grep -E '^(dmesg --follow|cat instances/labkit-log)' ; "
                   "ls /sys/kernel/tracing/instances"]).stdout


@pytest.mark.integration
def test_dashboard_on_a_live_guest(guest):
    """Every value comes from the guest: release, accelerator, log lines, VmPin
    of a held RDMA registration; close() leaves no thread and no guest reader."""
    before = {t.ident for t in threading.enumerate()}
    lab = Lab(guest)
    w = dash.dashboard(guest, lab)
    m = w.model
    try:
        release = guest.run("uname -r", check=True).stdout.strip()
        assert m.vm_panel.state == "running" and m.vm_panel.kernel_release == release
        assert m.vm_panel.accel == guest.accel.accel and m.vm_panel.accel_reason == guest.accel.reason
        assert release in w.panel_view.info.value

        eventually(lambda: len(m.log.lines) > 50, timeout=20, what="the boot log")
        guest.run("echo labkit-dashboard-probe > /dev/kmsg", check=True)
        eventually(lambda: any("labkit-dashboard-probe" in ln.text for ln in m.log.lines), timeout=20,
                   what="a new kernel log line")
        eventually(lambda: "labkit-dashboard-probe" in w.log_view.text.value, timeout=5, what="it rendered")

        w.pin_view.register_button.click()           # anon, the default
        m.pins.wait(120)
        assert not m.pins.error and m.pins.held is not None
        acquired_before = m.pins.history[0].foll_pin_acquired
        sample = eventually(lambda: m.pins.latest if m.pins.latest.vmpin_kb else None, timeout=20,
                            what="VmPin of the holder")
        assert sample.vmpin_kb == 2048                   # 2 MiB registered, measured live
        assert sample.foll_pin_acquired - acquired_before >= 512
        eventually(lambda: "2048" in w.pin_view.numbers.value, timeout=5, what="VmPin rendered")

        w.pin_view.release_button.click()
        m.pins.wait(60)
        assert m.pins.held is None and m.pins.latest.vmpin_kb is None   # the holder exited
    finally:
        w.close()
    assert m.log.closed and m.pins.closed and m.vm_panel.closed
    eventually(lambda: not ({t.ident for t in threading.enumerate() if t.name.startswith("labkit")} - before),
               timeout=10, what="the dashboard's threads to end")
    left = _guest_followers(guest)
    assert "dmesg --follow" not in left and "labkit-log-" not in left, left


@pytest.mark.integration
def test_log_pane_highlights_a_live_refusal(guest):
    """An RDMA registration on fs-dax: the kernel's refusal arrives in the log
    pane as a traced check_vma_flags failure (and the errno shown is the probe's)."""
    lab = Lab(guest)
    log = dash.log_pane(guest, lab, since_now=True)
    pins = dash.PinModel(guest, lab)
    try:
        info = pins.register("fsdax-xfs")
        assert info["ok"] is False and info["errname"] == "EOPNOTSUPP"
        assert f"{info['errname']} ({info['errno']})" in pins.message
        line = eventually(lambda: next((ln for ln in list(log.model.lines) if ln.kind == "refusal"), None),
                          timeout=20, what="the traced refusal")
        refusers = refusing_functions(guest.run(["uname", "-r"], check=True).stdout)   # check_vma_flags since v5.11
        assert traced_function(line.text) in refusers and f"ret=-{info['errno']}" in line.text
        eventually(lambda: "labkit-log-refusal" in log.text.value, timeout=5, what="it rendered highlighted")
    finally:
        pins.close()
        log.close()
    assert "labkit-log-" not in _guest_followers(guest)


@pytest.mark.integration
@pytest.mark.fresh_guest("its buttons stop, start and reset the guest")
def test_vm_panel_reset_and_start_on_a_real_vm():
    """The buttons on a VM of its own: Stop, Start (progress fed by the real
    console), Reset (vm.reset()); the log pane follows again after each boot."""
    from conftest import require_image
    require_image("6.1")
    with VM("test-dash-panel", kernel="6.1") as vm:
        w = dash.dashboard(vm)
        m = w.model
        try:
            first_release = m.vm_panel.kernel_release
            assert first_release == vm.run("uname -r").stdout.strip()
            eventually(lambda: m.log.running and len(m.log.lines) > 10, timeout=20, what="the log")

            w.panel_view.stop_button.click()
            m.vm_panel.wait(60)
            assert m.vm_panel.state == "stopped" and not m.log.running and not m.vm_panel.error

            w.panel_view.start_button.click()
            m.vm_panel.wait(180)
            assert not m.vm_panel.error, m.vm_panel.error
            assert m.vm_panel.state == "running" and m.vm_panel.kernel_release == first_release
            p = m.vm_panel.progress
            assert p.done and p.fraction == 1.0 and "labkit: ready" in p.last_line   # fed by the real console
            assert first_release in p.summary and vm.accel.accel.upper() in p.summary

            vm.run("touch /run/labkit-before-reset", check=True)   # /run is a tmpfs: gone after a reset
            w.panel_view.reset_button.click()
            m.vm_panel.wait(180)
            assert not m.vm_panel.error, m.vm_panel.error
            assert m.vm_panel.state == "running" and m.vm_panel.message.startswith("reset:")
            assert vm.run("test -e /run/labkit-before-reset").rc == 1   # a freshly started guest
            eventually(lambda: m.log.running and len(m.log.lines) > 10, timeout=30, what="the log after reset")
            assert m.pins.sampling
        finally:
            w.close()


def test_the_refusal_pane_follows_the_functions_of_the_guests_kernel():
    """On 5.10 the pane's kretprobes are those of the lab's tracer (same names), with errors only:
    __gup_longterm_locked returns a page count when it pins."""
    from labkit.course.dashboard.models import RefusalTrace
    t = RefusalTrace(FakeVM(kernel="5.10"))
    script = t.script(since_now=True)
    assert t.functions() == ("__gup_longterm_locked", "get_vaddr_frames")
    assert "'r:labkit_cvf __gup_longterm_locked ret=$retval:s32'" in script
    assert "'r:labkit_cvf_1 get_vaddr_frames ret=$retval:s32'" in script
    assert script.count("echo 'ret < 0' >") == 2 and "check_vma_flags" not in script
    assert "'r:labkit_cvf check_vma_flags ret=$retval:s32'" in RefusalTrace(FakeVM(kernel="6.1")).script(True)
