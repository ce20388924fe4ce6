"""Offline tests of what keeps learners apart (issue 25): the SSH port's
retry when another process takes it, the roster and the modes of homes and
the exchange (``labkit class``), and the rootless sandbox's command line.
The attacks themselves, with two real users, are tests/test_two_users.py."""

from __future__ import annotations

import os
import socket
import stat
from types import SimpleNamespace

import pytest

from labkit import cli
from labkit.course import sandbox, sandbox_mode
from labkit.deploy import accounts
from labkit.errors import LaunchError
from labkit.machine import boot, process
from labkit.machine.accel import AccelChoice
from labkit.machine.config import Nvdimm
from labkit.machine.statedir import StateDir, VMInfo
from labkit.settings import Settings

TAKEN = "qemu-system-x86_64: -netdev user,id=net0: Could not set up host forwarding rule 'tcp:127.0.0.1:4-:22'\n"


# -- the SSH port ----------------------------------------------------------------------------

def _launch(tmp_path, monkeypatch, failures: list[str]) -> tuple[boot.Launch, list[int], list[str]]:
    """A Launch whose spawn fails with the next of ``failures`` (QEMU's output) until they run out."""
    image = SimpleNamespace(boot_kernel=tmp_path / "k", initrd=tmp_path / "i")
    spec = boot.StartSpec(name="race", kernel="6.1", sd=StateDir(tmp_path / "race"), persistent=False,
                          memory_mb=1024, smp=1, nvdimms=(Nvdimm(),), settings=Settings(),
                          on_console_line=None)
    launch = boot.Launch(spec, image, AccelChoice("tcg", "test"), VMInfo("race", "6.1"))  # type: ignore[arg-type]
    ports, kills = [], []
    port_numbers = iter(range(40000, 40100))
    monkeypatch.setattr(boot, "free_port", lambda: next(port_numbers))

    def spawn(cfg, timeout):
        ports.append(cfg.ssh_port)
        if failures:
            raise LaunchError("QEMU exited during start-up", ["qemu"], 1, failures.pop(0))
    monkeypatch.setattr(launch, "spawn", spawn)
    monkeypatch.setattr(launch, "kill", lambda: kills.append("kill") or True)
    return launch, ports, kills


def test_a_taken_ssh_port_is_retried_with_another(tmp_path, monkeypatch):
    launch, ports, kills = _launch(tmp_path, monkeypatch, [TAKEN, TAKEN])
    cfg = launch.spawn_retrying("", 10.0)
    assert ports == [40000, 40001, 40002] and cfg.ssh_port == 40002
    assert len(kills) == 2


def test_a_port_taken_every_time_ends_in_a_clear_error(tmp_path, monkeypatch):
    launch, ports, _ = _launch(tmp_path, monkeypatch, [TAKEN] * 50)
    with pytest.raises(LaunchError) as e:
        launch.spawn_retrying("", 10.0)
    assert len(ports) == boot.PORT_ATTEMPTS
    assert f"could not bind its SSH port {boot.PORT_ATTEMPTS} times" in str(e.value)
    assert "40000" in str(e.value) and e.value.hint


def test_another_launch_failure_is_not_retried(tmp_path, monkeypatch):
    launch, ports, _ = _launch(tmp_path, monkeypatch, ["qemu: could not open kernel file\n"])
    with pytest.raises(LaunchError, match="QEMU exited"):
        launch.spawn_retrying("", 10.0)
    assert len(ports) == 1


def test_listens_on_sees_this_process_listening_on_its_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not process.listens_on(os.getpid(), port)        # bound, not yet listening
        s.listen()
        assert process.listens_on(os.getpid(), port)
        assert not process.listens_on(os.getpid(), port + 1 if port < 65535 else port - 1)
    assert process.forward_taken(TAKEN) and not process.forward_taken("qemu: other failure")


def test_a_qemu_the_grader_records_in_its_pid_namespace_counts_as_running_only_outside_it(tmp_path):
    pidfile = tmp_path / "qemu.pid"
    gone = 2**22 + 7                                  # above pid_max's default: no such process
    marker = tmp_path / process.QEMU_ELSEWHERE
    assert not process.is_qemu_of(gone, pidfile)
    marker.write_text(f"{process.pid_namespace() + 1} {gone}\n")     # another namespace: the grader's word
    assert process.is_qemu_of(gone, pidfile) and not process.is_qemu_of(gone + 1, pidfile)
    marker.write_text(f"{process.pid_namespace()} {gone}\n")         # this namespace: look for it
    assert not process.is_qemu_of(gone, pidfile)


# -- the roster --------------------------------------------------------------------------------

def test_a_roster_reads_users_full_names_header_and_comments():
    rows = accounts.parse_roster(["username,full name", "alice,Alice Liddell", "", "# a comment",
                                  'bob,"Smith, Bob"', "carol"])
    assert [(r.username, r.full_name, r.line) for r in rows] == [
        ("alice", "Alice Liddell", 2), ("bob", "Smith, Bob", 5), ("carol", "", 6)]


@pytest.mark.parametrize("lines, line, words", [
    (["alice", "Bob"], 2, "not a valid user name"),
    (["alice", "b,c,d"], 2, "3 columns"),
    (["alice", "bob,Bob: the admin"], 2, "contains ':'"),
    (["alice", "bob", "alice"], 3, "already on line 1"),
    (["-rf"], 1, "not a valid user name"),
])
def test_a_bad_roster_line_is_named(lines, line, words):
    with pytest.raises(accounts.AccountError) as e:
        accounts.parse_roster(lines, "class.csv")
    assert f"class.csv, line {line}: " in str(e.value) and words in str(e.value)
    assert e.value.hint


