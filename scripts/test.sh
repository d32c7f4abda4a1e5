#!/usr/bin/env bash
# Lint and run the whole test suite in the repo's own venv (.venv), creating it if missing.
# This is the command the README gives and the one CI runs (.ci/run).
set -euo pipefail

# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
.venv/bin/python -m pip install -e ".[test]"

.venv/bin/ruff check batchinf tests bench
exec .venv/bin/python -m pytest -q "$@"
