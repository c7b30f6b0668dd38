#!/usr/bin/env bash
# Install what uproxy and its tests need on a fresh Debian machine:
# system packages (when run as root with apt) and a virtualenv in .venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc      # the venv; python-iptables builds a small extension
  iptables nftables conntrack iproute2       # kernel rules and namespaces for system tests
  chromium                                   # the status page browser test
  podman buildah runc mmdebstrap             # the container image: build and run it here
  haproxy                                    # PROXY protocol headers to compare ours with
  netcat-openbsd curl procps                 # what the README and demo suggest trying
)

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "note: not root or no apt-get; skipping Debian packages (${APT_PACKAGES[*]})" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"
echo "installed: $(.venv/bin/uproxy --version)"