def test_enrol_with_a_bad_line_exits_2_naming_it_before_any_account(tmp_path, capsys, monkeypatch):
    made = []
    monkeypatch.setattr(accounts, "_useradd", lambda *a: made.append(a))
    roster = tmp_path / "class.csv"
    roster.write_text("alice\nbob smith\n")
    assert cli.main(["class", "enrol", str(roster)]) == 2
    assert f"{roster}, line 2: 'bob smith' is not a valid user name" in capsys.readouterr().err
    assert made == []


def test_class_help_names_its_actions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["class", "--help"])
    out = capsys.readouterr().out
    assert "enrol" in out and "exchange" in out and "0700" in out


# -- homes and the exchange ----------------------------------------------------------------------

def test_a_home_is_made_private_once(tmp_path):
    home = tmp_path / "alice"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    assert accounts.private_home(home, os.getuid(), os.getgid())
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert not accounts.private_home(home, os.getuid(), os.getgid())


def test_a_home_of_someone_else_is_refused(tmp_path):
    home = tmp_path / "alice"
    home.mkdir()
    with pytest.raises(accounts.AccountError, match="belongs to uid"):
        accounts.private_home(home, os.getuid() + 1, os.getgid(), line=3)


def test_the_exchange_has_nbgraders_layout_with_sticky_bits_and_is_idempotent(tmp_path):
    root = tmp_path / "exchange"
    ex = accounts.prepare_exchange(root, course="labkit")
    modes = {p: stat.S_IMODE(os.lstat(p).st_mode) for p in (root, root / "labkit", ex.outbound, ex.inbound)}
    assert modes == {root: 0o1777, root / "labkit": 0o755, ex.outbound: 0o755, ex.inbound: 0o3733}
    ex.inbound.chmod(0o777)                        # repaired by a second run
    accounts.prepare_exchange(root, course="labkit")
    assert stat.S_IMODE(ex.inbound.stat().st_mode) == 0o3733


def test_a_symlink_planted_in_the_exchange_is_refused(tmp_path):
    root = tmp_path / "exchange"
    root.mkdir()
    (root / "labkit").symlink_to(tmp_path)
    with pytest.raises(accounts.AccountError, match="not a directory"):
        accounts.prepare_exchange(root, course="labkit")


# -- the rootless sandbox ----------------------------------------------------------------------------

def _sb(tmp_path, **kw) -> sandbox.Sandbox:
    return sandbox.Sandbox(uid=1001, run_dir=tmp_path / "run", vm_state=tmp_path / "vm", vm_view=tmp_path / "view",
                           state_root=tmp_path, vm_name="g", ssh_port=2222, **kw)


def test_the_rootless_sandbox_has_its_own_user_and_pid_namespaces_and_no_uid_switch(tmp_path):
    k = sandbox.kernel_argv(_sb(tmp_path, rootless=True, disable_userns=True))
    bw = k.index("bwrap")
    assert {"--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--disable-userns"} <= set(k[bw:])
    assert "setpriv" not in k and "--nproc" not in k[:bw]
    inside = k.index("inside")
    assert k[k.index("--nproc", inside) + 1] == str(sandbox.KernelLimits().cgroup.pids)
    rooted = sandbox.kernel_argv(_sb(tmp_path, disable_userns=True))
    assert "setpriv" in rooted and "--unshare-pid" not in rooted and "--nproc" in rooted[:rooted.index("bwrap")]


def test_without_root_or_user_namespaces_the_grader_says_which_sysctl(monkeypatch):
    monkeypatch.setattr(sandbox_mode.os, "geteuid", lambda: 1001)
    monkeypatch.setattr(sandbox_mode, "_read", lambda path: "0" if path.endswith("max_user_namespaces") else "")
    sandbox_mode.rootless_problem.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxError) as e:
            sandbox_mode.grading_mode("bwrap")
    finally:
        sandbox_mode.rootless_problem.cache_clear()
    assert "max_user_namespaces is 0" in str(e.value)
    assert "sysctl -w user.max_user_namespaces=" in e.value.hint and "root" in e.value.hint


def test_as_root_the_grader_keeps_the_throwaway_uids(monkeypatch):
    monkeypatch.setattr(sandbox_mode.os, "geteuid", lambda: 0)
    assert sandbox_mode.grading_mode("bwrap") == sandbox_mode.ROOT


def test_the_rootless_view_tells_the_kernels_labkit_where_qemu_runs(tmp_path):
    state, view = tmp_path / "state", tmp_path / "view"
    state.mkdir()
    (state / "qemu.pid").write_text("4242\n")
    (state / "qmp.sock").write_text("")
    sandbox.make_vm_view(state, view, os.getuid(), rootless=True)
    assert (view / process.QEMU_ELSEWHERE).read_text().split() == [str(process.pid_namespace()), "4242"]
    assert not (view / "qmp.sock").exists()
    sandbox.make_vm_view(state, tmp_path / "rooted", os.getuid())
    assert not (tmp_path / "rooted" / process.QEMU_ELSEWHERE).exists()
