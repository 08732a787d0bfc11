#!/usr/bin/env bash
# Populate a busybox root filesystem directory: the one layer of the test image
# (oci/build-image.sh) and the rootfs of plain runc bundles (tests/garden.rs,
# tests/nerdctl.rs), so both see the same files.
#
# Usage:
#   oci/rootfs.sh DIR
#
# DIR (created if missing; should be empty) gets:
#   /bin/busybox (+ applet symlinks), /etc/passwd, /etc/group (root 0,
#   vcap 2000:2000, nobody 65534), /etc/hosts, /tmp (1777), /root (0700),
#   /etc/cf-instance-credentials, /home/vcap (owned by 2000:2000 when run as
#   root; build-image.sh sets the owner in the tar instead), /proc, /sys,
#   /dev, /www/index.html ("hello from envoy-sidecar test app").
#
# BUSYBOX (default /bin/busybox) must be a static busybox.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
rootfs="$1"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
[ -x "$BUSYBOX" ] || { echo "error: $BUSYBOX not found (apt-get install busybox-static)" >&2; exit 1; }

umask 022
mkdir -p "$rootfs"/{bin,etc/cf-instance-credentials,root,home/vcap,tmp,www,proc,sys,dev}
install -m 0755 "$BUSYBOX" "$rootfs/bin/busybox"
for applet in $("$BUSYBOX" --list | sort -u); do
    case "$applet" in busybox|*/*|"") continue ;; esac
    ln -sf busybox "$rootfs/bin/$applet"
done
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"
chmod 0755 "$rootfs/home/vcap"
if [ "$(id -u)" = 0 ]; then
    chown 2000:2000 "$rootfs/home/vcap"
fi

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
vcap:x:2000:2000:vcap:/home/vcap:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
vcap:x:2000:
nogroup:x:65534:
EOF
cat >"$rootfs/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
EOF
printf 'hello from envoy-sidecar test app\n' >"$rootfs/www/index.html"
chmod 0644 "$rootfs"/etc/passwd "$rootfs"/etc/group "$rootfs"/etc/hosts "$rootfs"/www/index.html
