#!/usr/bin/env bash
# Sidecar start and footprint: for N containers with the proxy enabled, one after the
# other, in one network namespace with a veth to the host (198.51.100.240/30: host .241,
# container .242):
#   - the time from invoking `ctr run -d` to the first HTTP response through Envoy's TLS
#     listener on the container IP, port 61001 (python3 ssl client polling every 3 ms,
#     verifying against the bench CA with server_hostname = the container id);
#   - after ~2 s idle: Envoy's VmRSS/RssAnon/RssFile, the supervisor's VmRSS/RssAnon, and
#     memory.usage_in_bytes of Envoy's own child cgroup (cgroup v1 memory controller);
#   - then SIGKILL, `ctr task rm`, `ctr container rm`, and a check that no state and no
#     process of the container is left.
# Prints a table and writes its section (`sidecar`) of docs/BENCHMARKS.md through
# scripts/md-section.py.
#
# Why `ctr run -d` and not `ctr container create` + timed `ctr task start`: ctr 1.6's
# `containers create` has no --runc-binary option (only `run` has), so the container
# cannot be created with the wrapper as its runtime; create + start are timed together.
#
# Run it through `make bench` (deps, release build, private containerd up). Root only.
#
# Environment:
#   BENCH_SIDECAR_N     containers (default 20)
#   BENCH_SIDECAR_IDLE  seconds idle after the first response before reading memory (2)
#   BENCH_SIDECAR_COLD  1 (default) = evict the Envoy binary from the page cache before
#                       the first container (posix_fadvise DONTNEED: only pages no
#                       running process maps), so that container shows the cold case
#   CONTAINERD_ADDRESS  default /run/envoy-sidecar-test/containerd.sock
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
SOCK="${CONTAINERD_ADDRESS:-/run/envoy-sidecar-test/containerd.sock}"
NS=envoy-sidecar-test
IMAGE=localhost/envoy-sidecar/busybox:latest
N="${BENCH_SIDECAR_N:-20}"
IDLE="${BENCH_SIDECAR_IDLE:-2}"
COLD="${BENCH_SIDECAR_COLD:-1}"
RUNC=/usr/sbin/runc
PORTS_ANNOTATION="envoy-sidecar/ports=8080,9999"
APP_CMD='httpd -p 9999 -h /www && exec httpd -f -p 8080 -h /www'
PROXY_PORT=61001
HOST_IP=198.51.100.241
CTR_IP=198.51.100.242
NETNS="es-bench-$$"
HOST_IF="esbh$$"
ID_PREFIX="esbs-$$-"
SUPERVISOR_TARGET_KIB=4096

die() { echo "bench-sidecar: error: $*" >&2; exit 1; }
log() { echo "bench-sidecar: $*" >&2; }
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }
# shellcheck source=scripts/bench-lib.sh
. "$REPO/scripts/bench-lib.sh"

