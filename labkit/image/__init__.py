"""The guest image: the mmdebstrap recipe in ``images/``, its manifest, the
tiny initramfs and the vmlinux the PVH entry boots.

``build`` builds and verifies images, ``initramfs`` picks the modules that
mount the root disk, ``vmlinux`` extracts the uncompressed kernel.
"""

from labkit.image.build import (
    ARTIFACTS,
    DEFAULT_KERNEL,
    KERNELS,
    Image,
    apt_sources,
    build_image,
    check_kernel,
    image_dir,
    image_status,
    list_images,
    load_image,
    mmdebstrap_argv,
    recipe_hash,
    sha256_file,
)

__all__ = ["ARTIFACTS", "KERNELS", "DEFAULT_KERNEL", "Image", "apt_sources", "build_image", "check_kernel", "image_dir",
           "image_status", "list_images", "load_image", "mmdebstrap_argv", "recipe_hash", "sha256_file"]
