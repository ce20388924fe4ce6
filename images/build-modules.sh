#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# Build the lab's out-of-tree kernel modules (images/modules/) against the exact
# guest kernel inside the image chroot, install them under
# /lib/modules/<release>/extra, then remove the build tools again.
#   sh build-modules.sh ROOT RELEASE
# Called by customize.sh after the kernel is unpacked. The kernel headers are
# unpacked without dpkg, like the kernel: from 6.12 on Debian's headers package
# depends on the kernel image package, which would pull in initramfs-tools and
# 100 MB, and purging it would delete the kernel we unpacked. Only the compiler
# goes through apt, and exactly what apt added is purged afterwards. A kernel
# whose headers or compiler cannot be had gets no modules (the lab says so at
# load time); the image build goes on.
set -eu
root="$1"
release="$2"
here=$(dirname "$0")
step() { echo "labkit-build: $*" >&2; }
t0=$(date +%s)
tmp="$root/tmp/labkit-modules"
rm -rf "$tmp"
mkdir -p "$tmp/debs" "$tmp/src"

# 1. The headers package and the headers/kbuild packages it depends on.
headers="linux-headers-$release"
pkgs="$headers $(chroot "$root" apt-cache depends --important "$headers" 2>/dev/null \
      | awk '$1 == "Depends:" && $2 ~ /^linux-(headers|kbuild)-/ { printf " %s", $2 }')"
step "modules: fetching $pkgs"
if ! chroot "$root" sh -c "cd /tmp/labkit-modules/debs && apt-get -q -o APT::Sandbox::User=root download $pkgs" >&2; then
    step "modules: $headers is not available: no lab modules for $release"
    rm -rf "$tmp"
    exit 0
fi
for deb in "$tmp"/debs/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x -v --keep-directory-symlink -C "$root" >> "$tmp/files"
done

# 2. The compiler the kernel was built with (from its config), and make.
cc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT=".*\(gcc-[0-9][0-9]*\).*/\1/p' "$root/usr/src/$headers/.config")
chroot "$root" dpkg-query -W -f '${Package}\n' | sort > "$tmp/before"
step "modules: installing ${cc:-gcc} and make"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o APT::Sandbox::User=root "${cc:-gcc}" make >&2 || step "modules: ${cc:-gcc} is not installable"

# 3. Build and install.
cp "$here"/modules/*.c "$here"/modules/Kbuild "$here"/modules/Makefile "$tmp/src/"
step "modules: building for $release with ${cc:-gcc}"
if chroot "$root" make -C /tmp/labkit-modules/src KDIR="/usr/src/$headers" >&2; then
    mkdir -p "$root/lib/modules/$release/extra"
    install -m 0644 "$tmp"/src/*.ko "$root/lib/modules/$release/extra/"
    step "modules: installed $(cd "$tmp/src" && echo *.ko)"
else
    step "modules: build failed for $release: no lab modules on this kernel"
fi

# 4. Remove the tools: what apt added, and the unpacked headers (files, then emptied directories).
chroot "$root" dpkg-query -W -f '${Package}\n' | sort | comm -13 "$tmp/before" - > "$tmp/new"
if [ -s "$tmp/new" ]; then
    # shellcheck disable=SC2046
    chroot "$root" env DEBIAN_FRONTEND=noninteractive dpkg --purge $(cat "$tmp/new") >&2
fi
# (tens of thousands of paths: one rm and one rmdir for all of them, not one
# process per path, which took about a minute of the image build.) tar lists
# directories with a trailing slash; children sort after their parents, so the
# reversed list empties a directory before it reaches it.
sed -n 's#^\./##; /^$/d; /\/$/!p' "$tmp/files" | (cd "$root" && xargs -r -d '\n' rm -f --)
sed -n 's#^\./##; /\/$/p' "$tmp/files" | sort -r | \
    (cd "$root" && xargs -r -d '\n' rmdir --ignore-fail-on-non-empty -- 2>/dev/null) || true
rm -rf "$tmp"
chroot "$root" depmod "$release"
step "modules: done in $(( $(date +%s) - t0 )) s"
