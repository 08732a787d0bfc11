#!/usr/bin/env bash
# Following the network, and CA rotation, with the release build, in Garden's order:
# the wrapper driven as runc (`run --detach --bundle B --pid-file P ID`, a private
# --root) into a network namespace that has only `lo`; then, as Garden's networker
# does, a veth and the address are added. Traffic comes from a "router" namespace that
# reaches the container only through the host's address and NAT.
#   (a) N containers, one after the other: the time from `ip addr add` (the address in
#       the container's netns) to the NAT element in `ip envoy_sidecar ports` and to
#       the first TLS handshake (verified against the CA, app answer received) through
#       <host address>:external_tls_proxy from the router; also to the first handshake
#       whose certificate carries the IP SAN. Each container is then killed and deleted
#       through the wrapper and checked gone (state, NAT, processes).
#   (b) one container: the CA files replaced (a new `generate-ca`, renamed over the
#       configured paths) -> the first handshake that verifies against the new CA
#       (the supervisor checks the files every 10 s: that wait dominates); and
#       `envoy-sidecar rotate ID` -> the first handshake serving a new certificate.
# Prints a table and writes its section (`network`) of docs/BENCHMARKS.md through
# scripts/md-section.py.
#
# Run it through `make bench` (deps, release build). Root only. No containerd needed
# (the machine facts ask it for its version when it runs).
#
# Environment:
#   BENCH_NETWORK_N      containers for (a) (default 20)
#   BENCH_NETWORK_CA_N   CA replacements and rotations for (b) (default 5)
#   ENVOY_SIDECAR_BIN_DIR  the binaries (default $CARGO_TARGET_DIR/release, else
#                        target/release of the repository)
#   CONTAINERD_ADDRESS   for the machine facts (default /run/envoy-sidecar-test/containerd.sock)
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
SOCK="${CONTAINERD_ADDRESS:-/run/envoy-sidecar-test/containerd.sock}"
NS=envoy-sidecar-test
N="${BENCH_NETWORK_N:-20}"
N_CA="${BENCH_NETWORK_CA_N:-5}"
RUNC=/usr/sbin/runc
# 198.51.100.224/27 is the benchmark scripts' (tests/common/slots.rs hands none of it
# out): the container's link .236/30, the router's .228/30.
HOST_IP=198.51.100.237
CTR_IP=198.51.100.238
ROUTER_HOST_IP=198.51.100.229
ROUTER_IP=198.51.100.230
# Host ports of this bench: below the ephemeral range, above every test slot's.
POOL_START=31000
POOL_END=31031
NETNS="es-bnet-$$"
HOST_IF="esbnh$$"
ROUTER_NS="es-bnetr-$$"
ROUTER_IF="esbnr$$"
ID_PREFIX="esbn-$$-"

die() { echo "bench-network: error: $*" >&2; exit 1; }
log() { echo "bench-network: $*" >&2; }
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }
# shellcheck source=scripts/bench-lib.sh
. "$REPO/scripts/bench-lib.sh"

# ---- preflight -------------------------------------------------------------------
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "BENCH_NETWORK_N must be a positive integer, got '$N'"
[[ "$N_CA" =~ ^[1-9][0-9]*$ ]] || die "BENCH_NETWORK_CA_N must be a positive integer, got '$N_CA'"
[ "$(id -u)" = 0 ] || die "must run as root (runc, cgroups, netns, nftables); use 'make bench'"
for b in ip nft python3; do command -v "$b" >/dev/null || die "'$b' not found in PATH"; done
[ -x "$RUNC" ] || die "$RUNC not found"
[ -x "$WRAPPER" ] || die "$WRAPPER missing; run 'make release' (or set ENVOY_SIDECAR_BIN_DIR)"
[ -x "$CLI" ] || die "$CLI missing; run 'make release' (or set ENVOY_SIDECAR_BIN_DIR)"
[ -x "$ENVOY" ] || die "$ENVOY missing; run 'scripts/install-deps.sh' (or 'make bench')"
for a in "$HOST_IP" "$ROUTER_HOST_IP"; do
    if ip -o addr show | grep -qF " $a/"; then
        die "$a is already configured on this host (another bench running?)"
    fi
done
# The pyenv shim costs tens of ms per call: resolve the interpreter once.
PY="$(python3 -c 'import sys; print(sys.executable)')"

