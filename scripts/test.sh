#!/usr/bin/env bash
# Install everything, then run every check CI runs: lint, types, layer
# contracts, the Dockerfile's lint and the whole test suite (system tests
# need root; set UPROXY_REQUIRE_SYSTEM=1 to make them fail instead of skip
# without it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
echo "== ruff";          ruff check uproxy tests bench
echo "== mypy --strict"; mypy --strict uproxy
echo "== import-linter"; lint-imports
echo "== hadolint";      hadolint --failure-threshold warning Dockerfile
echo "== pytest"
set +e
python -m pytest -p no:cacheprovider -q "$@"
status=$?
set -e
[ "$status" = 5 ] && { echo "no tests ran"; exit 1; }
exit "$status"
