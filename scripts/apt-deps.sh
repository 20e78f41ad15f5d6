#!/usr/bin/env bash
# The Debian packages ZLayer needs, installed only where missing.
#
#   apt-deps.sh run    what running ZLayer needs
#   apt-deps.sh test   that, plus what the tests drive for real
#   apt-deps.sh bench  that for running, plus the peers the benchmarks measure against
set -euo pipefail

# busybox-static: the busybox test image (shared/busybox_image.py) is built from it
# crun (runc where crun cannot run) and conmon: agentd's container runtime
# buildah: registryd builds images with it
# tini: the static init a service with init_container: true runs as PID 1
run_packages=(python3 python3-venv dbus-daemon busybox-static crun runc conmon iproute2 nftables curl buildah tini)
# busctl and systemd-analyze (tests check units and talk to the bus with them)
# docker-registry: a real registry the WASM push and registry client tests start
# apache2-utils: htpasswd, for the registry with basic auth
# skopeo: the tests check what ZLayer pushes and pulls against skopeo's copies
# debootstrap, systemd-container (systemd-nspawn): a fresh Debian with its own systemd for the package tests
# rpm, cpio: build the .rpm and look inside it
# prometheus: a real Prometheus scrapes the daemons' metrics, promtool lints them
# etcd-server, wireguard-go: a cluster's store and its mesh (zlayerctl node init / join need them;
#   not in the run set: Debian's etcd-server starts an etcd of its own on install, unwanted on a lone node)
# etcd-client: etcdctl, to check from outside what the cluster tests' members hold
# wireguard-tools: wg, to look at the mesh's devices from outside; tcpdump: the mesh tests
#   capture the nodes' shared network and find only WireGuard packets there
# clang, lld, wasi-libc, libclang-rt-dev-wasm32: `zlayerctl wasm build` of C sources to WASI
test_packages=(systemd docker-registry apache2-utils skopeo debootstrap systemd-container rpm cpio prometheus etcd-server wireguard-go wireguard-tools tcpdump etcd-client clang lld wasi-libc libclang-rt-dev-wasm32)

# The peers bench/ measures against (bench/README.md): wrk, nginx, podman, hyperfine.
bench_packages=(wrk nginx-light podman hyperfine skopeo)

wanted=("${run_packages[@]}")
[ "${1:-run}" = test ] && wanted+=("${test_packages[@]}")
[ "${1:-run}" = bench ] && wanted+=("${bench_packages[@]}")

# python3 may come from elsewhere (pyenv, a container image): a working venv module will do.
have_python=false
python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null && have_python=true

missing=()
for pkg in "${wanted[@]}"; do
    # The tests also build the .deb, whose environment is made with Debian's own
    # python3 (packaging/build-deb.sh): there, Debian's python3-venv is needed too.
    case "$pkg" in python3|python3-venv) $have_python && [ "${1:-run}" = run ] && continue ;; esac
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Suggested, as the package suggests it: a cluster's mesh runs on wireguard-go where the
# kernel has no WireGuard module.
if [ "${1:-run}" = run ] && [ ! -d /sys/module/wireguard ] \
    && ! dpkg-query -W -f='${Status}' wireguard-go 2>/dev/null | grep -q "install ok installed"; then
    echo "note: a cluster's encrypted mesh needs wireguard-go here (no kernel WireGuard): apt-get install wireguard-go" >&2
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "==> apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
