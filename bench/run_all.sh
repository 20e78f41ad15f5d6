#!/bin/sh
# Run every ZLayer benchmark in turn; each starts and stops its own daemons
# under a temporary prefix. Uses the repository's .venv unless PYTHON is set.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-"$here/../.venv/bin/python"}
echo "== bus round trip"
"$python" "$here/bus_roundtrip.py"
echo
echo "== idle memory"
"$python" "$here/idle_rss.py"
echo
echo "== replica start (root: runs containers)"
"$python" "$here/replica_start.py"
echo
echo "== kernel L4 path (root: namespaces, nftables; wrk)"
"$python" "$here/l4_kernel.py"
