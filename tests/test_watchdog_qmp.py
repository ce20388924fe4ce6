"""The watchdog asks QEMU's run state on a monitor of its own (``watch.sock``).

QEMU's monitor serves one client at a time, and a learner may hold the main
one open through ``vm.qmp`` (the error texts tell them to). Here the learner
does exactly that and stops the guest's CPUs through it; ``vm.run`` must still
say "paused" — during a silent command (the watchdog's once-a-second check)
and when the command's SSH channel cannot even be opened (the diagnosis after
the channel error). Checked on a cold-booted guest and on one from a warm
start (QEMU restored from the snapshot, whose command line carries the second
monitor).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from labkit.errors import ChannelError, GuestHung
from labkit.machine.channels.qmp import QMPChannel
from labkit.machine.health import HUNG_AFTER
from labkit.machine.vm import VM

from conftest import require_image

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("it pauses its guest through QMP, cold-booted and warm-started")]

KERNEL = "6.1"
BOUND = 10.0            # the fault tests' detection bound (tests/test_faults.py)
OPEN_TIMEOUT = 10.0     # vm.run waits at most this long for the guest to open a command's channel


@pytest.fixture(scope="module", params=["cold", "warm"])
def vm(request) -> Iterator[VM]:
    """A throwaway guest from a cold boot, then one restored from the warm-start snapshot."""
    require_image(KERNEL)
    warm = request.param == "warm"
    with VM(f"wd-{request.param}", kernel=KERNEL, warm=warm) as guest:
        assert guest.info.start_kind == request.param, guest.info.warm_error
        yield guest


def _resume(vm: VM, held: QMPChannel) -> None:
    held.command("cont")
    assert held.status() == "running"
    assert vm.run("echo resumed", timeout=30).stdout == "resumed\n"
    assert vm.qmp is held, "the learner's monitor connection must survive the watchdog's work"


def test_the_main_monitor_is_held(vm):
    """The situation the other tests need: while ``vm.qmp`` is open, nobody else gets the main monitor."""
    held = vm.qmp
    with pytest.raises(ChannelError):
        QMPChannel(vm.sd.qmp_socket).connect(timeout=2.0).close()
    assert held.status() == "running"


def test_pause_during_a_silent_command_is_reported(vm):
    held = vm.qmp
    box: dict[str, float] = {}

    def stop_when_started(text: str) -> None:
        if "started" in text and "t" not in box:
            held.command("stop")
            box["t"] = time.monotonic()

    with pytest.raises(GuestHung) as e:
        vm.run("echo started; sleep 20; echo finished", timeout=120, on_stdout=stop_when_started)
    detected = time.monotonic() - box["t"]
    print(f"\n{vm.info.start_kind}: pause during a command reported after {detected:.1f} s: {e.value}")
    assert e.value.qmp_status == "paused" and "paused" in str(e.value)
    assert detected < BOUND
    _resume(vm, held)


def test_pause_before_a_command_is_reported(vm):
    """The guest cannot open the command's SSH channel: after that timeout the
    diagnosis says paused (it used to be a bare "Timeout opening channel")."""
    held = vm.qmp
    held.command("stop")
    t0 = time.monotonic()
    with pytest.raises(GuestHung) as e:
        vm.run("echo x", timeout=40)
    detected = time.monotonic() - t0
    print(f"\n{vm.info.start_kind}: pause before a command reported after {detected:.1f} s: {e.value}")
    assert e.value.qmp_status == "paused" and "paused" in str(e.value)
    assert isinstance(e.value.__cause__, ChannelError)
    assert detected < min(OPEN_TIMEOUT + 3.0, HUNG_AFTER)
    assert abs(e.value.seconds - detected) < 2.0, "the message says how long vm.run waited"
    _resume(vm, held)
