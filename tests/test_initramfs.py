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
