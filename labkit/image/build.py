"""Guest images: build them from Debian packages with mmdebstrap, describe them
with a manifest, and check them before a VM uses them.

One image per kernel variant (the table in ``labkit.image.kernels``: 6.1 and
6.12 on bookworm, 7.3 on trixie with trixie-backports' kernel). An image is a
directory with ``vmlinuz``, ``initrd.img``, ``root.ext4`` and ``manifest.json``.
It is rebuilt only when the recipe (the files of ``images/``, the lab's kernel
module sources and the initramfs builder) changes, and it is written to a
temporary directory first so a failed build never replaces a working image.

The module sources ship inside the package (``labkit/lab/guest/modules/``,
found by ``labkit.lab.guest.files``); a build stages ``images/`` with them as
its ``modules/`` folder, where ``build-modules.sh`` reads them, and the recipe
hash names them ``images/modules/...`` as before, so moving them into the
package did not change any image.

Where images and the recipe live, and whether a missing image may be built,
come from ``Settings``: the public functions take ``settings`` (None: this
process's, for callers that do not resolve them themselves); the build's
internals take them from those.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from labkit import paths
from labkit.errors import HostSetupError, ImageBuildError, ImageMissing

# The kernel table and check_kernel are re-exported: callers use image.build.KERNELS.
from labkit.image.kernels import DEFAULT_KERNEL, KERNELS, KernelVariant, check_kernel, variant
from labkit.image.sources import apt_sources, needed_suites
from labkit.lab.guest import files as guest_files
from labkit.settings import Settings, resolve

ARTIFACTS = ("vmlinuz", "initrd.img", "root.ext4")
STRIP = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
         "/usr/share/lintian/*", "/usr/share/linda/*")

Progress = Callable[[str], None]


RECIPE = "images"       # the name the recipe's files are hashed under, wherever the recipe lives


def recipe_files(settings: Settings) -> list[tuple[str, bytes]]:
    """Everything whose change must trigger a rebuild, by the name it is
    hashed under: the recipe's files as ``images/...`` (the module sources,
    which come from the package, as ``images/modules/...``: where the build
    sees them, ``stage_recipe``) and the two builders as ``labkit/image/...``.
    The names do not depend on where the recipe or the package are, so an
    installed labkit pointed at a checkout's recipe (``LABKIT_RECIPE_DIR``)
    agrees with the checkout about which images are up to date."""
    rdir = settings.recipe_dir
    # never built images: neither where they go nor the recipe's own build/ (GiBs of earlier builds)
    built = {settings.images_dir, rdir / "build"}
    files = {p.relative_to(rdir).parts: p.read_bytes() for p in rdir.rglob("*")
             if p.is_file() and not built & set(p.parents) and "__pycache__" not in p.parts}
    files.update({("modules", name): data for name, data in guest_files.module_sources().items()})
    here = Path(__file__).resolve().parent
    return ([("/".join((RECIPE, *parts)), data) for parts, data in sorted(files.items())]
            + [(f"labkit/image/{name}", (here / name).read_bytes()) for name in ("initramfs.py", "kernelpkg.py")])


def recipe_hash(kernel: str, settings: Settings | None = None) -> str:
    settings = resolve(settings)
    h = hashlib.sha256()
    h.update(f"{variant(kernel).recipe_key()}\n".encode())
    for name, data in recipe_files(settings):
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def stage_recipe(into: Path, settings: Settings) -> Path:
    """The recipe as the build reads it: ``images/`` (without built images)
    plus the package's module sources as ``modules/``, copied under ``into``."""
    rdir, staged = settings.recipe_dir, into / "recipe"
    for name, data in recipe_files(settings):
        if not name.startswith(RECIPE + "/"):
            continue            # the initramfs builder runs from the package (PYTHONPATH)
        rel = name[len(RECIPE) + 1:]
        dest = staged / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        if (rdir / rel).exists():
            shutil.copymode(rdir / rel, dest)
    for d in [into, staged, *(p for p in staged.rglob("*") if p.is_dir())]:
        d.chmod(0o755)          # read by the customize hook inside mmdebstrap's namespace
    return staged


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


def image_dir(kernel: str, settings: Settings | None = None) -> Path:
    return resolve(settings).images_dir / kernel


