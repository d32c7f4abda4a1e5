#!/usr/bin/env bash
# Lint and run the whole test suite in the repo's own venv (.venv), creating it if missing.
# This is the command the README gives and the one CI runs (.ci/run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e ".[test]"

.venv/bin/ruff check batchinf tests
exec .venv/bin/python -m pytest -q "$@"
