"""The class-server image: a Debian 13 machine as a university would install it
(systemd as PID 1, cgroup v2 only, Debian's own kernel and initramfs, SSH), on
which ``labkit class install`` is run for real (``tests/test_server_guest.py``)
and which an admin can boot to rehearse a class before the real server exists.

It is built like the guest images, from the host's own apt sources with the
suite changed (``sources.py``), by mmdebstrap and the recipe in
``deploy/server/`` (its ``packages.txt`` and ``customize.sh``), into
``<images>/server/`` with a manifest. It is rebuilt only when that recipe
changes; the guest images' recipe hash does not include it, so building it
never makes them stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import ImageBuildError, ImageMissing
from labkit.image.build import STRIP, Progress, follow_output, read_packages, sha256_file
from labkit.image.kernels import KernelVariant
from labkit.image.sources import apt_sources, needed_suites
from labkit.settings import Settings, resolve

NAME = "server"
SUITE = "trixie"            # Debian 13
ARTIFACTS = ("vmlinuz", "initrd.img", "root.ext4", "id_ed25519", "host_ed25519.pub")
# what apt_sources needs to know about the suite (no kernel of the lab's table is involved)
VARIANT = KernelVariant(NAME, SUITE, "linux-image-amd64")
HINT = "run `labkit image server` (add --force to rebuild)"


def recipe_dir() -> Path:
    return paths.PROJECT_DIR / "deploy" / "server"


def recipe_hash() -> str:
    h = hashlib.sha256(f"suite={SUITE}\n".encode())
    for p in sorted(recipe_dir().iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class ServerImage:
    directory: Path
    manifest: dict

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def root(self) -> Path:
        return self.directory / "root.ext4"

    @property
    def key(self) -> Path:
        """The private key root logs in with (made for this image only)."""
        return self.directory / "id_ed25519"

    @property
    def host_key(self) -> Path:
        """The server's SSH host key, to pin."""
        return self.directory / "host_ed25519.pub"


def load(settings: Settings | None = None) -> ServerImage:
    """The built server image; ImageMissing (with the command that builds it) when it is
    absent, stale or incomplete."""
    d = resolve(settings).images_dir / NAME
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ImageMissing(NAME, f"not built yet ({d} has no readable manifest.json)").with_hint(HINT) from None
    missing = [a for a in ARTIFACTS if not (d / a).is_file()]
    if missing:
        raise ImageMissing(NAME, f"{', '.join(missing)} missing").with_hint(HINT)
    if manifest.get("recipe_hash") != recipe_hash():
        raise ImageMissing(NAME, "stale: deploy/server/ changed since it was built").with_hint(HINT)
    return ServerImage(d, manifest)


def build(settings: Settings | None = None, force: bool = False, progress: Progress | None = None) -> ServerImage:
    """Build the server image unless an up-to-date one is there; progress lines to ``progress``."""
    settings = resolve(settings)
    say = progress or (lambda line: print(line, flush=True))
    if not force:
        try:
            img = load(settings)
            say(f"image {NAME}: up to date ({img.manifest['kernel_release']}), not rebuilding")
            return img
        except ImageMissing:
            pass
    final = settings.images_dir / NAME
    work = final.parent / f".{NAME}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mode = "root" if os.geteuid() == 0 else "unshare"
    packages = read_packages(recipe_dir() / "packages.txt")
    argv = ["mmdebstrap", f"--mode={mode}", "--variant=apt", "--format=null", "--include=" + ",".join(packages),
            "--aptopt=Acquire::Retries \"3\"", "--customize-hook=sh \"$LABKIT_SERVER_RECIPE/customize.sh\" \"$1\""]
    argv += [f"--dpkgopt=path-exclude={p}" for p in STRIP]
    argv += ["--dpkgopt=path-include=/usr/share/doc/*/copyright", SUITE, "/dev/null",
             *apt_sources(VARIANT, work, settings)]
    log_path = final.parent / f"{NAME}.log"
    say(f"image {NAME}: building Debian 13 ({SUITE}) with mmdebstrap ({mode} mode, {len(packages)} packages); "
        f"log: {log_path}")
    t0 = time.monotonic()
    env = dict(os.environ)      # mmdebstrap's own variables and proxies; the hook's on top
    env.update(LABKIT_OUT=str(work), LABKIT_SERVER_RECIPE=str(recipe_dir()))
    try:
        with open(log_path, "w", buffering=1) as log, tempfile.TemporaryDirectory() as tmp:
            log.write("$ " + " ".join(argv) + "\n")
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", cwd=tmp)
            assert proc.stdout is not None
            tail = follow_output(proc.stdout, log, say, t0)
            rc = proc.wait()
        if rc != 0:
            raise ImageBuildError(f"mmdebstrap failed with exit code {rc}", log_tail="\n".join(tail),
                                  hint=f"see {log_path}; the mirror must serve {needed_suites(VARIANT)}")
        packages_tsv = dict(ln.split("\t", 1) for ln in (work / "packages.tsv").read_text().splitlines() if "\t" in ln)
        manifest = {
            "image": NAME, "suite": SUITE, "recipe_hash": recipe_hash(),
            "kernel_release": (work / "kernel-release").read_text().strip(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
            "artifacts": {a: {"sha256": sha256_file(work / a), "bytes": (work / a).stat().st_size} for a in ARTIFACTS},
            "packages": packages_tsv,
        }
        for leftover in ("packages.tsv", "kernel-release", *(p.name for p in work.glob("apt-*"))):
            (work / leftover).unlink()
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for a in ARTIFACTS:
            (work / a).chmod(0o600 if a == "id_ed25519" else 0o444)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = final.parent / f".{NAME}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    say(f"image {NAME}: built ({manifest['kernel_release']}) in {time.monotonic() - t0:.0f} s")
    return load(settings)