def verify_image(kernel: str, settings: Settings | None = None) -> Image:
    """Hash every artifact of ``kernel``'s image against its manifest now
    (``labkit image verify``); ImageMissing if anything differs."""
    img = load_image(kernel, verify=False, settings=settings)
    _verify_checksums(kernel, img.directory, img.manifest, force=True)
    return img


def load_image(kernel: str, verify: bool = True, settings: Settings | None = None) -> Image:
    """The built image for ``kernel``; ImageMissing (with a rebuild hint) if it
    is absent, stale, or its files do not match the manifest's sha256."""
    check_kernel(kernel)
    d = image_dir(kernel, settings)
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


STAMP = ".verified"     # the file states last hashed and found matching (see _verify_checksums)


def _stamps(d: Path, names: Iterable[str]) -> dict[str, list[int]]:
    return {name: [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            for name in names if (d / name).exists() for st in [(d / name).stat()]}


def _verify_checksums(kernel: str, d: Path, manifest: dict, force: bool = False) -> None:
    # Hashing the root image takes a second or two, so remember which file
    # states were already verified: size, mtime *and ctime*. A write changes
    # ctime and nobody can set it back (touch -d restores mtime only), so a
    # file changed in place is hashed again at its next use.
    names = list(manifest.get("artifacts", {})) or list(ARTIFACTS)
    try:
        if not force and json.loads((d / STAMP).read_text()) == _stamps(d, names):
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
        (d / STAMP).write_text(json.dumps(_stamps(d, names)))
    except OSError:
        pass


def install_copy(kernel: str, src: Path, dst: Path) -> None:
    """Copy the built image of ``kernel`` in ``src`` into ``dst`` for everyone to use (a class
    server's image directory): each artifact hashed against the manifest while it is copied
    (one read), the files made read-only (0444, the directory 0755), and then the stamp of
    :func:`_verify_checksums` written, so that users who cannot write it find the image
    verified instead of hashing it at every start. ImageMissing, and nothing left in ``dst``
    that looks done, if a file does not match."""
    manifest = json.loads((src / "manifest.json").read_text())
    names = list(manifest.get("artifacts", {})) or list(ARTIFACTS)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / STAMP).unlink(missing_ok=True)
    for f in sorted(src.iterdir()):
        if f.name == STAMP or not f.is_file():
            continue
        part = dst / f".{f.name}.part"
        h = hashlib.sha256()
        with open(f, "rb") as fin, open(part, "wb") as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                h.update(chunk)
                fout.write(chunk)
        want = manifest.get("artifacts", {}).get(f.name, {}).get("sha256")
        if f.name in names and h.hexdigest() != want:
            part.unlink()
            raise ImageMissing(kernel, f"{f} does not match its manifest (sha256 {h.hexdigest()[:12]}…, manifest "
                                       f"says {str(want)[:12]}…)")
        part.replace(dst / f.name)
    for name in names:
        if not (dst / name).is_file():
            raise ImageMissing(kernel, f"{name} is missing in {src}")
    seal(kernel, dst, hashed=True)


def seal(kernel: str, d: Path, hashed: bool = False) -> None:
    """Make the image of ``kernel`` in ``d`` read-only for everyone (files 0444, directories 0755;
    a mode that is right already is left alone, since a chmod changes the ctime the stamp keeps),
    then write its stamp (0444), hashing the files first unless the caller just did."""
    for p in [d, *d.rglob("*")]:
        want = 0o755 if p.is_dir() else 0o444
        if p.name != STAMP and stat.S_IMODE(p.stat().st_mode) != want:
            p.chmod(want)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / STAMP).unlink(missing_ok=True)
    if hashed:
        names = list(manifest.get("artifacts", {})) or list(ARTIFACTS)
        (d / STAMP).write_text(json.dumps(_stamps(d, names)))
    else:
        _verify_checksums(kernel, d, manifest, force=True)
    (d / STAMP).chmod(0o444)


def image_status(kernel: str, settings: Settings | None = None) -> tuple[str, Image | None]:
    """('ok'|'stale'|'missing'|'corrupt', image) for listing and doctor."""
    settings = resolve(settings)
    try:
        img = load_image(kernel, settings=settings)
    except ImageMissing as exc:
        return ("missing" if "not built" in exc.reason else "corrupt"), None
    # An installed labkit (a wheel, a class server's venv) has no recipe beside it: its images were
    # built elsewhere and copied in, and there is nothing here to compare them with.
    if settings.recipe_dir.is_dir() and img.manifest.get("recipe_hash") != recipe_hash(kernel, settings):
        return "stale", img
    return "ok", img


