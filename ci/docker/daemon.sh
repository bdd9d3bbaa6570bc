#!/usr/bin/env bash
# Install Docker's engine, docker-compose and debootstrap where missing, and start dockerd in the
# background unless one already answers. CI runs as root on Debian 12 (no daemon preinstalled).
set -euo pipefail
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    nohup dockerd >/var/log/prunecxr-dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
fi
docker info >/dev/null 2>&1 || { echo "error: dockerd did not start (see /var/log/prunecxr-dockerd.log)" >&2; exit 1; }
echo "docker daemon $(docker version -f '{{.Server.Version}}') is up"
