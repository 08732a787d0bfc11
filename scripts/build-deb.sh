#!/usr/bin/env bash
# `make deb`: target/envoy-sidecar_<version>_amd64.deb from the release build, with
# dpkg-deb (no debhelper: the layout is the product's own `install --root` output,
# moved to Debian's places), then lintian when it is installed (errors fail the build).
#
# Debian's places: binaries in /usr/bin (never /usr/local), the containerd drop-in and
# the configuration as conffiles, systemd units in /lib/systemd/system (the gc timer
# enabled, the serve-metrics service not), hooks.d files for podman/CRI-O, the
# RuntimeClass manifest in /usr/share/envoy-sidecar, completions, man pages (gzipped).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=amd64
name="envoy-sidecar_${version}_${arch}"
out="target/${name}.deb"
stage="target/deb/${name}"
staged="target/deb/install-root"
bin=target/release

[ -x "$bin/envoy-sidecar" ] && [ -x "$bin/envoy-sidecar-runc" ] \
    || { echo "build-deb.sh: run 'make release' first" >&2; exit 1; }

rm -rf "$stage" "$staged"
mkdir -p "$stage/DEBIAN"
# What `install` writes, for a wrapper at /usr/bin (drop-in in config version 2:
# containerd 1.6/1.7 read it, 2.x migrates it), staged.
"$bin/envoy-sidecar" install --root "$staged" --containerd /nonexistent/containerd \
    --binary-name /usr/bin/envoy-sidecar-runc >/dev/null

put() { # put MODE SRC DEST: DEST below the package root, /usr/local/bin -> /usr/bin
    install -D -m "$1" "$2" "$stage/$3"
    sed -i 's|/usr/local/bin/|/usr/bin/|g' "$stage/$3" 2>/dev/null || true
}
install -D -m 0755 "$bin/envoy-sidecar" "$stage/usr/bin/envoy-sidecar"
install -D -m 0755 "$bin/envoy-sidecar-runc" "$stage/usr/bin/envoy-sidecar-runc"
put 0644 "$staged/etc/envoy-sidecar/config.toml" etc/envoy-sidecar/config.toml
put 0644 "$staged/etc/containerd/conf.d/envoy-sidecar.toml" etc/containerd/conf.d/envoy-sidecar.toml
for u in envoy-sidecar-gc.service envoy-sidecar-gc.timer; do
    put 0644 "$staged/etc/systemd/system/$u" "lib/systemd/system/$u"
done
put 0644 hooks/envoy-sidecar-metrics.service lib/systemd/system/envoy-sidecar-metrics.service
for h in "$staged"/usr/share/containers/oci/hooks.d/*.json; do
    put 0644 "$h" "usr/share/containers/oci/hooks.d/$(basename "$h")"
done
put 0644 hooks/runtimeclass.yaml usr/share/envoy-sidecar/runtimeclass.yaml
for c in usr/share/bash-completion/completions/envoy-sidecar \
         usr/share/zsh/vendor-completions/_envoy-sidecar \
         usr/share/fish/vendor_completions.d/envoy-sidecar.fish; do
    put 0644 "$staged/$c" "$c"
done
mkdir -p "$stage/usr/share/man/man1"
for m in "$staged"/usr/share/man/man1/*.1; do
    gzip -9n -c "$m" >"$stage/usr/share/man/man1/$(basename "$m").gz"
done
doc="$stage/usr/share/doc/envoy-sidecar"
mkdir -p "$doc"
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: envoy-sidecar

Files: *
Copyright: 2026 the envoy-sidecar authors
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found
 in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
commit=$("$bin/envoy-sidecar" --version | sed -n 's/.*(\(.*\)).*/\1/p')
{
    echo "envoy-sidecar ($version) unstable; urgency=medium"
    echo
    echo "  * Built from commit $commit."
    echo
    echo " -- envoy-sidecar maintainers <envoy-sidecar@example.org>  $(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n >"$doc/changelog.gz"
find "$stage" -type d -exec chmod 0755 {} +

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: envoy-sidecar
Version: $version
Architecture: $arch
Maintainer: envoy-sidecar maintainers <envoy-sidecar@example.org>
Installed-Size: $size
Depends: libc6 (>= 2.34), runc, nftables
Recommends: containerd
Suggests: envoy
Section: admin
Priority: optional
Homepage: https://example.org/envoy-sidecar
Description: TLS-terminating Envoy in front of every container
 A runc-compatible runtime wrapper and OCI hooks that give each container a
 per-container Envoy terminating TLS (optionally mutual TLS) with an instance
 identity certificate from the operator's CA, host port NAT to it, a raised
 memory limit and metrics rescaled to the requested quota, for containerd (ctr,
 Kubernetes CRI, nerdctl), Garden, podman and CRI-O. Envoy itself is not
 packaged: set proxy.envoy_path in /etc/envoy-sidecar/config.toml.
CONTROL
cat >"$stage/DEBIAN/conffiles" <<CONFFILES
/etc/containerd/conf.d/envoy-sidecar.toml
/etc/envoy-sidecar/config.toml
CONFFILES
cat >"$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    systemctl enable --now envoy-sidecar-gc.timer >/dev/null || true
fi
POSTINST
cat >"$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl disable --now envoy-sidecar-gc.timer envoy-sidecar-metrics.service >/dev/null 2>&1 || true
fi
PRERM
cat >"$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = purge ]; then
    # What install records and gc's timer state; never a container's state under /run.
    rm -rf /var/lib/envoy-sidecar
    rmdir /etc/envoy-sidecar /etc/containerd/conf.d 2>/dev/null || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "build-deb.sh: $out ($(du -h "$out" | cut -f1))"
if command -v lintian >/dev/null; then
    # Errors fail the build; warnings are printed.
    lintian --fail-on error --tag-display-limit 0 "$out"
    echo "build-deb.sh: lintian: no errors"
fi
