#!/bin/sh
# Install what bench/run.py drives: the peers (HAProxy, nginx stream, socat)
# and the load generators (iperf3, wrk). Idempotent: installs only what is
# missing. Needs root (or sudo) and apt.
set -eu

PACKAGES="haproxy nginx libnginx-mod-stream socat iperf3 wrk"

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    echo "bench/install.sh: all installed ($PACKAGES)"
else
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -q
    # shellcheck disable=SC2086
    $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing
fi

# The Debian packages start system services on install; the benchmark runs its
# own instances with its own configs, so stop the system ones (ports 80 etc).
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        ${SUDO:-} systemctl stop "$svc" || true
    fi
done
exit 0
