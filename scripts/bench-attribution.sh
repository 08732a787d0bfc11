#!/usr/bin/env bash
# What makes runc slower with N proxied containers on the host (the density bench's
# ready ratio), one piece of the product at a time. ATTRIB_N (default 200) containers
# `ctr run -d IMAGE ID httpd -f -p 8080 -h /www` one after another (ctr's own private
# netns each, no CNI), with a `date` script around runc timing its `create` and
# `start`, for each of:
#   plain    runc itself, no proxy;
#   standin  the wrapper, proxy on, `proxy.envoy_path` a stand-in that only sleeps:
#            supervisors, cgroups, state, credentials — everything but Envoy;
#   envoy    the wrapper, proxy on, real Envoys;
# reporting runc's own create + start, median of the first 10 and of the last 10.
# And each new Envoy's own start-up: `utime + stime` of the Envoy of 10 new proxied
# containers, 2 s after `ctr run -d` returned, with no other container and with the
# ATTRIB_N of `envoy` still running.
# Prints its section (`attribution`) and writes it to docs/BENCHMARKS.md.
#
# Needs root and the private containerd of tests/env/containerd.sh (`make bench`).
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
SOCK="${CONTAINERD_ADDRESS:-/run/envoy-sidecar-test/containerd.sock}"
NS=envoy-sidecar-test
IMAGE=localhost/envoy-sidecar/busybox:latest
RUNC=/usr/sbin/runc
N="${ATTRIB_N:-200}"
ID_PREFIX="esba-$$-"
CURRENT_ID=""
NETNS="" HOST_IF=""

die() { echo "bench-attribution: error: $*" >&2; exit 1; }
log() { echo "bench-attribution: $*" >&2; }
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }
. "$REPO/scripts/bench-lib.sh"

[[ "$N" =~ ^[1-9][0-9]*$ ]] && [ "$N" -ge 20 ] || die "ATTRIB_N must be an integer >= 20, got '$N'"
[ "$(id -u)" = 0 ] || die "must run as root (containerd, runc, cgroups); use 'make bench'"
[ -x "$WRAPPER" ] || die "$WRAPPER missing; run 'make release' (or 'make bench')"
[ -x "$CLI" ] || die "$CLI missing; run 'make release' (or 'make bench')"
[ -x "$ENVOY" ] || die "$ENVOY missing; run 'scripts/install-deps.sh' (or 'make bench')"
timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1 \
    || die "no containerd answering on $SOCK; run 'tests/env/containerd.sh up' (or 'make bench')"
ctr_ images ls -q | grep -qxF "$IMAGE" \
    || die "image $IMAGE not in namespace $NS; run 'tests/env/containerd.sh up'"
PY="$(python3 -c 'import sys; print(sys.executable)')"

TMP="$(mktemp -d /tmp/envoy-sidecar-bench-attribution.XXXXXX)"
chmod 0755 "$TMP"
STATE="$TMP/state"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    bench_remove_leftovers
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$CLI" generate-ca --out "$TMP/ca" >/dev/null || die "generate-ca failed"
# runc's own create and start, timed: "<id> <subcommand> <µs>" a line.
cat >"$TMP/runc-timed" <<EOF
#!/bin/bash
s=\$(date +%s%N); $RUNC "\$@"; rc=\$?; e=\$(date +%s%N)
for a; do case \$a in create|start) echo "\${@: -1} \$a \$(( (e - s) / 1000 ))" >>$TMP/runc.log; break;; esac; done
exit \$rc
EOF
printf '#!/bin/sh\nexec sleep 3600\n' >"$TMP/envoy-standin"
for v in standin envoy; do
    envoy="$ENVOY"
    [ "$v" = standin ] && envoy="$TMP/envoy-standin"
    cat >"$TMP/$v.toml" <<EOF
[proxy]
enabled = true
envoy_path = "$envoy"
[instance_identity]
ca_cert = "$TMP/ca/ca.crt"
ca_key = "$TMP/ca/ca.key"
[runtime]
state_dir = "$STATE"
runc = "$TMP/runc-timed"
EOF
    printf '#!/bin/sh\nENVOY_SIDECAR_CONFIG=%s exec %s "$@"\n' "$TMP/$v.toml" "$WRAPPER" >"$TMP/runtime-$v"
done
chmod 0755 "$TMP/runc-timed" "$TMP/envoy-standin" "$TMP"/runtime-*

run_opts() { # variant
    case "$1" in
        plain) echo "--runc-binary $TMP/runc-timed" ;;
        *) echo "--runc-binary $TMP/runtime-$1 --annotation envoy-sidecar/ports=8080" ;;
    esac
}

