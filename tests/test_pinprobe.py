"""The guest helper without a guest: the zipapp is built from the package's
sources, runs on a bare stdlib python3 (``-I -S``: no site-packages, no
labkit), and refuses a target that is not on the DAX mount it was told to
expect (issue 11 item 5) before it creates or pins anything."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from labkit.lab.guest import bundle
from labkit.lab.guest.pinprobe import target

PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("helper") / "pinprobe.pyz"
    path.write_bytes(bundle.build())
    return path


def helper(pyz: Path, *args: str) -> tuple[int, dict]:
    r = subprocess.run([PYTHON, "-I", "-S", str(pyz), *args], capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])


def test_the_guest_compiles_the_uploaded_helper_once_and_later_calls_use_that(tmp_path):
    """What GuestHelper.ensure runs in the guest after the upload (its Python,
    ``-c`` with precompile.py's text): a .pyc beside every module in the archive,
    used by zipimport (shown by breaking a module's source after compiling: the
    helper still runs); an archive it cannot read is left as it was."""
    from labkit.lab.guest import files as guest_files
    path = tmp_path / "pinprobe.pyz"
    path.write_bytes(bundle.build())
    before = subprocess.run([PYTHON, "-I", "-S", str(path), "--help"], capture_output=True, text=True, timeout=60)
    r = subprocess.run([PYTHON, "-c", guest_files.precompile_source(), str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = path.read_bytes()
    assert data.startswith(bundle.SHEBANG) and path.stat().st_mode & 0o777 == 0o755
    names = zipfile.ZipFile(BytesIO(data)).namelist()
    modules = [n for n in names if n.endswith(".py") and n != "__main__.py"]
    assert modules and all(n + "c" in names for n in modules) and "__main__.pyc" not in names
    # the sources are no longer compiled: a broken one is never read
    broken = BytesIO()
    broken.write(bundle.SHEBANG)
    with zipfile.ZipFile(BytesIO(data)) as src, zipfile.ZipFile(broken, "w") as z:
        for info in src.infolist():
            text = src.read(info)
            z.writestr(info, b"this is not python (\n" if info.filename.endswith("pinprobe/common.py") else text)
    path.write_bytes(broken.getvalue())
    after = subprocess.run([PYTHON, "-I", "-S", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert after.returncode == before.returncode == 0 and after.stdout == before.stdout, after.stderr
    junk = tmp_path / "junk.pyz"
    junk.write_bytes(b"#!/usr/bin/env python3\nnot a zip")
    r = subprocess.run([PYTHON, "-c", guest_files.precompile_source(), str(junk)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and junk.read_bytes() == b"#!/usr/bin/env python3\nnot a zip"
    assert not list(tmp_path.glob("*.precompiled"))


def test_zipapp_holds_the_helper_and_the_shared_vocabulary():
    data = bundle.build()
    assert data.startswith(b"#!/usr/bin/env python3\n") and data == bundle.build()
    names = zipfile.ZipFile(BytesIO(data)).namelist()
    assert "__main__.py" in names and "labkit/lab/guest/vocab.py" in names
    for mod in ("rdma", "v4l2", "v4l2_abi", "odirect", "io_uring", "truncate", "target", "batch", "cli"):
        assert f"labkit/lab/guest/pinprobe/{mod}.py" in names
    # the stand-ins, not the host packages (which import paramiko and friends)
    assert zipfile.ZipFile(BytesIO(data)).read("labkit/__init__.py").decode().startswith('"""Stand-in')


def test_zipapp_runs_on_a_bare_stdlib_python(pyz):
    rc, out = helper(pyz, "status")
    assert rc == 0 and out["alive"] and "nr_foll_pin_acquired" in out
    rc, out = helper(pyz, "rdma", "--memory", "hugetlb")
    assert rc == 2 and "invalid choice" in out["error"]


@pytest.mark.parametrize("sub", [["odirect", "--target"], ["io_uring"]])
def test_a_file_off_the_expected_dax_mount_is_refused_before_it_is_created(pyz, tmp_path, sub):
    """What happened after ``umount /mnt/fsdax-xfs``: the probe used a file on the root disk.
    (rdma takes the same ``Buffer`` path once pyverbs opened a device; the guest test covers it.)"""
    path = tmp_path / "pin.dat"
    if sub[-1] == "--target":
        sub = [*sub, str(tmp_path / "src.dat")]
    rc, out = helper(pyz, *sub, "--memory", "file", "--path", str(path), "--dax-fs", "xfs")
    assert rc == 2 and "is not a mount point" in out["error"] and "not on a DAX mount of xfs" in out["error"]
    assert not path.exists()


def test_truncate_wait_refuses_a_file_off_the_dax_mount(pyz, tmp_path):
    path = tmp_path / "truncate.dat"
    rc, out = helper(pyz, "truncate-wait", "--path", str(path), "--dax-fs", "ext4", "--hold", "0.1")
    assert rc == 2 and "not a mount point" in out["error"] and not path.exists()


def test_wrong_filesystem_and_device_are_refused(tmp_path):
    from labkit.lab.guest.pinprobe.common import SetupError
    root = target.mount_of("/")
    other = "ext4" if root["fs"] == "xfs" else "xfs"
    with pytest.raises(SetupError, match=f"not {other}"):
        target.check_dax_dir("/pin.dat", other, None)
    with pytest.raises(SetupError, match="not on /dev/pmem7"):
        target.check_dax_dir("/pin.dat", root["fs"], "/dev/pmem7")
    path = tmp_path / "plain.dat"
    path.write_bytes(b"x")
    with pytest.raises(SetupError, match="STATX_ATTR_DAX is clear"):
        target.check_dax_file(str(path), root["fs"])


MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 259:0 / /mnt/fsdax-xfs rw,relatime shared:20 - xfs /dev/pmem0 rw,attr2,dax=always
41 22 259:1 / /mnt/fsdax-ext4 rw,relatime shared:21 - ext4 /dev/pmem1 rw,dax=always
42 40 0:50 / /mnt/fsdax-xfs rw shared:22 - tmpfs tmp rw
43 22 0:51 / /mnt/with\\040space rw - tmpfs tmpfs rw
"""


def test_mount_of_picks_the_innermost_and_topmost_mount():
    assert target.mount_of("/mnt/fsdax-ext4/pin.dat", MOUNTINFO)["device"] == "/dev/pmem1"
    assert target.mount_of("/mnt/fsdax-xfs/pin.dat", MOUNTINFO)["fs"] == "tmpfs"     # mounted on top
    assert target.mount_of("/mnt/fsdax-xfsx/pin.dat", MOUNTINFO)["mountpoint"] == "/"
    assert target.mount_of("/mnt/with space/f", MOUNTINFO)["mountpoint"] == "/mnt/with space"
    assert target.mount_of("/root/pin.dat", MOUNTINFO)["options"].startswith("rw,relatime")


# -- issue 22 item 6: a mechanism registers itself; item 7: one way to find guest-side files ----------

def test_the_vocabulary_the_guest_commands_and_the_host_rows_name_the_same_mechanisms():
    from labkit.lab.guest.pinprobe import registry
    from labkit.lab.guest.vocab import MECHANISMS
    from labkit.lab.probes import MECHANISM_ROWS
    assert registry.mechanisms() == list(MECHANISMS)
    assert list(MECHANISM_ROWS) == list(MECHANISMS)


def test_the_command_line_imports_no_mechanism():
    """Adding a mechanism does not touch cli.py: it imports the registry, not the probes."""
    import ast

    from labkit.lab.guest import files
    tree = ast.parse(files.pinprobe_sources()["pinprobe/cli.py"])
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert imported == {"common", "registry"}


def test_the_zipapp_offers_every_registered_command(pyz):
    from labkit.lab.guest.pinprobe import registry
    r = subprocess.run([PYTHON, "-I", "-S", str(pyz), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    names = [c.name for c in registry.commands()]
    assert {"rdma", "v4l2", "status", "batch", "mount", "odp-revoke"} <= set(names)
    for name in names:
        assert f"    {name}" in r.stdout, name


def test_every_guest_side_file_is_found_through_the_package():
    from labkit.lab.counterfactual import module_excerpt
    from labkit.lab.guest import files
    mods = files.module_sources()
    assert set(mods) == {"Kbuild", "Makefile", "labkit_no_layout_wait.c", "labkit_no_longterm_check.c"}
    assert b"labkit_no_longterm_check.o" in mods["Kbuild"]
    assert files.counterfactual_script().startswith(b"#!/usr/bin/env python3\n")
    assert "check_vma_flags" in files.module_source("labkit_no_longterm_check")
    assert "_return(" in module_excerpt("no-longterm-check")