# ---- sandbox + cleanup -------------------------------------------------------------
TMP="$(mktemp -d /tmp/envoy-sidecar-bench-network.XXXXXX)"
# Envoy runs as an unprivileged user and reads its bootstrap under the state dir.
chmod 0755 "$TMP"
STATE="$TMP/state"
CONFIG="$TMP/config.toml"
ROOT="$TMP/runc-root"
BUNDLE="$TMP/bundle"
CURRENT_ID=""

# Containers of our private runc root: killed and deleted through the wrapper (which
# releases their sidecar, state and NAT), then with runc itself.
remove_direct_containers() {
    local id
    [ -d "$ROOT" ] || return 0
    for id in $("$RUNC" --root "$ROOT" list -q 2>/dev/null); do
        log "removing leftover container $id"
        ENVOY_SIDECAR_CONFIG="$CONFIG" "$WRAPPER" --root "$ROOT" kill "$id" KILL >/dev/null 2>&1 || true
        ENVOY_SIDECAR_CONFIG="$CONFIG" "$WRAPPER" --root "$ROOT" delete --force "$id" >/dev/null 2>&1 || true
        "$RUNC" --root "$ROOT" delete --force "$id" >/dev/null 2>&1 || true
    done
}

# NAT elements of this bench's host port pool.
pool_nat() {
    nft list map ip envoy_sidecar ports 2>/dev/null | tr ',{}' '\n\n\n' \
        | awk -v lo="$POOL_START" -v hi="$POOL_END" '$1 == "tcp" && $3 >= lo && $3 <= hi'
}

cleanup() {
    local rc=$? e
    trap - EXIT INT TERM
    remove_direct_containers
    pool_nat | while read -r e; do
        nft "delete element ip envoy_sidecar ports { $e }" 2>/dev/null || true
    done
    ip netns del "$ROUTER_NS" 2>/dev/null || true
    ip link del "$ROUTER_IF" 2>/dev/null || true
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
runc = "$RUNC"
state_dir = "$STATE"
[host]
address = "$ROUTER_HOST_IP"
[ports]
pool_start = $POOL_START
pool_end = $POOL_END
EOF
"$CLI" --config "$CONFIG" check-config >/dev/null || die "the bench's config does not check"

# The router: a namespace on a veth with no route beyond the host's address.
ip netns add "$ROUTER_NS"
ip link add "$ROUTER_IF" type veth peer name eth0 netns "$ROUTER_NS"
ip addr add "$ROUTER_HOST_IP/30" dev "$ROUTER_IF"
ip link set "$ROUTER_IF" up
ip -n "$ROUTER_NS" addr add "$ROUTER_IP/30" dev eth0
ip -n "$ROUTER_NS" link set eth0 up
ip -n "$ROUTER_NS" link set lo up

# The bundle as Garden's plugin gets it: a busybox rootfs and `runc spec`, edited (no
# terminal, the app, the port annotation, the network namespace at a path). The
# wrapper patches config.json in place: each container starts from the pristine copy.
"$REPO/oci/rootfs.sh" "$BUNDLE/rootfs" >/dev/null
"$RUNC" spec --bundle "$BUNDLE"
"$PY" -I -S - "$BUNDLE/config.json" "/var/run/netns/$NETNS" <<'EOF'
import json, sys
path, netns = sys.argv[1:]
spec = json.load(open(path))
spec["process"]["terminal"] = False
spec["process"]["args"] = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
spec["annotations"] = {"envoy-sidecar/ports": "8080"}
for n in spec["linux"]["namespaces"]:
    if n["type"] == "network":
        n["path"] = netns
json.dump(spec, open(path + ".orig", "w"), indent=2)
EOF

cat >"$TMP/measure.py" <<'EOF'
"""Runs in the router's network namespace (setns at start); every command runs in the
host's (a setns before its exec). Prints one JSON line per measurement."""
import ctypes, json, os, random, shutil, socket, ssl, subprocess, sys, time

(tmp, wrapper, cli, runc, config, state, root, bundle, netns, host_if, host_ip, ctr_ip,
 router_ns, router_host_ip, id_prefix, n, n_ca) = sys.argv[1:]
n, n_ca = int(n), int(n_ca)
HELLO = b"hello from envoy-sidecar test app"
REQ = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)


