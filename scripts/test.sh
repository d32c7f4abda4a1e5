#!/usr/bin/env bash
# Lint and run the whole test suite in the repo's own venv (.venv), creating it if missing.
# This is the command the README gives and the one CI runs (.ci/run).
set -euo pipefail

# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
.venv/bin/python -m pip install -e ".[test]"

# The report page is rendered in a real headless browser (tests/test_report.py): Debian's
# chromium, installed here when missing (as root in CI; through sudo elsewhere).
if ! command -v chromium >/dev/null; then
    sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

.venv/bin/ruff check batchinf tests bench
exec .venv/bin/python -m pytest -q "$@"
