#!/usr/bin/env bash
# Density: what N real proxied containers cost on one host, N = DENSITY_NS (default
# 50 100 200), each level from an empty host:
#   - N containers created one after another, each `ctr run -d --cni --runc-binary
#     WRAPPER-SCRIPT --annotation envoy-sidecar/ports=8080 IMAGE ID httpd -f -p 8080 -h
#     /www` (proxy on, [host] address = the CNI bridge's gateway, so NAT is applied),
#     timed from invoking `ctr run -d` to the first HTTPS response through the
#     container's IP and its TLS proxy port (from `envoy-sidecar inspect`), verified
#     against the bench CA; the next container is created once the previous answered;
#   - then, after DENSITY_SETTLE s, DENSITY_IDLE s of idle: the host's CPU busy share
#     (/proc/stat) and the CPU of all Envoys, supervisors, containerd shims and
#     containerd (/proc/PID/stat utime+stime; the threads' schedstat run times too);
#     RssAnon of all Envoys and supervisors;
#   - wall time of `envoy-sidecar status`, `metrics`, `gc --dry-run` (3 each);
#   - teardown of all N (SIGKILL, `ctr task rm`, `ctr container rm`, one after another,
#     as bench-scale.sh), then the CNI DEL that `ctr run -d` never does, and a leak
#     check (containers, state, NAT elements, processes, veths, leases, CNI cache).
# Before the levels, once: an idle-timer breakdown of single Envoys, all running at
# once for DENSITY_IDLE s: (a) a minimal static one-listener tcp_proxy Envoy with
# Envoy's defaults (also the memory floor), (b) + stats_flush_on_admin + 60 s
# watchdogs, (c) (b) + the product's overload_manager / layered_runtime at 0.1 s,
# (d) the same at 1 s, (e) a copy of a running container's own bootstrap on the host's
# loopback, and the running container's own Envoy (with its supervisor).
# Prints tables and writes its section (`density`) of docs/BENCHMARKS.md through
# scripts/md-section.py (report: scripts/bench-density-report.py).
#
# Network: ctr's go-cni takes the first conflist of /etc/cni/net.d and the plugins of
# /opt/cni/bin. While it runs, this bench installs its own network there
# (00-envoy-sidecar-bench-density.conflist: bridge es-bdens, 198.19.0.0/24 of the
# benchmark range 198.18.0.0/15, gateway 198.19.0.1, leases under its temp dir), under
# the integration tests' lock /tmp/envoy-sidecar-test-ctr-cni.lock and their record of
# what the holder made (so either side removes the other's leftovers after a crash).
# Host port pool 31300-31799 (2 a container); breakdown Envoys on 127.0.0.1:31900-31909.
#
# Run it through `make bench` (deps, release build, private containerd up). Root only.
#
# Environment:
#   DENSITY_NS             levels N (default "50 100 200"; each 1..250)
#   DENSITY_IDLE           seconds of the idle windows (default 20)
#   DENSITY_SETTLE         seconds after the last container answered before the idle
#                          window (default 10)
#   DENSITY_READY_TIMEOUT  seconds a container may take to answer (default 60)
#   DENSITY_MAX_LOAD       before each level (and the breakdown), wait until the
#                          1-minute load average is below this (default 1.0) ...
#   DENSITY_LOAD_WAIT      ... for at most this many seconds (default 180), then go on
#   CONTAINERD_ADDRESS     default /run/envoy-sidecar-test/containerd.sock
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
SOCK="${CONTAINERD_ADDRESS:-/run/envoy-sidecar-test/containerd.sock}"
CONTAINERD_PIDFILE="$(dirname "$SOCK")/containerd.pid"
NS=envoy-sidecar-test
IMAGE=localhost/envoy-sidecar/busybox:latest
RUNC=/usr/sbin/runc
NS_S="${DENSITY_NS:-50 100 200}"
IDLE="${DENSITY_IDLE:-20}"
SETTLE="${DENSITY_SETTLE:-10}"
READY_TIMEOUT="${DENSITY_READY_TIMEOUT:-60}"
MAX_LOAD="${DENSITY_MAX_LOAD:-1.0}"
LOAD_WAIT="${DENSITY_LOAD_WAIT:-180}"
PORTS_ANNOTATION="envoy-sidecar/ports=8080"
APP_CMD="httpd -f -p 8080 -h /www"
CMD_REPS=3

