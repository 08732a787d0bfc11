#!/usr/bin/env bash
# Private containerd for envoy-sidecar integration tests.
#
# Usage: tests/env/containerd.sh up|down|status|env
#
#   up      start (idempotent), wait for readiness (<= 20 s), import the test
#           image localhost/envoy-sidecar/busybox:latest into namespace
#           envoy-sidecar-test. Not root => prints why and exits 0 (tests skip).
#   down    kill/remove tasks+containers in the test namespace, then stop the
#           daemon by its recorded pid (SIGTERM, wait, SIGKILL). Keeps /var/lib.
#   status  print state; exit 0 if running, 3 if not.
#   env     print export lines for CONTAINERD_ADDRESS / CONTAINERD_NAMESPACE.
#
# Never touches a system containerd: own root, state, socket and config.
#
# ES_CONTAINERD_INSTANCE=NAME (optional) runs a second, independent instance: its run
# and root directories, socket and test namespace get the suffix "-NAME"
# (/run/envoy-sidecar-test-NAME/containerd.sock, namespace envoy-sidecar-test-NAME).
# Unset or empty: the paths above.
#
# ES_STACK=NAME (set by tests/env/stack.sh, with CONTAINERD_BIN, CTR_BIN, ES_RUNC and
# PATH pointing at that stack's binaries) runs another engine stack's containerd in the
# same run directory and socket, with a root of its own; one stack runs at a time. Its
# config is written in the version that containerd speaks (2 for 1.x, 3 for 2.x).
set -euo pipefail

INSTANCE_SUFFIX="${ES_CONTAINERD_INSTANCE:+-$ES_CONTAINERD_INSTANCE}"
RUN_DIR=/run/envoy-sidecar-test$INSTANCE_SUFFIX
STACK="${ES_STACK:-bookworm}"
if [ "$STACK" = bookworm ]; then
    ROOT_DIR=/var/lib/envoy-sidecar-test$INSTANCE_SUFFIX/containerd
else
    ROOT_DIR=/var/lib/envoy-sidecar-test$INSTANCE_SUFFIX/stack-$STACK/containerd
fi
STACK_FILE=$RUN_DIR/stack
STATE_DIR=$RUN_DIR/containerd
SOCK=$RUN_DIR/containerd.sock
CONF=$RUN_DIR/containerd.toml
LOG=$RUN_DIR/containerd.log
PIDFILE=$RUN_DIR/containerd.pid
NS=envoy-sidecar-test$INSTANCE_SUFFIX
IMAGE_REF=localhost/envoy-sidecar/busybox:latest
CRI_NS=k8s.io
CRI_RUNTIME=$RUN_DIR/cri-runtime
CNI_CONF_DIR=$RUN_DIR/cni-conf
READY_TIMEOUT=20

CONTAINERD_BIN="${CONTAINERD_BIN:-containerd}"
CTR_BIN="${CTR_BIN:-ctr}"
RUNC_BIN="${ES_RUNC:-/usr/sbin/runc}"
# Where `envoy-sidecar install --root` stages the product's files (the CRI drop-in).
INSTALL_ROOT=$RUN_DIR/install

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/../.." && pwd)"
BUILD_IMAGE="$REPO_ROOT/oci/build-image.sh"

log() { echo "containerd.sh: $*" >&2; }

ctr_() { "$CTR_BIN" --address "$SOCK" -n "$NS" "$@"; }

recorded_pid() {
    [ -r "$PIDFILE" ] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [ -n "$pid" ] || return 1
    echo "$pid"
}

# Alive *and* actually a containerd (guards against pid reuse).
pid_alive() {
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "containerd" ]
}

responsive() {
    [ -S "$SOCK" ] || return 1
    timeout 5 "$CTR_BIN" --address "$SOCK" version >/dev/null 2>&1
}

is_running() {
    local pid
    pid="$(recorded_pid)" || return 1
    pid_alive "$pid" && responsive
}

log_tail() {
    if [ -r "$LOG" ]; then
        echo "---- last 30 lines of $LOG ----" >&2
        tail -n 30 "$LOG" >&2
        echo "----" >&2
    fi
}

# The product's CLI, for `install --root` (make test builds it first).
product_cli() {
    local b
    for b in "$REPO_ROOT/target/debug/envoy-sidecar" "$REPO_ROOT/target/release/envoy-sidecar"; do
        [ -x "$b" ] && { echo "$b"; return 0; }
    done
    log "error: no envoy-sidecar binary under $REPO_ROOT/target (cargo build first)"
    return 1
}

# The major version of the containerd that will run (2.x speaks config version 3).
containerd_major() {
    "$CONTAINERD_BIN" --version | awk '{v=$3; sub(/^v/, "", v); split(v, a, "."); print a[1]}'
}

