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

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check --quiet .
echo "==> mypy --strict shared daemons ctl"
.venv/bin/mypy --strict shared daemons ctl
echo "==> pytest"
if [ "$#" -gt 0 ] || ! .venv/bin/python -c "import xdist" 2>/dev/null; then
    exec .venv/bin/python -m pytest "$@"
fi
# The unit tests are pure and independent of each other: two workers (pytest-xdist) take
# them; the integration and end-to-end tests share the machine's network and run in order.
status=0
.venv/bin/python -m pytest -n 2 tests/unit || status=$?
# --durations: every log shows where the time of the slow layers goes.
.venv/bin/python -m pytest --durations=30 --ignore=tests/unit || status=$?
exit "$status"
