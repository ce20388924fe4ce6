"""What happened to a guest that does not answer: a pure function from the
evidence (is QEMU alive, its exit status, QMP's run state, does sshd answer,
the console text) to the error a learner should see, or None if nothing is
wrong. Unit-tested by a table; the VM only gathers the evidence.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from labkit.errors import GuestDied, GuestHung, GuestPanic, LabError

# A command that prints nothing for PROBE_AFTER s has the guest's sshd probed;
# HUNG_AFTER s of unanswered probes (with QEMU reporting running CPUs) is a hang.
PROBE_AFTER, HUNG_AFTER = 5.0, 15.0
PANIC = "Kernel panic"


@dataclass(frozen=True)
class Evidence:
    """What the host can see of a guest at one moment."""

    name: str
    qemu_alive: bool
    pid: int = 0
    exit_code: int | None = None        # QEMU's exit status when it was our child (<0: signal)
    qmp_status: str | None = None       # None: QMP did not answer
    sshd_silent_for: float = 0.0        # seconds the guest's sshd has not answered a probe (0: it answers)
    console_text: str = ""
    qemu_log: str = ""
    state_dir: str = ""
    seconds: float = 0.0                # how long the caller had been waiting


def diagnose(ev: Evidence) -> LabError | None:
    """The error that explains ``ev``, or None when the guest looks healthy."""
    if not ev.qemu_alive:
        return died(ev)
    if ev.qmp_status == "guest-panicked":
        return GuestPanic(_around_panic(ev.console_text) or ev.console_text[-5000:], ev.pid)
    if ev.qmp_status not in (None, "running"):
        return GuestHung(_stopped_words(ev.qmp_status, ev.state_dir), ev.seconds, ev.qmp_status)
    if ev.qmp_status == "running" and ev.sshd_silent_for >= HUNG_AFTER:
        return GuestHung(f"QEMU reports the CPUs running, but the guest's sshd has not answered for "
                         f"{ev.sshd_silent_for:.0f} s: something in the guest (a busy loop at real-time "
                         "priority, a kernel hang) starves it", ev.seconds, "running")
    return None


def died(ev: Evidence) -> GuestDied:
    """A QEMU that is gone: a kernel panic (with the console text around it)
    or a kill/crash (with the exit status when it was our child)."""
    panic = _around_panic(ev.console_text)
    if panic:
        return GuestPanic(panic, ev.pid)
    how = "killed or crashed"
    if ev.exit_code is not None and ev.exit_code < 0:
        try:
            how = f"killed by {signal.Signals(-ev.exit_code).name}"
        except ValueError:
            how = f"killed by signal {-ev.exit_code}"
    elif ev.exit_code is not None:
        how = f"exited with status {ev.exit_code}"
    qlog = ev.qemu_log.strip()[-1000:]
    return GuestDied(f"QEMU (PID {ev.pid}) of VM {ev.name!r} is no longer running ({how}); the guest is gone"
                     + (f"\n--- qemu.log ---\n{qlog}" if qlog else ""), ev.pid, ev.console_text[-3000:])


def _around_panic(text: str) -> str:
    at = text.rfind(PANIC)
    return text[max(0, at - 2500):at + 2500] if at >= 0 else ""


def _stopped_words(status: str, state_dir: str) -> str:
    if status == "paused":
        return "QEMU reports the guest's CPUs are paused (QMP status 'paused', e.g. after a QMP 'stop')"
    if status == "io-error":
        return ("QEMU paused the guest after a disk write failed (QMP status 'io-error'): the disk holding "
                f"{state_dir} is probably full")
    if status in ("inmigrate", "prelaunch"):
        return (f"QEMU is still waiting for a warm-start snapshot to be loaded (QMP status {status!r}): "
                "the start that launched it was interrupted")
    if status == "postmigrate":
        return ("QEMU is paused after saving a warm-start snapshot (QMP status 'postmigrate'): the start "
                "that was saving it was interrupted")
    return f"QEMU reports its state as {status!r}"
