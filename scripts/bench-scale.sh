#!/usr/bin/env bash
# Scale: what the product costs when the host already holds many proxied containers.
#   fill  (1) a whole `ctr run --rm` lifecycle of one proxied 3-port container
#             (`envoy-sidecar/ports=8080,9999,2222`, app /bin/true) in a network
#             namespace that already has an address (a veth to the host), while the
#             host holds N other proxied containers' state files and NAT elements,
#             N = BENCH_SCALE_LEVELS (default 0 250 1000 3000); one state dir and config
#             per level, all filled up front, the levels interleaved round-robin (order
#             rotated every round) with plain runc and the config-passing /bin/sh script
#             exec'ing plain runc, both in the same netns, as reference rows.
#         (3) before measuring, a sanity run (`ctr run -d ... sleep 5`) must show the
#             container's 3 TLS host ports in `nft -j list map ip envoy_sidecar ports`.
#   nat   (2) NAT add/remove of one container (6 mappings) through the product's own
#             `envoy_sidecar::nat::Nat::add`/`remove` (examples/nat_bench.rs) with the map
#             preloaded with 1, 100, 1000, 3000 containers' elements, next to the
#             per-rule iptables DNAT baseline (CNI portmap, Garden's kawasaki) in a chain
#             of its own (ESBENCH, table nat) preloaded with N x 6 rules.
#   gc    (4) `envoy-sidecar gc --dry-run` and a real `gc` over 3000 stale containers'
#             state (state files runc does not know, their nat.json and NAT elements).
# Prints tables and writes its sections (`scale-fill`, `scale-nat`, `scale-gc`) of
# docs/BENCHMARKS.md through scripts/md-section.py, leaving the rest of that file alone.
#
# Run it through `make bench` (deps, release build, private containerd up). Root only.
# Other suites on this machine use the same nftables table: run it under
# `flock /tmp/envoy-sidecar-itest.lock` when they may run at the same time.
#
# Addresses and ports (198.18.0.0/15 is the benchmark range; tests/common/slots.rs
# hands out 198.51.100.0/24, 203.0.113.0/24 and host ports 16384-30719, bench-network.sh
# 31000-31031):
#   198.18.0.1/30 host end of the veth (= [host] address), 198.18.0.2 the container;
#   fill containers 198.18.16.1+i, nat_bench's 198.18.32.1+i (measured 198.18.63.1),
#   gc's 198.18.64.1+i: addresses nothing uses (the elements are never hit);
#   host ports: measured container's pool 31100-31163, nat_bench's measured 31200-31205,
#   the fill / nat / gc sets 32000 + 6i .. +5 in turn (never two at the same time).
#
# Environment:
#   BENCH_SCALE_ROUNDS      measured rounds of (1) (default 40)
#   BENCH_SCALE_WARMUP      uncounted rounds before them (default 1, at least 1: the
#                           warm-up lifecycle of each level after its fill)
#   BENCH_SCALE_LEVELS      host-fill levels N (default "0 250 1000 3000"; must hold 0)
#   BENCH_SCALE_NAT_COUNTS  map sizes of (2) (default "1 100 1000 3000")
#   BENCH_SCALE_NAT_REPS    repetitions per point of (2) (default 25, at least 20)
#   BENCH_SCALE_GC_N        stale containers of (4) (default 3000)
#   BENCH_SCALE_PARTS       which parts to run (default "fill nat gc")
#   BENCH_RUNC              the plain runc (default /usr/sbin/runc)
#   CARGO                   cargo, for examples/nat_bench.rs (default cargo)
#   ENVOY_SIDECAR_BIN_DIR   the binaries (default $CARGO_TARGET_DIR/release, else
#                           target/release of the repository)
#   CONTAINERD_ADDRESS      default /run/envoy-sidecar-test/containerd.sock
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
SOCK="${CONTAINERD_ADDRESS:-/run/envoy-sidecar-test/containerd.sock}"
NS=envoy-sidecar-test
IMAGE=localhost/envoy-sidecar/busybox:latest
RUNC="${BENCH_RUNC:-/usr/sbin/runc}"
CARGO="${CARGO:-cargo}"
ROUNDS="${BENCH_SCALE_ROUNDS:-40}"
WARMUP="${BENCH_SCALE_WARMUP:-1}"
LEVELS_S="${BENCH_SCALE_LEVELS:-0 250 1000 3000}"
NAT_COUNTS_S="${BENCH_SCALE_NAT_COUNTS:-1 100 1000 3000}"
NAT_REPS="${BENCH_SCALE_NAT_REPS:-25}"
GC_N="${BENCH_SCALE_GC_N:-3000}"
PARTS_S="${BENCH_SCALE_PARTS:-fill nat gc}"
PORTS_ANNOTATION="envoy-sidecar/ports=8080,9999,2222"
TARGET_RATIO=1.10
NAT_WAIT_S=5

HOST_IP=198.18.0.1
CTR_IP=198.18.0.2
OUR_NET=198.18.0.0/16
FILL_IP_BASE=198.18.16.1
NATB_IP_BASE=198.18.32.1
NATB_MEASURED_IP=198.18.63.1
GC_IP_BASE=198.18.64.1
POOL_START=31100
POOL_END=31163
NATB_MEASURED_PORT=31200
SET_PORT_BASE=32000
OUR_PORT_LO=31100
OUR_PORT_HI=65535
# Largest set: 6 host ports a container from SET_PORT_BASE up to 65535.
MAX_SET=$(( (65535 - SET_PORT_BASE + 1) / 6 ))
UID_BASE=2000000000 # proxy.envoy_uid_pool_start's default: the fill takes the first N
CHAIN=ESBENCH
NETNS="es-bscale-$$"
HOST_IF="esbsh$$"
ID_PREFIX="esbs-$$-"
FILL_PREFIX="esfill-"
GC_PREFIX="esgc-"
GC_RUNC_ROOT="/run/containerd/runc/$NS"

die() { echo "bench-scale: error: $*" >&2; exit 1; }
log() { echo "bench-scale: $*" >&2; }
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }
# shellcheck source=scripts/bench-lib.sh
. "$REPO/scripts/bench-lib.sh"
FILL_PY="$REPO/scripts/bench-scale-fill.py"

