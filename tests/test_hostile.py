"""Hostile input, table-driven, against a real guest.

Every row feeds a hostile value to a public API or CLI argument that reaches
the guest. Each row must end in a clear LabError (ConfigError for bad values;
exit code 2 and no traceback on the CLI) or in safe literal handling, and the
canary file ``/tmp/pwned-<row>`` that the injection would create must stay
absent in the guest. A control row proves the canary check can fail.
Figures (tried / refused / literal) go to tests/artifacts/hostile-figures.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from labkit.errors import ConfigError, LabError
from labkit.lab import Lab
from labkit.machine.vm import VM

from conftest import ARTIFACTS, persistent_vm, require_image

pytestmark = [pytest.mark.integration, pytest.mark.fresh_guest("hostile input aimed at a persistent VM's lifecycle")]

KERNEL = "6.1"
NAME = "hostile"
LABKIT = [sys.executable, "-m", "labkit"]
OUTCOMES: dict[str, str] = {}


def canary(n: int) -> str:
    return f"/tmp/pwned-{n}"


def inj(n: int) -> dict[str, str]:
    """The usual injection spellings, each creating canary n if interpreted."""
    c = canary(n)
    return {"semi": f"; touch {c}", "subst": f"$(touch {c})", "tick": f"`touch {c}`", "pipe": f"| touch {c}",
            "amp": f"&& touch {c}", "nl": f"\ntouch {c}", "quote": f"' ; touch {c} ; '",
            "dquote": f"\" ; touch {c} ; \""}


def cli(*args: str | bytes, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(LABKIT + list(args), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def refused_cli(r: subprocess.CompletedProcess, *words: str) -> None:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err and all(w in err for w in words), err
    raise ConfigError("CLI refused: " + err.strip().splitlines()[-1])   # counted as refused


def literal_echo(vm: VM, value: str) -> str:
    """Send ``value`` as one argument; the guest must print it back unchanged."""
    r = vm.run(["printf", "%s", value], timeout=30)
    assert r.stdout == value
    return "literal"


# (id, callable(lab, vm, n)) -- n is the row number and the canary's suffix.
ROWS = [
    # VM names (directory names, QEMU ids)
    ("vm-name-semicolon", lambda lab, vm, n: VM("x" + inj(n)["semi"])),
    ("vm-name-subst", lambda lab, vm, n: VM(inj(n)["subst"])),
    ("vm-name-dotdot", lambda lab, vm, n: VM("../../etc")),
    ("vm-name-newline", lambda lab, vm, n: VM("ok\n")),
    ("vm-name-long", lambda lab, vm, n: VM("a" * 5000)),
    ("vm-name-non-utf8", lambda lab, vm, n: VM("vm\udcff")),
    ("vm-name-bytes", lambda lab, vm, n: VM(b"default")),
    ("vm-negative-memory", lambda lab, vm, n: VM("ok", memory_mb=-1)),
    ("vm-absurd-nvdimm", lambda lab, vm, n: VM("ok", nvdimms=(2**40,))),
    ("vm-negative-nvdimm", lambda lab, vm, n: VM("ok", nvdimms=(-512,))),
    # CLI arguments
    ("cli-name-backtick", lambda lab, vm, n: refused_cli(cli("vm", "status", "--name", inj(n)["tick"]),
                                                          "invalid VM name")),
    ("cli-kernel-unknown", lambda lab, vm, n: refused_cli(cli("run", "--kernel", "6.1" + inj(n)["semi"], "--",
                                                              "true"), "invalid choice")),
    ("cli-run-name-pipe", lambda lab, vm, n: refused_cli(cli("run", "--name", "x" + inj(n)["pipe"], "--", "true"),
                                                         "invalid VM name")),
    ("cli-port-negative", lambda lab, vm, n: refused_cli(cli("lab", "--port", "-1"), "out of range")),
    ("cli-port-absurd", lambda lab, vm, n: refused_cli(cli("lab", "--port", "99999999999"), "out of range")),
    ("cli-port-subst", lambda lab, vm, n: refused_cli(cli("lab", "--port", inj(n)["subst"]), "not a port")),
    ("cli-name-non-utf8", lambda lab, vm, n: refused_cli(cli("vm", "stop", "--name", b"vm\xff" + b"; touch " +
                                                             canary(n).encode()), "invalid VM name")),
    # labkit run passes each word as one literal argument
    ("cli-run-args-literal", lambda lab, vm, n: _cli_literal(n, ["echo", inj(n)["subst"] + inj(n)["tick"]])),
    ("cli-run-args-non-utf8", lambda lab, vm, n: _cli_literal(n, [b"echo", b"\xff\xfe" + inj(n)["semi"].encode()])),
    # Lab.mount
    ("mount-fs-semicolon", lambda lab, vm, n: lab.mount("xfs" + inj(n)["semi"], "/dev/pmem0")),
    ("mount-fs-newline", lambda lab, vm, n: lab.mount("ext4\n", "/dev/pmem0")),
    ("mount-fs-unknown", lambda lab, vm, n: lab.mount("btrfs", "/dev/pmem0")),
    ("mount-device-semicolon", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0" + inj(n)["semi"])),
    ("mount-device-dotdot", lambda lab, vm, n: lab.mount("xfs", "/dev/../etc/passwd")),
    ("mount-device-newline", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0" + inj(n)["nl"])),
    ("mount-device-bytes", lambda lab, vm, n: lab.mount("xfs", b"/dev/pmem0")),
    ("mount-point-subst", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", "/mnt/x" + inj(n)["subst"])),
    ("mount-point-dotdot", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", "/mnt/../etc")),
    ("mount-point-newline", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", "/mnt/x" + inj(n)["nl"])),
    ("mount-point-long", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", "/mnt/" + "a" * 5000)),
    ("mount-point-quote", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", "/mnt/x" + inj(n)["quote"])),
    ("mount-options-backtick", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", options="dax," + inj(n)["tick"])),
    ("mount-options-semicolon", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", options="dax" + inj(n)["semi"])),
    ("mount-options-newline", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", options="dax\nro")),
    ("mount-options-long", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", options="dax," * 5000)),
    ("mount-options-helper", lambda lab, vm, n: lab.mount("xfs", "/dev/pmem0", options="dax,uhelper=x")),
    ("umount-dquote", lambda lab, vm, n: lab.umount("/mnt/x" + inj(n)["dquote"])),
    # Lab.mkfs
    ("mkfs-fs-unknown", lambda lab, vm, n: lab.mkfs("vfat", "/dev/pmem0")),
    ("mkfs-device-subst", lambda lab, vm, n: lab.mkfs("xfs", inj(n)["subst"])),
    ("mkfs-blocksize-string", lambda lab, vm, n: lab.mkfs("ext4", "/dev/pmem0", block_size="4096" + inj(n)["semi"])),
    ("mkfs-blocksize-negative", lambda lab, vm, n: lab.mkfs("ext4", "/dev/pmem0", block_size=-4096)),
    ("mkfs-blocksize-absurd", lambda lab, vm, n: lab.mkfs("ext4", "/dev/pmem0", block_size=10**12)),
    # Lab.pin
    ("pin-mechanism-backtick", lambda lab, vm, n: lab.pin("rdma" + inj(n)["tick"], "anon")),
    ("pin-memory-dotdot", lambda lab, vm, n: lab.pin("rdma", "../../dev/mem")),
    ("pin-mapping-pipe", lambda lab, vm, n: lab.pin("rdma", "anon", mapping="shared" + inj(n)["pipe"])),
    ("pin-mechanism-none", lambda lab, vm, n: lab.pin(None, "anon")),
    ("pin-size-negative", lambda lab, vm, n: lab.pin("rdma", "anon", size=-4096)),
    ("pin-size-absurd", lambda lab, vm, n: lab.pin("rdma", "anon", size=2**62)),
    ("pin-size-unaligned", lambda lab, vm, n: lab.pin("rdma", "anon", size=4097)),
    ("pin-size-string", lambda lab, vm, n: lab.pin("rdma", "anon", size="4096" + inj(n)["semi"])),
    ("pin-hold-string", lambda lab, vm, n: lab.pin("rdma", "anon", hold="1" + inj(n)["amp"])),
    ("pin-hold-nan", lambda lab, vm, n: lab.pin("rdma", "anon", hold=float("nan"))),
    ("pin-hold-negative", lambda lab, vm, n: lab.pin("rdma", "anon", hold=-1)),
    ("hold-pin-memory-unknown", lambda lab, vm, n: lab.hold_pin("rdma", "fsdax-btrfs")),
    ("v4l2-frames-absurd", lambda lab, vm, n: lab.v4l2_stream("anon", frames=10**9)),
    ("truncate-hold-string", lambda lab, vm, n: lab.truncate_wait("xfs", hold="3" + inj(n)["semi"])),
    # Lab.set_mode
    ("set-mode-namespace-semicolon", lambda lab, vm, n: lab.set_mode("namespace0.0" + inj(n)["semi"], "fsdax")),
    ("set-mode-namespace-newline", lambda lab, vm, n: lab.set_mode("namespace0.0\n", "fsdax")),
    ("set-mode-mode-amp", lambda lab, vm, n: lab.set_mode("namespace0.0", "fsdax" + inj(n)["amp"])),
    ("set-mode-non-utf8", lambda lab, vm, n: lab.set_mode("namespace0.0\udcff", "fsdax")),
    # Paths and command words: passed literally
    ("run-list-metachars", lambda lab, vm, n: literal_echo(vm, "".join(inj(n).values()))),
    ("run-list-non-utf8", lambda lab, vm, n: _non_utf8_literal(vm, n)),
    ("upload-path-metachars", lambda lab, vm, n: _upload_literal(vm, n)),
]


def _cli_literal(n: int, words: list) -> str:
    r = cli("run", "--name", NAME, "--", *words)
    assert r.returncode == 0, r.stderr
    want = b" ".join(w if isinstance(w, bytes) else w.encode() for w in words[1:]) + b"\n"
    assert r.stdout == want
    return "literal"


def _non_utf8_literal(vm: VM, n: int) -> str:
    value = "\udcff\udcfe" + inj(n)["semi"]          # bytes 0xff 0xfe as Python keeps them
    r = vm.run(["sh", "-c", 'printf %s "$1" | od -An -tx1 | tr -d " \\n"', "sh", value], timeout=30)
    assert r.stdout.startswith("fffe3b20")              # the raw bytes arrived, then "; "
    return "literal"


def _upload_literal(vm: VM, n: int) -> str:
    path = "/tmp/up" + inj(n)["semi"]            # a directory "/tmp/up; touch /tmp", taken literally
    vm.run(["mkdir", "-p", path.rsplit("/", 1)[0]], check=True)
    vm.ssh.upload(b"x", path)
    assert vm.run(["cat", path]).stdout == "x"
    vm.run(["rm", "-rf", "/tmp/up; touch "], check=True)
    return "literal"


@pytest.fixture(scope="module")
def hvm():
    with persistent_vm(NAME, KERNEL) as vm:
        yield vm
        ARTIFACTS.mkdir(exist_ok=True)
        fig = {"tried": len(OUTCOMES), "refused": sum(v == "refused" for v in OUTCOMES.values()),
               "literal": sum(v == "literal" for v in OUTCOMES.values()), "rows": OUTCOMES}
        (ARTIFACTS / "hostile-figures.json").write_text(json.dumps(fig, indent=2) + "\n")
        print(f"\nhostile inputs tried {fig['tried']}, refused {fig['refused']}, literal {fig['literal']}")


def test_the_table_is_big_enough():
    assert len(ROWS) >= 30 and len({r[0] for r in ROWS}) == len(ROWS)


def test_canary_check_can_fail(hvm):
    """Control: an interpreted injection does leave the canary behind."""
    hvm.run("touch /tmp/pwned-control", check=True)
    assert hvm.run(["test", "-e", "/tmp/pwned-control"]).rc == 0
    hvm.run(["rm", "/tmp/pwned-control"], check=True)


@pytest.mark.parametrize("n,row", list(enumerate(ROWS)), ids=[r[0] for r in ROWS])
def test_hostile_input(hvm, n, row):
    name, action = row
    lab = Lab(hvm)
    try:
        outcome = action(lab, hvm, n)
        if isinstance(outcome, VM):
            pytest.fail(f"{name}: accepted as a VM")
        assert outcome == "literal", f"{name}: neither refused nor handled literally ({outcome!r})"
    except LabError as exc:
        outcome = "refused"
        msg = str(exc)
        assert msg.strip() and "Traceback" not in msg
        if not name.startswith("cli-"):
            assert isinstance(exc, ConfigError), f"{name}: {type(exc).__name__}: {msg}"
            assert exc.hint, f"{name}: no hint in {msg!r}"   # what to do instead
    OUTCOMES[name] = outcome
    r = hvm.run(["sh", "-c", f"ls /tmp/pwned-* 2>/dev/null; test -e {canary(n)}"], timeout=30)
    assert r.rc == 1, f"{name}: canary {canary(n)} exists in the guest: {r.stdout}"
    assert r.stdout == "", f"stray canaries in the guest: {r.stdout}"


# -- corrupted or truncated image files ------------------------------------------
CORRUPTIONS = {
    "manifest-truncated": lambda d: (d / "manifest.json").write_bytes((d / "manifest.json").read_bytes()[:100]),
    "manifest-wrong-sha": lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace(json.loads((d / "manifest.json").read_text())
                                                  ["artifacts"]["initrd.img"]["sha256"], "0" * 64)),
    "manifest-missing": lambda d: (d / "manifest.json").unlink(),
    "initrd-truncated": lambda d: os.truncate(d / "initrd.img", (d / "initrd.img").stat().st_size // 2),
    "vmlinuz-bitflip": lambda d: _flip(d / "vmlinuz", 4096),
    "vmlinux-missing": lambda d: (d / "vmlinux").unlink(),
    "root-truncated": lambda d: os.truncate(d / "root.ext4", (d / "root.ext4").stat().st_size - 4096),
    "root-bitflip": lambda d: _flip(d / "root.ext4", 2**20 + 17),
}


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def image_copy(tmp_path_factory):
    """A private, verified copy of the built 6.1 image (the real build is never
    written: its root.ext4 is only hard-linked, and only read)."""
    import shutil
    from labkit.image import build as imagemod
    src = require_image(KERNEL).directory
    base = tmp_path_factory.mktemp("images-pristine")
    d = base / KERNEL
    d.mkdir()
    for f in src.iterdir():
        if f.name == ".verified":
            continue
        try:
            if f.name != "root.ext4":
                raise OSError
            os.link(f, d / f.name)
        except OSError:
            shutil.copyfile(f, d / f.name)
    old = os.environ.get("LABKIT_IMAGES_DIR")
    os.environ["LABKIT_IMAGES_DIR"] = str(base)
    try:
        imagemod.load_image(KERNEL)          # control: the copy is good before it is corrupted
    finally:
        os.environ.pop("LABKIT_IMAGES_DIR") if old is None else os.environ.update(LABKIT_IMAGES_DIR=old)
    return d


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_image_is_detected_with_a_rebuild_hint(case, image_copy, tmp_path, monkeypatch):
    import shutil
    from labkit.image import build as imagemod
    from labkit.errors import ImageMissing
    d = tmp_path / "images" / KERNEL
    d.mkdir(parents=True)
    for f in image_copy.iterdir():
        if f.name == "root.ext4" and not case.startswith("root"):
            os.link(f, d / f.name)           # not written by this case
        elif f.name != ".verified":
            shutil.copyfile(f, d / f.name)
    monkeypatch.setenv("LABKIT_IMAGES_DIR", str(tmp_path / "images"))
    CORRUPTIONS[case](d)
    with pytest.raises(ImageMissing) as e:
        imagemod.load_image(KERNEL)
    assert "labkit image build --kernel 6.1" in str(e.value)
    assert any(w in str(e.value) for w in ("corrupt", "missing", "not built")), str(e.value)
    if case in ("manifest-truncated", "root-truncated"):
        r = subprocess.run(LABKIT + ["vm", "start", "--name", "corrupt", "--quiet"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "labkit image build" in r.stderr and "Traceback" not in r.stderr, r.stderr
