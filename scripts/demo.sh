#!/usr/bin/env bash
# Install batchinf in the repo's own venv (.venv), creating it if missing, and run the demo:
# train a digits classifier, then classify its held-out images as one batch job.
# Arguments go to `batchinf demo`, e.g. scripts/demo.sh --folder /tmp/demo
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e .

exec .venv/bin/batchinf demo "$@"