# ---- preflight -------------------------------------------------------------------
read -r -a LEVELS <<<"$LEVELS_S"
read -r -a NAT_COUNTS <<<"$NAT_COUNTS_S"
read -r -a PARTS <<<"$PARTS_S"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SCALE_ROUNDS must be a positive integer, got '$ROUNDS'"
[[ "$WARMUP" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SCALE_WARMUP must be an integer >= 1, got '$WARMUP'"
{ [[ "$NAT_REPS" =~ ^[1-9][0-9]*$ ]] && [ "$NAT_REPS" -ge 20 ]; } \
    || die "BENCH_SCALE_NAT_REPS must be an integer >= 20, got '$NAT_REPS'"
{ [[ "$GC_N" =~ ^[1-9][0-9]*$ ]] && [ "$GC_N" -le "$MAX_SET" ]; } \
    || die "BENCH_SCALE_GC_N must be an integer in 1..$MAX_SET, got '$GC_N'"
[ "${#LEVELS[@]}" -ge 2 ] || die "BENCH_SCALE_LEVELS needs at least two levels, got '$LEVELS_S'"
has_zero=0
for n in "${LEVELS[@]}"; do
    { [[ "$n" =~ ^(0|[1-9][0-9]*)$ ]] && [ "$n" -le "$MAX_SET" ]; } \
        || die "BENCH_SCALE_LEVELS: '$n' is not an integer in 0..$MAX_SET"
    [ "$n" = 0 ] && has_zero=1
done
[ "$has_zero" = 1 ] || die "BENCH_SCALE_LEVELS must include 0 (the ratios are to N=0), got '$LEVELS_S'"
[ "$(printf '%s\n' "${LEVELS[@]}" | sort -u | wc -l)" = "${#LEVELS[@]}" ] \
    || die "BENCH_SCALE_LEVELS has a level twice: '$LEVELS_S'"
[ "${#NAT_COUNTS[@]}" -ge 1 ] || die "BENCH_SCALE_NAT_COUNTS is empty"
for n in "${NAT_COUNTS[@]}"; do
    { [[ "$n" =~ ^[1-9][0-9]*$ ]] && [ "$n" -le "$MAX_SET" ]; } \
        || die "BENCH_SCALE_NAT_COUNTS: '$n' is not an integer in 1..$MAX_SET"
done
[ "${#PARTS[@]}" -ge 1 ] || die "BENCH_SCALE_PARTS is empty"
DO_FILL=0 DO_NAT=0 DO_GC=0
for p in "${PARTS[@]}"; do
    case "$p" in
        fill) DO_FILL=1 ;;
        nat) DO_NAT=1 ;;
        gc) DO_GC=1 ;;
        *) die "BENCH_SCALE_PARTS: unknown part '$p'; valid: fill nat gc" ;;
    esac
done
MAX_LEVEL=$(printf '%s\n' "${LEVELS[@]}" | sort -n | tail -1)

[ "$(id -u)" = 0 ] || die "must run as root (containerd, runc, netns, nftables, iptables); use 'make bench'"
for b in ctr ip nft iptables iptables-restore python3; do
    command -v "$b" >/dev/null || die "'$b' not found in PATH"
done
[ -x "$RUNC" ] || die "$RUNC not found (BENCH_RUNC)"
[ -x "$WRAPPER" ] || die "$WRAPPER missing; run 'make release' (or 'make bench')"
[ -x "$CLI" ] || die "$CLI missing; run 'make release' (or 'make bench')"
[ -x "$ENVOY" ] || die "$ENVOY missing; run 'scripts/install-deps.sh' (or 'make bench')"
timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1 \
    || die "no containerd answering on $SOCK; run 'tests/env/containerd.sh up' (or 'make bench')"
if [ "$DO_FILL" = 1 ]; then
    ctr_ images ls -q | grep -qxF "$IMAGE" \
        || die "image $IMAGE not in namespace $NS; run 'tests/env/containerd.sh up'"
fi
if [ "$DO_NAT" = 1 ]; then
    command -v "$CARGO" >/dev/null || die "'$CARGO' not found (CARGO): examples/nat_bench.rs needs it"
    if iptables -w -t nat -S "$CHAIN" >/dev/null 2>&1; then
        die "iptables chain $CHAIN (table nat) exists: left by an earlier run? remove it with 'iptables -t nat -F $CHAIN; iptables -t nat -X $CHAIN'"
    fi
fi
if ip -o addr show | grep -qE ' 198\.18\.'; then
    die "an address in 198.18.0.0/16 is already configured on this host (another bench running?)"
fi
if nft list table ip envoy_sidecar >/dev/null 2>&1; then
    left="$(nft -j list map ip envoy_sidecar ports | python3 "$FILL_PY" ours "$OUR_NET" "$OUR_PORT_LO" "$OUR_PORT_HI" | head -3)"
    [ -z "$left" ] || die "the NAT map already holds elements of this bench's ranges (a leftover of a killed run?), e.g.: $left"
fi
NAT_TABLE_EXISTED=0
nft list table ip nat >/dev/null 2>&1 && NAT_TABLE_EXISTED=1
# The pyenv shim costs tens of ms per call: resolve the interpreter once.
PY="$(python3 -c 'import sys; print(sys.executable)')"

# ---- sandbox + cleanup -------------------------------------------------------------
TMP="$(mktemp -d /tmp/envoy-sidecar-bench-scale.XXXXXX)"
# Envoy runs as an unprivileged user and reads its bootstrap under the state dir: the
# product checks that the state dir's parents are searchable by others.
chmod 0755 "$TMP"
STATE="$TMP/state-0" # bench-lib's name for the state dir it checks; reassigned per dir
CURRENT_ID=""
NAT_STARTED=0

# Every NAT element of our address and port ranges, in one transaction.
remove_our_nat() {
    local script
    nft list table ip envoy_sidecar >/dev/null 2>&1 || return 0
    script="$(nft -j list map ip envoy_sidecar ports 2>/dev/null \
        | "$PY" "$FILL_PY" ours "$OUR_NET" "$OUR_PORT_LO" "$OUR_PORT_HI" --delete-script)" || return 1
    [ -z "$script" ] || nft -f - <<<"$script"
}

# `table ip nat` that iptables-nft created for our chain, if it holds no rule of anyone.
remove_nat_table_if_ours() {
    local rules
    [ "$NAT_TABLE_EXISTED" = 0 ] || return 0
    nft list table ip nat >/dev/null 2>&1 || return 0
    rules="$(nft -j list table ip nat | "$PY" -c 'import json,sys; print(sum("rule" in x for x in json.load(sys.stdin)["nftables"]))')"
    [ "$rules" = 0 ] && nft delete table ip nat
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Containers (through the wrapper: its config lives in $TMP) before anything else.
    bench_remove_leftovers_containers
    if [ "$NAT_STARTED" = 1 ]; then
        iptables -w -t nat -F "$CHAIN" 2>/dev/null || true
        iptables -w -t nat -X "$CHAIN" 2>/dev/null || true
    fi
    remove_our_nat || log "warning: removing this bench's NAT elements failed; check 'nft list map ip envoy_sidecar ports'"
    remove_nat_table_if_ours || true
    bench_remove_leftovers
    exit "$rc"
}
bench_remove_leftovers_containers() {
    local id
    for id in $( (echo "$CURRENT_ID"; ctr_ containers ls -q 2>/dev/null | grep -F "$ID_PREFIX") | sort -u); do
        log "removing leftover container $id"
        remove_container "$id"
    done
    CURRENT_ID=""
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$CLI" generate-ca --out "$TMP/ca" >/dev/null || die "generate-ca failed"
# One config (and state dir) per level: $TMP/level-N.toml, $TMP/state-N. Pool
# 31100-31163 for the measured container; the fill's host ports (32000 + 6i) lie above.
write_config() { # file state_dir pool_start pool_end
    cat >"$1" <<EOF
[proxy]
enabled = true
envoy_path = "$ENVOY"
[instance_identity]
ca_cert = "$TMP/ca/ca.crt"
ca_key = "$TMP/ca/ca.key"
[runtime]
runc = "$RUNC"
state_dir = "$2"
[host]
address = "$HOST_IP"
memory_capacity_mb = 16777216
[ports]
pool_start = $3
pool_end = $4
EOF
    "$CLI" --config "$1" check-config >/dev/null || die "config $1 does not check"
}

# Our elements now in the map (nft syntax, one a line), optionally only those to IP.
our_nat() { # [ip]
    nft -j list map ip envoy_sidecar ports 2>/dev/null \
        | "$PY" "$FILL_PY" ours "${1:-$OUR_NET}" "$OUR_PORT_LO" "$OUR_PORT_HI"
}

# Once, before any section is written: afterwards the tree holds our own doc change,
# which is not a change of the code measured.
bench_export_machine_facts
# Each section's own date.
bench_section_date() { B_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"; export B_DATE; }
B_IPTABLES="$(iptables -V)"
B_NFT="$(nft -v)"
B_ENVOY_V="$("$ENVOY" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1 | cut -d' ' -f2)"
export B_IPTABLES B_NFT B_ENVOY_V
export B_ANN="$PORTS_ANNOTATION" B_RUNC_PATH="$RUNC" B_TARGET="$TARGET_RATIO"

# =================================================================================
# (1) + (3): host fill
# =================================================================================
if [ "$DO_FILL" = 1 ]; then
    NETNS_PATH="/var/run/netns/$NETNS"
    ip netns add "$NETNS"
    ip link add "$HOST_IF" type veth peer name eth0 netns "$NETNS"
    ip addr add "$HOST_IP/30" dev "$HOST_IF"
    ip link set "$HOST_IF" up
    ip -n "$NETNS" addr add "$CTR_IP/30" dev eth0
    ip -n "$NETNS" link set eth0 up
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" route add default via "$HOST_IP" dev eth0

    for n in "${LEVELS[@]}"; do
        write_config "$TMP/level-$n.toml" "$TMP/state-$n" "$POOL_START" "$POOL_END"
        printf '#!/bin/sh\nENVOY_SIDECAR_CONFIG=%s exec %s "$@"\n' "$TMP/level-$n.toml" "$WRAPPER" >"$TMP/runc-f$n"
        chmod 0755 "$TMP/runc-f$n"
    done
    # The same script shape exec'ing plain runc: the script's own cost.
    printf '#!/bin/sh\nENVOY_SIDECAR_CONFIG=%s exec %s "$@"\n' "$TMP/level-0.toml" "$RUNC" >"$TMP/runc-script"
    chmod 0755 "$TMP/runc-script"

    VARIANTS=()
    for n in "${LEVELS[@]}"; do VARIANTS+=("f$n"); done
    VARIANTS+=(runc script)

    run_opts() {
        case "$1" in
            f*) echo "--runc-binary $TMP/runc-$1 --annotation $PORTS_ANNOTATION --with-ns network:$NETNS_PATH" ;;
            runc) echo "--runc-binary $RUNC --with-ns network:$NETNS_PATH" ;;
            script) echo "--runc-binary $TMP/runc-script --with-ns network:$NETNS_PATH" ;;
        esac
    }

    # ---- (3) sanity: NAT applied for a proxied container whose netns has an address --
    log "sanity: a proxied container in $NETNS ($CTR_IP) must get its 3 TLS host ports mapped"
    CURRENT_ID="${ID_PREFIX}sanity"
    sanity_t0=$(date +%s%N)
    # shellcheck disable=SC2046
    ctr_ run -d $(run_opts f0) "$IMAGE" "$CURRENT_ID" /bin/sleep 5 >"$TMP/sanity.log" 2>&1 \
        || { cat "$TMP/sanity.log" >&2; die "sanity run (ctr run -d) failed"; }
    sanity_t1=$(date +%s%N)
    sstate="$TMP/state-0/$NS/$CURRENT_ID/state.json"
    [ -f "$sstate" ] || die "sanity: no state file $sstate after ctr run -d"
    cp "$sstate" "$TMP/sanity-state.json"
    read -r -a TLS_PORTS <<<"$("$PY" -c 'import json,sys; print(" ".join(str(p["external_tls_proxy"]) for p in json.load(open(sys.argv[1]))["ports"]))' "$sstate")"
    [ "${#TLS_PORTS[@]}" = 3 ] || die "sanity: expected 3 TLS host ports in $sstate, got '${TLS_PORTS[*]}'"
    seen_ms=""
    deadline=$(( $(date +%s%N) + NAT_WAIT_S * 1000000000 ))
    while :; do
        cur="$(our_nat "$CTR_IP/32" || true)"
        ok=1
        for p in "${TLS_PORTS[@]}"; do grep -q "^tcp \. $p : $CTR_IP \. " <<<"$cur" || ok=0; done
        if [ "$ok" = 1 ]; then seen_ms=$(( ($(date +%s%N) - sanity_t1) / 1000000 )); break; fi
        [ "$(date +%s%N)" -lt "$deadline" ] || break
        sleep 0.02
    done
    if [ -z "$seen_ms" ]; then
        echo "---- map elements to $CTR_IP ----" >&2; echo "$cur" >&2
        cat "$TMP/state-0/$NS/$CURRENT_ID/supervisor.log" >&2 2>/dev/null || true
        die "sanity: NAT not applied: the TLS host ports ${TLS_PORTS[*]} -> $CTR_IP are not in the map within ${NAT_WAIT_S} s of 'ctr run -d' returning"
    fi
    SANITY_RUNC_ROOT="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("runc_root") or "")' "$sstate")"
    [ -n "$SANITY_RUNC_ROOT" ] && GC_RUNC_ROOT="$SANITY_RUNC_ROOT"
    if [ "$seen_ms" -le 0 ]; then where="already when 'ctr run -d' returned"; else where="${seen_ms} ms after 'ctr run -d' returned"; fi
    log "sanity: TLS host ports ${TLS_PORTS[*]} -> $CTR_IP in the map $where (run -d took $(( (sanity_t1 - sanity_t0) / 1000000 )) ms)"
    export B_SANITY_SEEN_MS="$seen_ms" B_SANITY_RUN_MS=$(( (sanity_t1 - sanity_t0) / 1000000 ))
    export B_SANITY_PORTS="${TLS_PORTS[*]}"
    remove_container "$CURRENT_ID"
    CURRENT_ID=""
    [ ! -e "$sstate" ] || die "sanity: state of the removed container still there: $sstate"
    [ -z "$(our_nat "$CTR_IP/32")" ] || die "sanity: NAT elements to $CTR_IP left after the container's removal: $(our_nat "$CTR_IP/32")"

    # ---- fill --------------------------------------------------------------------
    # NAT: the elements of the largest level's containers, once, one transaction; a
    # level with fewer state files has the first N of them.
    fill_t0=$(date +%s%N)
    if [ "$MAX_LEVEL" -gt 0 ]; then
        "$PY" "$FILL_PY" nft add "$MAX_LEVEL" "$SET_PORT_BASE" "$FILL_IP_BASE" >"$TMP/fill-add.nft"
        nft -f "$TMP/fill-add.nft" || die "adding the fill's NAT elements failed"
    fi
    now_s="$(date -u '+%Y-%m-%dT%H:%M:%SZ')"
    for n in "${LEVELS[@]}"; do
        if [ "$n" -gt 0 ]; then
            "$PY" "$FILL_PY" state "$TMP/state-$n" "$NS" "$FILL_PREFIX" "$n" "$SET_PORT_BASE" \
                "$FILL_IP_BASE" "$UID_BASE" "$HOST_IP" "$GC_RUNC_ROOT" "$now_s" --nat-json \
                || die "writing the fill state of level $n failed"
            chmod 0700 "$TMP/state-$n" "$TMP/state-$n/$NS"
        fi
        # The host-wide allocation index (where the product has one) is rebuilt from
        # the state files whenever it is missing: make it see the fill.
        rm -f "$TMP/state-$n/.index.json"
        got=$(find "$TMP/state-$n" -mindepth 3 -maxdepth 3 -name state.json 2>/dev/null | wc -l)
        [ "$got" = "$n" ] || die "level $n: $got state files written, expected $n"
    done
    got=$(our_nat | wc -l)
    [ "$got" = $((6 * MAX_LEVEL)) ] || die "the map holds $got of our elements after the fill, expected $((6 * MAX_LEVEL))"
    log "filled levels ${LEVELS[*]} ($MAX_LEVEL containers' NAT elements) in $(( ($(date +%s%N) - fill_t0) / 1000000 )) ms"

    # ---- measure -----------------------------------------------------------------
    RESULTS="$TMP/fill-results"
    : >"$RESULTS"
    log "warm-up: $WARMUP round(s) (each level's first lifecycle after its fill)"
    for ((r = 0; r < WARMUP; r++)); do bench_round "$r" "w$r" 0; done
    log "measuring: $ROUNDS rounds x ${#VARIANTS[@]} variants (${VARIANTS[*]}), interleaved"
    start_s=$(date +%s)
    for ((r = 0; r < ROUNDS; r++)); do
        bench_round "$r" "$r" 1
        if (( (r + 1) % 5 == 0 )); then log "  $((r + 1))/$ROUNDS rounds"; fi
    done
    FILL_SECS=$(( $(date +%s) - start_s ))
    log "measured in $FILL_SECS s"

    # ---- unfill + leak checks ------------------------------------------------------
    for n in "${LEVELS[@]}"; do
        # The fill is ours: exactly its directories, then the state dir must be empty.
        if [ "$n" -gt 0 ]; then
            find "$TMP/state-$n/$NS" -mindepth 1 -maxdepth 1 -name "${FILL_PREFIX}*" -exec rm -rf {} +
            rmdir "$TMP/state-$n/$NS" 2>/dev/null || true
        fi
        STATE="$TMP/state-$n"
        bench_leak_check
    done
    if [ "$MAX_LEVEL" -gt 0 ]; then
        sed 's/^add element/delete element/' "$TMP/fill-add.nft" | nft -f - \
            || die "deleting the fill's NAT elements failed (some missing?)"
    fi
    left="$(our_nat)"
    [ -z "$left" ] || die "NAT elements left after the host-fill runs:"$'\n'"$left"

    # ---- report ------------------------------------------------------------------
    export B_ROUNDS="$ROUNDS" B_WARMUP="$WARMUP" B_LEVELS="${LEVELS[*]}" B_MAX_LEVEL="$MAX_LEVEL"
    export B_FILL_SECS="$FILL_SECS"
    bench_section_date
    "$PY" -I -S - "$RESULTS" "$TMP/scale-fill.md" <<'EOF' || die "computing the host-fill report failed"
import math, os, statistics, sys

results, out = sys.argv[1], sys.argv[2]
e = os.environ
levels = [int(x) for x in e["B_LEVELS"].split()]
order = sorted(levels)
times = {}
for line in open(results):
    v, ms = line.split()
    times.setdefault(v, []).append(float(ms))
rounds = int(e["B_ROUNDS"])
keys = [f"f{n}" for n in order] + ["runc", "script"]
for k in keys:
    assert len(times.get(k, [])) == rounds, f"variant {k}: {len(times.get(k, []))} samples, expected {rounds}"

def p90(t):  # nearest rank
    s = sorted(t)
    return s[math.ceil(0.9 * len(s)) - 1]

med = {k: statistics.median(times[k]) for k in keys}
base, runc, script = med["f0"], med["runc"], med["script"]
names = {f"f{n}": f"proxied, N = {n} other containers" for n in order}
names["runc"] = f"plain runc (`{e['B_RUNC_PATH']}`), same netns"
names["script"] = "the config-passing `/bin/sh` script exec'ing plain runc, same netns"
table = [
    "| Variant | Median (ms) | p90 (ms) | Min (ms) | Median ÷ N=0 | Median ÷ plain runc |",
    "|---|---:|---:|---:|---:|---:|",
]
for k in keys:
    bold = "**" if k == f"f{order[-1]}" else ""
    table.append(
        f"| {bold}{names[k]}{bold} | {med[k]:.1f} | {p90(times[k]):.1f} | {min(times[k]):.1f} | "
        + (f"{bold}{med[k] / base:.3f}×{bold}" if k.startswith("f") else "—")
        + f" | {med[k] / runc:.3f}× |"
    )
top = order[-1]
rtop = med[f"f{top}"] / base
target = float(e["B_TARGET"])
if "f3000" in med:
    r = med["f3000"] / base
    verdict = (f"median(N=3000) ÷ median(N=0) = {r:.3f}× — **met** (≤ {target:.2f}×)" if r <= target
               else f"median(N=3000) ÷ median(N=0) = {r:.3f}× — **not met** (> {target:.2f}×)")
else:
    verdict = f"not measured (no N=3000 level in this run; the largest, N={top}, gives {rtop:.3f}×)"
per_k = (med[f"f{top}"] - base) / top * 1000 if top else 0.0
seen = int(e["B_SANITY_SEEN_MS"])
seen_txt = ("already when `ctr run -d` returned" if seen <= 0
            else f"{seen} ms after `ctr run -d` returned")

doc = f"""## Scale: container lifecycle with N proxied containers on the host

What a whole lifecycle of one proxied container costs when the host already holds N
other proxied containers (their state files and NAT elements): the wall time of

    ctr --address SOCK -n envoy-sidecar-test run --rm --runc-binary WRAPPER-SCRIPT \\
        --annotation {e['B_ANN']} --with-ns network:/var/run/netns/NETNS \\
        localhost/envoy-sidecar/busybox:latest ID /bin/true

(create, start, wait, delete: every runc invocation the containerd shim makes, and the
hooks), with the proxy enabled and NETNS a network namespace with a veth to the host
whose address (container 198.18.0.2/30, host end 198.18.0.1 = `[host] address`) is
there before the container starts, so the product maps its host ports. One state dir
and config per level N, filled up front: N state files written directly
(`ContainerState` version 1 with 3 ports; 6 host ports each, 32000 + 6i .. +5, above
the measured container's pool 31100-31163; a distinct Envoy uid each from the start of
the uid pool, so allocation skips N uids; no memory limit; a `credentials/` dir and a
`nat.json` each; `.index.json` deleted after writing), then one unmeasured lifecycle
per level. The NAT map holds the elements of the
{e['B_MAX_LEVEL']} fill containers of the largest level (container IPs in 198.18.16.0/20
that nothing uses) **during all host-fill runs, whatever the level**: a level with fewer
state files has the first N of them. How the map's size itself costs is the next section.
Reference rows, in the same rotation and the same netns: plain runc, and the
config-passing `/bin/sh` script exec'ing plain runc (the shim does not pass ctr's
environment, so the proxied runs reach their config through such a script).

**Command:** `make bench` (runs `scripts/bench-scale.sh` after the other benchmarks;
`BENCH_SCALE_PARTS=fill scripts/bench-scale.sh` runs only this part).
`BENCH_SCALE_ROUNDS` and `BENCH_SCALE_LEVELS` change the run.

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}, cgroup {e['B_CGROUP']}  
**Runtime:** containerd {e['B_CONTAINERD']}, runc {e['B_RUNC']}, {e['B_NFT']}, Envoy {e['B_ENVOY_V']}  
**Rounds:** {rounds} measured (+ {e['B_WARMUP']} warm-up round(s) not counted), each
round running every variant once, in an order rotated every round; a fresh container id
per run ({e['B_FILL_SECS']} s in all).

{chr(10).join(table)}

**Target** (from the issue): ≤ {target:.2f}× at N = 3000: {verdict}.
Per 1000 containers on the host, the lifecycle grows by {per_k:.1f} ms (the difference of
the medians at N = {top} and N = 0, divided by {top}/1000).

### Proxy on vs plain runc, NAT applied

The N = 0 row against the plain runc row, both in a netns that has its address:
median(proxied, N=0) ÷ median(plain runc) = {base / runc:.3f}×; the config-passing
script alone accounts for median(script) ÷ median(plain runc) = {script / runc:.3f}×,
so the wrapper's own share is median(proxied, N=0) ÷ median(script) = {base / script:.3f}×.
Before measuring, a sanity run (`ctr run -d ... /bin/sleep 5`, the same config and
netns) showed the container's 3 TLS host ports ({e['B_SANITY_PORTS']}) in
`nft -j list map ip envoy_sidecar ports` {seen_txt} (`run -d` itself took
{e['B_SANITY_RUN_MS']} ms); the bench fails when they are not there within 5 s. On this
commit the supervisor (started by the poststart hook) maps the ports once it sees the
address, not the create itself, so in a `/bin/true` lifecycle the mapping may or may
not be in place before the delete removes it.

### How to read this

- The machine is shared and noisy: the variants are interleaved round-robin so noise
  and drift hit all alike; compare **medians**; p90 is much noisier. Differences of a
  few percent are within run-to-run noise.
- The proxied lifecycle includes the supervisor and the teardown at delete (stopping
  the sidecar, removing NAT and state), which plain runc does not have.
- What grows with N: the NAT map is the same for every level, so it is the state
  files. On this commit `create` reads and parses every state file under the host-wide
  lock (`Store::claims`) to find free host ports and Envoy uids — presumably most of
  the growth (not profiled here).
- After the runs the fill is removed and the script checks that no container is left
  and each level's state dir holds nothing but the product's `.lock`/`.index.json`
  (a leak check), and that no NAT element of the bench is left.
"""
with open(out, "w") as f:
    f.write(doc)