write_config() {
    local major
    major="$(containerd_major)"
    # The CRI runtime handler "envoy-sidecar" is the drop-in `envoy-sidecar install`
    # writes for this containerd, with BinaryName pointed at CRI_RUNTIME (a script the
    # CRI tests point at their own wrapper configuration).
    local cli
    cli="$(product_cli)"
    rm -rf "$INSTALL_ROOT"
    "$cli" install --root "$INSTALL_ROOT" --containerd "$CONTAINERD_BIN" \
        --binary-name "$CRI_RUNTIME" >"$RUN_DIR/install.log"
    local drop_in="$INSTALL_ROOT/etc/containerd/conf.d/envoy-sidecar.toml"
    if [ "$major" -ge 2 ]; then
        write_config_v3 "$drop_in"
    else
        write_config_v2
        # Appended, not imported: containerd 1.6 and 1.7 replace a whole plugin section
        # on import (the CRI settings above would be lost). Its version line is dropped:
        # appended it would land inside the last table.
        grep -v '^version = ' "$drop_in" >>"$CONF"
    fi
    # Until a test installs its own, the handler behaves as plain runc (this stack's).
    printf '#!/bin/sh\nexec %s "$@"\n' "$RUNC_BIN" >"$CRI_RUNTIME"
    chmod 0755 "$CRI_RUNTIME"
    # Pod network for CRI: a CNI bridge on a documentation range (203.0.113.224/28).
    mkdir -p "$CNI_CONF_DIR"
    cat >"$CNI_CONF_DIR/10-envoy-sidecar-test.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "es-cri", "plugins": [
  {"type": "bridge", "bridge": "es-br14", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "subnet": "203.0.113.224/28", "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$RUN_DIR/cni-cri"}},
  {"type": "loopback"}]}
CNI
}

# containerd 1.6 / 1.7.
write_config_v2() {
    cat >"$CONF" <<EOF
# Generated by tests/env/containerd.sh -- do not edit.
version = 2
root = "$ROOT_DIR"
state = "$STATE_DIR"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = ""

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$ROOT_DIR/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "localhost/envoy-sidecar/pause:latest"
    # Sandboxed machines may refuse a lower oom_score_adj than containerd's own.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$CNI_CONF_DIR"
EOF
}

# containerd 2.x: the CRI plugin split into images and runtime; the drop-in is
# imported (2.x merges imported plugin tables key by key).
write_config_v3() {
    cat >"$CONF" <<EOF
# Generated by tests/env/containerd.sh -- do not edit.
version = 3
root = "$ROOT_DIR"
state = "$STATE_DIR"
oom_score = 0
imports = ["$1"]
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  # NRI would take the host's /var/run/nri/nri.sock.
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "$ROOT_DIR/opt"
  [plugins.'io.containerd.cri.v1.images']
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "localhost/envoy-sidecar/pause:latest"
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "$CNI_CONF_DIR"
EOF
}

ensure_image() {
    if [ ! -x "$BUILD_IMAGE" ]; then
        log "error: $BUILD_IMAGE missing or not executable"
        return 1
    fi
    "$BUILD_IMAGE" --import "$SOCK" "$NS"
    # CRI works in namespace k8s.io and needs the pod sandbox image there.
    "$BUILD_IMAGE" --import "$SOCK" "$CRI_NS"
    IMAGE_NAME=pause "$BUILD_IMAGE" --import "$SOCK" "$CRI_NS"
}

