#!/usr/bin/env bash
# Sidecar memory sizing: what Envoy (the installed /usr/local/bin/envoy, with the
# configuration the supervisor generates) costs at idle and per concurrent open TLS
# connection, private (anonymous) and file-backed memory separately, and whether the
# memory comes back after the connections close.
#
# For each mode, TLS and mutual TLS (require_and_verify_client_certificates = true,
# a client CA from `envoy-sidecar generate-ca`, a client certificate from openssl), ONE
# container through the wrapper with the proxy enabled (proxy.max_connections = 10000),
# app `httpd -f -p 8080 -h /www` (busybox), in a network namespace with a veth to the
# host (198.51.100.232/30: host .233, container .234). Then, one after the other:
#   - idle: 2 s after the first complete request through the proxy;
#   - for N in BENCH_MEMORY_COUNTS (100 1000 2000): N concurrent TLS connections from
#     the host to 198.51.100.234:61001, opened and held by scripts/tls-load.py (completed
#     handshakes, each with the start of an HTTP/1.1 request, so Envoy also holds the
#     upstream connection to the app; see that script for why the request is left
#     unfinished), measured 1 s after all are open; then all closed, measured 2 s later.
# Last, BENCH_MEMORY_LATE (15) s after the last close, one more point.
# At each point: Envoy's RssAnon/RssFile/VmRSS (/proc/<pid>/status), its own memory
# cgroup's memory.stat rss/cache and memory.usage_in_bytes (cgroup v1,
# /sys/fs/cgroup/memory/envoy-sidecar-test/<id>/envoy-sidecar), tcmalloc's view
# (admin /memory), and the connection gauges from admin /stats read from inside the
# container (`ctr task exec ... wget`). A point with fewer open connections than
# intended fails the bench.
# Fits RssAnon = base + slope × N by least squares over idle and the open points, per
# mode, and writes its section (`memory`) of docs/BENCHMARKS.md via scripts/md-section.py.
# (The fit and the Markdown come from scripts/bench-memory-report.py.)
# Everything (containers, namespace, temp dir, processes) is removed at exit, and the
# wrapper's state dir is checked to be empty.
#
# Run it through `make bench` (deps, release build, private containerd up). Root only.
#
# Environment:
#   BENCH_MEMORY_COUNTS  connection counts to hold (default "100 1000 2000"; each ≤ 9000)
#   BENCH_MEMORY_MODES   "tls mtls" (default), or one of them
#   BENCH_MEMORY_LATE    s to wait after the last close for a final point (default 15)
#   CONTAINERD_ADDRESS   default /run/envoy-sidecar-test/containerd.sock
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
SOCK="${CONTAINERD_ADDRESS:-/run/envoy-sidecar-test/containerd.sock}"
NS=envoy-sidecar-test
IMAGE=localhost/envoy-sidecar/busybox:latest
COUNTS="${BENCH_MEMORY_COUNTS:-100 1000 2000}"
MODES="${BENCH_MEMORY_MODES:-tls mtls}"
IDLE=2    # s after the first response / after closing, before measuring
SETTLE=1  # s after the last connection opened, before measuring
LATE="${BENCH_MEMORY_LATE:-15}"  # s after the last close, for the final point
MAX_CONNECTIONS=10000
LOAD="$REPO/scripts/tls-load.py"
RUNC=/usr/sbin/runc
APP_PORT=8080
PROXY_PORT=61001
HOST_IP=198.51.100.233
CTR_IP=198.51.100.234
NETNS="es-benchmem-$$"
HOST_IF="esbm$$"
ID_PREFIX="esbm-$$-"

die() { echo "bench-memory: error: $*" >&2; exit 1; }
log() { echo "bench-memory: $*" >&2; }
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }
# shellcheck source=scripts/bench-lib.sh
. "$REPO/scripts/bench-lib.sh"

# ---- preflight -------------------------------------------------------------------
for n in $COUNTS; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] && [ "$n" -le 9000 ] \
        || die "BENCH_MEMORY_COUNTS: '$n' is not an integer in 1..9000"
