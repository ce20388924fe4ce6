"""The class server of tests/test_server_guest.py: the Debian 13 image of
``labkit.image.server`` booted under TCG (systemd as PID 1, cgroup v2 only),
reached over SSH with the host key its build pinned, and a read-only "media"
disk that carries what the installer is told to take from elsewhere: the host's
built guest images (``--images``), wheels of labkit and the hub for the
server's Python (``--wheels``) and this checkout (``--source``)."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from labkit.deploy.install import HUB_PACKAGES
from labkit.image import server as server_image

REPO = Path(__file__).resolve().parent.parent
MEDIA = "/media/labkit"
# Debian 13's Python and the oldest glibc its wheels may ask for (trixie has 2.41)
SERVER_PYTHON = "3.13"
SERVER_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64", "manylinux1_x86_64",
                                                                         "manylinux2010_x86_64", "linux_x86_64"]
# what never goes onto the media disk from the checkout
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "artifacts", "__pycache__", "node_modules",
                                       ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.egg-info")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def wheels_for_server(python: str, into: Path) -> float:
    """labkit's wheel and every wheel it and the hub need, for the server's Python, from this
    machine's configured pip index; returns the seconds it took."""
    t0 = time.monotonic()
    into.mkdir(parents=True, exist_ok=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(pip + ["wheel", "--no-deps", "-w", str(into), str(REPO)], timeout=600)
    (labkit_wheel,) = into.glob("labkit-*.whl")
    run(pip + ["download", "-d", str(into), "--only-binary=:all:", "--python-version", SERVER_PYTHON,
               "--implementation", "cp", *(a for p in SERVER_PLATFORMS for a in ("--platform", p)),
               str(labkit_wheel), *HUB_PACKAGES],
        timeout=900)
    return time.monotonic() - t0


def make_media(stage: Path, images: Path, kernels: tuple[str, ...], python: str, out: Path) -> dict[str, float]:
    """The media disk (ext4, made without root or loop devices by mke2fs -d)."""
    took = {"wheels": wheels_for_server(python, stage / "wheels")}
    t0 = time.monotonic()
    shutil.copytree(REPO, stage / "source", ignore=SOURCE_IGNORE, symlinks=True)
    for k in kernels:
        (stage / "images" / k).mkdir(parents=True)
        for f in (images / k).iterdir():
            if f.name != ".verified":
                os.link(f, stage / "images" / k / f.name)      # same file system: nothing is copied
    used_mb = int(run(["du", "-sm", "--apparent-size", str(stage)]).stdout.split()[0])
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "labkit-media", "-d", str(stage), str(out),
         f"{used_mb + used_mb // 5 + 64}M"])
    took["media"] = time.monotonic() - t0
    return took


@dataclass
class Server:
    """One booted server guest: QEMU, its console log, SSH as root."""

    proc: subprocess.Popen[bytes]
    ssh_port: int
    hub_port: int
    console: Path
    client: paramiko.SSHClient

    @classmethod
    def boot(cls, img: server_image.ServerImage, work: Path, media: Path, memory_mb: int = 6144,
             timeout: float = 600) -> tuple[Server, float]:
        """Boot it (a qcow2 overlay over the image, the media disk read-only) and wait for SSH."""
        overlay = work / "server.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img.root), str(overlay)])
        ssh_port, hub_port = free_port(), free_port()
        console = work / "server-console.log"
        argv = ["qemu-system-x86_64", "-name", "labkit-server-test", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot", "-machine", "pc", "-accel", "tcg,thread=multi,tb-size=512",
                "-cpu", "max", "-smp", "2", "-m", f"{memory_mb}M",
                "-kernel", str(img.vmlinuz), "-initrd", str(img.initrd),
                "-append", "console=ttyS0 root=/dev/vda rw quiet tsc=reliable no_timer_check mitigations=off",
                "-drive", f"file={overlay},if=virtio,format=qcow2",
                "-drive", f"file={media},if=virtio,format=raw,readonly=on",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,hostfwd=tcp:127.0.0.1:{hub_port}-:443",
                "-device", "virtio-net-pci,netdev=n0", "-serial", f"file:{console}"]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(work / "server-qemu.err", "wb"))
        key = paramiko.Ed25519Key.from_private_key_file(str(img.key))
        kind, blob = img.host_key.read_text().split()[:2]
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{ssh_port}", kind, paramiko.Ed25519Key(data=_b64(blob)))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        deadline = t0 + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server's QEMU exited ({proc.returncode}):\n"
                            f"{(work / 'server-qemu.err').read_text()[-2000:]}\n{_tail(console)}")
            try:
                client.connect("127.0.0.1", ssh_port, username="root", pkey=key, timeout=10, banner_timeout=30,
                               auth_timeout=30, allow_agent=False, look_for_keys=False)
                break
            except (OSError, paramiko.SSHException) as exc:
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"no SSH on the server within {timeout:.0f} s ({exc}):\n{_tail(console)}")
                time.sleep(2)
        server = cls(proc, ssh_port, hub_port, console, client)
        # SSH comes up before the boot is finished; multi-user.target is what a server is
        server.sh("systemctl is-system-running --wait || true", timeout=timeout)
        return server, time.monotonic() - t0

    def sh(self, script: str, timeout: float = 300, check: bool = True) -> tuple[int, str]:
        """Run ``script`` with bash as root; (exit status, stdout+stderr)."""
        transport = self.client.get_transport()
        assert transport is not None
        chan = transport.open_session(timeout=30)
        chan.settimeout(timeout)
        chan.set_combine_stderr(True)
        chan.exec_command("bash -c " + shlex.quote(script))
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                out += data
                if time.monotonic() > deadline:
                    raise TimeoutError
            rc = chan.recv_exit_status()
        except TimeoutError:
            pytest.fail(f"on the server, `{script[:200]}` took longer than {timeout:.0f} s:\n"
                        f"{out.decode(errors='replace')[-3000:]}")
        finally:
            chan.close()
        text = out.decode(errors="replace")
        if check and rc != 0:
            pytest.fail(f"on the server, `{script[:300]}` failed ({rc}):\n{text[-4000:]}")
        return rc, text

    def read(self, path: str) -> str:
        return self.sh(f"cat -- {shlex.quote(path)}")[1]

    def stop(self) -> None:
        try:
            self.client.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)


def _b64(text: str) -> bytes:
    import base64
    return base64.b64decode(text)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
