# Sourced by demo.sh and test.sh: cd to the repo root and make sure .venv exists (Python 3.11).
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
