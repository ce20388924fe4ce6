"""``labkit class status`` logic (labkit.deploy.status): the hub's user models read into server
states, learners' VM records read without changing them, the table. The live reading against a
real hub and two learners' VMs is in tests/test_hub.py."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest

from labkit.deploy import status
from labkit.machine.statedir import VMInfo


@pytest.mark.parametrize("user, expect", [
    ({"servers": {}}, "stopped"),
    ({"servers": {}, "pending": "spawn"}, "starting"),
    ({"servers": {"": {"ready": False, "pending": "spawn"}}}, "starting"),
    ({"servers": {"": {"ready": True, "pending": None}}}, "running"),
    ({"servers": {"": {"ready": True, "pending": "stop"}}}, "stopping"),
])
def test_server_states_from_the_hub(user, expect):
    assert status.server_state(user) == expect


def _record(d, name, **kw):
    (d / "vms" / name).mkdir(parents=True)
    info = VMInfo(name=name, kernel="6.1", **kw)
    (d / "vms" / name / "vm.json").write_text(json.dumps(info.__dict__))


def test_vm_records_are_read_and_a_dead_qemu_is_named(tmp_path):
    """Laid out as a real VM lays out its state dir (machine/vm.py: <state>/vms/<name>)."""
    from labkit.machine.vm import VM
    from labkit.settings import Settings
    vm = VM("lab", persistent=True, settings=Settings.from_env({"LABKIT_STATE_DIR": str(tmp_path)}))
    assert vm.sd.path == tmp_path / "vms" / "lab"
    _record(tmp_path, "lab", state="running", pid=os.getpid(), start_kind="warm")
    _record(tmp_path, "lab-k73", state="running", pid=2**22 + 7, start_kind="cold",
            warm_error="the snapshot was made by another QEMU")
    (tmp_path / "vms" / "broken").mkdir()
    (tmp_path / "vms" / "broken" / "vm.json").write_text("{not json")
    vms = {v.name: v for v in status.vms_of(tmp_path)}
    assert vms["lab"].state == "running" and vms["lab"].start_kind == "warm" and not vms["lab"].problem
    assert vms["lab-k73"].state == "dead" and "is gone" in vms["lab-k73"].problem
    assert vms["broken"].state == "unreadable"
    assert (tmp_path / "vms" / "broken" / "vm.json").exists()          # read only: nothing moved aside


def test_the_table_and_the_errors(tmp_path):
    now = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
    rows = [status.LearnerStatus("ada", "running", "2026-12-07T09:58:30Z", 512.4, 0.93,
                                 [status.VMStatus("lab", "6.1", "running", "warm", 42)]),
            status.LearnerStatus("bob", "stopped", "", 0.0, 0.0, [], last_error="lab: QEMU (pid 9) is gone")]
    text = status.render(rows, now)
    assert "ada" in text and "lab (6.1, running, warm)" in text and "512 MiB" in text and "1 min ago" in text
    assert "never" in text and "bob: lab: QEMU (pid 9) is gone" in text
    assert "2 learners, 1 servers running, 1 VMs running" in text
    assert status.as_json(rows)[0]["vms"][0]["start_kind"] == "warm"
    assert "enrol" in status.render([])


def test_admins_and_services_are_not_learners_and_unknown_accounts_are_said():
    users = [{"name": "prof", "admin": True, "servers": {}},
             {"name": "lk-no-such-user-x", "servers": {}, "last_activity": None}]
    rows = status.collect(users, interval=0)
    assert [r.name for r in rows] == ["lk-no-such-user-x"]
    assert "no Unix account" in rows[0].last_error


def test_an_unreachable_hub_is_a_clear_error():
    with pytest.raises(status.StatusError, match="cannot reach the hub") as e:
        status.hub_users("http://127.0.0.1:9", "token", timeout=2)
    assert "--hub" in e.value.hint
