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

# How each tier runs. The tiers that start Ray wait far more than they compute (Ray and node
# starts, model loads, node deaths and re-plans), so each runs in two processes (pytest-xdist),
# a test file to a process (--dist loadfile: a file's module and class fixtures, its clusters,
# start once), each process with its own session fixtures (a Ray head on free ports, an S3
# server). More processes, or the two tiers side by side, made the two cores the limit and
# slowed every test: docs/testing.md.
tier_args() {
    case "$1" in
        ray|cluster) echo "-n 2 --dist loadfile" ;;
        *) echo "" ;;
    esac
}
tier() {
    local name=$1; shift
    # shellcheck disable=SC2046  # tier_args is a list of words
    run .venv/bin/python -m pytest -q -m "$name" -p no:cacheprovider $(tier_args "$name") "$@"
}

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
    "")  # every tier: the unit tier; then the ray tier, with the deploy tier (pip installs and
        # validators, no Ray) beside it; then the cluster tier.
        deploy_log=$(mktemp)
        run unit_tier "$@" || failed=1
        tier deploy "$@" >"$deploy_log" 2>&1 &
        deploy=$!
        tier ray "$@" || failed=1
        report deploy "$deploy" "$deploy_log" || failed=1
        tier cluster "$@" || failed=1 ;;
    *) tier "$tier" "$@" || failed=1 ;;
esac
exit "$failed"
