"""``labkit image build|verify|list|container``: the guest images, and the container image that carries them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from labkit.commands.common import err, positive
from labkit.errors import LabError
from labkit.image import build as image
from labkit.settings import Settings


def cmd_image_build(args: argparse.Namespace, settings: Settings) -> int:
    # build_image resolves the settings itself, from the same environment as
    # ``settings``: its call stays the one tests stand in for (tests/test_cli.py)
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    if args.jobs == 1 or len(kernels) == 1:
        for k in kernels:
            img = image.build_image(k, force=args.force)
            print(f"{k}: {img.kernel_release} in {img.directory}")
        return 0
    # Several images at once: each build is mostly one dpkg or one download at a time, so
    # two or three overlap well even on two cores. Each progress line names its kernel.
    from concurrent.futures import ThreadPoolExecutor

    def one(k: str) -> image.Image:
        return image.build_image(k, force=args.force, progress=lambda line: print(f"[{k}] {line}", file=sys.stderr,
                                                                                   flush=True))
    with ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="labkit-image") as pool:
        futures = {k: pool.submit(one, k) for k in kernels}
        failed = []
        for k, fut in futures.items():
            try:
                img = fut.result()
            except LabError as exc:
                failed.append(k)
                err(f"image {k}: {exc}")
                continue
            print(f"{k}: {img.kernel_release} in {img.directory}")
    if failed:
        err(f"{len(failed)} of {len(kernels)} images failed ({', '.join(failed)}); the others are built. "
            f"Retry one with: labkit image build --kernel {failed[0]}")
        return 2
    return 0


def cmd_image_server(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.image import server
    img = server.build(settings, force=args.force)
    print(f"server: Debian 13, kernel {img.manifest['kernel_release']} in {img.directory}")
    return 0


def cmd_image_verify(args: argparse.Namespace, settings: Settings) -> int:
    kernels = ([k for k, _s, img in image.list_images(settings) if img] if args.kernel == "all"
               else [args.kernel])
    for k in kernels:
        t = time.monotonic()
        img = image.verify_image(k, settings)
        print(f"{k}: {len(img.manifest.get('artifacts', {}))} files match the manifest's sha256 "
              f"({time.monotonic() - t:.1f} s)")
    return 0


def cmd_image_container(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.image.container import build_container
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    build_container(kernels, settings, tag=args.tag, runtime=args.runtime)
    return 0


def cmd_image_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = []
    for kernel, status, img in image.list_images(settings):
        rel = img.kernel_release if img else "-"
        built = img.manifest.get("built_at", "-") if img else "-"
        size = f"{img.manifest['artifacts']['root.ext4']['bytes'] / 2**20:.0f} MiB" if img else "-"
        rows.append((kernel, status, rel, built, size))
    if args.json:
        print(json.dumps([dict(zip(("kernel", "status", "release", "built_at", "root_size"), r)) for r in rows],
                         indent=2))
        return 0
    print(f"{'KERNEL':7s} {'STATUS':8s} {'RELEASE':22s} {'BUILT':21s} ROOT")
    for r in rows:
        print(f"{r[0]:7s} {r[1]:8s} {r[2]:22s} {r[3]:21s} {r[4]}")
    return 0


def add_image(sub: Any) -> None:
    kernels = list(image.KERNELS)
    im = sub.add_parser("image", help="build or list guest images").add_subparsers(dest="sub", required=True,
                                                                                   metavar="ACTION")
    b = im.add_parser("build", help="build the guest image (skipped when up to date)")
    b.add_argument("--kernel", choices=kernels + ["all"], default=image.DEFAULT_KERNEL,
                   help="kernel variant (default %(default)s)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--jobs", type=positive(int), default=3, metavar="N",
                   help="with --kernel all: build up to N images at once (default %(default)s; 1 builds them "
                        "one after the other)")
    b.set_defaults(func=cmd_image_build)
    sv = im.add_parser("server", help="build the class-server image: Debian 13 with systemd and cgroup v2, on "
                                      "which `labkit class install` is rehearsed and tested",
                       description="Build (unless up to date) a Debian 13 server image (systemd as PID 1, cgroup "
                                   "v2 only, Debian's kernel, SSH with a key made for it) from the recipe in "
                                   "deploy/server/, into <images>/server/. tests/test_server_guest.py boots it "
                                   "and runs the class installer inside.")
    sv.add_argument("--force", action="store_true", help="rebuild even if up to date")
    sv.set_defaults(func=cmd_image_server)
    vf = im.add_parser("verify", help="hash every file of an image against its manifest now")
    vf.add_argument("--kernel", choices=kernels + ["all"], default="all",
                    help="kernel variant (default: every built image)")
    vf.set_defaults(func=cmd_image_verify)
    ls = im.add_parser("list", help="show the built images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_list)
    ct = im.add_parser("container", help="build the container image (JupyterLab, labkit, QEMU, the guest images) "
                                         "with docker/podman import; no registry needed")
    ct.add_argument("--kernel", choices=kernels + ["all"], default=image.DEFAULT_KERNEL,
                    help="the guest images to put in (default %(default)s; they must be built)")
    ct.add_argument("--tag", default="labkit", help="the image's name (default %(default)s)")
    ct.add_argument("--runtime", choices=["docker", "podman"], default=None, help="default: docker, else podman")
    ct.set_defaults(func=cmd_image_container)
