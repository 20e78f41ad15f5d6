#!/usr/bin/env bash
# Build the zlayer-node .rpm from this checkout with rpmbuild.
#
#   packaging/build-rpm.sh [OUTDIR]      (default: dist/)
#
# On Fedora or RHEL this is the package for that release. Elsewhere (a Debian
# build machine with the rpm package) set ZLAYER_RPM_NODEPS=1: the build then
# skips BuildRequires, which the host's rpm database cannot answer, and the
# package holds a virtual environment for the host's python3, not the target's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist}" && cd "${1:-$here/dist}" && pwd)
python=/usr/bin/python3
command -v rpmbuild >/dev/null || { echo "build-rpm.sh needs rpmbuild" >&2; exit 1; }
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$here/pyproject.toml")

top=$(mktemp -d /tmp/zlayer-rpm.XXXXXX)
trap 'rm -rf "$top"' EXIT
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS,BUILDROOT}
# The source is what git tracks (plus uncommitted edits to tracked files).
tar -C "$here" --transform "s#^#zlayer-node-$version/#" -czf "$top/SOURCES/zlayer-node-$version.tar.gz" \
    $(cd "$here" && git ls-files)
nodeps=()
[ "${ZLAYER_RPM_NODEPS:-0}" = 1 ] && nodeps=(--nodeps)
rpmbuild -bb "${nodeps[@]}" --quiet \
    --define "_topdir $top" --define "zl_version $version" --define "zl_python $python" \
    "$here/packaging/rpm/zlayer-node.spec" >"$top/build.log" 2>&1 || { tail -30 "$top/build.log" >&2; exit 1; }
find "$top/RPMS" -name '*.rpm' -exec cp {} "$out/" \; -printf "$out/%f\n"
