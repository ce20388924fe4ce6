"""The running guest kernel's own source, for the course's source viewer.

Debian ships the exact source of each kernel it builds as ``linux-source-X.Y``
(one ``.tar.xz`` inside a ``.deb``). The version to fetch is the one recorded
in the image's manifest (the package the image was built from), so what a
learner reads is the source of the kernel that just refused their pin, not a
nearby version. Only the handful of files the course reads are kept, in the
cache (``LABKIT_CACHE_DIR``/kernel-source/<release>/); the ``.deb`` is deleted.

The package comes from the same Debian sources the image was built from: a
private apt state (its own lists and cache, nothing in /etc/apt changes) over
the sources ``labkit.image.sources`` derives from the host's configuration.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from labkit.errors import HostSetupError, ImageBuildError
from labkit.image.kernels import variant
from labkit.image.sources import apt_sources
from labkit.settings import Settings, resolve

log = logging.getLogger(__name__)

# The files the course reads (paths inside the kernel tree). A file missing from
# one version is simply absent (e.g. frame_vector.c moved in 5.11).
FILES = (
    "mm/gup.c",
    "mm/memory.c",
    "include/linux/fs.h",
    "include/linux/mm.h",
    "drivers/media/common/videobuf2/frame_vector.c",
    "mm/frame_vector.c",
    "drivers/infiniband/core/umem.c",
    "drivers/infiniband/core/umem_odp.c",
    "drivers/infiniband/sw/rxe/rxe_odp.c",
    "fs/dax.c",
    "fs/xfs/xfs_file.c",
    "fs/xfs/xfs_inode.c",
    "include/rdma/ib_umem.h",
    "fs/ext4/inode.c",
    "io_uring/rsrc.c",
)

Progress = Callable[[str], None]


def source_package(kernel: str, image_manifest: dict) -> tuple[str, str]:
    """(package name, exact version) of the source of the image's kernel:
    ``linux-source-6.1`` at the version of the image package it was built from."""
    pkg = image_manifest.get("kernel_package") or {}
    version = pkg.get("version")
    if not version:
        raise HostSetupError(f"the {kernel} image's manifest does not record its kernel package version",
                             hint=f"rebuild it: labkit image build --kernel {kernel} --force")
    major_minor = ".".join(version.split(".")[:2]).split("-")[0]
    return f"linux-source-{major_minor}", version


def cache_dir(release: str, settings: Settings) -> Path:
    return settings.cache_dir / "kernel-source" / release


MANIFEST = "manifest.json"


def _complete(dest: Path) -> bool:
    """True if ``dest`` holds a fetch of today's FILES (a longer list refetches)."""
    try:
        return json.loads((dest / MANIFEST).read_text()).get("requested") == list(FILES)
    except (OSError, ValueError):
        return False


def _apt_root(kernel: str, work: Path, settings: Settings) -> list[str]:
    """apt-get options for a private apt over the kernel variant's Debian sources."""
    parts = work / "sources.list.d"
    parts.mkdir(parents=True, exist_ok=True)
    found = apt_sources(variant(kernel), work, settings)
    lines = [m for m in found if m.startswith("deb ")]
    for f in (Path(m) for m in found if not m.startswith("deb ")):
        shutil.copy(f, parts / f"labkit-{f.name}" if f.suffix in (".list", ".sources") else parts / "user.list")
    if lines:
        (parts / "mirror.list").write_text("\n".join(lines) + "\n")
    for d in ("lists/partial", "archives/partial"):
        (work / d).mkdir(parents=True, exist_ok=True)
    opts = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work}",
            "-o", f"Dir::Cache::Archives={work / 'archives'}", "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=", "-o", "Debug::NoLocking=1"]
    if os.geteuid() == 0:     # apt's _apt sandbox user cannot write into a root-owned cache dir
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def _run(argv: list[str], cwd: Path, what: str, timeout: float) -> None:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise HostSetupError("apt-get is not installed", hint="this needs a Debian host") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what} took longer than {timeout:.0f} s",
                              hint="check the network and the host's apt sources, then try again") from exc
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise ImageBuildError(f"{what} failed (exit {p.returncode}): {tail}",
                              hint="check that the host's apt sources reach Debian (apt-get update)")


def _extract(deb: Path, package: str, dest: Path) -> list[str]:
    """Pull FILES out of the .deb's linux-source-X.Y.tar.xz without unpacking the rest."""
    inner = f"./usr/src/{package}.tar.xz"
    fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert fsys.stdout is not None
    got: list[str] = []
    try:
        with tarfile.open(fileobj=fsys.stdout, mode="r|") as outer:
            for member in outer:
                if member.name != inner:
                    continue
                xz = outer.extractfile(member)
                assert xz is not None
                with tarfile.open(fileobj=xz, mode="r|xz") as src:
                    for m in src:
                        rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                        if rel in FILES and m.isfile():
                            f = src.extractfile(m)
                            assert f is not None
                            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                            (dest / rel).write_bytes(f.read())
                            got.append(rel)
                break
    finally:
        fsys.stdout.close()
        fsys.wait(timeout=60)
    if not got:
        raise ImageBuildError(f"{deb.name} holds no {inner} with the expected files",
                              hint="report this: Debian's linux-source layout may have changed")
    return got


def fetch(kernel: str, image_manifest: dict, progress: Progress | None = None,
          timeout: float = 900.0, settings: Settings | None = None) -> Path:
    """The directory with the course's files of this image's kernel source,
    fetched once (about 150 MB downloaded, a few hundred KB kept) into the
    settings' cache."""
    settings = resolve(settings)
    say = progress or (lambda s: None)
    release = image_manifest.get("kernel_release", kernel)
    dest = cache_dir(release, settings)
    if _complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    package, version = source_package(kernel, image_manifest)
    with open(dest.parent / f".{release}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(dest):                         # another process fetched it meanwhile
            return dest
        work = dest.parent / f".work-{release}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            t0 = time.monotonic()
            opts = _apt_root(kernel, work, settings)
            say(f"reading the Debian package lists for the {kernel} kernel's source")
            _run(["apt-get", *opts, "-q", "update"], work, "apt-get update (private lists)", timeout)
            say(f"downloading {package} {version} (about 150 MB, once)")
            _run(["apt-get", *opts, "-q", "download", f"{package}={version}"], work,
                 f"downloading {package}={version}", timeout)
            deb = next(work.glob(f"{package}_*.deb"), None)
            if deb is None:
                raise ImageBuildError(f"apt-get download left no {package} .deb",
                                      hint="check the host's apt sources")
            say(f"extracting {len(FILES)} files from {deb.name}")
            tmp = work / "tree"
            got = _extract(deb, package, tmp)
            (tmp / MANIFEST).write_text(json.dumps({"package": package, "version": version,
                                                    "requested": list(FILES), "files": sorted(got)}, indent=1))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            log.debug("kernel source %s %s: %d files in %.1f s", package, version, len(got),
                      time.monotonic() - t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest
