#!/bin/sh
# mmdebstrap customize hook: runs on the build host (inside mmdebstrap's
# namespace) with the finished chroot in $1. It installs the kernel, the labkit
# init and the SSH configuration, then writes every artifact into $LABKIT_OUT:
#   vmlinuz, initrd.img, root.ext4, packages.tsv, kernel-release
# The chroot itself is thrown away by mmdebstrap (--format=null).
set -eu
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
root="$1"
out="${LABKIT_OUT:?LABKIT_OUT must name the output directory}"
recipe="${LABKIT_RECIPE:?LABKIT_RECIPE must name the images/ directory}"
kpkg="${LABKIT_KERNEL_PACKAGE:?LABKIT_KERNEL_PACKAGE must name a kernel package}"
py="${LABKIT_PYTHON:-python3}"

step() { echo "labkit-build: $*" >&2; }

# 1. Kernel: follow metapackages to the real image package with the mirror's
#    metadata (7.x splits it into image/base/binary/modules packages), then
#    unpack them without dpkg so no initramfs-tools hook runs (we build our
#    own initramfs).
ksuite="${LABKIT_KERNEL_SUITE:-}"
aptopt=""
[ -z "$ksuite" ] || aptopt="-o APT::Default-Release=$ksuite"
step "resolving $kpkg${ksuite:+ from $ksuite}"
debs=$("$py" -m labkit.image.kernelpkg --root "$root" ${ksuite:+--suite "$ksuite"} "$kpkg")
pkg=""
for p in $debs; do
    step "downloading $p"
    chroot "$root" sh -c "cd /tmp && apt-get -q -o APT::Sandbox::User=root $aptopt download '$p'" >&2
    deb=$(ls "$root"/tmp/"$p"_*.deb)
    # Keep merged-/usr symlinks (/lib -> usr/lib) intact while unpacking.
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"
    if [ -z "$pkg" ]; then pkg="$p"; kver=$(dpkg-deb --field "$deb" Version); fi
    rm -f "$deb"
done
release=$(ls "$root/lib/modules" | head -n 1)
step "kernel $release ($pkg $kver)"
chroot "$root" depmod "$release"
sh "$recipe/build-modules.sh" "$root" "$release"
printf '%s\t%s\n' "$pkg" "$kver" > "$out/kernel-package.tsv"
printf '%s\n' "$release" > "$out/kernel-release"
# 6.x ships /boot/vmlinuz-<release>; 7.x ships the modules directory's vmlinuz
# (its postinst, which never runs here, would copy it to /boot).
for f in "$root/boot/vmlinuz-$release" "$root/lib/modules/$release/vmlinuz"; do
    if [ -f "$f" ]; then cp "$f" "$out/vmlinuz"; break; fi
done
[ -f "$out/vmlinuz" ] || { echo "E: no vmlinuz in $debs" >&2; exit 1; }
rm -f "$root/boot/vmlinuz-$release" "$root/boot/System.map-$release" "$root/lib/modules/$release/vmlinuz"

# 2. Initramfs: busybox plus exactly the modules needed to mount the root disk
#    (the list is labkit.image.initramfs.ROOT_MODULES).
step "building initramfs"
"$py" -m labkit.image.initramfs --root "$root" --release "$release" \
    --init "$recipe/initramfs-init" --output "$out/initrd.img"

# 3. The labkit guest: init, SSH server configuration, no host keys (each VM
#    makes its own on first boot, and the host pins it).
install -m 0755 "$recipe/guest/labkit-init" "$root/sbin/labkit-init"
install -m 0644 "$recipe/guest/sshd_config" "$root/etc/ssh/sshd_config"
install -D -m 0644 "$recipe/guest/fstab" "$root/etc/labkit/fstab"
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/root/.ssh" "$root/lab"
chmod 0700 "$root/root/.ssh"
echo labkit > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 labkit\n' > "$root/etc/hosts"
if [ -d "$recipe/guest/bin" ]; then
    for f in "$recipe"/guest/bin/*; do
        install -m 0755 "$f" "$root/usr/local/bin/$(basename "$f")"
    done
fi

# 4. Package list for the manifest, then slim the tree and make the root image.
chroot "$root" dpkg-query -W -f '${Package}\t${Version}\n' > "$out/packages.tsv"
# Drop hardware drivers a VM never loads (depmod runs again afterwards, and
# the lab checks at run time that the modules it needs resolve).
mods="$root/lib/modules/$release/kernel"
for d in drivers/gpu drivers/net/wireless drivers/net/ethernet drivers/staging drivers/bluetooth \
         drivers/media/usb drivers/media/pci drivers/media/dvb-frontends drivers/media/tuners \
         drivers/media/i2c drivers/infiniband/hw drivers/iio drivers/isdn drivers/hwmon \
         drivers/net/can drivers/net/usb drivers/usb/serial sound net/bluetooth net/wireless \
         net/mac80211; do
    rm -rf "${mods:?}/$d"
done
chroot "$root" depmod "$release"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*
# The chroot still has /proc, /sys and /dev mounted: copy the tree without
# them, then turn it into an ext4 image (no root or loop device needed).
stage="$out/.rootfs"
mkdir -p "$stage"
cp -a --one-file-system "$root"/. "$stage"/
used_mb=$(du -sm "$stage" | cut -f1)
size_mb=$(( used_mb + used_mb / 4 + 256 ))
step "making root.ext4 (${used_mb} MiB used, ${size_mb} MiB image)"
mke2fs -q -F -t ext4 -L labkit-root -E root_owner=0:0 -d "$stage" "$out/root.ext4" "${size_mb}M"
rm -rf "$stage"
step "done"
