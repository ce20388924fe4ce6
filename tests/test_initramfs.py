"""Module load order for the initramfs, from modules.dep text."""

import pytest

from labkit.errors import ImageBuildError
from labkit.image.initramfs import load_order, module_name

DEP = """\
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
"""


def test_dependencies_first_each_once():
    order = [module_name(p) for p in load_order(DEP, "", ["virtio_blk", "ext4", "virtio-blk"])]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "jbd2", "mbcache", "crc16", "ext4"]


def test_builtins_are_skipped():
    assert load_order(DEP, "kernel/crypto/crc32c_generic.ko\n", ["crc32c_generic"]) == []


def test_unknown_module_is_named():
    with pytest.raises(ImageBuildError, match="nosuchmod"):
        load_order(DEP, "", ["nosuchmod"])


def test_module_name():
    assert module_name("kernel/x/virtio-pci.ko.zst") == "virtio_pci"


# 7.x has no crc32c_generic module (crc32c lives in the built-in CRC library).
DEP_73 = "\n".join(ln for ln in DEP.splitlines() if "crc32c" not in ln) + "\n"


def test_root_modules_do_not_require_crc32c_generic():
    from labkit.image.initramfs import ROOT_MODULES
    wanted = list(ROOT_MODULES) + ["virtio_pci?"]
    dep = DEP_73 + "kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio.ko.xz\n"
    order = [module_name(p) for p in load_order(dep, "", wanted)]
    assert "crc32c_generic" not in order
    assert order[-1] == "ext4" and {"virtio_pci", "virtio_blk", "ext4"} <= set(order)


def test_optional_module_is_loaded_where_it_exists_in_the_same_place():
    # 6.x keeps its initramfs as before: crc32c_generic before ext4.
    order = [module_name(p) for p in load_order(DEP, "", ["virtio_blk", "crc32c_generic?", "ext4"])]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"]


def test_required_module_still_fails_loudly():
    with pytest.raises(ImageBuildError, match="crc32c_generic"):
        load_order(DEP_73, "", ["crc32c_generic"])
