#!/usr/bin/env bash
# Build what the docker tests run: the stand-in base images (cached between runs), then the real
# Dockerfile and the tracking server's Dockerfile on them, as prunecxr:ci and prunecxr-tracking:ci.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash ci/docker/standins.sh
build() {  # build TAG BASE_IMAGE CONTEXT: quiet, but the build's output on failure
    local log
    log=$(mktemp)
    if ! docker build -t "$1" --build-arg BASE_IMAGE="$2" "$3" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
    echo "built $1 on $2"
}
build prunecxr:ci prunecxr-ci/pytorch:2.14.1 .
build prunecxr-tracking:ci prunecxr-ci/python:3.11 docker/tracking
docker image prune -f >/dev/null  # layers of images these builds replaced
