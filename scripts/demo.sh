#!/usr/bin/env bash
# Install batchinf in the repo's own venv (.venv), creating it if missing, and run the demo:
# train a digits classifier, then classify its held-out images as one batch job.
# Arguments go to `batchinf demo`, e.g. scripts/demo.sh --folder /tmp/demo (a relative
# folder is taken from the repo root, where this script runs; the default is batchinf-demo/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "$0: batchinf needs Python 3.11; set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e .

exec .venv/bin/batchinf demo "$@"
