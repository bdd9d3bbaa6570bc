#!/usr/bin/env bash
# Local stand-ins for the public images CI cannot pull (this machine reaches no image registry):
#   prunecxr-ci/python:3.11     for python:3.11-slim          (base of the tracking server image)
#   prunecxr-ci/pytorch:2.14.1  for pytorch/pytorch:*-runtime (base of the prunecxr image; CUDA
#                               build of torch, as on the real base, run here on the CPU)
#   prunecxr-ci/postgres:15     for postgres:16               (the compose stack's database)
# Made from a debootstrapped Debian 12; rebuilt only when this recipe changes (image label).
set -euo pipefail
cd "$(dirname "$0")"
RECIPE=$(cat standins.sh postgres/* | sha256sum | cut -c1-16)
PYTHON_IMAGE=prunecxr-ci/python:3.11
PYTORCH_IMAGE=prunecxr-ci/pytorch:2.14.1
POSTGRES_IMAGE=prunecxr-ci/postgres:15
PATH_IN_IMAGE=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

is_current() {
    [ "$(docker image inspect -f '{{index .Config.Labels "prunecxr.recipe"}}' "$1" 2>/dev/null)" = "$RECIPE" ]
}

if is_current "$PYTHON_IMAGE" && is_current "$PYTORCH_IMAGE" && is_current "$POSTGRES_IMAGE"; then
    echo "stand-in images are current ($RECIPE)"
    exit 0
fi

ROOT=$(mktemp -d /var/tmp/prunecxr-rootfs.XXXXXX)
cleanup() {
    for mount in "$ROOT/opt/local-index" "$ROOT/proc"; do
        mountpoint -q "$mount" && umount "$mount"
    done
    rm -rf "$ROOT"
}
trap cleanup EXIT

import_rootfs() {  # import_rootfs TAG: the rootfs as it is now, as an image
    rm -rf "$ROOT/root/.cache" "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/var/lib/apt/lists/"*
    tar -C "$ROOT" --exclude=./proc --exclude=./opt/local-index -c . |
        docker import \
            --change "ENV PATH=$PATH_IN_IMAGE" \
            --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
            --change "LABEL prunecxr.recipe=$RECIPE" \
            --change 'CMD ["python3"]' - "$1" >/dev/null
    echo "built $1"
}

echo "debootstrapping Debian 12 into $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT" http://deb.debian.org/debian >/dev/null
# The host's CA bundle: inside containers, PyPI is reachable only through it.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
in_root() { chroot "$ROOT" env -i HOME=/root PATH="$PATH_IN_IMAGE" PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$@"; }
in_root python3 -m venv /opt/venv
in_root pip install -q --upgrade pip
import_rootfs "$PYTHON_IMAGE"

# torch from this machine's local wheel files where it has them (fast), else from PyPI.
LOCAL=()
if [ -d /opt/pypi-more/simple ]; then
    mkdir -p "$ROOT/opt/local-index" && mount --bind -o ro /opt/pypi-more "$ROOT/opt/local-index"
    LOCAL+=(--extra-index-url file:///opt/local-index/simple)
fi
in_root pip install -q "${LOCAL[@]}" torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored: it is neither" || true
in_root python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
umount "$ROOT/proc"
mountpoint -q "$ROOT/opt/local-index" && umount "$ROOT/opt/local-index"
rmdir "$ROOT/opt/local-index" 2>/dev/null || true
rm -f "$ROOT/etc/resolv.conf"
import_rootfs "$PYTORCH_IMAGE"

docker build -q -t "$POSTGRES_IMAGE" --label "prunecxr.recipe=$RECIPE" \
    --build-arg BASE_IMAGE="$PYTHON_IMAGE" postgres >/dev/null
echo "built $POSTGRES_IMAGE"