done
[ -n "${COUNTS// /}" ] || die "BENCH_MEMORY_COUNTS is empty"
for m in $MODES; do [[ "$m" =~ ^(tls|mtls)$ ]] || die "BENCH_MEMORY_MODES: '$m' is not tls or mtls"; done
[ -n "${MODES// /}" ] || die "BENCH_MEMORY_MODES is empty"
[[ "$LATE" =~ ^[0-9]+$ ]] && [ "$LATE" -le 600 ] || die "BENCH_MEMORY_LATE must be 0..600 s, got '$LATE'"
[ "$(id -u)" = 0 ] || die "must run as root (containerd, runc, cgroups, netns); use 'make bench'"
for b in ctr ip python3 openssl; do command -v "$b" >/dev/null || die "'$b' not found in PATH"; done
[ -x "$WRAPPER" ] || die "$WRAPPER missing; run 'make release' (or 'make bench')"
[ -x "$CLI" ] || die "$CLI missing; run 'make release' (or 'make bench')"
[ -x "$ENVOY" ] || die "$ENVOY missing; run 'scripts/install-deps.sh' (or 'make bench')"
[ -r "$LOAD" ] || die "$LOAD missing"
timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1 \
    || die "no containerd answering on $SOCK; run 'tests/env/containerd.sh up' (or 'make bench')"
ctr_ images ls -q | grep -qxF "$IMAGE" \
    || die "image $IMAGE not in namespace $NS; run 'tests/env/containerd.sh up'"
[ -d /sys/fs/cgroup/memory ] || die "no cgroup v1 memory controller at /sys/fs/cgroup/memory (this bench reads cgroup v1)"
if ip -o addr show | grep -qF " $HOST_IP/"; then
    die "$HOST_IP is already configured on this host (another bench running?)"
fi
PY="$(python3 -c 'import sys; print(sys.executable)')"

# ---- sandbox + cleanup -------------------------------------------------------------
TMP="$(mktemp -d /tmp/envoy-sidecar-bench-memory.XXXXXX)"
# Envoy runs as an unprivileged user and reads its bootstrap under the state dir.
chmod 0755 "$TMP"
STATE="$TMP/state"
RESULTS="$TMP/results.jsonl"
: >"$RESULTS"
CURRENT_ID=""
LOAD_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$LOAD_PID" ]; then kill -9 "$LOAD_PID" 2>/dev/null || true; fi
    bench_remove_leftovers
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- credentials and configuration -------------------------------------------------
"$CLI" generate-ca --out "$TMP/ca" >/dev/null || die "generate-ca failed"
# The routers' side of mutual TLS: a client CA and a client certificate it signed.
"$CLI" generate-ca --out "$TMP/client-ca" --cn "bench client CA" >/dev/null \
    || die "generate-ca (client CA) failed"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$TMP/client.key" -subj "/CN=bench-router" -out "$TMP/client.csr" 2>/dev/null \
    || die "openssl: client key/CSR failed"
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:bench-router\n' \
    >"$TMP/client.ext"
openssl x509 -req -in "$TMP/client.csr" -CA "$TMP/client-ca/ca.crt" -CAkey "$TMP/client-ca/ca.key" \
    -CAcreateserial -days 1 -sha256 -extfile "$TMP/client.ext" -out "$TMP/client.crt" 2>/dev/null \
    || die "openssl: signing the client certificate failed"