CNI_NET=es-density
BRIDGE=es-bdens
SUBNET=198.19.0.0/24
GATEWAY=198.19.0.1
POOL_START=31300
POOL_END=31799
BD_PORT_BASE=31900
BD_UPSTREAM=31909
CNI_BIN_DIR=/opt/cni/bin
CNI_CONF_DIR=/etc/cni/net.d
CONFLIST="$CNI_CONF_DIR/00-envoy-sidecar-bench-density.conflist"
CNI_PLUGINS=/usr/lib/cni
CNI_CACHE=/var/lib/cni/results
CTR_CNI_LOCK=/tmp/envoy-sidecar-test-ctr-cni.lock
CTR_CNI_MADE=/run/envoy-sidecar-test/ctr-cni-made
NETNS="es-bdensity-$$" # never made (bench-lib's leftover removal deletes it)
HOST_IF="esbdn$$"       # never made
ID_PREFIX="esbd-$$-"

die() { echo "bench-density: error: $*" >&2; exit 1; }
log() { echo "bench-density: $*" >&2; }
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }
# shellcheck source=scripts/bench-lib.sh
. "$REPO/scripts/bench-lib.sh"
HELPER="$REPO/scripts/bench-density.py"
REPORT="$REPO/scripts/bench-density-report.py"
FILL_PY="$REPO/scripts/bench-scale-fill.py"

# ---- preflight -------------------------------------------------------------------
read -r -a LEVELS <<<"$NS_S"
[ "${#LEVELS[@]}" -ge 1 ] || die "DENSITY_NS is empty"
for n in "${LEVELS[@]}"; do
    { [[ "$n" =~ ^[1-9][0-9]*$ ]] && [ "$n" -le 250 ]; } || die "DENSITY_NS: '$n' is not an integer in 1..250"
