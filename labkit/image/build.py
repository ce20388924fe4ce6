"""Guest images: build them from Debian packages with mmdebstrap, describe them
with a manifest, and check them before a VM uses them.

One image per kernel variant (``6.1``: bookworm's ``linux-image-amd64``;
``6.12``: ``linux-image-6.12-amd64`` from bookworm-security). An image is a
directory with ``vmlinuz``, ``initrd.img``, ``root.ext4`` and ``manifest.json``.
It is rebuilt only when the recipe (the files of ``images/`` plus the
initramfs builder) changes, and it is written to a temporary directory first
so a failed build never replaces a working image.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labkit import paths
from labkit.errors import HostSetupError, ImageBuildError, ImageMissing

SUITE = "bookworm"
KERNELS: dict[str, str] = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12-amd64",
}
DEFAULT_KERNEL = "6.1"
ARTIFACTS = ("vmlinuz", "initrd.img", "root.ext4")
STRIP = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
         "/usr/share/lintian/*", "/usr/share/linda/*")

Progress = Callable[[str], None]


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if it names a variant, else a ConfigError listing them."""
    from labkit.errors import ConfigError

    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel variant {kernel!r}",
                          hint="choose one of: " + ", ".join(KERNELS))
    return kernel


def recipe_files() -> list[Path]:
    """Everything whose change must trigger a rebuild."""
    rdir = paths.recipe_dir()
    files = [p for p in sorted(rdir.rglob("*"))
             if p.is_file() and paths.images_dir() not in p.parents and "__pycache__" not in p.parts]
    return files + [Path(__file__).resolve().parent / "initramfs.py"]


def recipe_hash(kernel: str) -> str:
    h = hashlib.sha256()
    h.update(f"suite={SUITE} kernel={kernel} package={KERNELS[kernel]}\n".encode())
    base = paths.PROJECT_DIR
    for f in recipe_files():
        try:
            name = str(f.relative_to(base))
        except ValueError:
            name = f.name
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Image:
    """A built image of one kernel variant."""

    kernel: str
    directory: Path
    manifest: dict

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def boot_kernel(self) -> Path:
        """What QEMU's -kernel gets: the PVH-bootable ELF when the build made one."""
        elf = self.directory / "vmlinux"
        return elf if "vmlinux" in self.manifest.get("artifacts", {}) and elf.exists() else self.vmlinuz

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def root(self) -> Path:
        return self.directory / "root.ext4"

    @property
    def kernel_release(self) -> str:
        return self.manifest["kernel_release"]


def image_dir(kernel: str) -> Path:
    return paths.images_dir() / kernel


