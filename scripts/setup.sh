#!/usr/bin/env bash
# Install ZLayer from this checkout and start it on this node.
#
#   sudo ./scripts/setup.sh
#
# Installs the Debian packages ZLayer needs, puts ZLayer into its own virtual
# environment (ZLAYER_HOME, default /opt/zlayer), links zlayerctl and the six
# daemons into /usr/local/bin, then starts the daemons: under systemd where
# systemd runs (units, D-Bus policy, zlayer.target), with the built-in
# supervisor (`zlayerctl daemon run --detach`) everywhere else, and shows
# `zlayerctl status`, then brings up the example web deployment (three busybox
# httpd replicas) and fetches a page from one of them. Safe to run again: it
# upgrades in place and redeploys.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${ZLAYER_HOME:-/opt/zlayer}
bindir=/usr/local/bin
daemons=(schedd agentd registryd overlayd proxyd apid)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh installs system packages and services: run it as root (sudo $0)" >&2
    exit 1
fi

"$here/scripts/apt-deps.sh" run

echo "==> installing ZLayer into $home"
python3 -m venv "$home"
"$home/bin/pip" install --quiet --upgrade pip
"$home/bin/pip" install --quiet "$here"
for name in zlayerctl "${daemons[@]/#/zlayer-}"; do
    ln -sf "$home/bin/$name" "$bindir/$name"
done

if [ -d /run/systemd/system ]; then
    echo "==> installing systemd units and the D-Bus policy"
    for unit in "$here"/units/*.service "$here"/units/zlayer.target; do
        sed "s#/usr/bin/zlayer-#$bindir/zlayer-#" "$unit" > "/etc/systemd/system/$(basename "$unit")"
    done
    install -m 0644 "$here/units/dbus/org.zlayer.conf" /etc/dbus-1/system.d/org.zlayer.conf
    install -d /usr/share/dbus-1/interfaces
    install -m 0644 "$here"/units/dbus/org.zlayer.*1.xml /usr/share/dbus-1/interfaces/
    systemctl reload dbus || true
    systemctl daemon-reload
    systemctl enable --now zlayer.target
else
    echo "==> no systemd here: starting the built-in supervisor"
    if ! "$bindir/zlayerctl" status >/dev/null 2>&1; then
        "$bindir/zlayerctl" daemon run --detach
    fi
fi

# The busybox test image, where zlayer-registryd can read it (its unit has a
# private /tmp and no /home).
echo "==> importing the busybox test image as zlayer/busybox:latest"
"$home/bin/python" -m shared.busybox_image "$home/share/images/busybox" >/dev/null
"$bindir/zlayerctl" image import "$home/share/images/busybox/oci" --name zlayer/busybox:latest ||
    echo "warning: could not import the busybox test image; see \`zlayerctl status\`" >&2

"$bindir/zlayerctl" status

# The main job: the example web deployment (busybox httpd, 3 replicas) on this node.
echo "==> deploying examples/static-web.zlayer.yml"
"$bindir/zlayerctl" up -d "$here/examples/static-web.zlayer.yml"
"$bindir/zlayerctl" ps
"$bindir/zlayerctl" ps --containers
address=$("$bindir/zlayerctl" ps --containers --format json |
    "$home/bin/python" -c 'import json, sys; print(json.load(sys.stdin)[0]["address"])')
echo "==> curl http://$address:8080/ (one replica, on the node network)"
curl -fsS "http://$address:8080/"

# The same page through the node's front door: proxyd on the http endpoint's
# port (80), and the tcp endpoint on 9080 by nftables DNAT. Routes follow
# within a second.
for url in http://127.0.0.1/ http://127.0.0.1:9080/; do
    echo "==> curl $url"
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        curl -fsS "$url" && break
        sleep 1
    done
done
"$bindir/zlayerctl" routes
echo "==> a replica resolves web.service.local (the service DNS)"
"$bindir/zlayerctl" exec web -d static-web -- nslookup web.service.local