print()
print(f"Host fill ({rounds} interleaved rounds, {e['B_DATE']})")
print()
print("\n".join(table))
print()
print(f"target <= {target:.2f}x at N=3000: {verdict}")
print(f"proxied N=0 / runc = {base / runc:.3f}  script / runc = {script / runc:.3f}  proxied N=0 / script = {base / script:.3f}")
EOF
    "$PY" -I -S "$MD_SECTION" "$OUT" scale-fill <"$TMP/scale-fill.md" \
        || die "writing the scale-fill section of $OUT failed"
    log "wrote section 'scale-fill' of $OUT"
    ip netns del "$NETNS"
fi

# =================================================================================
# (2) NAT add/remove of one container, product vs per-rule iptables
# =================================================================================
if [ "$DO_NAT" = 1 ]; then
    log "building examples/nat_bench.rs"
    (cd "$REPO" && "$CARGO" build --release --quiet --example nat_bench) || die "building examples/nat_bench.rs failed"
    counts_csv="$(IFS=,; echo "${NAT_COUNTS[*]}")"
    log "NAT: counts $counts_csv, $NAT_REPS repetitions each"
    NAT_STARTED=1
    nat_t0=$(date +%s)
    (cd "$REPO" && "$CARGO" run --release --quiet --example nat_bench -- run \
        --counts "$counts_csv" --reps "$NAT_REPS" --port-base "$SET_PORT_BASE" \
        --ip-base "$NATB_IP_BASE" --measured-port "$NATB_MEASURED_PORT" \
        --measured-ip "$NATB_MEASURED_IP" --host-ip "$HOST_IP" --chain "$CHAIN") \
        >"$TMP/nat.jsonl" || die "examples/nat_bench.rs failed"
    NAT_SECS=$(( $(date +%s) - nat_t0 ))
    if iptables -w -t nat -S "$CHAIN" >/dev/null 2>&1; then die "nat_bench left chain $CHAIN behind"; fi
    NAT_STARTED=0
    left="$(our_nat)"
    [ -z "$left" ] || die "NAT elements left after nat_bench:"$'\n'"$left"
    remove_nat_table_if_ours || die "removing the empty 'table ip nat' iptables-nft created failed"
    export B_NAT_REPS="$NAT_REPS" B_NAT_SECS="$NAT_SECS"
    bench_section_date
    "$PY" -I -S - "$TMP/nat.jsonl" "$TMP/scale-nat.md" <<'EOF' || die "computing the NAT report failed"
import json, math, os, statistics, sys

src, out = sys.argv[1], sys.argv[2]
e = os.environ
pts = [json.loads(l) for l in open(src) if l.strip()]
assert pts, "no NAT results"
reps = int(e["B_NAT_REPS"])
for p in pts:
    for k in ("nat_add_ms", "nat_remove_ms", "nat_settle_ms", "iptables_add_ms", "iptables_delete_ms", "conntrack_flush_ms"):
        assert len(p[k]) == reps, f"N={p['n']} {k}: {len(p[k])} samples, expected {reps}"

def p90(t):
    s = sorted(t)
    return s[math.ceil(0.9 * len(s)) - 1]

def cell(t):
    return f"{statistics.median(t):.1f} ({p90(t):.1f})"

