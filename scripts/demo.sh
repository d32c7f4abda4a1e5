#!/usr/bin/env bash
# Install batchinf in the repo's own venv (.venv), creating it if missing, and run the demo:
# train a digits classifier, then classify its held-out images as one batch job.
# Arguments go to `batchinf demo`, e.g. scripts/demo.sh --folder /tmp/demo (a relative
# folder is taken from the repo root, where this script runs; the default is batchinf-demo/).
set -euo pipefail

# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
.venv/bin/python -m pip install -e ".[demo]"  # scikit-learn: the digits set the demo trains on

exec .venv/bin/batchinf demo "$@"
