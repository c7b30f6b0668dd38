#!/usr/bin/env bash
# Build uproxy's container image with podman, with or without a registry.
#
#   bash scripts/image.sh              -> localhost/uproxy:VERSION (and :latest)
#   BASE_IMAGE=python:3.11-slim-bookworm bash scripts/image.sh   use a registry's base
#
# Without BASE_IMAGE, the base is a Debian image made here by mmdebstrap from
# this host's own apt sources (no mirror is written in this repository) and
# kept as localhost/uproxy-base:bookworm; it is made only when missing.
# Pip inside the build trusts the host's CA bundle, mounted for RUN steps only.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/scripts/containers.conf"

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' uproxy/__init__.py)
IMAGE=${IMAGE:-localhost/uproxy}
BASE=localhost/uproxy-base:bookworm
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

apt_sources() {
  # The host's deb822 sources for Debian itself (not third-party repositories).
  local file
  for file in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    if [ -f "$file" ] && grep -q "^Suites:.*bookworm" "$file"; then echo "$file"; return; fi
  done
  [ -f /etc/apt/sources.list ] && grep -q '^deb .*bookworm' /etc/apt/sources.list \
    && { echo /etc/apt/sources.list; return; }
  echo "image.sh: no bookworm apt sources on this host to build a base from" >&2
  exit 1
}

build_base() {
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  echo "image.sh: making $BASE with mmdebstrap from $(apt_sources)"
  mmdebstrap --quiet --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
    --include=python3,python3-venv,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$work/base.tar" "$(apt_sources)" >"$work/log" 2>&1 \
    || { cat "$work/log" >&2; return 1; }
  podman import --quiet "$work/base.tar" "$BASE" >/dev/null
}

base_image=${BASE_IMAGE:-}
if [ -z "$base_image" ]; then
  podman image exists "$BASE" || build_base
  base_image=$BASE
fi

ca_args=()
if [ -f "$CA_BUNDLE" ]; then
  ca_args=(--volume "$CA_BUNDLE:$CA_BUNDLE:ro" --build-arg "PIP_CERT=$CA_BUNDLE")
fi
pull=never
[ -n "${BASE_IMAGE:-}" ] && pull=missing

# The images these tags name now: a build that moves both tags leaves them
# untagged, and only they are removed after (nothing else in the store is).
replaced=()
for tag in "$IMAGE:$VERSION" "$IMAGE:latest"; do
  id=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null) && replaced+=("$id")
done

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --layers=false: no intermediate images (the build stage's, each step's)
# stay in the store untagged; a rebuild runs every step again.
podman build --pull="$pull" --network host --layers=false \
  --build-arg "BASE_IMAGE=$base_image" "${ca_args[@]}" \
  --tag "$IMAGE:$VERSION" --tag "$IMAGE:latest" . >"$log" 2>&1 \
  || { cat "$log" >&2; echo "image.sh: the build failed (its output is above)" >&2; exit 1; }
for id in $(printf '%s\n' "${replaced[@]}" | sort -u); do
  if [ "$(podman image inspect --format '{{len .RepoTags}}' "$id" 2>/dev/null)" = 0 ]; then
    podman image rm "$id" >/dev/null 2>&1 \
      || echo "image.sh: the replaced image $id is still in use; it stays" >&2
  fi
done
echo "image.sh: built $IMAGE:$VERSION ($(podman image inspect --format '{{.Size}}' "$IMAGE:$VERSION" | awk '{printf "%d MB", $1/1000000}'), base $base_image)"