done
[[ "$MAX_LOAD" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "DENSITY_MAX_LOAD must be a number, got '$MAX_LOAD'"
[[ "$LOAD_WAIT" =~ ^[0-9]+$ ]] || die "DENSITY_LOAD_WAIT must be an integer, got '$LOAD_WAIT'"
for v in IDLE SETTLE READY_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "DENSITY_$v must be a positive integer, got '${!v}'"
done
[ "$(id -u)" = 0 ] || die "must run as root (containerd, runc, CNI, nftables); use 'make bench'"
for b in ctr ip nft flock python3; do command -v "$b" >/dev/null || die "'$b' not found in PATH"; done
[ -x "$WRAPPER" ] || die "$WRAPPER missing; run 'make release' (or 'make bench')"
[ -x "$CLI" ] || die "$CLI missing; run 'make release' (or 'make bench')"
[ -x "$ENVOY" ] || die "$ENVOY missing; run 'scripts/install-deps.sh' (or 'make bench')"
for p in bridge host-local loopback; do
    [ -x "$CNI_PLUGINS/$p" ] || die "CNI plugin $CNI_PLUGINS/$p missing; run 'scripts/install-deps.sh'"
done
timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1 \
    || die "no containerd answering on $SOCK; run 'tests/env/containerd.sh up' (or 'make bench')"
ctr_ images ls -q | grep -qxF "$IMAGE" \
    || die "image $IMAGE not in namespace $NS; run 'tests/env/containerd.sh up'"
if ip -o addr show | grep -qE ' 198\.19\.0\.'; then
    die "an address in $SUBNET is already configured on this host (another bench running?)"
fi
ip link show "$BRIDGE" >/dev/null 2>&1 && die "link $BRIDGE exists (left by a killed run? 'ip link del $BRIDGE')"
PY="$(python3 -c 'import sys; print(sys.executable)')"

# ---- sandbox + cleanup -------------------------------------------------------------
TMP="$(mktemp -d /tmp/envoy-sidecar-bench-density.XXXXXX)"
chmod 0755 "$TMP" # Envoy's uid reads its bootstrap under the state dir
STATE="$TMP/state"
CONFIG="$TMP/config.toml"
LEASES="$TMP/cni-data/$CNI_NET"
CURRENT_ID=""
MADE=()
BD_PIDS=()
mkdir -p "$TMP/run-logs" "$TMP/idle"

# Our NAT elements (nft syntax, one a line): any to the subnet, any from the pool.
our_nat() {
    local j
    j="$(nft -j list map ip envoy_sidecar ports 2>/dev/null || true)"
    [ -n "$j" ] || return 0
    { "$PY" "$FILL_PY" ours "$SUBNET" 1 65535 <<<"$j"
      "$PY" "$FILL_PY" ours 0.0.0.0/0 "$POOL_START" "$POOL_END" <<<"$j"; } | sort -u
}

# CNI DEL (what ctr does after a foreground run) for every lease of our network, and
# libcni's cached results of it.
cni_conf_body() {
    printf '{"cniVersion":"1.0.0","name":"%s","type":"bridge","bridge":"%s","isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","subnet":"%s","dataDir":"%s","routes":[{"dst":"0.0.0.0/0"}]}}' \
        "$CNI_NET" "$BRIDGE" "$SUBNET" "$TMP/cni-data"
}
cni_del_all() {
    local f cid
    for f in "$LEASES"/*.*.*.*; do
        [ -e "$f" ] || continue
        cid="$(head -n1 "$f" | tr -d '\r')"
        cni_conf_body | CNI_COMMAND=DEL CNI_CONTAINERID="$cid" CNI_NETNS="" CNI_IFNAME=eth0 \
            CNI_PATH="$CNI_PLUGINS" "$CNI_PLUGINS/bridge" >"$TMP/cni-del.log" 2>&1 \
            || log "warning: CNI DEL of $cid failed: $(cat "$TMP/cni-del.log")"
    done
    rm -f "$CNI_CACHE/$CNI_NET-"* 2>/dev/null || true
}

note_made() { # kind path: recorded before it is made
    MADE+=("$1 $2")
    printf '%s\n' "${MADE[@]}" >"$CTR_CNI_MADE"
}
remove_made() {
    local i kind p
    for ((i = ${#MADE[@]} - 1; i >= 0; i--)); do
        read -r kind p <<<"${MADE[i]}"
        case "$kind" in
            file) rm -f "$p" ;;
            dir) rmdir "$p" 2>/dev/null || true ;;
            tree) rm -rf "$p" ;;
        esac
    done
    MADE=()
    rm -f "$CTR_CNI_MADE"
}

cleanup() {
    local rc=$? id pid
    trap - EXIT INT TERM
    for pid in "${BD_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for id in $( (echo "$CURRENT_ID"; ctr_ containers ls -q 2>/dev/null | grep -F "$ID_PREFIX") | sort -u); do
        log "removing leftover container $id"
        remove_container "$id"
    done
    CURRENT_ID=""
    if [ -d "$LEASES" ]; then cni_del_all; fi
    local left
    left="$(our_nat || true)"
    if [ -n "$left" ]; then
        log "removing leftover NAT elements of the bench"
        nft -j list map ip envoy_sidecar ports | "$PY" "$FILL_PY" ours "$SUBNET" 1 65535 --delete-script | nft -f - || true
        nft -j list map ip envoy_sidecar ports | "$PY" "$FILL_PY" ours 0.0.0.0/0 "$POOL_START" "$POOL_END" --delete-script | nft -f - || true
    fi
    if [ "${#MADE[@]}" -gt 0 ]; then remove_made; fi
    ip link del "$BRIDGE" 2>/dev/null || true
    bench_remove_leftovers
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the network ctr --cni picks up -----------------------------------------------
exec 8>>"$CTR_CNI_LOCK"
flock -w 120 8 || die "$CTR_CNI_LOCK held for 120 s (integration tests using ctr --cni?)"
# A crashed holder's files (we hold the lock: no one else's), as tests/common/engine.rs.
if [ -s "$CTR_CNI_MADE" ]; then
    log "removing what a crashed holder of $CTR_CNI_LOCK left: $(tr '\n' ' ' <"$CTR_CNI_MADE")"
    tac "$CTR_CNI_MADE" | while read -r kind p; do
        case "$kind" in file) rm -f "$p" ;; dir) rmdir "$p" 2>/dev/null || true ;; tree) rm -rf "$p" ;; esac
    done
    rm -f "$CTR_CNI_MADE"
fi
mkdir -p "$(dirname "$CTR_CNI_MADE")"
if [ ! -e "$CNI_BIN_DIR" ]; then
    if [ ! -d "$(dirname "$CNI_BIN_DIR")" ]; then
        note_made dir "$(dirname "$CNI_BIN_DIR")"
        mkdir "$(dirname "$CNI_BIN_DIR")"
    fi
    note_made tree "$CNI_BIN_DIR"
    mkdir "$CNI_BIN_DIR"
    for f in "$CNI_PLUGINS"/*; do ln -s "$f" "$CNI_BIN_DIR/"; done
fi
for p in bridge host-local loopback; do
    [ -x "$CNI_BIN_DIR/$p" ] || die "$CNI_BIN_DIR has no $p plugin"
done
mkdir -p "$CNI_CONF_DIR"
note_made file "$CONFLIST"
cat >"$CONFLIST" <<EOF
{"cniVersion": "1.0.0", "name": "$CNI_NET", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "subnet": "$SUBNET", "dataDir": "$TMP/cni-data",
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
first_conf="$(find "$CNI_CONF_DIR" -maxdepth 1 \( -name '*.conf' -o -name '*.conflist' -o -name '*.json' \) | LC_ALL=C sort | head -n1)"
[ "$first_conf" = "$CONFLIST" ] || die "ctr --cni would not pick our network (first of $CNI_CONF_DIR: $first_conf)"
# The bridge with its gateway address up front: the [host] address exists from the start.
ip link add "$BRIDGE" type bridge
ip addr add "$GATEWAY/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

# ---- product config -----------------------------------------------------------------
"$CLI" generate-ca --out "$TMP/ca" >/dev/null || die "generate-ca failed"
cat >"$CONFIG" <<EOF
[proxy]
enabled = true
envoy_path = "$ENVOY"
[instance_identity]
ca_cert = "$TMP/ca/ca.crt"
ca_key = "$TMP/ca/ca.key"
[runtime]
runc = "$TMP/runc-timed"
state_dir = "$STATE"
[host]
address = "$GATEWAY"
memory_capacity_mb = 16777216
[ports]
pool_start = $POOL_START
pool_end = $POOL_END
EOF
# Both the runtime containerd calls and the runc it runs log each create and start
# (container id, subcommand, start and end in ns) so the report can say how much of
# `ctr run -d` is the runtime's (with the supervisor's start after runc's create), runc's and
# the rest (containerd, its shim, CNI). Each log line costs two `date` calls, in the
# first and the last containers alike.
timed_script() { # out real [VAR=value]
    printf '#!/bin/bash\ns=$(date +%%s%%N)\n%s %q "$@"; rc=$?\n' "${3:-}" "$2"
    printf 'case " $* " in *" create "*) sub=create;; *" start "*) sub=start;; *) exit $rc;; esac\n'
    printf 'echo "${@: -1} $sub $s $(date +%%s%%N)" >>%q\nexit $rc\n' "$1"
}
timed_script "$TMP/runtime-times" "$WRAPPER" "ENVOY_SIDECAR_CONFIG=$(printf %q "$CONFIG")" >"$TMP/runc-wrapper"
timed_script "$TMP/runc-times" "$RUNC" >"$TMP/runc-timed"
chmod 0755 "$TMP/runc-wrapper" "$TMP/runc-timed"
"$CLI" --config "$CONFIG" check-config >/dev/null || die "config $CONFIG does not check"

export D_SOCK="$SOCK" D_NS="$NS" D_IMAGE="$IMAGE" D_RUNTIME="$TMP/runc-wrapper"
export D_ANN="$PORTS_ANNOTATION" D_APP="$APP_CMD" D_CLI="$CLI" D_CONFIG="$CONFIG"
export D_LEASES="$LEASES" D_CA="$TMP/ca/ca.crt" D_TMP="$TMP" D_STATE="$STATE"
export D_RUNTIME_TIMES="$TMP/runtime-times" D_RUNC_TIMES="$TMP/runc-times"
export D_PREFIX="$ID_PREFIX" D_READY_TIMEOUT="$READY_TIMEOUT" D_CONTAINERD_PID="$CONTAINERD_PIDFILE"

bench_export_machine_facts
B_ENVOY="$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: *//p' | head -n1)"
B_NFT="$(nft -v)"
export B_ENVOY B_NFT

supervisor_record() { cat "$STATE/$NS/$1/supervisor.json"; }
envoy_pid_of() {
    "$PY" -I -S -c 'import json,sys; print(json.load(open(sys.argv[1]))["envoy"]["pid"])' "$STATE/$NS/$1/supervisor.json"
}

# Remove all containers of a list, timed; then CNI DEL; then everything must be gone.
teardown_and_check() { # label ids...
    local label="$1" t0 t1 id i left
    shift
    t0=$(date +%s%N)
    for id in "$@"; do
        CURRENT_ID="$id"
        remove_container "$id"
    done
    t1=$(date +%s%N)
    CURRENT_ID=""
    TEARDOWN_MS=$(( (t1 - t0) / 1000000 ))
    t0=$(date +%s%N)
    cni_del_all
    CNI_DEL_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
    # Supervisors and Envoys exit on their own once the task is gone: bounded wait.
    for ((i = 0; i < 100; i++)); do
        left="$(our_pids | while read -r p; do grep -qxF "$p" <<<"${BD_PIDS[*]:-}" || echo "$p"; done)"
        [ -z "$left" ] && break
        sleep 0.1
    done
    LEAK_PROC_WAIT_MS=$((i * 100))
    [ -z "$left" ] || die "$label: processes of the bench left after teardown: $(for p in $left; do tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null; echo; done)"
    left="$(ctr_ containers ls -q | grep -F "$ID_PREFIX" || true)"
    [ -z "$left" ] || die "$label: containers left: $left"
    left="$(ctr_ tasks ls -q | grep -F "$ID_PREFIX" || true)"
    [ -z "$left" ] || die "$label: tasks left: $left"
    bench_leak_check
    left="$(our_nat)"
    [ -z "$left" ] || die "$label: NAT elements of the bench left:"$'\n'"$left"
    left="$(ip -o link show master "$BRIDGE" 2>/dev/null || true)"
    [ -z "$left" ] || die "$label: veths left on $BRIDGE:"$'\n'"$left"
    left="$(ls "$LEASES" 2>/dev/null | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' || true)"
    [ -z "$left" ] || die "$label: host-local leases left: $left"
    left="$(ls "$CNI_CACHE" 2>/dev/null | grep -F "$CNI_NET-" || true)"
    [ -z "$left" ] || die "$label: libcni cache files left: $left"
    left="$(for d in /proc/[0-9]*; do
        if [[ "$(cat "$d/comm" 2>/dev/null)" == containerd-shim* ]] && tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "-id $ID_PREFIX"; then echo "${d#/proc/}"; fi
    done)"
    [ -z "$left" ] || die "$label: containerd shims of the bench left: $left"
    if [ "$(ip netns list | sort)" != "$NETNS_BEFORE" ]; then
        die "$label: named network namespaces changed: $(ip netns list | tr '\n' ' ')"
    fi
    if [ -d /sys/fs/cgroup/memory/"$NS" ]; then
        left="$(find /sys/fs/cgroup/memory/"$NS" -mindepth 1 -maxdepth 1 -type d -name "$ID_PREFIX*" 2>/dev/null || true)"
        [ -z "$left" ] || die "$label: memory cgroups left: $left"
    fi
}
NETNS_BEFORE="$(ip netns list | sort)"

# Before each level: until the 1-minute load average is below DENSITY_MAX_LOAD (the
# previous level's teardown, a neighbour's job), at most DENSITY_LOAD_WAIT s.
wait_for_load() { # label
    local i l
    for ((i = 0; i < LOAD_WAIT; i += 5)); do
        l="$(cut -d' ' -f1 /proc/loadavg)"
        "$PY" -I -S -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$l" "$MAX_LOAD" && break
        sleep 5
    done
    log "$1: load average $(cut -d' ' -f1-3 /proc/loadavg) (waited $i s for < $MAX_LOAD)"
    echo "$(cut -d' ' -f1 /proc/loadavg) $i"
}

# =================================================================================
# Idle-timer breakdown of single Envoys (and the memory floor)
# =================================================================================
wait_for_load "breakdown" >/dev/null
log "breakdown: one reference container, then Envoy variants a-e, $IDLE s idle all at once"
REF_ID="${ID_PREFIX}ref-0"
CURRENT_ID="$REF_ID"
D_PREFIX="${ID_PREFIX}ref-" "$PY" -I -S "$HELPER" create "$TMP/ref.jsonl" 0 1 || die "reference container: ctr run -d failed"
grep -q '"ready_ms"' "$TMP/ref.jsonl" || { cat "$TMP/ref.jsonl" >&2; tail -30 "$STATE/$NS/$REF_ID/supervisor.log" >&2 || true; die "reference container never answered"; }
REF_BOOT="$STATE/$NS/$REF_ID/envoy/bootstrap.json"
[ -f "$REF_BOOT" ] || die "no product bootstrap at $REF_BOOT"
cp "$REF_BOOT" "$TMP/idle/product-bootstrap.json"
REF_ENVOY="$(envoy_pid_of "$REF_ID")"
REF_ARGV="$(tr '\0' ' ' <"/proc/$REF_ENVOY/cmdline")"
"$PY" -I -S "$HELPER" breakdown-bootstraps "$TMP/idle" "$BD_PORT_BASE" "$BD_UPSTREAM" "$REF_BOOT"
# The product's flags but the bootstrap (src/envoy/bootstrap.rs `args`).
BD_FLAGS="--concurrency 1 --disable-hot-restart --drain-time-s 5 --log-level warn"
BD_NAMED=()
for v in a b c d e; do
    # shellcheck disable=SC2086
    "$ENVOY" -c "$TMP/idle/$v.json" $BD_FLAGS >"$TMP/idle/$v.log" 2>&1 &
    BD_PIDS+=("$!")
    BD_NAMED+=("$v=$!")
done
sleep 5
for i in 0 1 2 3 4; do
    kill -0 "${BD_PIDS[i]}" 2>/dev/null || { tail -20 "$TMP/idle/$(echo a b c d e | cut -d' ' -f$((i + 1))).log" >&2; die "breakdown Envoy variant $((i + 1)) exited"; }
done
sleep 3
"$PY" -I -S "$HELPER" sample "$TMP/breakdown.json" "$IDLE" "${BD_NAMED[@]}" "real=$REF_ENVOY" \
    || die "breakdown sample failed"
for pid in "${BD_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
for pid in "${BD_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
BD_PIDS=()
export B_REF_ARGV="$REF_ARGV" B_BD_FLAGS="$BD_FLAGS" B_ENVOY_PATH="$ENVOY"
teardown_and_check "breakdown" "$REF_ID"

# =================================================================================
# Levels
# =================================================================================
for n in "${LEVELS[@]}"; do
    read -r LOAD_AT LOAD_WAITED < <(wait_for_load "N=$n")
    log "N=$n: creating $n containers one after another"
    : >"$TMP/create-$n.jsonl"
    t0=$(date +%s)
    D_PREFIX="${ID_PREFIX}n$n-" "$PY" -I -S "$HELPER" create "$TMP/create-$n.jsonl" 0 "$n" \
        || die "N=$n: creating the containers failed"
    CREATE_S=$(( $(date +%s) - t0 ))
    mapfile -t IDS < <("$PY" -I -S -c 'import json,sys; [print(json.loads(l)["id"]) for l in open(sys.argv[1])]' "$TMP/create-$n.jsonl")
    [ "${#IDS[@]}" = "$n" ] || die "N=$n: ${#IDS[@]} containers recorded"
    log "N=$n: created in $CREATE_S s; settling $SETTLE s"
    sleep "$SETTLE"
    log "N=$n: $IDLE s idle"
    "$PY" -I -S "$HELPER" sample "$TMP/idle-$n.json" "$IDLE" || die "N=$n: idle sample failed"
    # status of every container (NAT applied, ready), Envoy restarts.
    "$CLI" --config "$CONFIG" status --json >"$TMP/status-$n.json" 2>"$TMP/status-$n.err" || true
    # Commands at N.
    : >"$TMP/cmds-$n"
    for _ in $(seq "$CMD_REPS"); do
        for c in status metrics "gc --dry-run"; do
            # shellcheck disable=SC2086
            ms="$("$PY" -I -S "$TIMEIT" "$TMP/cmd.log" "$CLI" --config "$CONFIG" $c)" \
                || { tail -20 "$TMP/cmd.log" >&2; die "N=$n: '$c' failed"; }
            echo "${c%% *} $ms" >>"$TMP/cmds-$n"
            cp "$TMP/cmd.log" "$TMP/cmd-${c%% *}-$n.log"
        done
    done
    nat_elems="$(our_nat | wc -l)"
    log "N=$n: teardown"
    teardown_and_check "N=$n" "${IDS[@]}"
    printf '{"n": %d, "create_s": %d, "teardown_ms": %d, "cni_del_ms": %d, "nat_elements": %d, "proc_exit_wait_ms": %d, "load_before": %s, "load_waited_s": %d}\n' \
        "$n" "$CREATE_S" "$TEARDOWN_MS" "$CNI_DEL_MS" "$nat_elems" "$LEAK_PROC_WAIT_MS" "$LOAD_AT" "$LOAD_WAITED" >"$TMP/level-$n.json"
    log "N=$n: teardown ${TEARDOWN_MS} ms, CNI DEL ${CNI_DEL_MS} ms, leak check passed"
done

# ---- report -----------------------------------------------------------------------
export B_LEVELS="${LEVELS[*]}" B_IDLE="$IDLE" B_SETTLE="$SETTLE" B_ANN="$PORTS_ANNOTATION"
export B_APP="$APP_CMD" B_SUBNET="$SUBNET" B_GATEWAY="$GATEWAY" B_POOL="$POOL_START-$POOL_END"
export B_MAX_LOAD="$MAX_LOAD" B_CMD="DENSITY_NS=\"${LEVELS[*]}\" scripts/bench-density.sh"
"$PY" -I -S "$REPORT" "$TMP" "$TMP/density.md" || die "computing the report failed"
"$PY" -I -S "$MD_SECTION" "$OUT" density <"$TMP/density.md" || die "writing the density section of $OUT failed"
log "wrote section 'density' of $OUT"
log "done"
