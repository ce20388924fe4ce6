"""Fault injection on real guests: every fault is detected within a bound, ends
with an error that names what happened, and the VM works again afterwards.

Most faults share one persistent 6.1 guest ("faults") that each destructive
test restarts as part of its own assertions. Detection times are measured
from the moment the fault is injected; the 10 s bound is a correctness
property (no endless wait), not a speed figure. Figures go to
tests/artifacts/fault-figures.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import labkit.machine.boot as bootmod
import labkit.machine.health as healthmod
import labkit.machine.process as procmod
from labkit.errors import (GuestDied, GuestHung, GuestPanic, LabError, SSHDropped, StateDirError, VMInUse)
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.vm import VM, VMInfo, VMState

from conftest import ARTIFACTS, mount_tmpfs, persistent_vm, require_image, umount

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("each fault kills, hangs or panics its guest")]

KERNEL = "6.1"
BOUND = 10.0            # detection bound for every fault (seconds)
FIGURES: dict = {"faults": []}
LABKIT = [sys.executable, "-m", "labkit"]


def _sigint_default() -> None:   # in the child, before exec
    # A program started with SIGINT ignored (any command run with `&` by a
    # non-interactive shell, e.g. a CI wrapper) passes that on, and Python then
    # never raises KeyboardInterrupt: give the processes that play "the user's
    # terminal or notebook kernel" the default disposition a terminal gives them.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def record(fault: str, detected_s: float | None, error: LabError | None, survived: bool) -> None:
    FIGURES["faults"].append({"fault": fault, "detected_s": None if detected_s is None else round(detected_s, 2),
                              "error": type(error).__name__ if error else None,
                              "message": str(error).splitlines()[0] if error else "", "survived": survived})


@pytest.fixture(scope="module", autouse=True)
def _write_figures():
    yield
    ARTIFACTS.mkdir(exist_ok=True)
    f = FIGURES["faults"]
    FIGURES["injected"], FIGURES["survived"] = len(f), sum(1 for x in f if x["survived"])
    (ARTIFACTS / "fault-figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")
    print(f"\nfaults injected {FIGURES['injected']}, survived {FIGURES['survived']}")


@pytest.fixture(scope="module")
def fvm():
    with persistent_vm("faults", KERNEL) as vm:
        yield vm


def running(vm: VM) -> VM:
    """The shared guest, restarted if an earlier test left it dead or stopped."""
    if vm.state is not VMState.RUNNING or vm.status() is not VMState.RUNNING:
        vm.stop()
        vm.start()
    return vm


def restart_works(vm: VM) -> bool:
    """The restart half of every fault: start again and run a command."""
    vm.start()
    r = vm.run(["cat", "/proc/sys/kernel/hostname"], timeout=30)
    assert r.stdout.strip() == "labkit"
    return True


def later(seconds: float, action) -> dict:
    """Run ``action`` after ``seconds`` in a thread; the dict gets the time it ran."""
    box: dict = {}

    def go() -> None:
        time.sleep(seconds)
        box["t"] = time.monotonic()
        action()
    th = threading.Thread(target=go, daemon=True)
    th.start()
    box["thread"] = th
    return box


def test_sigkill_of_qemu_during_a_command(fvm):
    vm = running(fvm)
    pid = vm.info.pid
    box = later(2.0, lambda: os.kill(pid, signal.SIGKILL))
    with pytest.raises(GuestDied) as e:
        vm.run("sleep 60", timeout=90)
    detected = time.monotonic() - box["t"]
    assert not isinstance(e.value, GuestPanic)
    assert detected < BOUND
    assert f"PID {pid}" in str(e.value) and "killed by SIGKILL" in str(e.value)
    assert vm.status() is VMState.DEAD
    record("SIGKILL of QEMU during `sleep 60`", detected, e.value, restart_works(vm))


def test_sigkill_of_qemu_while_idle(fvm):
    vm = running(fvm)
    pid = vm.info.pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while procmod.pid_alive(pid) and time.monotonic() - t0 < 5:
        vm.proc.poll()
        time.sleep(0.02)
    r = subprocess.run(LABKIT + ["vm", "status", "--name", "faults"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "dead" in r.stdout and "killed" in r.stdout, r.stdout + r.stderr
    t0 = time.monotonic()
    with pytest.raises(GuestDied) as e:
        vm.run("true")
    detected = time.monotonic() - t0
    assert detected < BOUND and "no longer running" in str(e.value)
    record("SIGKILL of QEMU while idle (next vm.run, vm status)", detected, e.value, restart_works(vm))


def test_stale_pidfile_from_a_dead_qemu_is_not_trusted(fvm):
    """QEMU killed: its pidfile stays. Point it at an unrelated live process
    (PID reuse): status must say dead, start must not kill that process."""
    vm = running(fvm)
    os.kill(vm.info.pid, signal.SIGKILL)
    vm.proc.wait(timeout=10)
    decoy = subprocess.Popen(["sleep", "300"])
    try:
        (vm.state_dir / "qemu.pid").write_text(f"{decoy.pid}\n")
        t0 = time.monotonic()
        st = VM("faults", persistent=True).status()
        detected = time.monotonic() - t0
        assert st is VMState.DEAD
        with pytest.raises(GuestDied) as e:
            vm.run("true")
        ok = restart_works(vm)
        assert decoy.poll() is None, "the decoy process was killed"
        assert int((vm.state_dir / "qemu.pid").read_text()) == vm.info.pid != decoy.pid
        record("stale pidfile (dead QEMU, PID reused by another process)", detected, e.value, ok)
    finally:
        decoy.kill()
        decoy.wait()


def test_kernel_panic_during_a_command(fvm):
    vm = running(fvm)
    t0 = time.monotonic()
    with pytest.raises(GuestPanic) as e:
        vm.run("sleep 1; echo c > /proc/sysrq-trigger; sleep 60", timeout=90)
    detected = time.monotonic() - t0 - 1.0
    assert detected < BOUND
    assert "sysrq triggered crash" in e.value.console_tail and "sysrq triggered crash" in str(e.value)
    assert "Kernel panic" in vm.console_log.read_text(errors="replace")
    ok = restart_works(vm)
    # The restart starts a new console.log; the panic stays in the previous one.
    assert "sysrq triggered crash" in (vm.state_dir / "console.prev.log").read_text(errors="replace")
    record("kernel panic (sysrq c) during a command", detected, e.value, ok)


def test_kernel_panic_after_a_command(fvm):
    vm = running(fvm)
    vm.run("nohup sh -c 'sleep 1; echo c > /proc/sysrq-trigger' >/dev/null 2>&1 &", timeout=30)
    t_inject = time.monotonic() + 1.0
    while vm.qemu_alive() and time.monotonic() - t_inject < 30:
        time.sleep(0.1)
    with pytest.raises(GuestPanic) as e:
        vm.run("true")
    detected = time.monotonic() - t_inject
    assert detected < BOUND and "sysrq triggered crash" in str(e.value)
    record("kernel panic (sysrq c) while idle, seen by the next vm.run", detected, e.value, restart_works(vm))


def test_cpus_stopped_through_qmp(fvm):
    vm = running(fvm)

    def stop() -> None:
        with QMPChannel(vm.state_dir / "qmp.sock").connect(timeout=5) as q:
            q.command("stop")
    box = later(1.5, stop)
    with pytest.raises(GuestHung) as e:
        vm.run("sleep 5; echo finished", timeout=120)
    detected = time.monotonic() - box["t"]
    assert detected < BOUND
    assert e.value.qmp_status == "paused" and "paused" in str(e.value)
    with QMPChannel(vm.state_dir / "qmp.sock").connect(timeout=5) as q:
        q.command("cont")
    ok = vm.run("echo resumed", timeout=30).stdout == "resumed\n"
    record("guest CPUs stopped (QMP stop) during a command; resumed with cont", detected, e.value, ok)


def test_busy_loop_starving_sshd(tmp_path):
    """Real-time busy loops, one pinned to each vCPU (RT throttling off), leave sshd no
    CPU. The wait is bounded and the error says sshd is starved while QEMU runs.
    A guest of its own: the starved guest is thrown away (reset) whatever happens,
    so the shared guest of the other faults is never left starved."""
    require_image(KERNEL)
    vm = VM("starve", kernel=KERNEL, state_dir=tmp_path / "starve").start()
    # one loop pinned to each vCPU (the guest's own count), started a second after
    # this command returned: no CPU is left for sshd, whatever the scheduler's placement
    starve = ("echo -1 > /proc/sys/kernel/sched_rt_runtime_us; n=$(nproc); "
              "nohup setsid sh -c 'sleep 1; for c in $(seq 0 $(($1 - 1))); do "
              "taskset -c $c chrt -f 99 sh -c \"while :; do :; done\" & done' sh $n "
              "</dev/null >/dev/null 2>&1 & echo started $n")
    t0 = time.monotonic()
    try:
        try:
            started = vm.run(starve, timeout=60).stdout.split()
            assert started[:1] == ["started"] and int(started[1]) >= 1, started
            err = None
            time.sleep(3)
            t0 = time.monotonic()
            with pytest.raises(GuestHung) as e:
                vm.run("echo alive", timeout=120)
            err = e.value
        except GuestHung as exc:      # the loops may starve sshd before it reports the exit
            err = exc
        detected = time.monotonic() - t0
        bound = healthmod.PROBE_AFTER + healthmod.HUNG_AFTER + 15.0
        assert detected < bound
        assert err.qmp_status == "running" and "starves" in str(err)
        vm.reset()
        ok = vm.run("cat /proc/sys/kernel/sched_rt_runtime_us", timeout=30).stdout.strip() != "-1"
        record("busy loop at RT priority starving sshd (bound "
               f"{bound:.0f} s)", detected, err, ok)
    finally:
        vm.stop()


def test_ssh_dropped_mid_stream(fvm):
    vm = running(fvm)
    chunks: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(SSHDropped) as e:
        vm.run("(sleep 1.5; pkill -x sshd) & for i in $(seq 50); do echo $i; sleep 0.2; done", timeout=60,
               on_stdout=chunks.append)
    detected = time.monotonic() - t0 - 1.5
    assert detected < BOUND and chunks, "nothing streamed before the drop"
    assert "dropped" in str(e.value)
    t1 = time.monotonic()
    ok = vm.run("echo reconnected", timeout=30).stdout == "reconnected\n"
    assert time.monotonic() - t1 < BOUND
    record("SSH connection dropped mid-stream (sshd killed); next vm.run reconnects", detected, e.value, ok)


CHILD_INTERRUPT = r"""
import json, sys, time
from labkit.machine.vm import VM
vm = VM.attach("faults")
print("started", flush=True)
t = time.monotonic()
try:
    vm.run("sleep 60; echo finished", timeout=120)
    print(json.dumps({"interrupted": False}))