def load_image(kernel: str, verify: bool = True) -> Image:
    """The built image for ``kernel``; ImageMissing (with a rebuild hint) if it
    is absent, stale, or its files do not match the manifest's sha256."""
    check_kernel(kernel)
    d = image_dir(kernel)
    mf = d / "manifest.json"
    if not mf.exists():
        raise ImageMissing(kernel, f"not built yet ({d} has no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ImageMissing(kernel, f"manifest.json is unreadable or corrupt ({exc})") from exc
    for name in ARTIFACTS:
        if not (d / name).is_file():
            raise ImageMissing(kernel, f"{name} is missing")
    if verify:
        _verify_checksums(kernel, d, manifest)
    return Image(kernel, d, manifest)


def _verify_checksums(kernel: str, d: Path, manifest: dict) -> None:
    # Hashing the root image takes a second or two, so remember which file
    # states (size, mtime) were already verified.
    stamp_file = d / ".verified"
    names = list(manifest.get("artifacts", {})) or list(ARTIFACTS)
    stamps = {name: [(d / name).stat().st_size, (d / name).stat().st_mtime_ns] for name in names
              if (d / name).exists()}
    try:
        if json.loads(stamp_file.read_text()) == stamps:
            return
    except (OSError, json.JSONDecodeError):
        pass
    for name in names:
        want = manifest.get("artifacts", {}).get(name, {}).get("sha256")
        if not (d / name).is_file():
            raise ImageMissing(kernel, f"{name} is missing")
        got = sha256_file(d / name)
        if want != got:
            raise ImageMissing(kernel, f"{name} is corrupt or changed (sha256 {got[:12]}…, manifest says "
                                       f"{str(want)[:12]}…)")
    try:
        stamp_file.write_text(json.dumps(stamps))
    except OSError:
        pass


def image_status(kernel: str) -> tuple[str, Image | None]:
    """('ok'|'stale'|'missing'|'corrupt', image) for listing and doctor."""
    try:
        img = load_image(kernel)
    except ImageMissing as exc:
        return ("missing" if "not built" in exc.reason else "corrupt"), None
    if img.manifest.get("recipe_hash") != recipe_hash(kernel):
        return "stale", img
    return "ok", img


# -- building ----------------------------------------------------------------

def apt_sources(build_dir: Path) -> list[str]:
    """MIRROR arguments for mmdebstrap, from the user's override or the host's
    own apt configuration (never a hard-coded host)."""
    if os.environ.get("LABKIT_APT_SOURCES"):
        src = Path(os.environ["LABKIT_APT_SOURCES"])
        if not src.is_file():
            raise HostSetupError(f"LABKIT_APT_SOURCES={src} is not a file",
                                 hint="point it to an apt sources.list or deb822 .sources file")
        return [str(src)]
    if os.environ.get("LABKIT_MIRROR"):
        uri = os.environ["LABKIT_MIRROR"]
        return [f"deb {uri} {SUITE} main", f"deb {uri} {SUITE}-updates main"]
    osr = _os_release()
    if osr.get("ID") != "debian":
        raise HostSetupError(
            f"this host is {osr.get('PRETTY_NAME', 'not Debian')}: its apt sources are not Debian's",
            hint="set LABKIT_MIRROR to a Debian mirror URI, or LABKIT_APT_SOURCES to a sources file "
                 "with bookworm, bookworm-updates and bookworm-security")
    codename = osr.get("VERSION_CODENAME", SUITE)
    found = []
    candidates = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for i, f in enumerate(candidates):
        if not f.is_file() or f.suffix not in (".list", ".sources"):
            continue
        text = f.read_text()
        if "debian" not in text or not any(
                ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines()):
            continue
        if codename != SUITE:
            text = re.sub(rf"\b{re.escape(codename)}\b", SUITE, text)
        out = build_dir / f"apt-{i:02d}{f.suffix}"
        out.write_text(text)
        found.append(str(out))
    if not found:
        raise HostSetupError("no Debian apt sources found in /etc/apt",
                             hint="set LABKIT_MIRROR to a Debian mirror URI")
    return found


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            k, _, v = line.partition("=")
            out[k] = v.strip().strip('"')
    except OSError:
        pass
    return out


def mmdebstrap_argv(kernel: str, packages: list[str], mirrors: list[str], mode: str) -> list[str]:
    """The mmdebstrap command line (pure)."""
    argv = ["mmdebstrap", f"--mode={mode}", "--variant=apt", "--format=null",
            "--include=" + ",".join(packages),
            "--aptopt=Acquire::Retries \"3\"",
            "--customize-hook=sh \"$LABKIT_RECIPE/customize.sh\" \"$1\""]
    for pattern in STRIP:
        argv.append(f"--dpkgopt=path-exclude={pattern}")
    argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    return argv + [SUITE, "/dev/null", *mirrors]


def read_packages(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#")[0].strip()]


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise HostSetupError(f"{tool} is not installed",
                             hint=f"install the Debian package {package} (`make lab` does it: "
                                  f"sudo apt-get install {package})")


def build_image(kernel: str = DEFAULT_KERNEL, force: bool = False,
                progress: Progress | None = None) -> Image:
    """Build (or reuse) the image for ``kernel``; return it.

    Progress lines go to ``progress`` (default: stderr). The full log is kept in
    ``images/build/<kernel>.log``.
    """
    check_kernel(kernel)
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    rhash = recipe_hash(kernel)
    status, img = image_status(kernel)
    if status == "ok" and not force:
        say(f"image {kernel}: up to date ({img.kernel_release}), not rebuilding")
        return img
    for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"), ("cpio", "cpio"),
                      ("dpkg-deb", "dpkg"), ("apt-get", "apt")):
        _require(tool, pkg)
    if status == "stale":
        say(f"image {kernel}: recipe changed, rebuilding")
    final = image_dir(kernel)
    work = final.parent / f".{kernel}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = final.parent / f"{kernel}.log"
    mode = "root" if os.geteuid() == 0 else "unshare"
    packages = read_packages(paths.recipe_dir() / "packages.txt")
    argv = mmdebstrap_argv(kernel, packages, apt_sources(work), mode)
    env = dict(os.environ, LABKIT_OUT=str(work), LABKIT_RECIPE=str(paths.recipe_dir()),
               LABKIT_KERNEL_PACKAGE=KERNELS[kernel], LABKIT_PYTHON=sys.executable,
               PYTHONPATH=str(paths.PROJECT_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    say(f"image {kernel}: building with mmdebstrap ({mode} mode, {len(packages)} packages + "
        f"{KERNELS[kernel]}); log: {log_path}")
    t0 = time.monotonic()
    tail: list[str] = []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", cwd=work)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            msg = _progress_line(line)
            if msg:
                say(f"  [{time.monotonic() - t0:5.1f}s] {msg}")
        rc = proc.wait()
    if rc != 0:
        text = "\n".join(tail)
        hint = f"see {log_path}"
        if re.search(r"Unable to locate package|has no installation candidate|Failed to fetch|"
                     r"Temporary failure resolving|Could not resolve", text):
            hint = ("a package could not be fetched: check that `apt-get update` works on this host "
                    "and that its sources include bookworm (and bookworm-security for 6.12); "
                    "LABKIT_MIRROR or LABKIT_APT_SOURCES can point elsewhere")
        shutil.rmtree(work, ignore_errors=True)
        raise ImageBuildError(f"mmdebstrap failed with exit code {rc}", log_tail=text, hint=hint)
    from labkit.image.vmlinux import extract
    pvh = extract(work / "vmlinuz", work / "vmlinux")
    say(f"  [{time.monotonic() - t0:5.1f}s] " + ("vmlinux extracted: QEMU boots it through the PVH entry"
                                                 if pvh else "no PVH entry in this kernel: booting vmlinuz"))
    manifest = _write_manifest(kernel, work, rhash, time.monotonic() - t0, mode)
    old = final.parent / f".{kernel}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    say(f"image {kernel}: built {manifest['kernel_release']} in {time.monotonic() - t0:.0f} s "
        f"(root image {manifest['artifacts']['root.ext4']['bytes'] / 2**20:.0f} MiB)")
    return load_image(kernel)


def _progress_line(line: str) -> str:
    line = line.strip()
    if line.startswith("labkit-build: "):
        return line.removeprefix("labkit-build: ")
    if line.startswith("I: "):
        return line[3:]
    if line.startswith(("E: ", "W: ")):
        return line
    return ""


def _write_manifest(kernel: str, d: Path, rhash: str, seconds: float, mode: str) -> dict:
    packages = {}
    for ln in (d / "packages.tsv").read_text().splitlines():
        name, _, ver = ln.partition("\t")
        packages[name] = ver
    kpkg, _, kver = (d / "kernel-package.tsv").read_text().strip().partition("\t")
    manifest = {
        "kernel": kernel,
        "kernel_release": (d / "kernel-release").read_text().strip(),
        "kernel_package": {"name": kpkg, "version": kver, "requested": KERNELS[kernel]},
        "suite": SUITE,
        "recipe_hash": rhash,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
        "build_mode": mode,
        "host": platform.node(),
        "artifacts": {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}
                      for name in ARTIFACTS + ("vmlinux",) if (d / name).exists()},
        "packages": packages,
    }
    for f in ("packages.tsv", "kernel-package.tsv", "kernel-release"):
        (d / f).unlink()
    for f in d.glob("apt-*"):
        f.unlink()
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name in manifest["artifacts"]:
        (d / name).chmod(0o444)      # VMs write to their own overlays, never here
    return manifest


def list_images() -> list[tuple[str, str, Image | None]]:
    return [(k, *image_status(k)) for k in KERNELS]
