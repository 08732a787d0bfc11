#!/usr/bin/env bash
# A cgroup v2 guest for the tests that touch cgroups: Debian bookworm booted in qemu
# (TCG: this machine's /dev/kvm is nested PVM, which a stock kernel cannot run on) with
# systemd as init and the unified hierarchy, built from Debian's packages only.
#
# Usage: tests/env/vm.sh build|up|down|status|run CMD...|test
#
#   build   mmdebstrap --variant=minbase of bookworm with the packages below, made into
#           an ext4 image (mkfs.ext4 -d). Cached under $BASE/<hash>, the hash of the
#           package list, the mirror and the guest's set-up (rebuilt only when those
#           change). About 95 s on this machine kind.
#   up      build, then boot it (about 40 s to ssh) on a throw-away qcow2 overlay (the
#           cached image stays pristine), with this checkout shared over 9p at the same
#           absolute path (the test binaries find the product through paths compiled
#           in) and /usr/local/bin read-only (Envoy is installed from it). Idempotent.
#   down    power the guest off (its pid, recorded at boot; SIGKILL after 30 s).
#   status  whether it runs; exit 3 if not.
#   run     a command inside the guest, as root, in this checkout's directory.
#   test    build the suite's test binaries on the host (cargo test --no-run), up, the
#           cgroup v2 suite inside (tests/env/vm-suite.sh run), down.
#
# Environment: ES_VM_SSH_PORT (default 2222, on 127.0.0.1 only), ES_DEBIAN_MIRROR.
# The guest's NIC is qemu's user-mode network (its own 10.0.2.0/24, nothing on the
# host); the tests inside make their own networks, as on the host.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SCRIPT")"
REPO="$(cd "$HERE/../.." && pwd)"
BASE=/var/lib/envoy-sidecar-vm
RUN=/run/envoy-sidecar-vm
MIRROR="${ES_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PORT="${ES_VM_SSH_PORT:-2222}"
KEY=$BASE/id_ed25519
# tests/env/stack.sh's engine stacks, shared read-only at the same path: the guest runs
# the suite with Debian unstable's containerd 2.x / runc 1.3 too.
STACKS=/var/lib/envoy-sidecar-stacks
SSH_TIMEOUT=300

# The guest's packages: the engines (bookworm's containerd 1.6 and runc 1.1) and what
# the tests call (ip, nft, conntrack, openssl, python3, CNI's bridge, busybox).
PACKAGES="linux-image-amd64 systemd-sysv udev dbus openssh-server kmod procps
containerd runc containernetworking-plugins nftables iptables iproute2 conntrack
busybox-static curl python3 openssl jq umoci ca-certificates"

log() { echo "vm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    echo "usage: $0 build|up|down|status|run CMD...|test" >&2
    exit 2
}

# The guest's set-up, run by mmdebstrap on the unpacked tree ($1). Part of the cache
# hash (declare -f), so editing it rebuilds the image.
customize_guest() {
    local root=$1 pub=$2
    echo envoy-sidecar-v2 > "$root/etc/hostname"
    printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$root/etc/fstab"
    install -d -m 0700 "$root/root/.ssh"
    install -m 0600 "$pub" "$root/root/.ssh/authorized_keys"
    cat > "$root/etc/systemd/network/10-nic.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
EOF
    chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
    # The tests start their own private containerd, as on the host.
    chroot "$root" systemctl mask containerd.service >/dev/null 2>&1
    # Nothing waits for a network that is up once DHCP answers.
    chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1
    printf 'UseDNS no\n' > "$root/etc/ssh/sshd_config.d/envoy-sidecar.conf"
    # A kernel panic reboots instead of hanging the run until its time-out.
    printf 'kernel.panic = 10\n' > "$root/etc/sysctl.d/90-envoy-sidecar.conf"
}

image_hash() {
    { echo "$PACKAGES"; echo "$MIRROR"; declare -f customize_guest; } | sha256sum | cut -c1-16
}
IMG_DIR=$BASE/$(image_hash)

# The checkout is mounted cache=loose (2-3x faster than uncached for the suite's many
# execs of the product), which trusts cached pages and dentries: drop them before each
# command, so a binary rebuilt on the host since the guest booted is read afresh.
DROP_CACHES='sync; echo 3 > /proc/sys/vm/drop_caches'

ssh_() {
    ssh -i "$KEY" -p "$PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR -o ConnectTimeout=5 -o ServerAliveInterval=15 \
        -o ServerAliveCountMax=8 -o BatchMode=yes root@127.0.0.1 "$@"
}