table = [
    "| N containers already mapped | map elements / chain rules | product `Nat::add` | product `Nat::remove` (caller waits) | then in the background until settled | conntrack flush alone (ctnetlink) | iptables 6 × `-A` | iptables 6 × `-D` | iptables add ÷ product add | iptables delete ÷ product remove |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for p in pts:
    # The whole removal, foreground and background, for the comparison.
    ma = statistics.median(p["nat_add_ms"])
    mr = statistics.median(p["nat_remove_ms"]) + statistics.median(p["nat_settle_ms"])
    ia, idl = statistics.median(p["iptables_add_ms"]), statistics.median(p["iptables_delete_ms"])
    table.append(
        f"| {p['n']} | {p['map_elements']} / {p['chain_rules']} | **{cell(p['nat_add_ms'])}** | **{cell(p['nat_remove_ms'])}** | "
        f"{cell(p['nat_settle_ms'])} | {cell(p['conntrack_flush_ms'])} | {cell(p['iptables_add_ms'])} | {cell(p['iptables_delete_ms'])} | "
        f"{ia / ma:.1f}× | {idl / mr:.1f}× |"
    )
first, last = pts[0], pts[-1]
g = lambda p, k: statistics.median(p[k])
growth = (
    f"From N = {first['n']} to N = {last['n']}: product add ×{g(last, 'nat_add_ms') / g(first, 'nat_add_ms'):.2f}, "
    f"product remove ×{g(last, 'nat_remove_ms') / g(first, 'nat_remove_ms'):.2f}; "
    f"iptables add ×{g(last, 'iptables_add_ms') / g(first, 'iptables_add_ms'):.2f}, "
    f"iptables delete ×{g(last, 'iptables_delete_ms') / g(first, 'iptables_delete_ms'):.2f}."
)
doc = f"""## Scale: NAT add/remove of one container vs the size of the map

What mapping and unmapping one container's host ports costs when the host already maps
N containers: 6 mappings (3 TLS proxy ports + 3 unproxied, as
`{e['B_ANN']}` gets them), host address 198.18.0.1. Two ways, same run, same N,
repetitions alternating which goes first:

- **product**: `envoy_sidecar::nat::Nat::add` and `Nat::remove` (the library's own
  code, `examples/nat_bench.rs`) on the product's table `ip envoy_sidecar`, verdict map
  `ports` preloaded with N other containers' 6 N elements. Both talk to the kernel over
  netlink (no process). `Nat::remove` includes the ctnetlink flush of the container
  IP's connections (what `conntrack -D --reply-src IP` does), on the same socket as
  the element delete; that flush alone, on a socket of its own, is timed separately
  too (fifth column).
- **baseline**, the way CNI portmap and Garden's kawasaki do it: one DNAT rule per
  mapping, `iptables -w -t nat -A ESBENCH -p tcp -d 198.18.0.1 --dport P -j DNAT
  --to-destination IP:PORT`, one process spawned per rule, then `-D` per rule, in a
  chain of the bench's own (`ESBENCH` in table `nat`, not jumped to from any hook)
  preloaded with 6 N rules (`iptables-restore --noflush`). Backend: `{e['B_IPTABLES']}`.

Preloaded elements and rules point at container IPs in 198.18.32.0/19 that nothing uses;
all are removed at the end (the chain too).

**Command:** `make bench` (`scripts/bench-scale.sh`; `BENCH_SCALE_PARTS=nat` runs only
this part, `BENCH_SCALE_NAT_COUNTS` and `BENCH_SCALE_NAT_REPS` change it). The program:
`cargo run --release --example nat_bench -- run --counts 1,100,1000,3000 --reps {reps} ...`.

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}  
**Tools:** {e['B_NFT']}, {e['B_IPTABLES']}  
**Repetitions:** {reps} per point (+ 2 warm-up), {e['B_NAT_SECS']} s in all.

Median (p90) in ms; one container = 6 mappings.

{chr(10).join(table)}

{growth}

**How to read this.** The product's add and remove are each one nf_tables netlink
transaction whatever N (a map element change: the kernel does a hash insert or
delete), so they do not grow with N. Add is a fraction of a millisecond. So is what
the caller of remove waits for: the kernel's acknowledgement that the elements are gone
(the host ports may then be reused). What follows is the kernel's cost, not the
product's, and runs on a thread beside the caller (during `runc delete`, for the
wrapper) until the process settles it before exiting: the conntrack flush walks the
kernel's whole connection hash table (its bucket count, not the number of
connections), and closing the netfilter socket waits (5-15 ms here) until the kernel
has freed the deleted elements (an RCU grace period; `nft` pays the same at exit).
Together {g(last, 'nat_settle_ms'):.1f} ms at N = {last['n']} (the flush alone, on a
socket of its own, {g(last, 'conntrack_flush_ms'):.1f} ms); the ratio column compares
the baseline's delete with the whole removal, foreground and background. The baseline spawns 6 `iptables` processes per container;
with the nf_tables backend each one fetches the ruleset it needs from the kernel (for
`-D`, the chain's rules, to find the one to delete), so its cost grows with the rules
already there. The machine is shared and noisy: read the medians.
"""
with open(out, "w") as f:
    f.write(doc)
print()
print(f"NAT add/remove ({reps} repetitions per point, {e['B_DATE']}), median (p90) ms")
print()
print("\n".join(table))
print()
print(growth)
EOF
    "$PY" -I -S "$MD_SECTION" "$OUT" scale-nat <"$TMP/scale-nat.md" \
        || die "writing the scale-nat section of $OUT failed"
    log "wrote section 'scale-nat' of $OUT"
fi

# =================================================================================
# (4) gc over GC_N stale containers
# =================================================================================
if [ "$DO_GC" = 1 ]; then
    GC_POOL_END=$(( SET_PORT_BASE + 6 * GC_N - 1 ))
    GC_CONFIG="$TMP/gc.toml"
    STATE="$TMP/state-gc"
    write_config "$GC_CONFIG" "$STATE" "$SET_PORT_BASE" "$GC_POOL_END"
    created="$(date -u -d '-1 hour' '+%Y-%m-%dT%H:%M:%SZ')"
    log "gc: writing $GC_N stale containers' state (runc root $GC_RUNC_ROOT) and NAT elements"
    "$PY" "$FILL_PY" state "$STATE" "$NS" "$GC_PREFIX" "$GC_N" "$SET_PORT_BASE" "$GC_IP_BASE" \
        "$UID_BASE" "$HOST_IP" "$GC_RUNC_ROOT" "$created" --nat-json || die "writing the gc state failed"
    chmod 0700 "$STATE" "$STATE/$NS"
    rm -f "$STATE/.index.json"
    "$PY" "$FILL_PY" nft add "$GC_N" "$SET_PORT_BASE" "$GC_IP_BASE" >"$TMP/gc-add.nft"
    # The product's table: created by the product's own code if no one has yet.
    nft list table ip envoy_sidecar >/dev/null 2>&1 \
        || (cd "$REPO" && "$CARGO" run --release --quiet --example nat_bench -- ensure-table) \
        || die "creating the product's NAT table failed"
    nft -f "$TMP/gc-add.nft" || die "adding the gc set's NAT elements failed"
    gc_elems() { our_nat "${GC_IP_BASE%.*}.0/20" | wc -l; }
    gc_states() { find "$STATE" -mindepth 3 -maxdepth 3 -name state.json | wc -l; }
    [ "$(gc_elems)" = $((6 * GC_N)) ] || die "gc: $(gc_elems) elements in the map, expected $((6 * GC_N))"
    [ "$(gc_states)" = "$GC_N" ] || die "gc: $(gc_states) state files, expected $GC_N"
    # runc must not know them (their ids are ours and fresh).
    if "$RUNC" --root "$GC_RUNC_ROOT" list -q 2>/dev/null | grep -q "^$GC_PREFIX"; then
        die "runc root $GC_RUNC_ROOT knows a container named $GC_PREFIX*: cannot make stale state with those ids"
    fi
    DRY=()
    for _ in 1 2 3; do
        ms="$("$PY" -I -S "$TIMEIT" "$TMP/gc-dry.log" "$CLI" --config "$GC_CONFIG" gc --dry-run)" \
            || { tail -20 "$TMP/gc-dry.log" >&2; die "gc --dry-run failed"; }
        DRY+=("$ms")
        # The state files were written behind the allocation index's back (it is
        # missing): gc also plans its rebuild, one more action.
        want=$GC_N
        grep -q '^\[dry-run\] rebuilding the allocation index' "$TMP/gc-dry.log" && want=$((GC_N + 1))
        grep -qx "gc: would $want action(s)" "$TMP/gc-dry.log" \
            || { tail -5 "$TMP/gc-dry.log" >&2; die "gc --dry-run: expected 'gc: would $want action(s)'"; }
        [ "$(grep -c '^\[dry-run\] container .* is gone' "$TMP/gc-dry.log")" = "$GC_N" ] \
            || die "gc --dry-run: not $GC_N 'container ... is gone' actions"
        { [ "$(gc_states)" = "$GC_N" ] && [ "$(gc_elems)" = $((6 * GC_N)) ]; } \
            || die "gc --dry-run changed something (state files $(gc_states), elements $(gc_elems))"
    done
    log "gc --dry-run: ${DRY[*]} ms"
    REAL="$("$PY" -I -S "$TIMEIT" "$TMP/gc-real.log" "$CLI" --config "$GC_CONFIG" gc)" \
        || { tail -20 "$TMP/gc-real.log" >&2; die "gc failed"; }
    log "gc: $REAL ms"
    want=$GC_N
    grep -q '^rebuilding the allocation index' "$TMP/gc-real.log" && want=$((GC_N + 1))
    grep -qx "gc: did $want action(s)" "$TMP/gc-real.log" \
        || { tail -5 "$TMP/gc-real.log" >&2; die "gc: expected 'gc: did $want action(s)'"; }
    [ "$(gc_elems)" = 0 ] || die "gc: $(gc_elems) of the stale containers' NAT elements left"
    bench_leak_check # the state dir: nothing but .lock / .index.json
    export B_GC_N="$GC_N" B_GC_DRY="${DRY[*]}" B_GC_REAL="$REAL" B_GC_ROOT="$GC_RUNC_ROOT"
    B_GC_RUNC_LISTED="$("$RUNC" --root "$GC_RUNC_ROOT" list -q 2>/dev/null | wc -l)"
    export B_GC_RUNC_LISTED
    bench_section_date
    "$PY" -I -S - "$TMP/scale-gc.md" <<'EOF' || die "computing the gc report failed"
import os, statistics, sys
out = sys.argv[1]
e = os.environ
n = int(e["B_GC_N"])
dry = [float(x) for x in e["B_GC_DRY"].split()]
real = float(e["B_GC_REAL"])
table = [
    "| Run | Wall time (s) | per stale container (ms) |",
    "|---|---:|---:|",
    f"| `gc --dry-run` (median of {len(dry)}: {', '.join(f'{d / 1000:.2f}' for d in dry)} s) | {statistics.median(dry) / 1000:.2f} | {statistics.median(dry) / n:.2f} |",
    f"| **`gc`** (once) | **{real / 1000:.2f}** | {real / n:.2f} |",
]
doc = f"""## Scale: gc over {n} stale containers

`envoy-sidecar --config C gc --dry-run`, then a real `envoy-sidecar --config C gc`,
over {n} stale proxied containers: state files (`ContainerState` version 1, 3 ports, a
`credentials/` dir, created an hour ago: past gc's 60 s grace) of containers that runc
does not know (their `runc_root` is `{e['B_GC_ROOT']}`, the containerd shim's, which
listed {e['B_GC_RUNC_LISTED']} container(s) at the time), each with its `nat.json` and
its 6 NAT elements in `ip envoy_sidecar ports` (host ports 32000 + 6i, container IPs in
198.18.64.0/20 that nothing uses; the config's pool is exactly those ports). gc reads
every state file, asks runc once per runc root (`runc list`), scans the process table
and the cgroups, and plans one "container is gone" action per container; the real run
then tears them down: no supervisor record, so nothing to stop; the `nat.json`
elements of all of them removed with one `Nat::remove` (netlink transactions of 512
mappings on one socket, one walk of the conntrack table for all their IPs); each
directory removed (and released in the allocation index). The dry run must plan exactly
{n} actions and change nothing; afterwards the state dir must be empty (but for the
product's `.lock`/`.index.json`) and none of the elements left — both checked.

**Command:** `make bench` (`scripts/bench-scale.sh`; `BENCH_SCALE_PARTS=gc` runs only
this part, `BENCH_SCALE_GC_N` sets the number).

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}  
**Tools:** runc {e['B_RUNC']}, {e['B_NFT']}

{chr(10).join(table)}

**How to read this.** The dry run is what gc costs to decide (reading {n} state files
and their records, one `runc list`, one listing of the map); the real run adds the
teardown: per container, a look for its processes, its state removal and index
update; the NAT removal is one batch for all of them. One run each, on a shared machine: expect ±20 %.
"""
with open(out, "w") as f:
    f.write(doc)
print()
print(f"gc over {n} stale containers ({e['B_DATE']})")
print()
print("\n".join(table))
EOF
    "$PY" -I -S "$MD_SECTION" "$OUT" scale-gc <"$TMP/scale-gc.md" \
        || die "writing the scale-gc section of $OUT failed"
    log "wrote section 'scale-gc' of $OUT"
fi

# ---- final leak check ------------------------------------------------------------
left="$(our_nat)"
[ -z "$left" ] || die "NAT elements of this bench left at the end:"$'\n'"$left"
if iptables -w -t nat -S "$CHAIN" >/dev/null 2>&1; then die "iptables chain $CHAIN left at the end"; fi
left="$(ctr_ containers ls -q | grep -F "$ID_PREFIX" || true)"
[ -z "$left" ] || die "containers left behind: $left"
log "done"