def setns(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def in_host():
    setns(host_fd)


def fail(msg):
    sys.stderr.write(f"measure: {msg}\n")
    sys.exit(1)


def run(*argv, check=True, env=None, **kw):
    p = subprocess.run(argv, preexec_fn=in_host, capture_output=True, env=env, **kw)
    if check and p.returncode != 0:
        fail(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return p


def wait_for(what, timeout, f, every=0.005):
    end = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > end:
            fail(f"{what}: not within {timeout} s")
        time.sleep(every)


WENV = dict(os.environ, ENVOY_SIDECAR_CONFIG=config)
GLOBAL = ["--root", root, "--log", f"{tmp}/runc-log.json", "--log-format", "json"]


def record(cid):
    try:
        with open(f"{state}/default/{cid}/supervisor.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def start(cid):
    """run --detach into a netns with only lo; back when Envoy is ready on the
    container's loopback and the status waits for the network."""
    run("ip", "netns", "add", netns)
    run("ip", "-n", netns, "link", "set", "lo", "up")
    shutil.copy(f"{bundle}/config.json.orig", f"{bundle}/config.json")
    with open(f"{tmp}/run.out", "wb") as out:
        t = time.monotonic()
        p = subprocess.run([wrapper, *GLOBAL, "run", "--detach", "--bundle", bundle,
                            "--pid-file", f"{tmp}/init.pid", cid], env=WENV,
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                           preexec_fn=in_host)
        run_ms = (time.monotonic() - t) * 1e3
    if p.returncode != 0:
        fail(f"run --detach {cid}: {open(f'{tmp}/run.out').read()}")

    def waiting():
        r = record(cid)
        return r and (r.get("status") or {}).get("state") == "waiting-for-network" \
            and r.get("ready_at") and r

    waiting_rec = wait_for(f"{cid}: Envoy ready, waiting for the network", 30, waiting, 0.01)
    st = json.loads(run(cli, "--config", config, "inspect", cid, "--namespace",
                        "default").stdout)
    return st, run_ms, waiting_rec


def network(cid):
    """The networker's veth, host address and route (onlink, so the address is last)."""
    run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
    run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
    run("ip", "link", "set", host_if, "up")
    run("ip", "-n", netns, "link", "set", "eth0", "up")
    run("ip", "-n", netns, "route", "add", "default", "via", host_ip, "dev", "eth0", "onlink")


def nat_present(host_port, ctr_port):
    out = run("nft", "list", "map", "ip", "envoy_sidecar", "ports").stdout.decode()
    return f"tcp . {host_port} : {ctr_ip} . {ctr_port}" in out


def handshake(ctx, cid, port):
    """(ok, der, ip SANs): a verified handshake with the app's answer, or (False, ...)."""
    data = b""
    try:
        with socket.create_connection((router_host_ip, port), timeout=1) as s:
            with ctx.wrap_socket(s, server_hostname=cid) as t:
                der = t.getpeercert(binary_form=True)
                sans = [v for k, v in t.getpeercert().get("subjectAltName", ()) if k == "IP Address"]
                t.sendall(REQ)
                while True:
                    chunk = t.recv(65536)
                    if not chunk:
                        break
                    data += chunk
    except (OSError, ssl.SSLError):
        if not data:
            return False, None, []
    return HELLO in data, der, sans


def stop(cid, st):
    """kill KILL + delete through the wrapper, as Garden does; then check it is gone."""
    rec = record(cid) or {}
    run(wrapper, *GLOBAL, "kill", cid, "KILL", env=WENV)

    def stopped():
        p = run(runc, "--root", root, "state", cid, check=False)
        return p.returncode != 0 or json.loads(p.stdout).get("status") == "stopped"

    wait_for(f"{cid} stopped", 10, stopped, 0.02)
    run(wrapper, *GLOBAL, "delete", cid, env=WENV)
    if os.path.exists(f"{state}/default/{cid}"):
        fail(f"state of {cid} left behind")
    host_port = st["ports"][0]["external_tls_proxy"]
    if f"tcp . {host_port} :" in run("nft", "list", "map", "ip", "envoy_sidecar", "ports").stdout.decode():
        fail(f"NAT of {cid} left behind")
    for what in ("envoy", "supervisor"):
        p = rec.get(what)
        if p:
            wait_for(f"{what} of {cid} gone", 10,
                     lambda: not alive(p["pid"], p["start_time"]), 0.02)
    run("ip", "netns", "del", netns)
    wait_for(f"{host_if} gone", 5,
             lambda: run("ip", "link", "show", host_if, check=False).returncode != 0, 0.02)


def alive(pid, start_time):
    try:
        s = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    f = s[s.rindex(")") + 2:].split()
    return f[0] != "Z" and int(f[19]) == start_time


def follow(cid, st, ctx):
    """(a) for one container: address, then NAT and TLS through the host port."""
    host_port = st["ports"][0]["external_tls_proxy"]
    proxy = st["ports"][0]["internal_tls_proxy"]
    network(cid)
    t0 = time.monotonic()
    run("ip", "-n", netns, "addr", "add", f"{ctr_ip}/30", "dev", "eth0")
    t_ip = time.monotonic()
    t_nat = t_tls = t_san = None
    first_sans = None
    attempts = 0
    while t_san is None:
        now = time.monotonic()
        if now - t0 > 30:
            fail(f"{cid}: not followed within 30 s (nat {t_nat}, tls {t_tls})")
        if t_nat is None:
            if nat_present(host_port, proxy):
                t_nat = time.monotonic()
            else:
                time.sleep(0.002)
            continue
        attempts += 1
        ok, _, sans = handshake(ctx, cid, host_port)
        if ok:
            t = time.monotonic()
            if t_tls is None:
                t_tls, first_sans = t, sans
            if ctr_ip in sans:
                t_san = t
                break
        time.sleep(0.002)
    ms = lambda t: (t - t0) * 1e3
    # What one handshake + request costs once served (to read the figures above by).
    t = time.monotonic()
    if not handshake(ctx, cid, host_port)[0]:
        fail(f"{cid}: a handshake failed after the first success")
    one_ms = (time.monotonic() - t) * 1e3
    return {"ip_cmd_ms": ms(t_ip), "nat_ms": ms(t_nat), "tls_ms": ms(t_tls),
            "san_ms": ms(t_san), "first_tls_had_san": ctr_ip in first_sans,
            "attempts": attempts, "one_handshake_ms": one_ms}


setns(os.open(f"/var/run/netns/{router_ns}", os.O_RDONLY))
ca = f"{tmp}/ca/ca.crt"
ctx = ssl.create_default_context(cafile=ca)

# ---- (a) ---------------------------------------------------------------------------
for i in range(n):
    cid = f"{id_prefix}{i}"
    st, run_ms, _ = start(cid)
    r = follow(cid, st, ctx)
    r.update(kind="follow", id=cid, run_ms=run_ms)
    print(json.dumps(r), flush=True)
    stop(cid, st)

# ---- (b) ---------------------------------------------------------------------------
cid = f"{id_prefix}ca"
st, _, _ = start(cid)
follow(cid, st, ctx)
port = st["ports"][0]["external_tls_proxy"]
rng = random.Random(1)
for k in range(n_ca):
    new = f"{tmp}/ca-{k}"
    run(cli, "generate-ca", "--out", new)
    new_ctx = ssl.create_default_context(cafile=f"{new}/ca.crt")
    if handshake(new_ctx, cid, port)[0]:
        fail("verifies against a CA not yet installed")
    # Where in the supervisor's 10 s check cycle the replacement falls: spread out.
    time.sleep(rng.uniform(0, 10))
    for f in ("ca.key", "ca.crt"):
        shutil.copy(f"{new}/{f}", f"{tmp}/ca/{f}.new")
    os.replace(f"{tmp}/ca/ca.key.new", f"{tmp}/ca/ca.key")
    os.replace(f"{tmp}/ca/ca.crt.new", f"{tmp}/ca/ca.crt")
    t0 = time.monotonic()
    wait_for("a handshake verifying against the new CA", 30,
             lambda: handshake(new_ctx, cid, port)[0], 0.01)
    t = time.monotonic()
    if handshake(ctx, cid, port)[0]:
        fail("still verifies against the old CA")
    ctx = new_ctx
    print(json.dumps({"kind": "ca_file", "s": t - t0}), flush=True)
for k in range(n_ca):
    before = handshake(ctx, cid, port)[1] or fail("no handshake before rotate")
    t0 = time.monotonic()
    run(cli, "--config", config, "rotate", cid, "--namespace", "default")
    t_cmd = time.monotonic()
    wait_for("a new serial after rotate", 10,
             lambda: (lambda h: h[0] and h[1] != before)(handshake(ctx, cid, port)), 0.002)
    t = time.monotonic()
    print(json.dumps({"kind": "rotate", "ms": (t - t0) * 1e3,
                      "cmd_ms": (t_cmd - t0) * 1e3}), flush=True)
stop(cid, st)
EOF

RESULTS="$TMP/results.jsonl"
log "(a) $N containers in Garden's order; (b) $N_CA CA file replacements and $N_CA rotations"
"$PY" -I -S "$TMP/measure.py" "$TMP" "$WRAPPER" "$CLI" "$RUNC" "$CONFIG" "$STATE" "$ROOT" \
    "$BUNDLE" "$NETNS" "$HOST_IF" "$HOST_IP" "$CTR_IP" "$ROUTER_NS" "$ROUTER_HOST_IP" \
    "$ID_PREFIX" "$N" "$N_CA" >"$RESULTS" \
    || { for f in "$STATE"/default/*/supervisor.log; do
             [ -e "$f" ] || continue
             echo "---- $f (last 30 lines) ----" >&2
             tail -n 30 "$f" >&2
         done
         die "measurement failed"; }

# ---- leak checks ------------------------------------------------------------------
left="$("$RUNC" --root "$ROOT" list -q 2>/dev/null || true)"
[ -z "$left" ] || die "containers left in $ROOT: $left"
left="$(pool_nat)"
[ -z "$left" ] || die "NAT elements left in the pool: $left"
bench_leak_check
left="$(our_pids)"
[ -z "$left" ] || die "processes of the bench left: $left"

# ---- report -----------------------------------------------------------------------
bench_export_machine_facts
export B_ENVOY="$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: *//p' | head -n1)"
export B_N="$N" B_N_CA="$N_CA" B_CTR_IP="$CTR_IP" B_ROUTER_HOST_IP="$ROUTER_HOST_IP"

SECTION="$TMP/network.md"
"$PY" -I -S - "$RESULTS" "$SECTION" <<'EOF' || die "computing the report failed"
import json, math, os, statistics, sys, textwrap

results, out = sys.argv[1], sys.argv[2]
e = os.environ
rows = [json.loads(l) for l in open(results)]
follow = [r for r in rows if r["kind"] == "follow"]
ca_file = [r["s"] for r in rows if r["kind"] == "ca_file"]
rotate = [r["ms"] for r in rows if r["kind"] == "rotate"]
rotate_cmd = [r["cmd_ms"] for r in rows if r["kind"] == "rotate"]
n, n_ca = int(e["B_N"]), int(e["B_N_CA"])
assert len(follow) == n and len(ca_file) == n_ca and len(rotate) == n_ca, "result count"


def p90(v):
    s = sorted(v)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]  # nearest rank


def line(label, v, fmt):
    cells = [fmt.format(x) for x in (statistics.median(v), p90(v), max(v), min(v))]
    return f"| {label} | " + " | ".join(cells) + f" | {len(v)} |"


col = lambda k: [r[k] for r in follow]
table = [
    "| Figure | Median | p90 | Max | Min | n |",
    "|---|---:|---:|---:|---:|---:|",
    line("(a) address added → NAT element in `ip envoy_sidecar ports` (ms)", col("nat_ms"), "{:.0f}"),
    line("**(a) address added → NAT applied and TLS handshake through host:external_tls_proxy from the router (ms)**",
         col("tls_ms"), "{:.0f}"),
    line("(a) address added → first handshake whose certificate has the IP SAN (ms)", col("san_ms"), "{:.0f}"),
    line("(a) of which `ip addr add` itself (ms)", col("ip_cmd_ms"), "{:.1f}"),
    line("(a) TLS attempts until the first success (after the NAT element was seen)", col("attempts"), "{:.0f}"),
    line("(a) one handshake + request through the host port, once served (ms)", col("one_handshake_ms"), "{:.0f}"),
    line("(a) `run --detach` through the wrapper (ms)", col("run_ms"), "{:.0f}"),
    line("(b) CA files replaced → first handshake verifying against the new CA (s)", ca_file, "{:.1f}"),
    line("**(b) `envoy-sidecar rotate ID` invoked → new certificate served (ms)**", rotate, "{:.0f}"),
    line("(b) of which the `rotate` command itself (ms)", rotate_cmd, "{:.0f}"),
]
san_first = sum(1 for r in follow if r["first_tls_had_san"])
how = (
    "**How to read this.** (a) is the supervisor following the network: an rtnetlink "
    "event wakes it, it re-issues the certificate with the IP SAN (an SDS file swap, no "
    "Envoy restart), then maps the host ports from the host's netns (one `nft -f` "
    "transaction). The clock starts just before `ip -n NS addr add` runs (so it "
    "includes that command, a few ms), the NAT element is polled with `nft list map` "
    "(each call a few ms, so the NAT figure is resolved to about that), and TLS "
    "attempts start once the element is there: most of the TLS figure is the one "
    f"handshake and request itself (median {statistics.median(col('one_handshake_ms')):.0f} ms "
    "once served: python's client, Envoy with one worker, busybox httpd behind it; "
    f"median {statistics.median(col('attempts')):.0f} attempt(s)). The first handshake already carried the "
    f"IP SAN in {san_first} of {n} containers. (b) The supervisor re-reads the CA files "
    "every 10 s, so a replacement is picked up after whatever remains of that period "
    "(the replacements were spread over the cycle at random: expect anything from "
    "~0 to ~10 s, median ~5 s); `rotate` (SIGHUP) skips the wait and shows what the "
    "re-read, re-issue and SDS swap themselves cost. The machine is shared and noisy: "
    "read the medians."
)
how = textwrap.fill(how, width=88, break_long_words=False, break_on_hyphens=False)
doc = f"""## Following the network (Garden's order) and CA rotation

How soon a container whose address comes after it started is reachable through host
NAT, and how soon a new CA reaches the wire. Garden's order, with the release build:
the wrapper driven as runc (`envoy-sidecar-runc --root R run --detach --bundle B
--pid-file P ID`, a bundle from `runc spec` with busybox `httpd` on 8080 and the
annotation `envoy-sidecar/ports=8080`) into a network namespace that has only `lo`. Once the supervisor records `waiting-for-network` with Envoy ready on
the container's loopback, the networker's part: a veth, the host's address and an
onlink default route, then **the timed step**, `ip -n NS addr add {e['B_CTR_IP']}/30 dev
eth0`. Success = the NAT element `tcp . <external_tls_proxy> : {e['B_CTR_IP']} .
<internal_tls_proxy>` is in the map and a TLS handshake from a "router" namespace (no
route but to the host) to {e['B_ROUTER_HOST_IP']}:<external_tls_proxy> verifies
against the CA (server name = the container id) and returns the app's page; python3
`ssl`, polling every ~2 ms. Each of the {n} containers is then killed and deleted
through the wrapper and checked gone (state, NAT, supervisor, Envoy, veth). (b) One
such container: {n_ca} times a new `envoy-sidecar generate-ca` renamed over the
configured `ca.key` and `ca.crt`, timed to the first handshake verifying against the
new CA (the old one then refused); then {n_ca} times `envoy-sidecar rotate ID`, timed
to the first handshake that serves a different certificate.

**Command:** `make bench` (runs `scripts/bench-network.sh` after the other bench
scripts). `BENCH_NETWORK_N` and `BENCH_NETWORK_CA_N` set the counts,
`ENVOY_SIDECAR_BIN_DIR` the binaries (default `$CARGO_TARGET_DIR/release`, else
`target/release`).

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}, cgroup {e['B_CGROUP']}  
**Runtime:** runc {e['B_RUNC']} (no containerd in this path)  
**Envoy:** {e['B_ENVOY']} (`/usr/local/bin/envoy --version`)

{chr(10).join(table)}

{how}
"""
with open(out, "w") as f:
    f.write(doc)
print()
print(f"Following the network and CA rotation ({n} containers, {e['B_DATE']})")
print()
print("\n".join(table))
EOF
"$PY" -I -S "$MD_SECTION" "$OUT" network <"$SECTION" \
    || die "writing the network section of $OUT failed"
log "wrote section 'network' of $OUT"
