#!/usr/bin/env bash
# Lay out an installed ZLayer under ROOT, as both packages ship it.
#
#   packaging/stage.sh ROOT PYTHON UNITDIR [ZSHDIR]
#
# ROOT     the package's root (a staging directory, or rpmbuild's buildroot)
# PYTHON   the distribution's own python3, which the package will depend on
# UNITDIR  where the distribution keeps systemd units (/lib/systemd/system on
#          Debian, /usr/lib/systemd/system on Fedora)
# ZSHDIR   where the distribution's zsh finds a vendor's completions
#          (/usr/share/zsh/vendor-completions on Debian, the default;
#          /usr/share/zsh/site-functions on Fedora)
#
# ZLayer goes into a virtual environment in /opt/zlayer made with PYTHON;
# zlayerctl and the daemons are linked into /usr/bin, where the units expect
# them; the units, the D-Bus policy and interface XML, the README and the
# helpers the maintainer scripts share (stop-deployments, compile-bytecode) go where the
# distribution looks for them, with zlayerctl's shell completions (bash, zsh,
# fish) and a man page per command, made from its click commands
# (packaging/shelldocs.py).
set -euo pipefail

root=${1:?ROOT}
python=${2:?PYTHON}
unitdir=${3:?UNITDIR}
zshdir=${4:-/usr/share/zsh/vendor-completions}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/opt/zlayer
daemons=(schedd agentd registryd overlayd proxyd apid)

echo "==> virtual environment in $prefix ($("$python" --version))"
"$python" -m venv "$root$prefix"
"$root$prefix/bin/pip" install --quiet --disable-pip-version-check --no-compile "$here"

echo "==> shell completions and man pages"
# click-man is needed for this step only: it goes beside the environment, not in it.
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$root$prefix/bin/pip" install --quiet --disable-pip-version-check --no-compile --no-deps \
    --target "$tools" 'click-man>=0.6'
PYTHONPATH=$tools PYTHONDONTWRITEBYTECODE=1 \
    "$root$prefix/bin/python" "$here/packaging/shelldocs.py" "$root" --zsh-dir "$zshdir"

# setuptools too (Python 3.11's venv installs it): nothing runs it, and its .pth file
# imports a module and adds an import hook to every start, zlayerctl's included.
"$root$prefix/bin/pip" uninstall --quiet --yes setuptools pip
# The environment was made under ROOT: point every script at where it will live.
grep -rlI --null "$root" "$root$prefix/bin" "$root$prefix/pyvenv.cfg" | xargs -0 -r sed -i "s#$root##g"
find "$root$prefix" -name '__pycache__' -type d -prune -exec rm -rf {} +
rm -rf "$root$prefix"/lib/python*/site-packages/*.dist-info/RECORD

echo "==> commands, units, bus policy"
install -d "$root/usr/bin" "$root$prefix/libexec"
for name in zlayerctl "${daemons[@]/#/zlayer-}"; do
    ln -s "$prefix/bin/$name" "$root/usr/bin/$name"
done
install -m 0755 "$here/packaging/stop-deployments" "$root$prefix/libexec/stop-deployments"
install -m 0755 "$here/packaging/compile-bytecode" "$root$prefix/libexec/compile-bytecode"
install -d "$root$unitdir"
install -m 0644 "$here"/units/*.service "$here/units/zlayer.target" "$root$unitdir/"
install -d "$root/usr/share/dbus-1/system.d" "$root/usr/share/dbus-1/interfaces"
install -m 0644 "$here/units/dbus/org.zlayer.conf" "$root/usr/share/dbus-1/system.d/"
install -m 0644 "$here"/units/dbus/org.zlayer.*1.xml "$root/usr/share/dbus-1/interfaces/"
install -d "$root/usr/share/doc/zlayer-node"
install -m 0644 "$here/README.md" "$root/usr/share/doc/zlayer-node/"
install -d "$root/etc/zlayer"
