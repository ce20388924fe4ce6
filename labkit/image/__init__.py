"""The guest image: the kernel table, the mmdebstrap recipe in ``images/``,
its manifest, the tiny initramfs and the vmlinux the PVH entry boots.

``kernels`` is the table of kernel variants (one row per kernel), ``sources``
derives the package sources from the host's, ``build`` builds and verifies
images, ``kernelpkg`` picks the kernel packages to unpack, ``initramfs`` the
modules that mount the root disk, ``vmlinux`` extracts the uncompressed kernel.
"""

from labkit.image.build import (
    ARTIFACTS,
    Image,
    build_image,
    ensure_image,
    image_dir,
    image_status,
    list_images,
    load_image,
    mmdebstrap_argv,
    recipe_hash,
    sha256_file,
    verify_image,
)
from labkit.image.kernels import DEFAULT_KERNEL, KERNELS, KernelVariant, check_kernel, variant
from labkit.image.sources import apt_sources

__all__ = ["ARTIFACTS", "DEFAULT_KERNEL", "KERNELS", "Image", "KernelVariant", "apt_sources", "build_image",
           "check_kernel", "ensure_image", "image_dir", "image_status", "list_images", "load_image",
           "mmdebstrap_argv", "recipe_hash", "sha256_file", "variant", "verify_image"]
