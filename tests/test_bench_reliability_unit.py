"""`labkit bench --reliability`'s logic without guests: how a trial's end is
classified, how trials add up across chunks, and the runner driven by fake VMs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.errors import (
    ChannelError,
    ConfigError,
    GuestDied,
    GuestHung,
    GuestPanic,
    GuestTimeout,
    LaunchError,
)
from labkit.tools import bench_reliability as rel
from labkit.tools import reliability_count as count
from labkit.tools.reliability_count import Trial, classify

INT3_CONSOLE = ("[    1.234567] int3: 0000 [#1] PREEMPT SMP NOPTI\n"
                "[    1.234568] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
                "[    1.234570] Kernel panic - not syncing: Fatal exception\n")
BOOT_OK = "[    0.000000] Linux version 6.1.0-x\n[    3.5] Run /init as init process\nlabkit-ready 6.1.0-x 8.1\n"


@pytest.mark.parametrize("kind, exc, console, kw, outcome, detail", [
    ("cold", None, BOOT_OK, {}, "ok", ""),
    # boot.py booted again after an int3: the trial worked, but only thanks to the retry
    ("cold", None, BOOT_OK, {"retried": True}, "int3_boot_recovered", ""),
    # the retry died on int3 too: early boot, not recovered
    ("cold", GuestPanic(INT3_CONSOLE), "", {"booting": True}, "int3_boot", "Oops: int3"),
    ("cold", LaunchError("QEMU closed the console", output=INT3_CONSOLE), "", {"booting": True},
     "int3_boot", "Oops: int3"),
    # a restored kernel is past early boot; so is a cold-booted one after the start
    ("warm", GuestPanic(INT3_CONSOLE), "", {"booting": True}, "int3_running", "Oops: int3"),
    ("cold", GuestDied("QEMU exited", console_tail=INT3_CONSOLE), "", {}, "int3_running", "Oops: int3"),
    # a cycle whose command failed with the oops on the console; one the guest survived
    ("kprobe", None, INT3_CONSOLE, {"output": "exit 137: Killed"}, "int3_running", "Oops: int3"),
    ("module", None, INT3_CONSOLE, {}, "int3_running", "Oops: int3"),
    ("warm", GuestDied("QEMU went away (killed by signal 9)"), "", {}, "qemu_died", "GuestDied: QEMU went away"),
    ("cold", LaunchError("QEMU exited during start-up", exitcode=1), "", {"booting": True}, "qemu_died",
     "LaunchError: QEMU exited during start-up"),
    ("warm", GuestTimeout("SSH on 127.0.0.1:2222 (refused)", 30), "", {"booting": True}, "ssh_timeout",
     "GuestTimeout: timed out after 30.0 s waiting for SSH on 127.0.0.1:2222 (refused)"),
    ("cold", GuestTimeout("guest command 'true'", 30), "", {}, "ssh_timeout", "GuestTimeout"),
    ("kprobe", GuestHung("CPUs paused", 12.0), "", {}, "ssh_timeout", "GuestHung"),
    ("module", ChannelError("the SSH connection to the guest is not open"), "", {}, "ssh_timeout", "ChannelError"),
    # the console wait for the boot is no SSH timeout
    ("cold", GuestTimeout("the guest to boot (readiness marker on the console)", 60), "", {"booting": True},
     "other", "GuestTimeout: timed out after 60.0 s waiting for the guest to boot"),
    ("cold", GuestPanic("[ 2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n"), "",
     {"booting": True}, "other", "Kernel panic - not syncing: VFS"),
    # it worked, but the kernel reported a BUG meanwhile; a WARN alone does not fail a trial
    ("warm", None, BOOT_OK + "[ 9.1] BUG: kernel NULL pointer dereference, address: 0\n", {}, "other",
     "BUG: kernel NULL pointer"),
    ("warm", None, BOOT_OK + "[ 9.1] WARNING: CPU: 0 PID: 1 at mm/gup.c:1 foo\n", {}, "ok", ""),
    ("module", None, "", {"output": "exit 1: modprobe: FATAL: Module x not found\nmore"}, "other",
     "exit 1: modprobe: FATAL"),
])
def test_classify(kind, exc, console, kw, outcome, detail):
    got, why = classify(kind, exc, console, **kw)
    assert got == outcome
    assert why.startswith(detail) or detail in why, why


def test_the_retry_note_is_the_line_boot_shows():
    # boot.py's progress line when it boots again; the bench recognises exactly it
    import inspect

    from labkit.machine import boot
    src = inspect.getsource(boot.Launch.boot_console)
    note = "labkit: the guest kernel stopped on an int3 while patching its own code " \
           "under TCG emulation (a known emulation race, not a kernel bug); booting again"
    assert "labkit: the guest kernel stopped on an int3" in src and "booting again" in src
    assert count.RETRY_NOTE.match(note) and not count.RETRY_NOTE.match("[ 1.0] int3: booting again")


def _t(kernel: str, kind: str, outcome: str = "ok", detail: str = "", s: float = 1.0) -> Trial:
    return Trial(kernel, kind, outcome, detail, s, "2026-12-07 06:00:00")


def test_summary_counts_by_kernel_kind_and_outcome():
    trials = ([_t("6.1", "cold", s=10)] * 8 + [_t("6.1", "cold", "int3_boot_recovered", s=20)]
              + [_t("6.1", "cold", "qemu_died", "GuestDied: x", s=4)]
              + [_t("7.3", "kprobe", s=0.5)] * 4)
    s = count.summarize(trials)
    cold = s["kernels"]["6.1"]["cold"]
    assert (cold["trials"], cold["failures"], cold["recovered"]) == (10, 2, 1)
    assert cold["by_outcome"] == {"int3_boot_recovered": 1, "qemu_died": 1}
    assert cold["details"] == {"qemu_died": ["GuestDied: x"]}
    assert cold["failure_rate"] == 0.2 and cold["unrecovered_rate"] == 0.1 and cold["mean_s"] == 10.4
    assert s["kernels"]["7.3"]["kprobe"]["failures"] == 0
    assert s["totals"]["cold"]["trials"] == 10 and s["totals"]["kprobe"]["trials"] == 4
    text = count.format_report(s)
    assert "6.1     cold    2/10 failed (20.0 %), 1 recovered, 1 unrecovered" in text
    assert "7.3     kprobe  0/4 failed (0.0 %)" in text and "qemu_died: GuestDied: x" in text
    # kernels by version, kinds in KINDS order, whatever order the trials came in
    text = count.format_report(count.summarize([_t("7.3", "warm"), _t("6.12", "module"), _t("6.12", "cold")]))
    assert text.index("6.12    cold") < text.index("6.12    module") < text.index("7.3     warm")


def test_upper_bound_of_a_rate():
    assert count.upper_bound(0, 200) == pytest.approx(0.0188, abs=0.0005)     # Wilson, 95 %
    assert count.upper_bound(5, 100) > 0.05 and count.upper_bound(0, 0) == 1.0
    assert count.upper_bound(0, 600) < count.upper_bound(0, 200)


def test_chunks_add_up_in_the_results_file(tmp_path):
    out = tmp_path / "rel.json"
    assert count.load(out) == []
    count.save(out, [_t("6.1", "cold")])
    count.save(out, count.load(out) + [_t("6.1", "cold", "ssh_timeout")])
    assert [t.outcome for t in count.load(out)] == ["ok", "ssh_timeout"]
    assert not (tmp_path / "rel.json.tmp").exists()
    out.write_text('{"something": "else"}')
    with pytest.raises(ConfigError, match="not a results file"):
        count.load(out)


# -- the runner, with fake VMs ---------------------------------------------------------

class FakeVM:
    """A VM that starts (or raises), answers commands from a script and has a console log."""

    def __init__(self, tmp: Path, name: str, start_error: Exception | None, cycle_rcs: list[int],
                 console_on_fail: str = "") -> None:
        self.console_log = tmp / f"{name}.log"
        self.console_log.write_text("")
        self.start_error, self.cycle_rcs, self.console_on_fail = start_error, cycle_rcs, console_on_fail
        self.finished = False
        self.commands: list[str] = []

    def start(self) -> FakeVM:
        if self.start_error:
            raise self.start_error
        return self

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> object:
        self.commands.append(cmd)
        rc = self.cycle_rcs.pop(0) if cmd != "true" and self.cycle_rcs else 0
        if rc:
            with open(self.console_log, "a") as fh:
                fh.write(self.console_on_fail)
        return type("R", (), {"rc": rc, "stdout": "", "stderr": "Killed" if rc else ""})()

    def finish(self) -> None:
        self.finished = True


def test_runner_counts_every_trial_and_gives_a_fresh_guest_after_a_failed_cycle(tmp_path):
    # one at a time, the jobs run interleaved: cold, warm, the cycles' guest(s), cold
    script = [(None, []), (GuestDied("QEMU went away"), []), (None, [0, 137]), (None, [0, 0]), (None, [])]
    made: list[FakeVM] = []

    def make(name, kernel, warm=True, on_console_line=None):
        error, rcs = script[len(made)]
        made.append(FakeVM(tmp_path, name, error, rcs, console_on_fail=INT3_CONSOLE))
        return made[-1]

    got: list[Trial] = []
    plan = rel.Plan(kernels=["6.1"], cold=2, warm=1, cycles=4, cycles_per_guest=4)
    rel.run(plan, make, got.append, lambda s: None)
    assert [(t.kind, t.outcome) for t in got] == [
        ("cold", "ok"), ("warm", "qemu_died"), ("kprobe", "ok"), ("module", "int3_running"),
        ("kprobe", "ok"), ("module", "ok"), ("cold", "ok")]
    assert len(made) == 5 and all(vm.finished for vm in made)
    # the failed cycle ended its guest; the other two ran in a fresh one
    assert made[2].commands == [rel.CYCLES["kprobe"], rel.CYCLES["module"]]
    assert made[3].commands == made[2].commands
    assert rel.KPROBE_CYCLE in made[2].commands[0] and rel.MODULE_CYCLE in made[2].commands[1]


def test_runner_stops_starting_trials_when_the_budget_is_spent(tmp_path):
    got: list[Trial] = []
    plan = rel.Plan(kernels=["6.1"], cold=5, budget_s=0.0)
    rel.run(plan, lambda name, kernel, **kw: FakeVM(tmp_path, name, None, []), got.append, lambda s: None)
    assert got == []


def test_interleave_samples_every_kind_first():
    assert rel.interleave([[1, 2, 3], ["a"], [], ["x", "y"]]) == [1, "a", "x", 2, "y", 3]


def test_reliability_without_counts_says_what_to_give():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--reliability"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--cold N" in r.stderr and "Traceback" not in r.stderr


def test_reliability_options_without_reliability_say_so():
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--cold", "5"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--cold" in r.stderr and "--reliability" in r.stderr and "Traceback" not in r.stderr


def test_reliability_prints_a_results_file_without_guests(tmp_path):
    out = tmp_path / "rel.json"
    count.save(out, [_t("6.12", "warm"), _t("6.12", "warm", "int3_running", "Oops: int3: 0000 [#1]")])
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "--reliability", "--kernel", "6.12", "--out",
                        str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["kernels"]["6.12"]["warm"]["by_outcome"] == {"int3_running": 1} and s["this_run"] == 0


def test_a_warm_start_without_a_snapshot_counts_as_the_cold_boot_it_was(tmp_path):
    def make(name, kernel, warm=True, on_console_line=None):
        vm = FakeVM(tmp_path, name, None, [])
        vm.record = type("Info", (), {"start_kind": "cold"})()      # type: ignore[attr-defined]
        return vm
    assert rel.start_trial(make, "6.1", "warm", "w").kind == "cold"
    assert rel.start_trial(lambda n, k, **kw: FakeVM(tmp_path, n, None, []), "6.1", "warm", "w2").kind == "warm"