except KeyboardInterrupt:
    took = time.monotonic() - t
    r = vm.run("echo usable; pgrep -x -f 'sleep 60' || true", timeout=30)
    print(json.dumps({"interrupted": True, "seconds": took, "after": r.stdout}), flush=True)
"""


def test_keyboard_interrupt_leaves_the_guest_usable(fvm):
    """A notebook's Ctrl-C/interrupt is SIGINT to the kernel process: here a
    child Python process running a long vm.run gets SIGINT."""
    vm = running(fvm)
    p = subprocess.Popen([sys.executable, "-c", CHILD_INTERRUPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_sigint_default)
    assert p.stdout.readline().strip() == "started"
    time.sleep(2.0)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    detected = time.monotonic() - t0
    data = json.loads(out.strip().splitlines()[-1])
    assert data["interrupted"] and data["after"].splitlines() == ["usable"], (out, err)   # no leftover sleep
    assert detected < BOUND
    ok = vm.run("echo still-usable").stdout == "still-usable\n"
    record("KeyboardInterrupt during a long vm.run (guest command interrupted too)", detected, None, ok)


@pytest.mark.parametrize("how", [["run", "--name", "faults"], ["vm", "ssh", "--name", "faults"]])
def test_ctrl_c_of_the_cli_interrupts_the_guest_command(fvm, how):
    """Ctrl-C on `labkit run` / `labkit vm ssh` ends the guest command too."""
    vm = running(fvm)
    p = subprocess.Popen(LABKIT + how + ["--", "sh", "-c", "echo started; exec sleep 61"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    try:
        assert p.stdout.readline().strip() == "started"
        assert vm.run("pgrep -x -f 'sleep 61'").rc == 0          # it runs in the guest now
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        detected = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted" in err, (out, err)
    assert vm.run("pgrep -x -f 'sleep 61' || echo none").stdout == "none\n"
    assert detected < BOUND
    record(f"Ctrl-C of `labkit {' '.join(how[:-2])}` during a guest command", detected, None,
           vm.run("echo usable").stdout == "usable\n")


CHILD_CONNECT = r"""
import json, os, sys, time
import labkit
t = time.monotonic()
vm = labkit.connect("faults")
print(json.dumps({"pid": vm.info.pid, "connect_s": time.monotonic() - t,
                  "out": vm.run("echo $((6*7))").stdout}), flush=True)
