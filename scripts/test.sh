#!/usr/bin/env bash
# Install what the tests need and run them: lint, types, unit, integration, end to end.
#
#   sudo ./scripts/test.sh [pytest args...]
#
# The tests drive real parts (dbus-daemon, systemd-analyze, ...); many need root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

"$here/scripts/apt-deps.sh" test

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'

if [ "$#" -gt 0 ]; then
    echo "==> ruff"
    .venv/bin/ruff check .
    .venv/bin/ruff format --check --quiet .
    echo "==> mypy --strict shared daemons ctl"
    .venv/bin/mypy --strict shared daemons ctl
    echo "==> pytest"
    exec .venv/bin/python -m pytest "$@"
fi
# Two lanes, so the whole run stays within CI's time on two cores. The cluster tests
# spend most of their time waiting on their nodes, and read only what their own
# clusters made; beside them run the lint, the type check, the unit tests (pure) and
# the package tests (their machine has namespaces of its own). The end-to-end and
# integration tests read the whole machine's links, mounts and cgroups, so they run
# after, alone. --durations: each log shows where the time of the slow layers goes.
# The second lane's output is printed when it ends, and on any exit before that (a
# failure, ^C, CI's time limit), so what it found is never lost.
lane_log=$(mktemp)
lane_step=$(mktemp)  # the PID of the second lane's running step
lane=""
fg=""  # the PID of this lane's running step
# A process that runs: /proc has it and it is no zombie.
running() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}
# Stop test steps by their PIDs: SIGTERM, which the tests' conftest turns into an
# interrupt, so each step's fixtures clean up (clusters, daemons, a package machine
# powered off, which alone may take a minute); what still runs 150 s later is killed.
stop_steps() {
    local left pid
    [ "$#" -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    for _ in $(seq 300); do
        left=""
        for pid in "$@"; do
            if running "$pid"; then left="$left $pid"; fi
        done
        [ -z "$left" ] && return 0
        sleep 0.5
    done
    kill -KILL $left 2>/dev/null || true
}
# On any exit before the end (a failure, ^C, SIGTERM to the script or its whole process
# group, CI's time limit): the steps still running clean up, and the second lane's
# output is printed, so what it found is never lost.
finish() {
    local steps=()
    set +m  # no job notices ("Terminated") in the output
    if [ -n "$lane" ]; then
        kill "$lane" 2>/dev/null || true  # first, so it starts no next step
        steps+=($(cat "$lane_step" 2>/dev/null || true))
    fi
    if [ -n "$fg" ]; then steps+=("$fg"); fi
    stop_steps "${steps[@]}"
    if [ -n "$lane" ]; then
        echo "==> the second lane's output (packaging, unit, ruff, mypy)"
        cat "$lane_log"
    fi
    rm -f "$lane_log" "$lane_step"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
# Each test step runs in the background and is waited for: the shell then takes a
# signal at once (not after the step), and finish() knows the step's PID. With job
# control on (set -m), each step has a process group of its own, so ^C and a SIGTERM
# to this script's group reach only the script, and finish() stops the steps; without
# it a background step would ignore SIGINT, and so would every process it starts (the
# tests that interrupt a zlayerctl with SIGINT could not).
set -m
(
    set -m

    status=0
    step() {
        "$@" &
        echo "$!" >"$lane_step"
        wait "$!"
    }
    echo "==> pytest tests/packaging"
    # no cache: the two lanes would each write pytest's last-failed list over the other's
    step .venv/bin/python -m pytest -p no:cacheprovider --durations=10 tests/packaging || status=1
    echo "==> pytest tests/unit"
    step .venv/bin/python -m pytest -p no:cacheprovider -n 2 tests/unit || status=1
    echo "==> ruff"
    { .venv/bin/ruff check . && .venv/bin/ruff format --check --quiet .; } || status=1
    echo "==> mypy --strict shared daemons ctl"
    .venv/bin/mypy --strict shared daemons ctl || status=1
    exit "$status"
) >"$lane_log" 2>&1 &
lane=$!
status=0
echo "==> pytest tests/cluster (beside it: packaging, unit, ruff, mypy)"
.venv/bin/python -m pytest --durations=20 tests/cluster &
fg=$!
wait "$fg" || status=$?
fg=""
wait "$lane" || status=1
echo "==> the second lane's output (packaging, unit, ruff, mypy)"
cat "$lane_log"
lane=""
echo "==> pytest tests/e2e tests/integration"
.venv/bin/python -m pytest --durations=30 --ignore=tests/unit --ignore=tests/cluster \
    --ignore=tests/packaging &
fg=$!
wait "$fg" || status=$?
fg=""
exit "$status"
