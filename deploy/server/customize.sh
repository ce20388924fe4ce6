#!/bin/sh
# mmdebstrap customize hook for the class-server image (labkit.image.server drives it):
# runs on the build host with the finished Debian 13 root filesystem in $1 and writes
# into $LABKIT_OUT: vmlinuz and initrd.img (Debian's own, made by initramfs-tools while
# the kernel package was installed), root.ext4, packages.tsv, kernel-release, the SSH
# host key to pin (host_ed25519.pub) and the key root logs in with (id_ed25519).
# The image boots systemd as PID 1 with cgroup v2 only, as Debian 13 does by default.
set -eu
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
root="$1"
out="${LABKIT_OUT:?LABKIT_OUT must name the output directory}"

step() { echo "labkit-build: $*" >&2; }

# 1. Debian's kernel and initramfs, as installed by the kernel package.
release=$(ls "$root/lib/modules" | head -n 1)
step "kernel $release"
cp "$root/boot/vmlinuz-$release" "$out/vmlinuz"
cp "$root/boot/initrd.img-$release" "$out/initrd.img"
printf '%s\n' "$release" > "$out/kernel-release"

# 2. A server: its name, the root file system, DHCP on the virtual NIC (systemd-networkd),
#    QEMU's user-network resolver, the serial console.
echo labkit-server > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 labkit-server\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' > "$root/etc/fstab"
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/10-wired.network"
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
rm -f "$root/etc/resolv.conf"
echo "nameserver 10.0.2.3" > "$root/etc/resolv.conf"
# Timers that would compete with the test for the emulated CPU (nothing else changes).
for t in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer; do
    chroot "$root" systemctl mask "$t" >/dev/null 2>&1 || true
done

# 3. SSH: host keys made now and pinned by whoever boots the image; root logs in with a key
#    made for this image only (no password anywhere).
rm -f "$root"/etc/ssh/ssh_host_*
chroot "$root" ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$out/host_ed25519.pub"
ssh-keygen -q -t ed25519 -N "" -C "labkit-server-root" -f "$out/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$out/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
rm -f "$out/id_ed25519.pub"

# 4. Package list for the manifest, then the root image with room for what the installer adds
#    (a venv, the proxy, the guest images and snapshots, the learners' homes).
chroot "$root" dpkg-query -W -f '${Package}\t${Version}\n' > "$out/packages.tsv"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*.log
stage="$out/.rootfs"
mkdir -p "$stage"
cp -a --one-file-system "$root"/. "$stage"/
used_mb=$(du -sm "$stage" | cut -f1)
size_mb=$(( used_mb + 6144 ))
step "making root.ext4 (${used_mb} MiB used, ${size_mb} MiB image)"
mke2fs -q -F -t ext4 -L labkit-server -E root_owner=0:0 -d "$stage" "$out/root.ext4" "${size_mb}M"
rm -rf "$stage"
step "done"
