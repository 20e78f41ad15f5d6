#!/usr/bin/env bash
# Build the zlayer-node .deb from this checkout.
#
#   packaging/build-deb.sh [OUTDIR]      (default: dist/)
#
# ZLAYER_DEB_COMPRESSION (xz) is dpkg-deb's -Z: the tests pack with gzip, since
# xz takes minutes on two cores and the package's contents are the same.
#
# The package holds what packaging/stage.sh lays out (ZLayer in its own
# virtual environment, /opt/zlayer, made with Debian's own python3, so it runs
# with the python3 the package depends on; zlayerctl and the daemons in
# /usr/bin; the units, zlayer.target and the D-Bus policy). The maintainer
# scripts (packaging/deb/) start zlayer.target on install and stop the
# deployments and the daemons on removal.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist}" && cd "${1:-$here/dist}" && pwd)
python=/usr/bin/python3   # Debian's, not whatever python3 is first on PATH

for tool in "$python" dpkg-deb dpkg; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh needs $tool" >&2; exit 1; }
done
"$python" -c 'import venv, ensurepip' 2>/dev/null ||
    { echo "build-deb.sh needs Debian's python3-venv (apt-get install python3-venv)" >&2; exit 1; }
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$here/pyproject.toml")
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
arch=$(dpkg --print-architecture)

stage=$(mktemp -d /tmp/zlayer-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"

"$here/packaging/stage.sh" "$root" "$python" /lib/systemd/system

echo "==> control"
install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@PYVER@/$pyver/" -e "s/@PYNEXT@/$pynext/" \
    "$here/packaging/deb/control" > "$root/DEBIAN/control"
for script in postinst prerm postrm; do
    install -m 0755 "$here/packaging/deb/$script" "$root/DEBIAN/$script"
done
# The daemons' bytecode of the standard library is made again when it changes (postinst).
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
echo "interest-noawait $stdlib" > "$root/DEBIAN/triggers"

deb="$out/zlayer-node_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"${ZLAYER_DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
echo "$deb"