# -- building ----------------------------------------------------------------

def mmdebstrap_argv(kernel: str, packages: list[str], mirrors: list[str], mode: str) -> list[str]:
    """The mmdebstrap command line (pure)."""
    argv = ["mmdebstrap", f"--mode={mode}", "--variant=apt", "--format=null",
            "--include=" + ",".join(packages),
            "--aptopt=Acquire::Retries \"3\"",
            "--customize-hook=sh \"$LABKIT_RECIPE/customize.sh\" \"$1\""]
    for pattern in STRIP:
        argv.append(f"--dpkgopt=path-exclude={pattern}")
    argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    return argv + [variant(kernel).suite, "/dev/null", *mirrors]


def read_packages(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#")[0].strip()]


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise HostSetupError(f"{tool} is not installed",
                             hint=f"install the Debian package {package} (`make lab` does it: "
                                  f"sudo apt-get install {package})")


def build_image(kernel: str = DEFAULT_KERNEL, force: bool = False,
                progress: Progress | None = None, settings: Settings | None = None) -> Image:
    """Build (or reuse) the image for ``kernel``; return it.

    Progress lines go to ``progress`` (default: stderr). The full log is kept in
    ``images/build/<kernel>.log``. One build per kernel at a time: a second
    caller waits for the first and then finds the image up to date.
    """
    check_kernel(kernel)
    settings = resolve(settings)
    say = progress or _stderr
    with _build_lock(kernel, say, settings.images_dir):
        status, img = image_status(kernel, settings)
        if status == "ok" and img is not None and not force:
            say(f"image {kernel}: up to date ({img.kernel_release}), not rebuilding")
            return img
        for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"), ("cpio", "cpio"),
                          ("dpkg-deb", "dpkg"), ("apt-get", "apt")):
            _require(tool, pkg)
        if status == "stale":
            say(f"image {kernel}: recipe changed, rebuilding")
        return _build(kernel, say, settings)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _build_lock:
    """An exclusive flock on ``images/build/.<kernel>.lock`` for one build."""

    def __init__(self, kernel: str, say: Progress, images_dir: Path) -> None:
        self.path = images_dir / f".{kernel}.lock"
        self.say = say

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.say(f"image {self.path.stem[1:]}: another build of it is running; waiting for it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)       # closing drops the lock


def _build(kernel: str, say: Progress, settings: Settings) -> Image:
    v = variant(kernel)
    final = image_dir(kernel, settings)
    work = final.parent / f".{kernel}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mode = "root" if os.geteuid() == 0 else "unshare"
    packages = read_packages(settings.recipe_dir / "packages.txt")
    argv = mmdebstrap_argv(kernel, packages, apt_sources(v, work, settings), mode)
    say(f"image {kernel}: building with mmdebstrap ({mode} mode, {v.suite}, {len(packages)} packages + "
        f"{v.package}{' from ' + v.package_suite if v.package_suite else ''}); log: {final.parent}/{kernel}.log")
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="labkit-recipe-") as tmp:
            _run_mmdebstrap(kernel, argv, _build_env(v, work, stage_recipe(Path(tmp), settings)), work, say, t0)
        release = (work / "kernel-release").read_text().strip()
        if not v.release_matches(release):
            raise ImageBuildError(f"{v.package} resolved to kernel {release}, not a {kernel} kernel",
                                  hint=f"the mirror moved on: add a row for {release.split('+')[0]} to "
                                       "labkit/image/kernels.py, or pin the package there")
        from labkit.image.vmlinux import extract
        pvh = extract(work / "vmlinuz", work / "vmlinux")
        say(f"  [{time.monotonic() - t0:5.1f}s] " + ("vmlinux extracted: QEMU boots it through the PVH entry"
                                                     if pvh else "no PVH entry in this kernel: booting vmlinuz"))
        manifest = _write_manifest(kernel, work, recipe_hash(kernel, settings), time.monotonic() - t0, mode)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _replace(final, work)
    say(f"image {kernel}: built {manifest['kernel_release']} in {time.monotonic() - t0:.0f} s "
        f"(root image {manifest['artifacts']['root.ext4']['bytes'] / 2**20:.0f} MiB)")
    return load_image(kernel, settings=settings)


