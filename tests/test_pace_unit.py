"""The host-wide start queue (labkit/machine/pace.py) without guests: the
slot count, FIFO order, the place in line a learner is told, and the
tickets' life (a dead owner frees its slot, a release frees it, a timeout is
a clear error). Tickets are real files with real flocks in a temporary
directory; other starters are other open files or child processes."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from labkit.errors import StartQueueTimeout
from labkit.machine import pace
from labkit.machine.pace import Place, Ticket
from labkit.settings import Settings


def test_slots_are_one_per_cpu_as_memory_allows_and_never_zero():
    assert pace.host_slots(1024, cpus=2, mem_available_mb=20000) == 2
    assert pace.host_slots(1024, cpus=16, mem_available_mb=4096) == 4       # memory is the limit
    assert pace.host_slots(1024, cpus=8, mem_available_mb=500) == 1         # a start is always allowed
    assert pace.host_slots(1024, cpus=None, mem_available_mb=None) == 1
    assert pace.host_slots(1024, cpus=4, mem_available_mb=None) == 4


def test_the_setting_overrides_the_host(tmp_path):
    assert pace.slots_for(Settings(start_slots=1), 1024) == 1
    assert pace.slots_for(Settings(start_slots=0), 1024) == 0
    assert pace.slots_for(Settings(), 1024) >= 1


def test_mem_available_is_read_from_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24684000 kB\nMemAvailable:    2097152 kB\n")
    assert pace.mem_available_mb(f) == 2048
    f.write_text("garbage\n")
    assert pace.mem_available_mb(f) is None
    assert pace.mem_available_mb(tmp_path / "none") is None


def test_ticket_names_round_trip_and_anything_else_is_not_a_ticket():
    t = Ticket(1_700_000_000_123_456_789, 1000, 4242, 3)
    assert Ticket.parse(t.name) == t
    for name in ("." + t.name, "x.ticket", "1.2.3.ticket", "a.b.c.d.ticket", t.name[:-7], "notes.txt"):
        assert Ticket.parse(name) is None


@pytest.mark.parametrize("n, word", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                     (12, "12th"), (13, "13th"), (21, "21st"), (102, "102nd"), (111, "111th")])
def test_ordinals(n, word):
    assert pace.ordinal(n) == word


def test_place_is_fifo_by_ticket_time():
    a, b, c, d = (Ticket(t, 1000 + t, 10 + t, 0) for t in (5, 1, 9, 3))
    live = sorted([a, b, c, d])
    assert [pace.place_of(x, live, 2).ahead for x in (b, d, a, c)] == [0, 1, 2, 3]
    assert [pace.place_of(x, live, 2).may_start for x in (b, d, a, c)] == [True, True, False, False]
    assert pace.place_of(c, live, 2) == Place(ahead=3, starting=4, slots=2)
    assert pace.place_of(b, [a], 2) == Place(ahead=0, starting=2, slots=2)   # mine not listed yet: counted once


def test_the_learner_is_told_their_place():
    assert Place(ahead=4, starting=12, slots=2).message() == \
        "labkit: 12 guests starting on this host (2 at a time); yours is 5th in line"


# -- real tickets in a real directory ----------------------------------------------------

def test_the_queue_directory_is_sticky_and_shared(tmp_path):
    q = tmp_path / "q"
    assert pace.ensure_dir(q)
    mode = os.lstat(q).st_mode
    assert stat.S_ISDIR(mode) and mode & 0o1777 == 0o1777
    assert pace.ensure_dir(q)       # again: already there


def test_a_symlink_is_not_trusted_as_the_queue(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").symlink_to(tmp_path / "elsewhere")
    assert not pace.ensure_dir(tmp_path / "q")


def test_a_ticket_is_live_while_held_and_freed_when_dropped(tmp_path):
    old_umask = os.umask(0o077)
    try:
        ticket, fd = pace.take_ticket(tmp_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / ticket.name).st_mode) == 0o644    # other users see it held
    assert pace.live_tickets(tmp_path) == [ticket]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())    # renamed into the queue
    pace.drop_ticket(tmp_path, ticket, fd)
    assert pace.live_tickets(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_a_dead_starters_ticket_frees_its_slot_and_is_removed(tmp_path):
    # A child takes a ticket and dies without dropping it (a killed start).
    code = ("import os, sys; from pathlib import Path; from labkit.machine import pace; "
            "pace.take_ticket(Path(sys.argv[1])); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert len(list(tmp_path.glob("*.ticket"))) == 1
    assert pace.live_tickets(tmp_path) == []
    assert list(tmp_path.glob("*.ticket")) == []


def test_a_ticket_not_owned_by_the_uid_it_names_is_ignored(tmp_path):
    fake = Ticket(1, os.geteuid() + 1, 1, 0)
    fd = os.open(tmp_path / fake.name, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert pace.live_tickets(tmp_path) == []
    finally:
        os.close(fd)


def test_an_idle_host_starts_at_once_and_says_nothing(tmp_path):
    said: list[str] = []
    with pace.turn(Settings(start_queue_dir=tmp_path / "q", start_slots=1), 1024, said.append) as turn:
        assert len(pace.live_tickets(tmp_path / "q")) == 1
    assert (turn.first_place, said) == (0, [])
    assert pace.live_tickets(tmp_path / "q") == []


def test_zero_slots_turns_the_queue_off(tmp_path):
    with pace.turn(Settings(start_queue_dir=tmp_path / "q", start_slots=0), 1024, print) as turn:
        assert not (tmp_path / "q").exists()
    assert turn.first_place == 0


def test_a_start_waits_its_turn_says_its_place_and_goes_when_the_one_ahead_is_done(tmp_path):
    q = tmp_path / "q"
    pace.ensure_dir(q)
    first, fd = pace.take_ticket(q)
    said: list[str] = []
    settings = Settings(start_queue_dir=q, start_slots=1)
    release = threading.Timer(0.5, pace.drop_ticket, (q, first, fd))
    release.start()
    with pace.turn(settings, 1024, said.append) as turn:
        assert pace.live_tickets(q)[0].pid == os.getpid() and len(pace.live_tickets(q)) == 1
    release.join()
    assert said[0] == "labkit: 2 guests starting on this host (1 at a time); yours is 2nd in line"
    assert said[-1].startswith("labkit: your guest's turn to start (waited ")
    assert turn.first_place == 2 and turn.waited_s >= 0.4


def test_the_turn_is_given_up_when_the_start_fails(tmp_path):
    q = tmp_path / "q"
    with pytest.raises(RuntimeError):
        with pace.turn(Settings(start_queue_dir=q, start_slots=1), 1024, print):
            raise RuntimeError("the boot failed")
    assert pace.live_tickets(q) == [] and list(q.iterdir()) == []


def test_a_wait_past_the_timeout_is_a_clear_error_and_leaves_no_ticket(tmp_path):
    q = tmp_path / "q"
    pace.ensure_dir(q)
    first, fd = pace.take_ticket(q)
    try:
        settings = Settings(start_queue_dir=q, start_slots=1, start_queue_timeout=0.3)
        t = time.monotonic()
        with pytest.raises(StartQueueTimeout) as e:
            with pace.turn(settings, 1024, lambda s: None):
                pytest.fail("started without a turn")
        assert time.monotonic() - t < 5
        assert "2 guests are starting on this host, 1 at a time" in str(e.value)
        assert "number 2 in line" in str(e.value) and "LABKIT_START_SLOTS" in e.value.hint
        assert pace.live_tickets(q) == [first]
    finally:
        pace.drop_ticket(q, first, fd)


def test_an_unusable_queue_never_fails_the_start(tmp_path):
    (tmp_path / "file").write_text("")
    with pace.turn(Settings(start_queue_dir=tmp_path / "file" / "q", start_slots=1), 1024, print) as turn:
        pass
    assert turn.first_place == 0
