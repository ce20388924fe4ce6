"""Shared fixtures. Integration tests boot real guests from the built images;
`make test` builds them first. When an image is missing the test fails with the
command that builds it (a missing image is a broken setup, not a skip)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from labkit import image
from labkit.machine.vm import VM

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session", autouse=True)
def _private_state(tmp_path_factory):
    """Tests never touch the user's own VMs or caches (warm-start snapshots
    included: the suite makes its own, once per kernel), and never build an
    image on demand (a missing image is a broken setup: `make test` builds them)."""
    root = tmp_path_factory.mktemp("labkit-state")
    old = {k: os.environ.get(k) for k in ("LABKIT_STATE_DIR", "LABKIT_CACHE_DIR", "LABKIT_AUTO_BUILD",
                                          "LABKIT_SHARED_CACHE_DIR", "LABKIT_LIFETIME_PID")}
    os.environ["LABKIT_AUTO_BUILD"] = "0"
    os.environ["LABKIT_SHARED_CACHE_DIR"] = ""     # nor the host-wide snapshot cache of a class
    os.environ["LABKIT_LIFETIME_PID"] = "0"        # nor a hub's server that happens to run pytest
    os.environ["LABKIT_STATE_DIR"] = str(root)
    os.environ["LABKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("labkit-cache"))
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def require_image(kernel: str) -> image.Image:
    try:
        return image.load_image(kernel)
    except Exception as exc:   # fail loudly: the suite must boot real guests
        pytest.fail(f"image {kernel} unavailable ({exc}); run `labkit image build --kernel {kernel}`")


@contextmanager
def persistent_vm(name: str, kernel: str) -> Iterator[VM]:
    """A started persistent VM (child processes can attach to it by name), stopped afterwards."""
    require_image(kernel)
    vm = VM(name, kernel=kernel, persistent=True)
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="session", params=list(image.KERNELS))
def guest(request):
    """One booted throwaway guest per kernel variant, shared by the module's tests."""
    require_image(request.param)
    with VM(f"test-{request.param.replace('.', '-')}", kernel=request.param) as vm:
        yield vm


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "labkit-test", str(path)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        pytest.fail("these fault tests mount a small tmpfs as the state dir and need root "
                    "(CI runs as root)")