write_config() { # MODE
    local mode="$1"
    {
        echo "[proxy]"
        echo "enabled = true"
        echo "envoy_path = \"$ENVOY\""
        echo "max_connections = $MAX_CONNECTIONS"
        # What is measured is memory per held connection, unbounded: the heap budget
        # follows the allocation (16.4 MiB at the default 32 MiB would refuse past
        # ~410 connections), so the allocation is set far above the largest level.
        echo "additional_memory_allocation_mb = 1024"
        # The bench reads admin with wget from inside the container.
        echo "admin_listener = \"loopback\""
        if [ "$mode" = mtls ]; then
            echo "require_and_verify_client_certificates = true"
            echo "trusted_ca_certificates = [\"$TMP/client-ca/ca.crt\"]"
        fi
        echo "[instance_identity]"
        echo "ca_cert = \"$TMP/ca/ca.crt\""
        echo "ca_key = \"$TMP/ca/ca.key\""
        echo "[runtime]"
        echo "state_dir = \"$STATE\""
    } >"$TMP/config-$mode.toml"
    "$CLI" --config "$TMP/config-$mode.toml" check-config >/dev/null \
        || die "config for $mode rejected by check-config"
    # The shim does not pass ctr's environment on: the config reaches the wrapper
    # through a script (as in the integration tests).
    printf '#!/bin/sh\nENVOY_SIDECAR_CONFIG=%s exec %s "$@"\n' "$TMP/config-$mode.toml" "$WRAPPER" \
        >"$TMP/runc-$mode"
    chmod 0755 "$TMP/runc-$mode"
}

# ---- the container's network --------------------------------------------------------
ip netns add "$NETNS"
ip link add "$HOST_IF" type veth peer name eth0 netns "$NETNS"
ip addr add "$HOST_IP/30" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip -n "$NETNS" addr add "$CTR_IP/30" dev eth0
ip -n "$NETNS" link set eth0 up
ip -n "$NETNS" link set lo up
ip -n "$NETNS" route add default via "$HOST_IP"
NETNS_PATH="/var/run/netns/$NETNS"

# ---- one measurement point ---------------------------------------------------------
# snapshot.py MODE ID PHASE N LOADJSON: appends one JSON line to $RESULTS.
cat >"$TMP/snapshot.py" <<'EOF'
import json, os, subprocess, sys, time
sock, ns, state, results, mode, cid, phase, n, load = sys.argv[1:]
n = int(n)
load = json.loads(load) if load else None


def fail(msg):
    sys.stderr.write(f"snapshot {cid} {phase} {n}: {msg}\n")
    sys.exit(1)


cdir = os.path.join(state, ns, cid)
with open(os.path.join(cdir, "supervisor.json")) as f:
    rec = json.load(f)
envoy = rec["envoy"]
pid = envoy["pid"]
with open(f"/proc/{pid}/stat") as f:
    s = f.read()
if int(s[s.rindex(")") + 2:].split()[19]) != envoy["start_time"]:
    fail(f"Envoy pid {pid} is not the recorded process")
if rec.get("envoy_restarts", 0) != 0:
    fail(f"Envoy restarted {rec['envoy_restarts']} time(s) during the measurement")
with open(os.path.join(cdir, "envoy", "bootstrap.json")) as f:
    admin_port = json.load(f)["admin"]["address"]["socket_address"]["port_value"]

status = {}
with open(f"/proc/{pid}/status") as f:
    for line in f:
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            status[k] = int(v.split()[0])  # kB
nofile = None
with open(f"/proc/{pid}/limits") as f:
    for line in f:
        if line.startswith("Max open files"):
            nofile = line.split()[3]
mem_rel = None
with open(f"/proc/{pid}/cgroup") as f:
    for line in f:
        _, ctrls, rel = line.rstrip("\n").split(":", 2)
        if "memory" in ctrls.split(","):
            mem_rel = rel
if mem_rel != f"/{ns}/{cid}/envoy-sidecar":
    fail(f"Envoy's memory cgroup is {mem_rel}, expected /{ns}/{cid}/envoy-sidecar")
cg = f"/sys/fs/cgroup/memory{mem_rel}"