start_one() { # variant id
    CURRENT_ID="$2"
    # shellcheck disable=SC2046
    ctr_ run -d $(run_opts "$1") "$IMAGE" "$2" httpd -f -p 8080 -h /www >"$TMP/run.log" 2>&1 \
        || { cat "$TMP/run.log" >&2; die "ctr run -d $2 ($1) failed"; }
    CURRENT_ID=""
}

remove_run() { # id prefix
    local id
    for id in $(ctr_ containers ls -q | grep -F "$1"); do remove_container "$id"; done
}

# utime + stime (ms) of the Envoy of 10 new proxied containers, 2 s after each started.
envoy_start_cpu() { # tag
    local i id pid out=()
    for ((i = 0; i < 10; i++)); do
        id="${ID_PREFIX}cpu-$1-$i"
        start_one envoy "$id"
        sleep 2
        pid="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["envoy"]["pid"])' \
            "$STATE/$NS/$id/supervisor.json")" || die "$id: no Envoy pid in its supervisor.json"
        out+=("$(awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) * 1000 / hz}' "/proc/$pid/stat")")
    done
    remove_run "${ID_PREFIX}cpu-$1-"
    echo "${out[*]}"
}

log "Envoy start-up alone: 10 containers"
CPU_ALONE="$(envoy_start_cpu alone)"
: >"$TMP/runc.log"
for v in plain standin envoy; do
    log "$v: $N containers one after another"
    for ((i = 0; i < N; i++)); do start_one "$v" "${ID_PREFIX}$v-$i"; done
    if [ "$v" = envoy ]; then
        log "Envoy start-up beside $N proxied containers: 10 more"
        CPU_BESIDE="$(envoy_start_cpu beside)"
    fi
    log "$v: removing them"
    remove_run "${ID_PREFIX}$v-"
done
bench_leak_check

bench_export_machine_facts
export B_N="$N" B_CPU_ALONE="$CPU_ALONE" B_CPU_BESIDE="$CPU_BESIDE" B_PREFIX="$ID_PREFIX"
"$PY" -I -S - "$TMP/runc.log" "$TMP/attribution.md" <<'EOF'
import os, statistics, sys
e = os.environ
n, prefix = int(e["B_N"]), e["B_PREFIX"]
t = {}
for line in open(sys.argv[1]):
    cid, sub, us = line.split()
    t.setdefault(cid, {})[sub] = int(us) / 1000
def both(v, rng):
    xs = [t[f"{prefix}{v}-{i}"] for i in rng]
    return statistics.median(x["create"] + x["start"] for x in xs)
names = {
    "plain": "plain runc, no proxy",
    "standin": "the wrapper, proxy on, `proxy.envoy_path` a stand-in that only sleeps (supervisors, cgroups, state, credentials: all but Envoy)",
    "envoy": "the wrapper, proxy on, real Envoys",
}
rows = [f"| {names[v]} | {both(v, range(10)):.0f} | {both(v, range(n - 10, n)):.0f} |" for v in names]
alone = [float(x) for x in e["B_CPU_ALONE"].split()]
beside = [float(x) for x in e["B_CPU_BESIDE"].split()]
fmt = lambda xs: f"{min(xs):.0f}–{max(xs):.0f} (median {statistics.median(xs):.0f})"
out = f"""## Attribution: what makes runc slower with N proxied containers

{n} containers `ctr run -d IMAGE ID httpd -f -p 8080 -h /www` one after another (ctr's
private netns each, no CNI), a `date` script around runc timing its `create` and
`start`; runc's own `create` + `start`, median of the first 10 and of the last 10.
Then each new Envoy's own start-up: `utime + stime` of the Envoy of 10 new proxied
containers, 2 s after `ctr run -d` returned, with no other container and with the {n}
of the last row still running.

**Command:** `scripts/bench-attribution.sh` (`make bench` runs it; `ATTRIB_N` sets N)

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU']}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}, cgroup {e['B_CGROUP']}  
**Runtime:** containerd {e['B_CONTAINERD']}, runc {e['B_RUNC']}

| {n} containers of | runc's create + start, first 10 (ms) | last 10 (ms) |
|---|---:|---:|
""" + "\n".join(rows) + f"""

| a new proxied container's Envoy, start-up CPU (ms, 10 containers) | |
|---|---:|
| no other container | {fmt(alone)} |
| beside {n} proxied containers | {fmt(beside)} |
"""
open(sys.argv[2], "w").write(out)
print(out)
EOF
"$PY" -I -S "$MD_SECTION" "$OUT" attribution <"$TMP/attribution.md" \
    || die "writing the attribution section of $OUT failed"
log "wrote section 'attribution' of $OUT"
