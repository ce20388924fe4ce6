#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# Build the lab's out-of-tree kernel modules (images/modules/) against the exact
# guest kernel inside the image chroot, install them under
# /lib/modules/<release>/extra, then remove the build tools again.
#   sh build-modules.sh ROOT RELEASE
# Called by customize.sh after the kernel is unpacked. A kernel whose headers
# or compiler cannot be installed gets no modules (the lab says so at load
# time); the image build goes on.
set -eu
root="$1"
release="$2"
here=$(dirname "$0")
step() { echo "labkit-build: $*" >&2; }

t0=$(date +%s)
before="$root/tmp/labkit-pkgs-before"
chroot "$root" dpkg-query -W -f '${Package}\n' | sort > "$before"
# The compiler the kernel was built with (Debian's headers depend on it).
headers="linux-headers-$release"
step "modules: installing $headers and its compiler"
if ! chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o APT::Sandbox::User=root "$headers" make >&2; then
    step "modules: $headers is not installable: no lab modules for $release"
    rm -f "$before"
    exit 0
fi
work="$root/tmp/labkit-modules"
rm -rf "$work"
mkdir -p "$work"
cp "$here"/modules/*.c "$here"/modules/Kbuild "$here"/modules/Makefile "$work"/
step "modules: building for $release"
if chroot "$root" make -C /tmp/labkit-modules KDIR="/usr/src/$headers" >&2; then
    mkdir -p "$root/lib/modules/$release/extra"
    install -m 0644 "$work"/*.ko "$root/lib/modules/$release/extra/"
    chroot "$root" depmod "$release"
    step "modules: installed $(cd "$work" && echo *.ko)"
else
    step "modules: build failed for $release: no lab modules on this kernel"
fi
# Remove exactly what the build installed, so the image grows only by the .ko files.
chroot "$root" dpkg-query -W -f '${Package}\n' | sort | comm -13 "$before" - > "$root/tmp/labkit-pkgs-new"
# shellcheck disable=SC2046
chroot "$root" env DEBIAN_FRONTEND=noninteractive dpkg --purge $(cat "$root/tmp/labkit-pkgs-new") >&2
rm -rf "$work" "$before" "$root/tmp/labkit-pkgs-new" "$root/usr/src/linux-headers-"* "$root/lib/modules/$release/build"
step "modules: done in $(( $(date +%s) - t0 )) s"
