#!/usr/bin/env bash
# Builds fieldgate's Debian package from an already built binary, with plain dpkg-deb.
#
#   scripts/package-deb.sh BINARY ARCH OUTDIR      # ARCH: amd64 or arm64
#
# Writes OUTDIR/fieldgate_VERSION_ARCH.deb (VERSION from Cargo.toml) and prints its path.
# Contents: /usr/bin/fieldgate, /etc/fieldgate/fieldgate.toml (a conffile: the embedded
# default config with data_dir = /var/lib/fieldgate), the hardened systemd unit,
# docs and example configs; the maintainer scripts in packaging/deb/ create the
# `fieldgate` user and /var/lib/fieldgate (0700). Used by scripts/release.sh and by
# tests/packaging.rs (on the debug binary: no release build needed).
# FIELDGATE_DEB_COMPRESSION (xz by default) is dpkg-deb's -Z: the tests use `none`, as
# xz takes minutes on a 230 MB debug binary.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 BINARY ARCH OUTDIR" >&2
    exit 2
fi
BINARY=$1
ARCH=$2
OUTDIR=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)

case "$ARCH" in amd64|arm64) ;; *) echo "package-deb: ARCH must be amd64 or arm64, not $ARCH" >&2; exit 2 ;; esac
[ -x "$BINARY" ] || { echo "package-deb: $BINARY is not an executable file" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "package-deb: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }

# The first `version = "..."` of Cargo.toml is [workspace.package]'s.
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -n 1)
[ -n "$VERSION" ] || { echo "package-deb: no version in $ROOT/Cargo.toml" >&2; exit 1; }

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/fieldgate-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/fieldgate

install -D -m 0755 "$BINARY" "$PKG/usr/bin/fieldgate"
install -D -m 0644 "$ROOT/deploy/systemd/fieldgate.service" "$PKG/lib/systemd/system/fieldgate.service"

# The conffile: the embedded default, its data_dir moved to the package's data dir.
DEFAULT="$ROOT/src/config/default.toml"
grep -q '^data_dir = "./data"$' "$DEFAULT" || {
    echo "package-deb: $DEFAULT no longer sets data_dir = \"./data\"; update this script" >&2
    exit 1
}
install -d -m 0755 "$PKG/etc/fieldgate"
{
    echo "# /etc/fieldgate/fieldgate.toml: fieldgate's config (\`fieldgate default-config\`"
    echo "# prints the embedded default this file starts from; every key is in"
    echo "# /usr/share/doc/fieldgate/CONFIG.md). Check an edit with"
    echo "#   fieldgate check /etc/fieldgate/fieldgate.toml"
    echo "# then \`systemctl restart fieldgate\`. data_dir must stay /var/lib/fieldgate, the"
    echo "# only path the systemd unit lets the service write (ReadWritePaths)."
    echo "# Devices on other hosts: set sources.*.address to 0.0.0.0:PORT. A port below"
    echo "# 1024 needs CAP_NET_BIND_SERVICE: see /usr/share/doc/fieldgate/DEPLOY.md."
    echo "# The console sink writes every event to the journal; drop it in production."
    echo
    sed 's|^data_dir = "./data"$|data_dir = "/var/lib/fieldgate"|' "$DEFAULT"
} > "$PKG/etc/fieldgate/fieldgate.toml"
chmod 0644 "$PKG/etc/fieldgate/fieldgate.toml"

DOC=$PKG/usr/share/doc/fieldgate
install -d -m 0755 "$DOC/examples"
install -m 0644 "$ROOT/README.md" "$ROOT/docs/DEPLOY.md" "$ROOT/docs/CONFIG.md" "$DOC/"
install -m 0644 "$ROOT"/examples/*.toml "$DOC/examples/"
install -d -m 0755 "$DOC/deploy"
cp -r "$ROOT/deploy/grafana" "$ROOT/deploy/prometheus" "$DOC/deploy/"
find "$DOC" -type d -exec chmod 0755 {} + && find "$DOC" -type f -exec chmod 0644 {} +

install -d -m 0755 "$PKG/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$ROOT/packaging/deb/$script" "$PKG/DEBIAN/$script"
done
echo /etc/fieldgate/fieldgate.toml > "$PKG/DEBIAN/conffiles"
(cd "$PKG" && find usr lib -type f -exec md5sum {} + | sort -k 2) > "$PKG/DEBIAN/md5sums"
INSTALLED_KB=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: fieldgate
Version: $VERSION
Architecture: $ARCH
Maintainer: fieldgate maintainers <fieldgate@localhost>
Installed-Size: $INSTALLED_KB
Depends: passwd
Section: net
Priority: optional
Description: lightweight IoT edge gateway with durable store-and-forward
 Devices connect over TCP; every event goes through a bounded pipeline into a
 disk-backed buffer in front of each sink and on to the cloud over MQTT
 (3.1.1 or 5, QoS 0/1/2, TLS). An acknowledged event is never lost.
 .
 Runs as the systemd service fieldgate.service (Type=notify, hardened) as the
 fieldgate user, with its data in /var/lib/fieldgate.
CONTROL

mkdir -p "$OUTDIR"
OUT="$OUTDIR/fieldgate_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"${FIELDGATE_DEB_COMPRESSION:-xz}" --build "$PKG" "$OUT" >/dev/null
echo "$OUT"
