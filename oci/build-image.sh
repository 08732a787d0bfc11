#!/usr/bin/env bash
# Build a tiny busybox OCI image (image-layout tar) without any registry.
#
# Usage:
#   oci/build-image.sh [--force] [--import ADDRESS NAMESPACE]
#
# Output: <repo>/target/oci/busybox-oci.tar
#   - oci-layout, index.json, blobs/sha256/{config,manifest,gzip layer}
#   - linux/amd64, Env PATH, Cmd ["/bin/sh"]
#   - rootfs: /bin/busybox (+ applet symlinks), /etc/passwd, /etc/group
#     (root 0, vcap 2000:2000), /tmp (1777), /etc/cf-instance-credentials,
#     /home/vcap (2000:2000), /www/index.html
#
# The rootfs comes from oci/rootfs.sh. The tar is rebuilt only if missing,
# older than this script, oci/rootfs.sh or the busybox binary (or with --force).
#
# --import ADDRESS NAMESPACE imports it into a containerd as
# localhost/envoy-sidecar/busybox:latest (skipped if that image already
# points at the same manifest digest). The name comes from the
# io.containerd.image.name annotation in index.json.
set -euo pipefail

# IMAGE_NAME=pause builds the same rootfs whose command sleeps forever: the pod
# sandbox ("pause") image containerd's CRI plugin needs, made without a registry.
IMAGE_NAME="${IMAGE_NAME:-busybox}"
IMAGE_REF="localhost/envoy-sidecar/$IMAGE_NAME:latest"
case "$IMAGE_NAME" in
    busybox) IMAGE_CMD='["/bin/sh"]' ;;
    pause) IMAGE_CMD='["/bin/sleep", "2147483647"]' ;;
    *) echo "build-image.sh: IMAGE_NAME=$IMAGE_NAME; valid: busybox, pause" >&2; exit 2 ;;
esac
BUSYBOX="${BUSYBOX:-/bin/busybox}"

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
OUT_DIR="$REPO_ROOT/target/oci"
OUT="$OUT_DIR/$IMAGE_NAME-oci.tar"

force=0
import_addr=""
import_ns=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1; shift ;;
        --import)
            [ $# -ge 3 ] || { echo "usage: $0 [--force] [--import ADDRESS NAMESPACE]" >&2; exit 2; }
            import_addr="$2"; import_ns="$3"; shift 3 ;;
        -h|--help)
            sed -n '2,20p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

# Deterministic tar flags (GNU tar).
TAR_FLAGS=(--format=gnu --mtime=@0 --sort=name --owner=0 --group=0 --numeric-owner)

sha256() { sha256sum "$1" | cut -d' ' -f1; }
fsize() { stat -c %s "$1"; }