cmd_build() {
    [ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, mkfs)"
    if [ -f "$IMG_DIR/ready" ]; then
        log "image $IMG_DIR (cached)"
        return 0
    fi
    command -v mmdebstrap >/dev/null || die "mmdebstrap not found (scripts/install-deps.sh)"
    command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (e2fsprogs)"
    install -d -m 0700 "$BASE"
    [ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -C envoy-sidecar-vm -f "$KEY"
    local tmp=$IMG_DIR.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local start=$SECONDS
    log "building the guest in $IMG_DIR (mmdebstrap bookworm, $MIRROR)"
    # mmdebstrap runs hooks with sh: hand it the function as a script.
    { declare -f customize_guest; echo 'customize_guest "$@"'; } > "$tmp/customize.sh"
    mmdebstrap --quiet --variant=minbase --mode=root --format=directory \
        --include="$(echo $PACKAGES | tr ' ' ,)" \
        --customize-hook="bash $tmp/customize.sh \"\$1\" $KEY.pub" \
        bookworm "$tmp/rootfs" "$MIRROR" \
        || die "mmdebstrap failed"
    cp "$tmp"/rootfs/boot/vmlinuz-* "$tmp/vmlinuz"
    cp "$tmp"/rootfs/boot/initrd.img-* "$tmp/initrd.img"
    mkfs.ext4 -q -L envoy-sidecar-v2 -d "$tmp/rootfs" "$tmp/disk.raw" 8G \
        || die "mkfs.ext4 failed"
    rm -rf "$tmp/rootfs"
    touch "$tmp/ready"
    rm -rf "$IMG_DIR"
    mv "$tmp" "$IMG_DIR"
    # Older images (another package list) are of no further use.
    find "$BASE" -mindepth 1 -maxdepth 1 -type d ! -path "$IMG_DIR" -exec rm -rf {} +
    log "image built in $((SECONDS - start)) s ($(du -sh "$IMG_DIR" | cut -f1))"
}

running() {
    [ -f "$RUN/qemu.pid" ] && kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null
}

cmd_up() {
    if running; then
        log "guest already running (pid $(cat "$RUN/qemu.pid"))"
        return 0
    fi
    cmd_build
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (scripts/install-deps.sh)"
    mkdir -p "$STACKS"
    if ss -ltnH "sport = :$PORT" | grep -q .; then
        die "127.0.0.1:$PORT is taken; set ES_VM_SSH_PORT"
    fi
    mkdir -p "$RUN"
    rm -f "$RUN/overlay.qcow2" "$RUN/console.log"
    qemu-img create -q -f qcow2 -b "$IMG_DIR/disk.raw" -F raw "$RUN/overlay.qcow2"
    local start=$SECONDS
    qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 4096 -machine q35 \
        -kernel "$IMG_DIR/vmlinuz" -initrd "$IMG_DIR/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 quiet" \
        -drive "file=$RUN/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -virtfs "local,path=$REPO,mount_tag=repo,security_model=none,id=repo" \
        -virtfs "local,path=/usr/local/bin,mount_tag=hostbin,security_model=none,readonly=on,id=hostbin" \
        -virtfs "local,path=$STACKS,mount_tag=stacks,security_model=none,readonly=on,id=stacks" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0 \
        -display none -serial "file:$RUN/console.log" -monitor none \
        -daemonize -pidfile "$RUN/qemu.pid" \
        || die "qemu failed to start"
    log "booting (pid $(cat "$RUN/qemu.pid"), console $RUN/console.log)"
    until ssh_ true 2>/dev/null; do
        running || { tail -20 "$RUN/console.log" >&2; die "qemu exited during boot"; }
        [ $((SECONDS - start)) -lt $SSH_TIMEOUT ] \
            || { tail -20 "$RUN/console.log" >&2; die "no ssh after ${SSH_TIMEOUT}s"; }
        sleep 2
    done
    ssh_ "set -e
        mkdir -p '$REPO' /mnt/hostbin '$STACKS'
        mountpoint -q '$STACKS' || mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose,ro stacks '$STACKS'
        mountpoint -q '$REPO' || mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose repo '$REPO'
        mountpoint -q /mnt/hostbin || mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,ro hostbin /mnt/hostbin
        install -m 0755 /mnt/hostbin/envoy /usr/local/bin/envoy" \
        || die "mounting the shares in the guest failed"
    log "guest up in $((SECONDS - start)) s: $(ssh_ 'echo "$(uname -r), $(stat -fc %T /sys/fs/cgroup), containerd $(containerd --version | cut -d" " -f3), runc $(runc --version | sed -n "1s/.* //p")"')"
}

cmd_down() {
    running || { log "guest not running"; rm -rf "$RUN"; return 0; }
    local pid
    pid=$(cat "$RUN/qemu.pid")
    ssh_ 'systemctl poweroff' >/dev/null 2>&1 || true
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "guest did not power off in 30 s: SIGKILL $pid"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$RUN"
    log "guest down"
}

[ $# -ge 1 ] || usage
CMD=$1
shift
case "$CMD" in
    build) cmd_build ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status)
        if running; then echo "running (pid $(cat "$RUN/qemu.pid"), ssh 127.0.0.1:$PORT)"; else echo "not running"; exit 3; fi ;;
    run)
        running || die "guest not running (tests/env/vm.sh up)"
        ssh_ "$DROP_CACHES; cd '$REPO' && $(printf '%q ' "$@")" ;;
    test)
        [ "$(id -u)" = 0 ] || { echo "vm.sh: SKIP: not root (uid $(id -u)); the cgroup v2 guest needs root"; exit 0; }
        # The newer stacks the guest runs, fetched on the host (idempotent).
        for st in $("$HERE/vm-suite.sh" stacks); do
            [ "$st" = bookworm ] || "$HERE/stack.sh" "$st" fetch
        done
        # The suite's test binaries, as cargo built them on the host (same glibc).
        targets=$("$HERE/vm-suite.sh" targets | sed 's/^/--test /' | tr '\n' ' ')
        # shellcheck disable=SC2086
        bins=$(cd "$REPO" && cargo test --no-run --message-format=json $targets 2>/dev/null \
            | jq -r 'select(.profile.test == true and .target.kind == ["test"]) | "\(.target.name)=\(.executable)"' \
            | tr '\n' ' ') || die "cargo test --no-run failed"
        cmd_up
        rc=0
        ssh_ "$DROP_CACHES; cd '$REPO' && ES_VM_STACKS='${ES_VM_STACKS:-}' ES_VM_BINS='$bins' tests/env/vm-suite.sh run" || rc=$?
        cmd_down
        exit $rc ;;
    *) usage ;;
esac
