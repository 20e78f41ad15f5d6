#!/usr/bin/env bash
# Build the zlayer-node .deb from this checkout.
#
#   packaging/build-deb.sh [OUTDIR]      (default: dist/)
#
# The package holds ZLayer in its own virtual environment, /opt/zlayer, made
# with Debian's own python3 (so it runs with the python3 the package depends
# on), the six daemons' systemd units and zlayer.target, the D-Bus system bus
# policy and the interfaces' introspection XML. zlayerctl and the daemons are
# linked into /usr/bin, where the units expect them. The maintainer scripts
# (packaging/deb/) start zlayer.target on install and stop it on removal.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist}" && cd "${1:-$here/dist}" && pwd)
python=/usr/bin/python3   # Debian's, not whatever python3 is first on PATH
prefix=/opt/zlayer
daemons=(schedd agentd registryd overlayd proxyd apid)

for tool in "$python" dpkg-deb dpkg; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh needs $tool" >&2; exit 1; }
done
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$here/pyproject.toml")
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
arch=$(dpkg --print-architecture)

stage=$(mktemp -d /tmp/zlayer-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"

echo "==> virtual environment in $prefix ($("$python" --version))"
"$python" -m venv "$root$prefix"
"$root$prefix/bin/pip" install --quiet --disable-pip-version-check --no-compile "$here"
"$root$prefix/bin/pip" uninstall --quiet --yes pip
# The environment was made under the staging directory: point every script at
# where it will live.
grep -rlI --null "$root" "$root$prefix/bin" "$root$prefix/pyvenv.cfg" | xargs -0 -r sed -i "s#$root##g"
find "$root$prefix" -name '__pycache__' -type d -prune -exec rm -rf {} +
rm -rf "$root$prefix"/lib/python*/site-packages/*.dist-info/RECORD

echo "==> commands, units, bus policy"
install -d "$root/usr/bin"
for name in zlayerctl "${daemons[@]/#/zlayer-}"; do
    ln -s "$prefix/bin/$name" "$root/usr/bin/$name"
done
install -d "$root/lib/systemd/system"
install -m 0644 "$here"/units/*.service "$here/units/zlayer.target" "$root/lib/systemd/system/"
install -d "$root/usr/share/dbus-1/system.d" "$root/usr/share/dbus-1/interfaces"
install -m 0644 "$here/units/dbus/org.zlayer.conf" "$root/usr/share/dbus-1/system.d/"
install -m 0644 "$here"/units/dbus/org.zlayer.*1.xml "$root/usr/share/dbus-1/interfaces/"
install -d "$root/usr/share/doc/zlayer-node"
install -m 0644 "$here/README.md" "$root/usr/share/doc/zlayer-node/"
install -d "$root/etc/zlayer"

echo "==> control"
install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@PYVER@/$pyver/" -e "s/@PYNEXT@/$pynext/" \
    "$here/packaging/deb/control" > "$root/DEBIAN/control"
for script in postinst prerm postrm; do
    install -m 0755 "$here/packaging/deb/$script" "$root/DEBIAN/$script"
done

deb="$out/zlayer-node_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
