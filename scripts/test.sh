#!/usr/bin/env bash
# Lint and run the tests in the repo's own venv (.venv), creating it if missing.
#
#   bash scripts/test.sh               every tier: the command the README gives and CI runs (.ci/run)
#   bash scripts/test.sh --fast        lint and the unit tier only, with Ray unable to start
#   bash scripts/test.sh --tier ray    one tier (unit, ray, cluster or deploy)
#
# Any further arguments go to pytest (a file, -k, -x, --durations=20...). The tiers and their
# rule are in docs/testing.md.
set -euo pipefail

tier=""
case "${1:-}" in
    --fast) tier=unit; shift ;;
    --tier)
        tier="${2:?--tier needs one of unit, ray, cluster, deploy}"; shift 2
        [[ "$tier" =~ ^(unit|ray|cluster|deploy)$ ]] || { echo "$0: no tier $tier" >&2; exit 2; } ;;
esac

# shellcheck source=scripts/venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
.venv/bin/python -m pip install -e ".[test]"

# The report page is rendered in a real headless browser (tests/test_report.py): Debian's
# chromium, installed here when missing (as root in CI; through sudo elsewhere).
if ! command -v chromium >/dev/null; then
    sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

.venv/bin/ruff check batchinf tests bench examples
.venv/bin/mypy batchinf  # settings in pyproject.toml [tool.mypy]
# The unit tier runs with tests/noray first on PYTHONPATH: there Ray cannot start, in pytest or
# in any subprocess, and each test that tried is logged, so one that starts Ray without its
# tier saying so fails here rather than slowing the fast tier down. It runs in 4 processes
# (pytest-xdist): its tests wait on S3 round trips more than on the CPU.
unit_tier() {
    local log status=0
    log=$(mktemp)
    PYTHONPATH="$PWD/tests/noray${PYTHONPATH:+:$PYTHONPATH}" BATCHINF_NORAY_LOG="$log" \
        .venv/bin/python -m pytest -q -m unit -n 4 "$@" || status=$?
    if [[ -s "$log" ]]; then
        echo "$0: these unit tests started Ray; mark them (STARTS_RAY in tests/conftest.py):" >&2
        sort -u "$log" >&2
        status=1
    fi
    rm -f "$log"
    return "$status"
}

# pytest's exit 5 (nothing collected: arguments that name no test of a tier) is no failure.
run() { "$@" || { local status=$?; [[ $status -eq 5 ]] || return "$status"; }; }

# The end of a tier run beside the others (its pid, its output in a file): its summary line,
# or its whole output when it failed.
report() {
    local name=$1 pid=$2 log=$3 status=0
    wait "$pid" || status=$?
    echo "--- the $name tier, run beside:"
    if [[ $status -eq 0 ]]; then tail -n 1 "$log"; else cat "$log"; fi
    rm -f "$log"
    return "$status"
}

failed=0
case "$tier" in
    unit) run unit_tier "$@" || failed=1 ;;
    "")  # every tier: the unit tier in parallel; then the tiers that start Ray side by side with
        # the deploy tier (pip installs and validators, no Ray): they wait far more than they
        # compute. Each runs in its own pytest process, one test at a time, with its own session
        # fixtures (a Ray head on free ports, an S3 server). More processes than these (xdist
        # workers) made the two cores the limit and timed tests fail: docs/testing.md.
        deploy_log=$(mktemp) cluster_log=$(mktemp)
        run unit_tier "$@" || failed=1
        run .venv/bin/python -m pytest -q -m deploy -p no:cacheprovider "$@" >"$deploy_log" 2>&1 &
        deploy=$!
        run .venv/bin/python -m pytest -q -m cluster -p no:cacheprovider "$@" >"$cluster_log" 2>&1 &
        cluster=$!
        run .venv/bin/python -m pytest -q -m ray -p no:cacheprovider "$@" || failed=1
        report cluster "$cluster" "$cluster_log" || failed=1
        report deploy "$deploy" "$deploy_log" || failed=1 ;;
    *) run .venv/bin/python -m pytest -q -m "$tier" "$@" || failed=1 ;;
esac
exit "$failed"