def read_int(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


usage = read_int(f"{cg}/memory.usage_in_bytes")
kmem = read_int(f"{cg}/memory.kmem.usage_in_bytes")
stat = {}
with open(f"{cg}/memory.stat") as f:
    for line in f:
        k, v = line.split()
        stat[k] = int(v)


def admin(path):
    # From inside the container, as the brief of this bench says: a process in the
    # container's namespaces (its own exec), busybox wget against admin on loopback.
    out = subprocess.run(
        ["ctr", "--address", sock, "-n", ns, "tasks", "exec", "--exec-id",
         f"benchmem-{os.getpid()}-{time.monotonic_ns()}", cid,
         "wget", "-qO-", f"http://127.0.0.1:{admin_port}{path}"],
        capture_output=True, timeout=30)
    if out.returncode != 0:
        fail(f"admin {path}: exit {out.returncode}: {out.stderr.decode(errors='replace')}")
    return out.stdout.decode()


stats = {}
for line in admin("/stats?filter=cx_active%7Cssl%5C.handshake%7Cssl%5C.connection_error"
                  "%7Cdownstream_cx_overflow%7Cdownstream_cx_total").splitlines():
    k, _, v = line.partition(":")
    v = v.strip()
    if v.isdigit():
        stats[k.strip()] = int(v)
mem = json.loads(admin("/memory"))
lis = "listener.0.0.0.0_61001."
row = {
    "mode": mode, "id": cid, "phase": phase, "n": n, "pid": pid, "nofile": nofile,
    "rss_anon_kib": status["RssAnon"], "rss_file_kib": status["RssFile"],
    "rss_shmem_kib": status.get("RssShmem", 0), "vmrss_kib": status["VmRSS"],
    "vmhwm_kib": status["VmHWM"],
    "cg_usage": usage, "cg_kmem": kmem, "cg_rss": stat.get("rss", 0),
    "cg_cache": stat.get("cache", 0), "cg_mapped_file": stat.get("mapped_file", 0),
    "ds_active": stats.get(lis + "downstream_cx_active"),
    "ds_total": stats.get(lis + "downstream_cx_total"),
    "us_active": stats.get("cluster.app-8080.upstream_cx_active"),
    "ssl_handshake": stats.get(lis + "ssl.handshake"),
    "ssl_errors": stats.get(lis + "ssl.connection_error"),
    "cx_overflow": stats.get(lis + "downstream_cx_overflow"),
    "tc_allocated": int(mem.get("allocated", 0)), "tc_heap": int(mem.get("heap_size", 0)),
    "tc_unmapped": int(mem.get("pageheap_unmapped", 0)),
    "tc_free": int(mem.get("pageheap_free", 0)),
    "load": load,
    "stats": stats,
}
with open(results, "a") as f:
    f.write(json.dumps(row) + "\n")
print(f"{phase:>6} N={n:<5} active={row['ds_active']}/{row['us_active']} "
      f"RssAnon={row['rss_anon_kib'] / 1024:.1f} MiB RssFile={row['rss_file_kib'] / 1024:.1f} MiB "
      f"cgroup usage={usage / 2**20:.1f} rss={row['cg_rss'] / 2**20:.1f} "
      f"cache={row['cg_cache'] / 2**20:.1f} MiB tcmalloc allocated={row['tc_allocated'] / 2**20:.1f} "
      f"heap={row['tc_heap'] / 2**20:.1f} MiB")
if phase == "open" and (row["ds_active"] or 0) < n:
    fail(f"Envoy reports {row['ds_active']} active downstream connections, expected {n}")
EOF

snapshot() { # MODE ID PHASE N [LOADJSON]
    "$PY" -I -S "$TMP/snapshot.py" "$SOCK" "$NS" "$STATE" "$RESULTS" "$1" "$2" "$3" "$4" "${5:-}" >&2
}

client_args() { # MODE ID
    local a=(--host "$CTR_IP" --port "$PROXY_PORT" --ca "$TMP/ca/ca.crt" --server-name "$2")
    if [ "$1" = mtls ]; then a+=(--cert "$TMP/client.crt" --key "$TMP/client.key"); fi
    printf '%s\n' "${a[@]}"
}

measure_mode() { # MODE
    local mode="$1" id="${ID_PREFIX}$1" n i ready summary rc args
    write_config "$mode"
    mapfile -t args < <(client_args "$mode" "$id")
    log "[$mode] starting container $id"
    CURRENT_ID="$id"
    ctr_ run -d --runc-binary "$TMP/runc-$mode" --annotation "envoy-sidecar/ports=$APP_PORT" \
        --with-ns=network:"$NETNS_PATH" "$IMAGE" "$id" httpd -f -p "$APP_PORT" -h /www \
        >"$TMP/run-$mode.log" 2>&1 || die "ctr run failed: $(cat "$TMP/run-$mode.log")"
    if ! "$PY" -I -S "$LOAD" probe "${args[@]}" --timeout 30 >/dev/null; then
        for f in supervisor.log envoy.log; do
            echo "---- $f of $id (last 30 lines) ----" >&2
            tail -n 30 "$STATE/$NS/$id/$f" >&2 2>/dev/null || true
        done
        die "[$mode] no response through the proxy"
    fi
    if [ "$mode" = mtls ]; then
        # Mutual TLS must really be required: the same request without a client
        # certificate has to fail.
        mapfile -t noc < <(client_args tls "$id")
        if "$PY" -I -S "$LOAD" probe "${noc[@]}" --timeout 0 >/dev/null 2>&1; then
            die "[mtls] a client without a certificate got a response: mTLS is not enforced"
        fi
    fi
    sleep "$IDLE"
    snapshot "$mode" "$id" idle 0
    for n in $COUNTS; do
        rm -f "$TMP/ready.json"
        "$PY" -I -S "$LOAD" hold "${args[@]}" --n "$n" --ready-file "$TMP/ready.json" \
            --open-timeout 60 --hold-max 40 >"$TMP/load.out" 2>"$TMP/load.err" &
        LOAD_PID=$!
        for ((i = 0; i < 700; i++)); do  # ≤ 70 s: the client's own open timeout is 60 s
            [ -e "$TMP/ready.json" ] && break
            kill -0 "$LOAD_PID" 2>/dev/null || break
            sleep 0.1
        done
        [ -e "$TMP/ready.json" ] || die "[$mode] load client did not get ready: $(cat "$TMP/load.err")"
        ready="$(cat "$TMP/ready.json")"
        sleep "$SETTLE"
        snapshot "$mode" "$id" open "$n" "$ready" \
            || { log "load client: $ready"; die "[$mode] measurement with $n connections failed"; }
        kill -TERM "$LOAD_PID" 2>/dev/null || true
        rc=0
        wait "$LOAD_PID" || rc=$?
        LOAD_PID=""
        summary="$(cat "$TMP/load.out")"
        [ "$rc" = 0 ] || die "[$mode] load client with $n connections exited $rc: $summary $(cat "$TMP/load.err")"
        log "[$mode] load client: $summary"
        sleep "$IDLE"
        snapshot "$mode" "$id" closed "$n" "$summary"
    done
    # Does it come back later? tcmalloc releases nothing by itself unless configured to.
    sleep "$LATE"
    snapshot "$mode" "$id" late "$n"
    remove_container "$id"
    ctr_ containers info "$id" >/dev/null 2>&1 && die "container $id still exists after removal"
    CURRENT_ID=""
    [ ! -e "$STATE/$NS/$id" ] || die "state of $id left behind: $(ls -A "$STATE/$NS/$id")"
    [ ! -d "/sys/fs/cgroup/memory/$NS/$id" ] || die "memory cgroup of $id left behind"
    local left
    left="$(our_pids)"
    [ -z "$left" ] || die "processes of the bench left after removing $id: $left"
}

for mode in $MODES; do
    measure_mode "$mode"
done

# ---- leak checks ------------------------------------------------------------------
bench_leak_check

# ---- report -----------------------------------------------------------------------
bench_export_machine_facts
export B_ENVOY="$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: *//p' | head -n1)"
export B_ENVOY_SIZE_MIB="$(( $(stat -c %s "$(readlink -f "$ENVOY")") / 1048576 ))"
export B_COUNTS="$COUNTS" B_IDLE="$IDLE" B_SETTLE="$SETTLE" B_MAXC="$MAX_CONNECTIONS"
export B_IP="$CTR_IP" B_PORT="$PROXY_PORT" B_LATE="$LATE"

SECTION="$TMP/memory.md"
"$PY" -I -S "$REPO/scripts/bench-memory-report.py" "$RESULTS" "$SECTION" \
    || die "computing the report failed"
"$PY" -I -S "$MD_SECTION" "$OUT" memory <"$SECTION" \
    || die "writing the memory section of $OUT failed"
log "wrote section 'memory' of $OUT"