if sys.argv[1:] == ["hang"]:
    vm.run("sleep 60")
"""


def test_notebook_kernel_restart_reattaches(fvm):
    """A notebook kernel killed mid-command (what a kernel restart does) and a
    new kernel calling labkit.connect(): same QEMU, no new boot, works."""
    vm = running(fvm)
    first = subprocess.Popen([sys.executable, "-c", CHILD_CONNECT, "hang"], stdout=subprocess.PIPE, text=True)
    d1 = json.loads(first.stdout.readline())
    first.kill()
    first.wait()
    r = subprocess.run([sys.executable, "-c", CHILD_CONNECT], capture_output=True, text=True, timeout=60)
    d2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert d1["pid"] == d2["pid"] == vm.info.pid and d2["out"] == "42\n"
    assert d2["connect_s"] < BOUND
    record("notebook kernel killed mid-command, new kernel re-attaches", d2["connect_s"], None, True)


CHILD_ATTACH = r"""
import json, os, time
from labkit.machine.vm import VM
vm = VM.attach("faults")
r = vm.run("sleep 2; cat /proc/uptime")
print(json.dumps({"ok": r.ok, "pid": os.getpid()}))
"""

CHILD_RESET = r"""
import sys
from labkit.machine.vm import VM
vm = VM.attach("faults")
start = vm.start

