#!/usr/bin/env bash
# Install uproxy and run its demo: loopback backends proxied in laptop mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/uproxy demo "$@"
