"""The security model, checked on a running VM (see README "Security model").

1. SSH forward bound to 127.0.0.1 only       test_qemu_listens_on_loopback_only
2. per-VM ed25519 key, 0600 / 0700           test_per_vm_key_and_private_state_dir
3. no password logins                        test_password_and_foreign_keys_are_refused
4. guest host key pinned                     test_wrong_host_key_is_refused, test_changed_host_key_stops_start,
                                             tests/test_snapshot.py (a snapshot's key is pinned too)
5. QMP/console sockets in the private dir    test_control_sockets_are_in_the_private_state_dir
6. restrict=on: the guest reaches nothing    test_guest_reaches_nothing_outside
7. JupyterLab on localhost with a token      tests/test_cli.py::test_lab_starts_jupyterlab_with_a_running_vm
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import paramiko
import pytest

from labkit.errors import HostKeyMismatch
from labkit.machine.channels.ssh import SSHChannel
from labkit.machine.vm import VM, VMState

from conftest import persistent_vm, require_image

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("it checks a VM's own keys, sockets and host key")]

KERNEL = "6.1"


@pytest.fixture(scope="module")
def svm():
    with persistent_vm("secure", KERNEL) as vm:
        yield vm


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds (IPv4 and IPv6)."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in inodes:
                addr, port = f[1].split(":")
                if len(addr) == 8:
                    ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                else:
                    ip = socket.inet_ntop(socket.AF_INET6, b"".join(bytes.fromhex(addr[i:i + 8])[::-1]
                                                                    for i in range(0, 32, 8)))
                found.append((ip, int(port, 16)))
    return found


def test_qemu_listens_on_loopback_only(svm):
    listeners = tcp_listeners(svm.info.pid)
    assert listeners == [("127.0.0.1", svm.info.ssh_port)], listeners
    assert any("hostfwd=tcp:127.0.0.1:" in a for a in svm.info.qemu_argv)


def test_per_vm_key_and_private_state_dir(svm):
    assert stat.S_IMODE(svm.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(svm.key_path.stat().st_mode) == 0o600
    key = paramiko.Ed25519Key.from_private_key_file(str(svm.key_path))
    pub = svm.key_path.with_suffix(".pub").read_text().split()
    assert pub[0] == "ssh-ed25519" and pub[1] == key.get_base64()
    # The guest accepts exactly this VM's key: the one this QEMU passes in fw_cfg
    # (sshd's only authorized-keys file, read at each login), nothing on its disk.
    auth = svm.run(["cat", "/sys/firmware/qemu_fw_cfg/by_name/opt/org.labkit/sshkey/raw"],
                   check=True).stdout.split()
    assert auth[:2] == ["ssh-ed25519", key.get_base64()] and len(auth) == 3
    conf = svm.run(["/usr/sbin/sshd", "-T"], check=True).stdout.lower().splitlines()
    assert "authorizedkeysfile /sys/firmware/qemu_fw_cfg/by_name/opt/org.labkit/sshkey/raw" in conf
    assert "authorizedkeyscommand none" in conf
    assert not [line for line in conf if line.startswith("authorizedkeysfile") and "qemu_fw_cfg" not in line]
    # Nothing in the state dir is readable by others (the dir itself is 0700 as well).
    for p in (svm.key_path, *svm.state_dir.glob("pmem*.img")):
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


def _transport(svm: VM) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", svm.info.ssh_port))
    t.start_client(timeout=10)
    return t


def test_password_and_foreign_keys_are_refused(svm):
    cfg = svm.run("sshd -T 2>/dev/null | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication|"
                  "permitrootlogin|permitemptypasswords) '", check=True).stdout.lower().split("\n")
    assert {"passwordauthentication no", "kbdinteractiveauthentication no", "permitemptypasswords no"} <= set(cfg)
    t = _transport(svm)
    try:
        with pytest.raises(paramiko.BadAuthenticationType) as e:
            t.auth_password("root", "root")
        assert e.value.allowed_types == ["publickey"]
    finally:
        t.close()
    t = _transport(svm)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_publickey("root", paramiko.Ed25519Key.from_private_key_file(str(_other_key(svm))))
    finally:
        t.close()


def _other_key(svm: VM) -> Path:
    from labkit.machine.channels.keys import ensure_client_key
    p = svm.state_dir.parent / "not-this-vm-key"
    p.unlink(missing_ok=True)
    p.with_suffix(".pub").unlink(missing_ok=True)
    ensure_client_key(p)
    return p


def test_wrong_host_key_is_refused(svm):
    other = paramiko.Ed25519Key.from_private_key_file(str(_other_key(svm)))
    with pytest.raises(HostKeyMismatch) as e:
        SSHChannel(svm.info.ssh_port, svm.key_path, ("ssh-ed25519", other.get_base64())).connect(timeout=10)
    assert svm.info.host_key[1] in str(e.value) and e.value.hint


def unix_listeners(pid: int) -> list[str]:
    inodes = socket_inodes(pid)
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[6]) in inodes and len(f) > 7 and f[3] == "00010000":    # __SO_ACCEPTCON: listening
            paths.append(f[7])
    return paths


def test_control_sockets_are_in_the_private_state_dir(svm):
    paths = unix_listeners(svm.info.pid)
    assert sorted(Path(p).name for p in paths) == ["console.sock", "qmp.sock", "watch.sock"], paths
    assert all(Path(p).parent == svm.state_dir for p in paths)
    assert stat.S_IMODE(svm.state_dir.stat().st_mode) == 0o700
    argv = " ".join(svm.info.qemu_argv)
    assert "tcp:" not in argv.replace("hostfwd=tcp:127.0.0.1", "") and "telnet" not in argv
    assert svm.qmp.status() == "running"


def test_guest_reaches_nothing_outside(svm):
    """A host service on all interfaces, reachable from the host itself, is
    not reachable from the guest (10.0.2.2 is the host through slirp), and
    neither is anything else outside."""
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    accepted: list = []

    def accept() -> None:
        srv.settimeout(20)
        try:
            while True:
                accepted.append(srv.accept()[1])
        except OSError:
            pass
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    with socket.create_connection(("127.0.0.1", port), timeout=5):   # control: the service answers
        pass
    code = (
        "import socket, sys, threading\n"
        "res = {}\n"
        "def go(h, p):\n"
        "    try:\n"
        "        socket.create_connection((h, p), timeout=4).close(); res[h, p] = 'connected'\n"
        "    except OSError as e:\n"
        "        res[h, p] = type(e).__name__\n"
        "ts = [threading.Thread(target=go, args=a) for a in "
        f"[('10.0.2.2', {port}), ('10.0.2.2', {svm.info.ssh_port}), ('1.1.1.1', 443), ('8.8.8.8', 53)]]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(res)\n")
    try:
        r = svm.run(["python3", "-c", code], timeout=60, check=True)
        assert "connected" not in r.stdout, r.stdout
        assert r.stdout.count("Error") + r.stdout.count("timeout") >= 4, r.stdout
        assert len(accepted) == 1          # only the host's own control connection
    finally:
        srv.close()
    assert any("restrict=on" in a for a in svm.info.qemu_argv)


def test_changed_host_key_stops_start(tmp_path):
    """The guest's host key changes behind labkit's back (as if the disk were
    swapped): the next start refuses to talk to it. A cold-booted VM keeps its
    root disk between starts, so the key can change there; a warm start's guest
    always comes from the snapshot with the key recorded when it was made."""
    require_image(KERNEL)
    vm = VM("rekey", kernel=KERNEL, state_dir=tmp_path / "rekey", warm=False)
    vm.start()
    try:
        vm.run("rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub; sync", check=True)
        pinned = list(vm.info.host_key)
        vm.stop()
        with pytest.raises(HostKeyMismatch) as e:
            vm.start()
        assert pinned[1] in str(e.value) and e.value.got != " ".join(pinned)
        assert vm.status() is not VMState.RUNNING      # nothing left running with the unknown key
    finally:
        vm.stop()