# ---- preflight -------------------------------------------------------------------
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIDECAR_N must be a positive integer, got '$N'"
[[ "$COLD" =~ ^[01]$ ]] || die "BENCH_SIDECAR_COLD must be 0 or 1, got '$COLD'"
[[ "$IDLE" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "BENCH_SIDECAR_IDLE must be a number, got '$IDLE'"
[ "$(id -u)" = 0 ] || die "must run as root (containerd, runc, cgroups, netns); use 'make bench'"
for b in ctr ip python3; do command -v "$b" >/dev/null || die "'$b' not found in PATH"; done
[ -x "$WRAPPER" ] || die "$WRAPPER missing; run 'make release' (or 'make bench')"
[ -x "$CLI" ] || die "$CLI missing; run 'make release' (or 'make bench')"
[ -x "$ENVOY" ] || die "$ENVOY missing; run 'scripts/install-deps.sh' (or 'make bench')"
timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1 \
    || die "no containerd answering on $SOCK; run 'tests/env/containerd.sh up' (or 'make bench')"
ctr_ images ls -q | grep -qxF "$IMAGE" \
    || die "image $IMAGE not in namespace $NS; run 'tests/env/containerd.sh up'"
if ip -o addr show | grep -qF " $HOST_IP/"; then
    die "$HOST_IP is already configured on this host (another bench running?)"
fi
# The pyenv shim costs tens of ms per call: resolve the interpreter once.
PY="$(python3 -c 'import sys; print(sys.executable)')"

# ---- sandbox + cleanup -------------------------------------------------------------
TMP="$(mktemp -d /tmp/envoy-sidecar-bench-sidecar.XXXXXX)"
# Envoy runs as an unprivileged user and reads its bootstrap under the state dir:
# mktemp's 0700 would lock it out.
chmod 0755 "$TMP"
STATE="$TMP/state"
CONFIG="$TMP/config.toml"
CURRENT_ID=""

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
cat >"$CONFIG" <<EOF
[proxy]
enabled = true
envoy_path = "$ENVOY"
[instance_identity]
ca_cert = "$TMP/ca/ca.crt"
ca_key = "$TMP/ca/ca.key"
[runtime]
state_dir = "$STATE"
EOF
# The shim does not pass ctr's environment on: the config reaches the wrapper through
# a script (as in the integration tests).
printf '#!/bin/sh\nENVOY_SIDECAR_CONFIG=%s exec %s "$@"\n' "$CONFIG" "$WRAPPER" >"$TMP/runc-wrapper"
chmod 0755 "$TMP/runc-wrapper"

# The container's network: a namespace with a veth to the host (as tests/common Netns).
ip netns add "$NETNS"
ip link add "$HOST_IF" type veth peer name eth0 netns "$NETNS"
ip addr add "$HOST_IP/30" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip -n "$NETNS" addr add "$CTR_IP/30" dev eth0
ip -n "$NETNS" link set eth0 up
ip -n "$NETNS" link set lo up
ip -n "$NETNS" route add default via "$HOST_IP"
NETNS_PATH="/var/run/netns/$NETNS"

# One container: `ctr run -d` timed from its invocation to the first HTTP response
# through the proxy, then the memory figures after IDLE seconds. Prints one JSON line.
cat >"$TMP/measure.py" <<'EOF'
import json, os, socket, ssl, subprocess, sys, time

(sock, ns, image, runtime, netns_path, ann, app_cmd, ip, port, ca, cid, cli, config,
 state_dir, idle) = sys.argv[1:]
port, idle = int(port), float(idle)
HELLO = b"hello from envoy-sidecar test app"
POLL_S, TIMEOUT_S = 0.003, 30.0
ctx = ssl.create_default_context(cafile=ca)  # CERT_REQUIRED, hostname checked
REQ = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"


def fail(msg):
    sys.stderr.write(f"measure {cid}: {msg}\n")
    sys.exit(1)


def attempt():
    """None on success, else why not (yet)."""
    data = b""
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            with ctx.wrap_socket(s, server_hostname=cid) as t:
                t.sendall(REQ)
                while True:
                    chunk = t.recv(65536)
                    if not chunk:
                        break
                    data += chunk
    except (OSError, ssl.SSLError) as e:  # refused, reset, EOF without close_notify, ...
        if not data:
            return f"{type(e).__name__}: {e}"
    if data.startswith(b"HTTP/1.") and HELLO in data:
        return None
    return f"unexpected response: {data[:200]!r}"


cmd = ["ctr", "--address", sock, "-n", ns, "run", "-d", "--runc-binary", runtime,
       "--annotation", ann, f"--with-ns=network:{netns_path}", image, cid,
       "/bin/sh", "-c", app_cmd]
out = open(os.path.join(os.path.dirname(config), f"run-{cid}.log"), "wb")
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
t_ret = None
last = "no attempt"
attempts = 0
while True:
    if t_ret is None and p.poll() is not None:
        t_ret = time.monotonic()
        if p.returncode != 0:
            out.close()
            fail(f"ctr run -d exited {p.returncode}: "
                 + open(out.name, errors="replace").read())
    attempts += 1
    last = attempt()
    if last is None:
        t_ready = time.monotonic()
        break
    if time.monotonic() - t0 > TIMEOUT_S:
        fail(f"no HTTP response through {ip}:{port} within {TIMEOUT_S:.0f} s; last: {last}")
    time.sleep(POLL_S)
if t_ret is None:
    p.wait()
    t_ret = time.monotonic()
    if p.returncode != 0:
        fail(f"ctr run -d exited {p.returncode} after the proxy answered")
out.close()

# The port polled is the one the wrapper allocated for the first app port.
st = json.loads(subprocess.run([cli, "--config", config, "inspect", cid, "--namespace", ns],
                               check=True, capture_output=True).stdout)
p0 = st["ports"][0]
if (p0["internal"], p0["internal_tls_proxy"]) != (8080, port):
    fail(f"first port mapping is {p0}, expected 8080 -> {port}")


def record():
    with open(os.path.join(state_dir, ns, cid, "supervisor.json")) as f:
        return json.load(f)


def start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return int(s[s.rindex(")") + 2:].split()[19])


def status(pid):
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                d[k] = int(v.split()[0])  # kB
    return d


time.sleep(max(0.0, t_ready + idle - time.monotonic()))
rec = record()
envoy, sup = rec["envoy"], rec["supervisor"]
for what, pi in (("envoy", envoy), ("supervisor", sup)):
    if start_time(pi["pid"]) != pi["start_time"]:
        fail(f"{what} pid {pi['pid']} is not the recorded process")
if rec.get("envoy_restarts", 0) != 0:
    fail(f"Envoy restarted {rec['envoy_restarts']} time(s) during the measurement")
es, ss = status(envoy["pid"]), status(sup["pid"])
with open(f"/proc/{envoy['pid']}/cmdline", "rb") as f:
    argv = f.read().decode(errors="replace").split("\0")
concurrency = argv[argv.index("--concurrency") + 1] if "--concurrency" in argv else "default"

mem_rel = None
with open(f"/proc/{envoy['pid']}/cgroup") as f:
    for line in f:
        _, ctrls, rel = line.rstrip("\n").split(":", 2)
        if "memory" in ctrls.split(","):
            mem_rel = rel
if mem_rel is None:
    fail("Envoy is in no cgroup v1 memory hierarchy (this bench reads cgroup v1)")
if mem_rel != f"/{ns}/{cid}/envoy-sidecar":
    fail(f"Envoy's memory cgroup is {mem_rel}, expected /{ns}/{cid}/envoy-sidecar")
cg = f"/sys/fs/cgroup/memory{mem_rel}"
with open(f"{cg}/memory.usage_in_bytes") as f:
    usage = int(f.read())
stat = {}
with open(f"{cg}/memory.stat") as f:
    for line in f:
        k, v = line.split()
        stat[k] = int(v)

print(json.dumps({
    "id": cid,
    "attempts": attempts,
    "concurrency": concurrency,
    "run_return_ms": (t_ret - t0) * 1e3,
    "ready_ms": (t_ready - t0) * 1e3,
    "envoy": envoy, "supervisor": sup,
    "envoy_vmrss_kib": es["VmRSS"], "envoy_rssanon_kib": es["RssAnon"],
    "envoy_rssfile_kib": es["RssFile"], "envoy_rssshmem_kib": es.get("RssShmem", 0),
    "sup_vmrss_kib": ss["VmRSS"], "sup_rssanon_kib": ss["RssAnon"],
    "sup_rssfile_kib": ss["RssFile"],
    "cg_usage_bytes": usage, "cg_rss_bytes": stat.get("rss", 0),
    "cg_cache_bytes": stat.get("cache", 0),
}))
EOF

RESULTS="$TMP/results.jsonl"
: >"$RESULTS"

if [ "$COLD" = 1 ]; then
    log "evicting $ENVOY from the page cache (BENCH_SIDECAR_COLD=0 skips this)"
    "$PY" -I -S -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)' "$ENVOY"
fi
log "$N containers, one after the other (idle ${IDLE} s each before reading memory)"
for ((i = 0; i < N; i++)); do
    id="${ID_PREFIX}$i"
    CURRENT_ID="$id"
    line="$("$PY" -I -S "$TMP/measure.py" "$SOCK" "$NS" "$IMAGE" "$TMP/runc-wrapper" \
        "$NETNS_PATH" "$PORTS_ANNOTATION" "$APP_CMD" "$CTR_IP" "$PROXY_PORT" "$TMP/ca/ca.crt" \
        "$id" "$CLI" "$CONFIG" "$STATE" "$IDLE")" \
        || { for f in supervisor.log envoy.log; do
                 echo "---- $f of $id (last 30 lines) ----" >&2
                 tail -n 30 "$STATE/$NS/$id/$f" >&2 2>/dev/null || true
             done
             die "container $id: measurement failed"; }
    echo "$line" >>"$RESULTS"
    # pid and start time of Envoy and the supervisor, to check they are gone.
    read -r e_pid e_start s_pid s_start < <("$PY" -I -S -c '
import json, sys
r = json.loads(sys.argv[1])
print(r["envoy"]["pid"], r["envoy"]["start_time"], r["supervisor"]["pid"], r["supervisor"]["start_time"])' "$line")

    remove_container "$id"
    ctr_ containers info "$id" >/dev/null 2>&1 && die "container $id still exists after removal"
    CURRENT_ID=""
    [ ! -e "$STATE/$NS/$id" ] || die "state of $id left behind: $(ls -A "$STATE/$NS/$id")"
    for p in "$e_pid:$e_start:Envoy" "$s_pid:$s_start:supervisor"; do
        # Gone, a zombie, or the pid reused by another process: fine.
        IFS=: read -r pid start what <<<"$p"
        if st="$(cat "/proc/$pid/stat" 2>/dev/null)"; then
            st="${st##*) }"
            read -r -a f <<<"$st"
            if [ "${f[0]}" != Z ] && [ "${f[19]}" = "$start" ]; then
                die "$what (pid $pid) of $id survived its container"
            fi
        fi
    done
    [ ! -d "/sys/fs/cgroup/memory/$NS/$id" ] || die "memory cgroup of $id left behind"
    left="$(our_pids)"
    [ -z "$left" ] || die "processes of the bench left after removing $id: $left"
    log "  $((i + 1))/$N: $("$PY" -I -S -c '
import json, sys
r = json.loads(sys.argv[1])
print("first response %.0f ms (ctr returned %.0f ms), Envoy RSS %.1f MiB, supervisor %.2f MiB"
      % (r["ready_ms"], r["run_return_ms"], r["envoy_vmrss_kib"] / 1024, r["sup_vmrss_kib"] / 1024))' "$line")"
done

# ---- leak checks ------------------------------------------------------------------
bench_leak_check

# ---- report -----------------------------------------------------------------------
bench_export_machine_facts
export B_ENVOY="$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: *//p' | head -n1)"
export B_N="$N" B_IDLE="$IDLE" B_ANN="$PORTS_ANNOTATION" B_APP="$APP_CMD" B_PORT="$PROXY_PORT"
export B_COLD="$COLD" B_IP="$CTR_IP" B_SUP_TARGET_KIB="$SUPERVISOR_TARGET_KIB"

SECTION="$TMP/sidecar.md"
"$PY" -I -S - "$RESULTS" "$SECTION" <<'EOF' || die "computing the report failed"
import json, os, statistics, sys, textwrap

results, out = sys.argv[1], sys.argv[2]
e = os.environ
rows = [json.loads(l) for l in open(results)]
cold = e["B_COLD"] == "1"
n = int(e["B_N"])
assert len(rows) == n, f"{len(rows)} results, expected {n}"
for r in rows:
    r["bringup_ms"] = r["ready_ms"] - r["run_return_ms"]

MIB = 1024.0
figures = [  # key, label, unit divisor, format
    ("ready_ms", "**`ctr run -d` invoked → first HTTP response through the proxy** (ms)", 1, "{:.0f}"),
    ("run_return_ms", "`ctr run -d` invoked → returned (create + start) (ms)", 1, "{:.0f}"),
    ("bringup_ms", "`ctr run -d` returned → first HTTP response (ms)", 1, "{:.0f}"),
    ("envoy_vmrss_kib", "Envoy `VmRSS` (MiB)", MIB, "{:.1f}"),
    ("envoy_rssanon_kib", "Envoy `RssAnon` (MiB)", MIB, "{:.1f}"),
    ("envoy_rssfile_kib", "Envoy `RssFile` (MiB)", MIB, "{:.1f}"),
    ("cg_usage_bytes", "Envoy's cgroup `memory.usage_in_bytes` (MiB)", MIB * MIB, "{:.1f}"),
    ("cg_rss_bytes", "  of which `rss` in its `memory.stat` (MiB)", MIB * MIB, "{:.1f}"),
    ("cg_cache_bytes", "  of which `cache` in its `memory.stat` (MiB)", MIB * MIB, "{:.1f}"),
    ("sup_vmrss_kib", "Supervisor `VmRSS` (MiB)", MIB, "{:.2f}"),
    ("sup_rssanon_kib", "Supervisor `RssAnon` (MiB)", MIB, "{:.2f}"),
    ("sup_rssfile_kib", "Supervisor `RssFile` (MiB)", MIB, "{:.2f}"),
]
if any(r["envoy_rssshmem_kib"] for r in rows):
    figures.insert(6, ("envoy_rssshmem_kib", "Envoy `RssShmem` (MiB)", MIB, "{:.1f}"))

def col(k):
    return [r[k] for r in rows]

table = [
    "| Figure | Median | Min | Max | 1st container" + (" (cold cache)" if cold else "") + " |",
    "|---|---:|---:|---:|---:|",
]
for k, label, div, fmt in figures:
    v = col(k)
    cells = [fmt.format(x / div) for x in (statistics.median(v), min(v), max(v), v[0])]
    table.append(f"| {label} | " + " | ".join(cells) + " |")

med = lambda k: statistics.median(col(k))
sup_max = max(col("sup_vmrss_kib"))
target = int(e["B_SUP_TARGET_KIB"])
sup_met = sup_max < target
sup_verdict = (
    f"**{'met' if sup_met else 'not met'}** by `VmRSS`: the largest seen was "
    f"{sup_max / MIB:.2f} MiB (median {med('sup_vmrss_kib') / MIB:.2f} MiB)"
)
if not sup_met:
    sup_verdict += (
        f"; its private part, `RssAnon`, is {med('sup_rssanon_kib') / MIB:.2f} MiB, and the "
        f"rest (`RssFile`, median {med('sup_rssfile_kib') / MIB:.2f} MiB) is mapped pages of "
        "the `envoy-sidecar` binary and libc, shared in the page cache by all supervisors "
        "on the host and counted in full by each (the kernel's fault-around maps cached "
        "file pages in blocks, so `RssFile` can overstate what the process touches)"
    )
mib = lambda k, r=None: (r[k] if r else med(k)) / (MIB * MIB if k.endswith("_bytes") else MIB)
if cold:
    first = rows[0]
    later = rows[1:]
    first_note = (
        "(readahead reads more than Envoy maps)"
        if first["cg_cache_bytes"] / 1024 > first["envoy_rssfile_kib"] else
        "(pages that other processes on the host, such as other Envoys, kept mapped were "
        "not evicted and are not charged to it)"
    )
    if later:
        lmed = lambda k: statistics.median(r[k] for r in later) / (MIB * MIB)
        later_sentence = (
            f"while the later containers' median is {lmed('cg_cache_bytes'):.1f} MiB of cache "
            f"and {lmed('cg_usage_bytes'):.1f} MiB of usage, close to `RssAnon`: they map "
            "the same pages without being charged for them. "
        )
    else:
        later_sentence = ""
    cg_sentence = (
        "Before the first container the script evicted the Envoy binary from the page "
        "cache (`posix_fadvise` DONTNEED, which spares pages a running process maps; "
        "`BENCH_SIDECAR_COLD=0` skips it), so that container's Envoy cgroup was charged "
        f"{mib('cg_cache_bytes', first):.1f} MiB of page cache for the binary pages it read "
        f"back {first_note} and its `memory.usage_in_bytes` was "
        f"{mib('cg_usage_bytes', first):.1f} MiB, {later_sentence}"
        "As Envoy's cgroup is a child of the container's, the container whose sidecar is "
        "the first to read the binary carries those pages against its memory limit (as "
        "reclaimable page cache)."
    )
else:
    cg_sentence = (
        "Here the binary was already cached, so Envoy's cgroup was charged a median "
        f"{mib('cg_cache_bytes'):.1f} MiB of page cache (first container "
        f"{mib('cg_cache_bytes', rows[0]):.1f} MiB) and its `memory.usage_in_bytes` (median "
        f"{mib('cg_usage_bytes'):.1f} MiB) is close to `RssAnon`; the container whose "
        "sidecar is the first to read the binary (e.g. after a reboot) carries those pages "
        "against its memory limit (as reclaimable page cache)."
    )
how = (
    "**How to read this.** The machine is shared and noisy: single start times scatter, "
    "so read the medians, and treat differences of a few tens of ms between runs as "
    "noise. The start time covers containerd, the shim and runc as much as the sidecar "
    "(the poststart hook, the supervisor issuing the identity, Envoy starting and "
    "passing the supervisor's own TLS check); the split shows how much of it comes "
    "after `ctr run -d` returned, and the 3 ms polling adds at most that much. "
    f"Of Envoy's RSS, `RssAnon` (median {mib('envoy_rssanon_kib'):.1f} MiB) is its private "
    "memory, what each further sidecar adds; `RssFile` (median "
    f"{mib('envoy_rssfile_kib'):.1f} MiB) is pages of the Envoy binary mapped into it, one "
    "copy of which in the page cache serves every sidecar on the host, and the cgroup v1 "
    "memory controller charges a page-cache page to the cgroup that first read it, not "
    f"to each one mapping it. {cg_sentence} The supervisor's target is < 4 MiB RSS: "
    f"{sup_verdict}."
)
conc = ", ".join(sorted({str(r["concurrency"]) for r in rows}))
how = textwrap.fill(how, width=88, break_long_words=False, break_on_hyphens=False)

doc = f"""## Sidecar start and footprint

How long a container with the proxy enabled takes until its app answers through
Envoy, and what the sidecar costs in memory once it idles. {n} containers, one after
the other, each

    ctr --address SOCK -n envoy-sidecar-test run -d --runc-binary WRAPPER-SCRIPT \\
        --annotation {e['B_ANN']} --with-ns=network:NETNS \\
        localhost/envoy-sidecar/busybox:latest ID \\
        /bin/sh -c '{e['B_APP']}'

(proxy enabled, a fresh CA, a private state dir; the container in a network namespace
with a veth to the host, container IP {e['B_IP']}). The clock starts just before
`ctr run -d` is invoked and stops at the first TLS handshake on {e['B_IP']}:{e['B_PORT']}
(the proxy port of app port 8080) that verifies against the CA with server name = the
container id and returns the app's HTTP response; a python3 `ssl` client polls every
3 ms from the host. Create and start are timed together because `ctr containers create`
(ctr {e['B_CONTAINERD']}) has no `--runc-binary` option, so a container cannot be created
with the wrapper as its runtime and then started separately. {e['B_IDLE']} s after that
first response the memory figures are read: `/proc/<pid>/status` of Envoy and of its
supervisor, and `memory.usage_in_bytes` (and `memory.stat`) of Envoy's own child cgroup
`/sys/fs/cgroup/memory/envoy-sidecar-test/ID/envoy-sidecar`. Then the task is
SIGKILLed and removed, and the script checks that no state, cgroup, Envoy or
supervisor of the container is left.

**Command:** `make bench` (runs `scripts/bench.sh`, then `scripts/bench-sidecar.sh`).
`BENCH_SIDECAR_N` sets the number of containers.

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}, cgroup {e['B_CGROUP']}  
**Runtime:** containerd {e['B_CONTAINERD']}, runc {e['B_RUNC']}  
**Envoy:** {e['B_ENVOY']} (`/usr/local/bin/envoy --version`), `--concurrency {conc}`  
**Containers:** {n}

{chr(10).join(table)}

{how}
"""
with open(out, "w") as f:
    f.write(doc)

print()
print(f"Sidecar start and footprint ({n} containers, {e['B_DATE']})")
print()
print("\n".join(table))
print()
print(f"supervisor VmRSS < 4 MiB: {'MET' if sup_met else 'NOT MET'} (max {sup_max / MIB:.2f} MiB)")
EOF
"$PY" -I -S "$MD_SECTION" "$OUT" sidecar <"$SECTION" \
    || die "writing the sidecar section of $OUT failed"
log "wrote section 'sidecar' of $OUT"