cmd_up() {
    if [ "$(id -u)" != 0 ]; then
        echo "containerd.sh: SKIP: not root (uid $(id -u)); private containerd needs root, integration tests will skip"
        exit 0
    fi
    local b
    for b in "$CONTAINERD_BIN" "$CTR_BIN" containerd-shim-runc-v2 "$RUNC_BIN" setsid timeout; do
        command -v "$b" >/dev/null || { log "error: '$b' not found in PATH"; exit 1; }
    done

    if is_running; then
        local running
        running="$(cat "$STACK_FILE" 2>/dev/null || echo bookworm)"
        if [ "$running" != "$STACK" ]; then
            log "error: stack $running is running on $SOCK; stop it first (tests/env/stack.sh $running down)"
            exit 1
        fi
        log "already running (pid $(recorded_pid)), stack $STACK, socket $SOCK"
        ensure_image
        return 0
    fi

    local pid=""
    if pid="$(recorded_pid)" && pid_alive "$pid"; then
        # Alive but not (yet) answering: maybe still starting; fall through
        # to the readiness wait below instead of starting a second one.
        log "pid $pid alive but not responding yet; waiting"
    else
        pid=""
        if responsive; then
            log "error: something answers on $SOCK but is not our recorded containerd; refusing to start"
            exit 1
        fi
        mkdir -p "$RUN_DIR" "$STATE_DIR" "$ROOT_DIR"
        chmod 0711 "$RUN_DIR"
        rm -f "$PIDFILE" "$SOCK" "$SOCK.ttrpc"
        write_config
        echo "$STACK" >"$STACK_FILE"
        {
            echo
            echo "==== $(date -u +%FT%TZ) starting containerd --config $CONF ===="
        } >>"$LOG"
        # Fully detached: new session, no controlling tty, stdio redirected,
        # and every other inherited fd closed (make jobserver pipes, our
        # lock fd, a caller's `| tee` ...), so it survives the caller and
        # nobody waits for EOF on a pipe containerd still holds. The child
        # shell records its own pid then execs containerd => exact pid file.
        # shellcheck disable=SC2016
        setsid -f bash -c '
            # (no redirections on this loop: bash would park fd 2 on a
            # high fd while it runs, and the loop would close that too)
            for f in /proc/$$/fd/*; do
                f=${f##*/}
                case $f in 0|1|2|*[!0-9]*) ;; *) eval "exec $f>&-" ;; esac
            done
            echo $$ >"$1"
            exec "$2" --config "$3"' containerd-start \
            "$PIDFILE" "$(command -v "$CONTAINERD_BIN")" "$CONF" \
            </dev/null >>"$LOG" 2>&1
    fi

    local start now deadline
    start="$(date +%s%N)"
    deadline=$(( $(date +%s) + READY_TIMEOUT ))
    while :; do
        if [ -z "$pid" ]; then
            pid="$(recorded_pid 2>/dev/null)" || pid=""
        fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            log "error: containerd (pid $pid) exited during startup"
            log_tail
            rm -f "$PIDFILE"
            exit 1
        fi
        if [ -n "$pid" ] && responsive; then
            break
        fi
        now="$(date +%s)"
        if [ "$now" -ge "$deadline" ]; then
            log "error: containerd not ready after ${READY_TIMEOUT}s (pid ${pid:-unknown}, socket $SOCK)"
            log_tail
            exit 1
        fi
        sleep 0.1
    done
    log "containerd ($STACK: $("$CONTAINERD_BIN" --version | awk '{print $3}'), runc $("$RUNC_BIN" --version | awk 'NR==1{print $3}')) up (pid $pid) in $(( ($(date +%s%N) - start) / 1000000 )) ms; socket $SOCK, log $LOG"
    ensure_image
}

cleanup_namespace() {
    responsive || return 0
    local id
    # Tasks first (kill, then force-delete), then containers (+ snapshots).
    for id in $(ctr_ tasks ls -q 2>/dev/null || true); do
        ctr_ tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ tasks ls -q 2>/dev/null || true); do
        ctr_ tasks rm -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ containers ls -q 2>/dev/null || true); do
        if ctr_ containers rm "$id" >/dev/null 2>&1; then
            log "removed leftover container $id"
        else
            log "warning: could not remove container $id"
        fi
    done
}

cmd_down() {
    local pid
    if ! pid="$(recorded_pid)"; then
        log "not running (no pid file $PIDFILE)"
        rm -f "$SOCK" "$SOCK.ttrpc"
        return 0
    fi
    if ! pid_alive "$pid"; then
        log "recorded pid $pid is not a live containerd; cleaning up stale files"
        rm -f "$PIDFILE" "$SOCK" "$SOCK.ttrpc"
        return 0
    fi
    cleanup_namespace
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do   # 10 s
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "containerd pid $pid did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$PIDFILE" "$SOCK" "$SOCK.ttrpc" "$STACK_FILE"
    # runc leaves the (now empty) per-namespace parent cgroups behind;
    # rmdir only succeeds on empty cgroups, so this never kills anything.
    local d
    for d in /sys/fs/cgroup/*/"$NS" /sys/fs/cgroup/"$NS"; do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
    done
    # The CRI pod network's bridge (the bridge plugin never deletes it on DEL).
    ip link del es-br14 2>/dev/null || true
    log "containerd stopped (pid $pid)"
}

cmd_status() {
    local pid=""
    pid="$(recorded_pid 2>/dev/null)" || pid=""
    if is_running; then
        echo "running: pid $pid, socket $SOCK, namespace $NS"
        if ctr_ images ls -q 2>/dev/null | grep -qxF "$IMAGE_REF"; then
            echo "image: $IMAGE_REF present"
        else
            echo "image: $IMAGE_REF MISSING"
        fi
        local n
        n="$(ctr_ containers ls -q 2>/dev/null | wc -l)"
        echo "containers in $NS: $n"
        return 0
    fi
    if [ -n "$pid" ] && pid_alive "$pid"; then
        echo "not responding: pid $pid alive but $SOCK not answering"
    else
        echo "stopped"
    fi
    return 3
}

cmd_env() {
    echo "export CONTAINERD_ADDRESS=$SOCK"
    echo "export CONTAINERD_NAMESPACE=$NS"
}

# Serialise concurrent up/down (parallel make targets / test runners).
take_lock() {
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/lock"
    if command -v flock >/dev/null; then
        flock -w 60 9 || { log "error: could not lock $RUN_DIR/lock"; exit 1; }
    fi
}

case "${1:-}" in
    up)
        if [ "$(id -u)" = 0 ]; then take_lock; fi
        cmd_up ;;
    down)
        [ "$(id -u)" = 0 ] || { log "must be root"; exit 1; }
        take_lock
        cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