def start_when_told():
    # Between reset's stop and its start: the guest is down, the lock must still be held.
    print("stopped", flush=True)
    assert sys.stdin.readline().strip() == "go"
    return start()

vm.start = start_when_told
vm.reset()
print("reset", vm.run("echo ok").stdout.strip(), flush=True)
"""


def test_two_processes_attach_and_lifecycle_lock(fvm):
    """Semantics: any number of processes may attach and run commands at once;
    start/stop/reset/delete take an exclusive per-VM lock, and another
    process's lifecycle change is refused with "in use by PID n"."""
    vm = running(fvm)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_ATTACH], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(o["ok"] for o in outs)
    resetter = subprocess.Popen([sys.executable, "-c", CHILD_RESET], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        # The child pauses inside its reset, after the stop and before the start:
        # no timing guess decides whether the lock is held.
        assert resetter.stdout.readline().strip() == "stopped"
        other = VM("faults", persistent=True)
        other.lock_timeout = 0.5
        t0 = time.monotonic()
        with pytest.raises(VMInUse) as e:
            other.start()
        detected = time.monotonic() - t0
        assert e.value.pid == resetter.pid and f"in use by PID {resetter.pid}" in str(e.value)
        resetter.stdin.write("go\n")
        resetter.stdin.flush()
        assert resetter.stdout.readline().strip() == "reset ok"
    finally:
        if resetter.poll() is None and not resetter.stdin.closed:
            resetter.stdin.close()
        resetter.wait(timeout=300)
    # This process's VM object follows the restart made by the other process.
    ok = vm.run("echo followed").stdout == "followed\n"
    assert VMInfo.load(vm.info_path).pid == vm.info.pid
    record("second process changes the lifecycle while another resets the VM", detected, e.value, ok)


def test_two_vms_started_at_once():
    require_image(KERNEL)
    vms = [VM(f"twin-{c}", kernel=KERNEL) for c in "ab"]
    errors: list[BaseException] = []

    def boot(v: VM) -> None:
        try:
            v.start()
        except BaseException as exc:   # reported below
            errors.append(exc)
    threads = [threading.Thread(target=boot, args=(v,)) for v in vms]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        outs = [v.run("cat /proc/sys/kernel/hostname; uname -r", timeout=30).stdout for v in vms]
        assert outs[0] == outs[1] and outs[0].startswith("labkit\n")
        assert vms[0].info.ssh_port != vms[1].info.ssh_port and vms[0].info.pid != vms[1].info.pid
        record("two VMs started at once under different names", None, None, True)
    finally:
        for v in vms:
            v.finish()


def test_ssh_port_taken_between_probe_and_bind(monkeypatch):
    """Another program grabs the port labkit picked: QEMU cannot bind its SSH
    forward, and the start retries on a fresh port."""
    require_image(KERNEL)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    taken = squatter.getsockname()[1]
    picks: list[int] = []
    real = bootmod.free_port

    def rigged() -> int:
        picks.append(taken if not picks else real())
        return picks[-1]
    monkeypatch.setattr(bootmod, "free_port", rigged)
    try:
        with VM("porty", kernel=KERNEL) as v:
            assert len(picks) == 2 and v.info.ssh_port == picks[1] != taken
            assert v.run("echo up").stdout == "up\n"
    finally:
        squatter.close()
    record("SSH port taken (start retries on another port)", None, None, True)


def test_state_dir_not_writable(tmp_path, as_root):
    """Root bypasses file permissions, so 'not writable' is a read-only mount."""
    root = tmp_path / "ro"
    mount_tmpfs(root, "ro,size=16m")
    try:
        env = dict(os.environ, LABKIT_STATE_DIR=str(root))
        t0 = time.monotonic()
        r = subprocess.run(LABKIT + ["vm", "start", "--name", "ro", "--quiet"], env=env, capture_output=True,
                           text=True, timeout=120)
        detected = time.monotonic() - t0
        assert r.returncode == 2 and "cannot be written" in r.stderr and "Read-only" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "LABKIT_STATE_DIR" in r.stderr
        with pytest.raises(StateDirError) as e:
            VM("ro", persistent=True, state_dir=root / "vms/ro").start()
        # The same VM starts once the state dir is writable.
        subprocess.run(["mount", "-o", "remount,rw,size=2g", str(root)], check=True)
        with VM("ro", kernel=KERNEL, state_dir=root / "vms/ro") as v:
            ok = v.run("echo up").stdout == "up\n"
        record("state dir not writable (read-only mount)", detected, e.value, ok)
    finally:
        umount(root)


def test_state_dir_full_before_start_and_while_running(tmp_path, as_root):
    root = tmp_path / "full"
    mount_tmpfs(root, "size=8m")
    try:
        t0 = time.monotonic()
        with pytest.raises(StateDirError) as e:
            VM("full", kernel=KERNEL, state_dir=root / "vms/full").start()
        assert "MiB free" in str(e.value) and time.monotonic() - t0 < BOUND
        record("state dir full before start", time.monotonic() - t0, e.value, True)
        # Room to boot, not to write 400 MiB: QEMU pauses the guest on ENOSPC.
        subprocess.run(["mount", "-o", "remount,size=300m", str(root)], check=True)
        v = VM("full", kernel=KERNEL, state_dir=root / "vms/full", persistent=True)
        v.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(GuestHung) as e:
                v.run("dd if=/dev/zero of=/root/fill bs=1M count=400 conv=fsync 2>&1", timeout=300)
            assert e.value.qmp_status == "io-error" and "full" in str(e.value)
            took = time.monotonic() - t0
            v.stop()
            subprocess.run(["mount", "-o", "remount,size=2g", str(root)], check=True)
            v.start()
            ok = v.run("rm -f /root/fill; echo up", timeout=60).stdout == "up\n"
            assert all((root / f"vms/full/pmem{i}.img").exists() for i in range(3))
            record(f"state dir disk full while running (dd stopped after {took:.0f} s)", None, e.value, ok)
        finally:
            v.stop()
    finally:
        umount(root)
