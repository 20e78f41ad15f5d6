#!/bin/sh
# Run every ZLayer benchmark in turn (see bench/README.md); each that needs the
# daemons starts and stops its own under a temporary prefix. A benchmark that
# fails (a missing tool, not root, an error) does not stop the others: the
# list of those that failed, with their exit codes, is printed at the end and
# the script then exits 1.
#
#   bench/run_all.sh                     # all of them
#   bench/run_all.sh startup pull        # only these, in this order
#
# Uses the repository's .venv unless PYTHON is set.
set -u
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-"$here/../.venv/bin/python"}
# this checkout's zlayerctl and daemons before any installed elsewhere on PATH
PATH="$(dirname "$python"):$PATH"
export PATH

all="startup bus_roundtrip idle_rss wasm_inspect replica_start l4_kernel proxy_http restart pull api wasm_run build cluster up_first"
if [ "$#" -gt 0 ]; then
    selected="$*"
else
    selected=$all
fi

describe() {
    case "$1" in
        startup) echo "zlayerctl start-up against podman --version" ;;
        bus_roundtrip) echo "bus round trip" ;;
        idle_rss) echo "idle memory of the six daemons" ;;
        wasm_inspect) echo "wasm info against wasmtime's compile" ;;
        replica_start) echo "replica start (root: runs containers)" ;;
        l4_kernel) echo "kernel L4 path (root: namespaces, nftables; wrk)" ;;
        proxy_http) echo "HTTP proxy against nginx (wrk, nginx)" ;;
        restart) echo "requests lost to daemon restarts against nginx -s reload (root, nginx)" ;;
        pull) echo "image pull against skopeo (docker-registry, skopeo)" ;;
        api) echo "REST API against the bus call it makes" ;;
        wasm_run) echo "WebAssembly replicas against wasmtime run/serve (root, wrk)" ;;
        build) echo "image build against buildah bud (root: buildah)" ;;
        cluster) echo "cluster placement against a naive first fit" ;;
        up_first) echo "up -b to the first 200 against podman run -d (root)" ;;
        *) echo "$1" ;;
    esac
}

failed=""
ran=0
for name in $selected; do
    script="$here/$name.py"
    echo "== $name: $(describe "$name")"
    if [ ! -f "$script" ]; then
        echo "no benchmark named $name (known: $all)"
        failed="$failed $name(unknown)"
        echo
        continue
    fi
    ran=$((ran + 1))
    if "$python" "$script"; then
        :
    else
        code=$?
        echo "-- $name failed with exit code $code; going on with the next"
        failed="$failed $name(exit $code)"
    fi
    echo
done

if [ -n "$failed" ]; then
    echo "== done: $ran ran; failed:$failed"
    exit 1
fi
echo "== done: all $ran benchmarks ran"
