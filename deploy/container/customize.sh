#!/bin/sh
# mmdebstrap customize hook for the container image (labkit.image.container drives it):
# runs on the build host with the finished root filesystem in $1, which mmdebstrap then
# writes out as a tar stream for `docker import` / `podman import`.
#   LABKIT_WHEELS    a directory of wheels: labkit and everything it and JupyterHub need,
#                    fetched on the host from its own configured pip index (nothing is
#                    fetched inside the chroot)
#   LABKIT_IMAGES    the host's built guest images; LABKIT_KERNELS which of them go in
#   LABKIT_PROJECT   the labkit checkout (its notebooks/)
set -eu
root="$1"
wheels="${LABKIT_WHEELS:?}"
images="${LABKIT_IMAGES:?}"
kernels="${LABKIT_KERNELS:?}"
project="${LABKIT_PROJECT:?}"
venv=/opt/labkit/venv
home=/home/jovyan

step() { echo "labkit-build: $*" >&2; }
# The host's environment (its pip configuration, its paths) stays outside the chroot.
in_root() { chroot "$root" env -i PATH="$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root LANG=C.UTF-8 "$@"; }

# 1. The learner: uid 1000, gid 100 (users), as Zero to JupyterHub's values expect.
in_root useradd --create-home --uid 1000 --gid 100 --shell /bin/bash jovyan

# 2. The venv, from the wheels only.
step "venv: labkit, JupyterLab, JupyterHub's single-user server"
mkdir -p "$root/tmp/wheels"
cp "$wheels"/*.whl "$root/tmp/wheels/"
in_root python3 -m venv "$venv"
in_root "$venv/bin/pip" install -q --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/wheels labkit jupyterhub
rm -rf "$root/tmp/wheels"
ln -s "$venv/bin/labkit" "$root/usr/local/bin/labkit"
ln -s "$venv/bin/jupyterhub-singleuser" "$root/usr/local/bin/jupyterhub-singleuser"

# 3. The guest images (read-only: every VM writes to its own overlay) and the notebooks.
for k in $kernels; do
    step "guest image $k"
    install -d -m 0755 "$root/opt/labkit/images/$k"
    for f in vmlinuz vmlinux initrd.img root.ext4 manifest.json; do
        [ -e "$images/$k/$f" ] || continue
        cp --sparse=always "$images/$k/$f" "$root/opt/labkit/images/$k/$f"
        chmod 0444 "$root/opt/labkit/images/$k/$f"
    done
done
cp -r "$project/notebooks" "$root/opt/labkit/notebooks"
chmod -R a+rX "$root/opt/labkit/notebooks"
install -m 0755 "$LABKIT_CONTAINER_RECIPE/labkit-home" "$root/usr/local/bin/labkit-home"

# 4. The warm-start snapshots, made here by the container's own QEMU at the container's own
#    paths (the snapshot's key holds QEMU's version and the machine's command line, and its
#    disk names the root image by path): a learner's first start restores one instead of
#    booting cold. They go to the host-wide snapshot directory, which the learner reads.
# (mmdebstrap mounts /proc and /sys for the hooks and fills /dev with device nodes.)
for p in proc sys; do
    mountpoint -q "$root/$p" || { echo "E: /$p is not mounted in the chroot" >&2; exit 1; }
done
install -d -m 0755 "$root/var/cache/labkit/snapshots"
for k in $kernels; do
    name="snapshot-$(echo "$k" | tr . -)"       # a VM name has no dots
    step "warm-start snapshot $k (a cold boot under TCG, then QEMU's migration)"
    snapenv="LABKIT_ACCEL=tcg LABKIT_AUTO_BUILD=0 LABKIT_IMAGES_DIR=/opt/labkit/images
             LABKIT_STATE_DIR=/tmp/labkit-snap/state LABKIT_CACHE_DIR=/tmp/labkit-snap/cache"
    # shellcheck disable=SC2086
    in_root env $snapenv labkit vm start --name "$name" --kernel "$k" >&2
    # shellcheck disable=SC2086
    in_root env $snapenv labkit vm stop --name "$name" >&2
done
rm -rf "$root/tmp/labkit-snap"
for k in $kernels; do rm -f "$root/opt/labkit/images/$k/.verified"; done
ls "$root/var/cache/labkit/snapshots" >&2
