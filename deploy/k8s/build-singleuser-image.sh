#!/bin/bash
# The single-user image for deploy/k8s/values.yaml, built from Debian packages without a
# Dockerfile: mmdebstrap makes the root filesystem (as labkit's own guest-image recipe does),
# hooks add the learner account, a venv with labkit and the Jupyter server, and the guest
# images already built on this host; the result is a tarball that `podman import` or
# `docker import` turns into an image for your registry.
#
#   labkit image build --kernel all            # the guest images, once
#   deploy/k8s/build-singleuser-image.sh OUT.tar [MIRROR...]    # mmdebstrap's mirror arguments
#   podman import --change 'USER 1000' --change 'WORKDIR /home/jovyan' \
#       --change 'ENV PATH=/opt/labkit/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
#       --change 'CMD ["jupyterhub-singleuser"]' OUT.tar registry.example.org/labkit/singleuser:0.1.0
#   podman push registry.example.org/labkit/singleuser:0.1.0
#
# Not built in CI: no container registry is reachable from it, and pip inside the hook needs the
# Python package index. Run as root (or with mmdebstrap's unshare mode as a user with subuids).
set -euo pipefail

out=${1:?usage: build-singleuser-image.sh OUT.tar}
repo=$(cd "$(dirname "$0")/../.." && pwd)
images=${LABKIT_IMAGES_DIR:-$repo/images/build}
suite=${SUITE:-bookworm}
if [[ ! -d $images ]]; then
    echo "no guest images in $images: run 'labkit image build --kernel all' first" >&2
    exit 1
fi

# QEMU and its tools (the learner's VM), ssh (labkit talks to the guest over it), Python for
# the venv, tini as PID 1 so QEMU's children are reaped, ca-certificates for pip.
packages=qemu-system-x86,qemu-utils,openssh-client,python3,python3-venv,python3-pip,tini,ca-certificates,procps,git

mmdebstrap --variant=apt --include="$packages" \
    --customize-hook='chroot "$1" useradd --create-home --uid 1000 --gid 100 --shell /bin/bash jovyan' \
    --customize-hook='mkdir -p "$1/opt/labkit/src" "$1/opt/labkit/images"' \
    --customize-hook="copy-in $repo/pyproject.toml $repo/README.md /opt/labkit/src" \
    --customize-hook="copy-in $repo/labkit /opt/labkit/src" \
    --customize-hook="sync-in $images /opt/labkit/images" \
    --customize-hook='chroot "$1" python3 -m venv /opt/labkit/venv' \
    --customize-hook='chroot "$1" /opt/labkit/venv/bin/pip install --no-cache-dir /opt/labkit/src jupyterhub jupyterlab' \
    --customize-hook='chroot "$1" ln -s /opt/labkit/venv/bin/jupyterhub-singleuser /usr/local/bin/jupyterhub-singleuser' \
    --customize-hook='chroot "$1" ln -s /opt/labkit/venv/bin/labkit /usr/local/bin/labkit' \
    "$suite" "$out" "${@:2}" </dev/null
echo "root filesystem in $out; import it with podman/docker import (see the top of this script)"