build() {
    [ -x "$BUSYBOX" ] || { echo "error: $BUSYBOX not found (apt-get install busybox-static)" >&2; exit 1; }
    if ! file_is_static "$BUSYBOX"; then
        echo "warning: $BUSYBOX does not look statically linked" >&2
    fi
    command -v jq >/dev/null || { echo "error: jq is required" >&2; exit 1; }

    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/envoy-sidecar-oci.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    umask 022

    local rootfs="$work/rootfs" layout="$work/layout"
    # The files themselves: shared with the plain runc bundles of the tests.
    BUSYBOX="$BUSYBOX" "$REPO_ROOT/oci/rootfs.sh" "$rootfs"

    # Layer: everything root-owned, except /home/vcap owned by 2000:2000
    # (appended as a second, also deterministic, tar pass).
    local layer_tar="$work/layer.tar"
    (cd "$rootfs" && tar "${TAR_FLAGS[@]}" --exclude=./home/vcap -cf "$layer_tar" .)
    (cd "$rootfs" && tar --format=gnu --mtime=@0 --sort=name --owner=2000 --group=2000 --numeric-owner \
        --no-recursion -rf "$layer_tar" ./home/vcap)
    local diff_id
    diff_id="$(sha256 "$layer_tar")"

    mkdir -p "$layout/blobs/sha256"
    gzip -n -9 -c "$layer_tar" >"$work/layer.tar.gz"
    local layer_digest layer_size
    layer_digest="$(sha256 "$work/layer.tar.gz")"
    layer_size="$(fsize "$work/layer.tar.gz")"
    mv "$work/layer.tar.gz" "$layout/blobs/sha256/$layer_digest"

    jq -cn --arg diff "sha256:$diff_id" --argjson cmd "$IMAGE_CMD" '{
        created: "1970-01-01T00:00:00Z",
        architecture: "amd64",
        os: "linux",
        config: {
            Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            Cmd: $cmd,
            WorkingDir: "/"
        },
        rootfs: { type: "layers", diff_ids: [$diff] },
        history: [ { created: "1970-01-01T00:00:00Z",
                     created_by: "envoy-sidecar oci/build-image.sh (busybox-static)" } ]
    }' | tr -d '\n' >"$work/config.json"
    local config_digest config_size
    config_digest="$(sha256 "$work/config.json")"
    config_size="$(fsize "$work/config.json")"
    mv "$work/config.json" "$layout/blobs/sha256/$config_digest"

    jq -cn \
        --arg cd "sha256:$config_digest" --argjson cs "$config_size" \
        --arg ld "sha256:$layer_digest" --argjson ls "$layer_size" '{
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs },
        layers: [ { mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls } ]
    }' | tr -d '\n' >"$work/manifest.json"
    local manifest_digest manifest_size
    manifest_digest="$(sha256 "$work/manifest.json")"
    manifest_size="$(fsize "$work/manifest.json")"
    mv "$work/manifest.json" "$layout/blobs/sha256/$manifest_digest"

    # ref.name "latest" is the OCI tag; io.containerd.image.name gives ctr
    # the full name even when imported without --index-name/--base-name.
    jq -cn --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg name "$IMAGE_REF" '{
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: [ {
            mediaType: "application/vnd.oci.image.manifest.v1+json",
            digest: $md, size: $ms,
            platform: { architecture: "amd64", os: "linux" },
            annotations: {
                "io.containerd.image.name": $name,
                "org.opencontainers.image.ref.name": "latest"
            }
        } ]
    }' | tr -d '\n' >"$layout/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

    mkdir -p "$OUT_DIR"
    (cd "$layout" && tar "${TAR_FLAGS[@]}" -cf "$work/out.tar" oci-layout index.json blobs)
    mv -f "$work/out.tar" "$OUT"
    rm -rf "$work"
    trap - EXIT
    echo "built $OUT (manifest sha256:$manifest_digest, layer diff_id sha256:$diff_id)"
}

file_is_static() {
    # No ELF interpreter => static. Avoid depending on `file`.
    ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

if [ "$force" = 1 ] || [ ! -s "$OUT" ] || [ "$SCRIPT" -nt "$OUT" ] || [ "$REPO_ROOT/oci/rootfs.sh" -nt "$OUT" ] \
    || [ "$BUSYBOX" -nt "$OUT" ]; then
    build
else
    echo "up to date: $OUT"
fi

if [ -n "$import_addr" ]; then
    command -v ctr >/dev/null || { echo "error: ctr not found" >&2; exit 1; }
    # ctr 1.6 names the image from the io.containerd.image.name annotation in
    # index.json; the image target is the manifest. Do NOT add --index-name
    # with the same name: in ctr 1.6.20 it collides with the annotated name
    # ("content digest ...: not found" during unpack); and --index-name
    # without the annotation also creates a stray "import-<date>:latest".
    want="$(tar -xOf "$OUT" index.json | jq -r '.manifests[0].digest')"
    # "images check" prints REF TYPE DIGEST STATUS... SIZE... UNPACKED.
    image_state() {
        ctr --address "$import_addr" -n "$import_ns" images check 2>/dev/null \
            | awk -v ref="$IMAGE_REF" '$1 == ref { print $3, $NF }'
    }
    have="$(image_state)"
    if [ "$have" = "$want true" ]; then
        echo "image $IMAGE_REF already imported ($want)"
    else
        ctr --address "$import_addr" -n "$import_ns" images import \
            --platform linux/amd64 "$OUT"
        have="$(image_state)"
        if [ "$have" != "$want true" ]; then
            echo "error: after import, $IMAGE_REF is '${have:-missing}', expected '$want true' (digest, unpacked)" >&2
            exit 1
        fi
        echo "imported $IMAGE_REF ($want) into namespace $import_ns"
    fi
fi