def _build_env(v: KernelVariant, work: Path, recipe: Path) -> dict[str, str]:
    # mmdebstrap inherits this process's environment (its own variables,
    # proxies); the recipe's scripts get theirs on top
    env = dict(os.environ)
    env.update(LABKIT_OUT=str(work), LABKIT_RECIPE=str(recipe),
               LABKIT_KERNEL_PACKAGE=v.package, LABKIT_KERNEL_SUITE=v.package_suite,
               LABKIT_PYTHON=sys.executable,
               PYTHONPATH=str(paths.PROJECT_DIR) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run_mmdebstrap(kernel: str, argv: list[str], env: dict[str, str], work: Path, say: Progress,
                    t0: float) -> None:
    log_path = work.parent / f"{kernel}.log"
    with open(log_path, "w", buffering=1) as log:     # line-buffered: a killed build leaves its log
        log.write("$ " + " ".join(argv) + "\n")
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", cwd=work)
        assert proc.stdout is not None
        tail = follow_output(proc.stdout, log, say, t0)
        rc = proc.wait()
    if rc != 0:
        text = "\n".join(tail)
        hint = f"see {log_path}"
        if re.search(r"Unable to locate package|has no installation candidate|Failed to fetch|"
                     r"Temporary failure resolving|Could not resolve|Unable to find a source", text):
            hint = ("a package could not be fetched: check that `apt-get update` works on this host "
                    f"and that the mirror serves {needed_suites(variant(kernel))}; "
                    "LABKIT_MIRROR or LABKIT_APT_SOURCES can point elsewhere")
        raise ImageBuildError(f"mmdebstrap failed with exit code {rc}", log_tail=text, hint=hint)


def _replace(final: Path, work: Path) -> None:
    """Swap the new image in; the old one goes only once the new one is in place."""
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def ensure_image(kernel: str, build: bool | None = None, progress: Progress | None = None,
                 settings: Settings | None = None) -> Image:
    """The image for ``kernel``, built now (with progress lines) if it was
    never built. ``build=False``, or ``settings.auto_build`` false
    (``LABKIT_AUTO_BUILD=0``) when ``build`` is None, refuses with ImageMissing
    instead. A corrupt image is never rebuilt behind the learner's back: that
    stays an ImageMissing with its hint."""
    settings = resolve(settings)
    try:
        return load_image(kernel, settings=settings)
    except ImageMissing as exc:
        allowed = settings.auto_build if build is None else build
        if not (allowed and _never_built(exc)):
            raise
    say = progress or _stderr
    say(f"image {kernel}: not built yet; building it now (about a minute; "
        f"`labkit image build --kernel {kernel}` does the same)")
    return build_image(kernel, progress=say, settings=settings)


def _never_built(exc: ImageMissing) -> bool:
    return exc.reason.startswith("not built")


def follow_output(lines: Iterable[str], log: TextIO, say: Progress, t0: float) -> list[str]:
    """Follow a build's output (mmdebstrap and the recipe's hooks): every line
    into ``log``, its progress lines to ``say``; the last 40 lines, for an error."""
    tail: list[str] = []
    for line in lines:
        log.write(line)
        tail = (tail + [line.rstrip()])[-40:]
        msg = _progress_line(line)
        if msg:
            say(f"  [{time.monotonic() - t0:5.1f}s] {msg}")
    return tail


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
    artifacts = {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}
                 for name in ARTIFACTS + ("vmlinux",) if (d / name).exists()}
    manifest = {
        "kernel": kernel,
        "kernel_release": (d / "kernel-release").read_text().strip(),
        "kernel_package": {"name": kpkg, "version": kver, "requested": KERNELS[kernel].package},
        "suite": KERNELS[kernel].suite,
        "recipe_hash": rhash,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
        "build_mode": mode,
        "host": platform.node(),
        "artifacts": artifacts,
        "packages": packages,
    }
    for name in ("packages.tsv", "kernel-package.tsv", "kernel-release"):
        (d / name).unlink()
    for leftover in d.glob("apt-*"):
        leftover.unlink()
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name in artifacts:
        (d / name).chmod(0o444)      # VMs write to their own overlays, never here
    return manifest


def list_images(settings: Settings | None = None) -> list[tuple[str, str, Image | None]]:
    settings = resolve(settings)
    return [(k, *image_status(k, settings)) for k in KERNELS]
