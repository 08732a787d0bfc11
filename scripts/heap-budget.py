#!/usr/bin/env python3
"""Envoy's heap budget, standalone (no containerd): one real Envoy with the generated
listener's shape (TLS, tcp_proxy to an app on loopback, `--concurrency 1`) in its own
cgroup v1 memory cgroup, floods of held TLS connections (`scripts/tls-load.py hold`),
and what the overload manager, tcmalloc (admin `/memory`) and the cgroup say while a
flood is held, once it is released, and how long until a new connection is served.
Root (it creates /sys/fs/cgroup/memory/heap-budget-<name>). python3 stdlib + openssl.

Measures the heap constants of src/envoy/sizing.rs (HEAP_IDLE_KIB, *_HEAP_PER_CONNECTION
_BYTES: `--heap-mb 1000 --use-allocated --max-conn 600 --flood 600`, allocated at idle
and held) and the two ways the fixed_heap monitor counts (docs/BENCHMARKS.md, "Envoy
heap budget"):

    scripts/heap-budget.py --name legacy --max-conn 4096 --heap-mb 16.37 --stop-at 0.95
    scripts/heap-budget.py --name alloc  --max-conn 4096 --heap-mb 16.37 --stop-at 0.90 \
        --use-allocated --refresh 0.1s --rounds 4

Prints one JSON line per snapshot and a line per round (opened / released / recovered).
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time, urllib.request
p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--envoy", default="/usr/local/bin/envoy")
p.add_argument("--max-conn", type=int, default=386)
p.add_argument("--heap-mb", type=float, default=0)      # 0: no fixed_heap
p.add_argument("--use-allocated", action="store_true")
p.add_argument("--stop-at", type=float, default=0.95)
p.add_argument("--action", default="envoy.overload_actions.reject_incoming_connections")
p.add_argument("--shrink-at", type=float, default=0)
p.add_argument("--release-bytes", type=int, default=0)
p.add_argument("--release-ms", type=int, default=1000)
p.add_argument("--cg-limit-mb", type=int, default=0)
p.add_argument("--flood", type=int, default=4000)
p.add_argument("--rounds", type=int, default=1)
p.add_argument("--hold", type=int, default=8)
p.add_argument("--recover-max", type=int, default=40)
p.add_argument("--port", type=int, default=18443)
p.add_argument("--mtls", action="store_true")
p.add_argument("--refresh", default="0.25s")
a = p.parse_args()
HERE = os.path.dirname(os.path.abspath(__file__))
D = tempfile.mkdtemp(prefix="heap-budget-")
ADMIN = a.port + 1; APP = a.port + 2
mons = [{"name": "envoy.resource_monitors.global_downstream_max_connections",
  "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
   "max_active_downstream_connections": a.max_conn}}]
actions = []
if a.heap_mb:
    mons.append({"name": "envoy.resource_monitors.fixed_heap", "typed_config": {
      "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
      "max_heap_size_bytes": int(a.heap_mb * 2**20)}})
    actions.append({"name": a.action, "triggers": [{"name": "envoy.resource_monitors.fixed_heap",
        "threshold": {"value": a.stop_at}}]})
    if a.shrink_at:
        actions.append({"name": "envoy.overload_actions.shrink_heap", "triggers": [{"name": "envoy.resource_monitors.fixed_heap",
        "threshold": {"value": a.shrink_at}}]})
om = {"refresh_interval": a.refresh, "resource_monitors": mons}
if actions: om["actions"] = actions
bs = {"node": {"id": "x/y", "cluster": "c"},
 "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN}}, "ignore_global_conn_limit": True},
 "overload_manager": om,
 "static_resources": {"listeners": [{"name": "tls", "address": {"socket_address": {"address": "127.0.0.1", "port_value": a.port}},
   "per_connection_buffer_limit_bytes": 32768,
   "filter_chains": [{"transport_socket_connect_timeout": "5s",
     "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "t", "cluster": "app", "upstream_connect_mode": "ON_DOWNSTREAM_TLS_HANDSHAKE", "max_early_data_bytes": 0}}],
     "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2"}, "alpn_protocols": ["h2", "http/1.1"],
          "tls_certificates": [{"certificate_chain": {"filename": f"{D}/srv.crt"}, "private_key": {"filename": f"{D}/srv.key"}}]}}}}]}],
  "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "2s", "per_connection_buffer_limit_bytes": 32768,
    "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000, "max_retries": 0}]},
    "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": APP}}}}]}]}}]}}
if a.mtls:
    t = bs["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    t["require_client_certificate"] = True
    t["common_tls_context"]["validation_context"] = {"trusted_ca": {"filename": f"{D}/ca.crt"}}
CLI = ["--cert", f"{D}/cli.crt", "--key", f"{D}/cli.key"] if a.mtls else []
if a.use_allocated:
    bs["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {"envoy.reloadable_features.fixed_heap_use_allocated": True}}]}
if a.release_bytes:
    bs["memory_allocator_manager"] = {"bytes_to_release": a.release_bytes, "memory_release_interval": f"{a.release_ms/1000}s"}
W = D
def ossl(*args):
    subprocess.run(["openssl", *args], cwd=D, check=True, capture_output=True)
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
ossl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=heap-budget-ca", "-days", "2")
open(f"{D}/ext", "w").write("subjectAltName=DNS:app\n")
for n, ext in (("srv", ["-extfile", "ext"]), ("cli", [])):
    ossl("req", "-new", *EC, "-keyout", f"{n}.key", "-out", f"{n}.csr", "-subj", f"/CN={n}")
    ossl("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{n}.crt", "-days", "2", *ext)
APP_PY = """
import asyncio, resource, sys
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
async def serve(r, w):
    try:
        await r.readuntil(b"\\r\\n\\r\\n")
        w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 6\\r\\nConnection: close\\r\\n\\r\\nhello\\n")
        await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"""
open(f"{D}/app.py", "w").write(APP_PY)
json.dump(bs, open(f"{W}/bootstrap.json", "w"), indent=1)
cg = f"/sys/fs/cgroup/memory/heap-budget-{a.name}"
os.makedirs(cg, exist_ok=True)
if a.cg_limit_mb: open(f"{cg}/memory.limit_in_bytes", "w").write(str(a.cg_limit_mb << 20))
open(f"{cg}/memory.max_usage_in_bytes", "w").write("0")
app = subprocess.Popen([sys.executable, f"{D}/app.py", str(APP)])
env_log = open(f"{W}/envoy.log", "w")
def pre(): open(f"{cg}/cgroup.procs", "w").write(str(os.getpid()))
ev = subprocess.Popen([a.envoy, "-c", f"{W}/bootstrap.json", "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"],
    stdout=env_log, stderr=env_log, preexec_fn=pre)
def adm(path):
    return urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}{path}", timeout=5).read().decode()
def stat(name):
    for l in adm(f"/stats?filter={name}").splitlines():
        k, _, v = l.partition(": ")
        if k == name: return v
def cgv(f): return int(open(f"{cg}/{f}").read().split()[0]) if "stat" not in f else None
def oomk(): 
    for l in open(f"{cg}/memory.oom_control"):
        if l.startswith("oom_kill "): return int(l.split()[1])
def mem():
    m = json.loads(adm("/memory"))
    return {k: round(int(m[k]) / 2**20, 1) for k in ("allocated", "heap_size", "pageheap_unmapped", "pageheap_free", "total_thread_cache", "total_physical_bytes") if k in m}
def snap(tag):
    s = {"t": tag, "cg_usage_mb": round(cgv("memory.usage_in_bytes")/2**20, 1), "cg_peak_mb": round(cgv("memory.max_usage_in_bytes")/2**20, 1),
         "oom_kill": oomk(), "envoy_alive": ev.poll() is None}
    try:
        s["heap_pressure"] = stat("overload.envoy.resource_monitors.fixed_heap.pressure")
        s["reject_active"] = stat(f"overload.{a.action}.active")
        s["shrink_count"] = stat("overload.envoy.overload_actions.shrink_heap.shrink_count")
        s["cx_active"] = stat("listener.127.0.0.1_%d.downstream_cx_active" % a.port)
        s["overload_reject"] = stat("listener.127.0.0.1_%d.downstream_cx_overload_reject" % a.port)
        s["global_cx_overflow"] = stat("listener.127.0.0.1_%d.downstream_global_cx_overflow" % a.port)
        s["mem"] = mem()
    except Exception as e:
        s["admin_err"] = str(e)
    print(json.dumps(s), flush=True)
    return s
def probe(timeout=2):
    r = subprocess.run([sys.executable, f"{HERE}/tls-load.py", "probe", "--host", "127.0.0.1", "--port", str(a.port),
        "--ca", f"{D}/ca.crt", "--server-name", "app", *CLI, "--expect", "hello", "--timeout", str(timeout)], capture_output=True, text=True)
    return r.returncode == 0
try:
    for _ in range(100):
        try: adm("/ready"); break
        except Exception: time.sleep(0.1)
    assert probe(10), "first probe"
    snap("idle")
    for rnd in range(a.rounds):
        ready = f"{W}/ready{rnd}"
        if os.path.exists(ready): os.unlink(ready)
        t0 = time.time()
        ld = subprocess.Popen([sys.executable, f"{HERE}/tls-load.py", "hold", "--host", "127.0.0.1", "--port", str(a.port),
            "--ca", f"{D}/ca.crt", "--server-name", "app", *CLI, "--n", str(a.flood), "--ready-file", ready, "--parallel", "64",
            "--open-timeout", "60", "--hold-max", "120", "--keep-partial", "--finish"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not os.path.exists(ready):
            if ld.poll() is not None: print("load exited", ld.stdout.read(), ld.stderr.read()[-2000:]); break
            if ev.poll() is not None: break
            time.sleep(0.2)
        if os.path.exists(ready): print(f"round {rnd} opened:", open(ready).read(), f"{time.time()-t0:.1f}s", flush=True)
        snap(f"held{rnd}")
        time.sleep(a.hold)
        snap(f"held{rnd}+{a.hold}s")
        ld.send_signal(signal.SIGTERM)
        out, err = ld.communicate(timeout=60)
        print(f"round {rnd} release:", out.strip(), flush=True)
        t1 = time.time()
        snap(f"released{rnd}")
        ok = False
        while time.time() - t1 < a.recover_max:
            if probe(1): ok = True; break
        print(f"round {rnd} recovered={ok} after {time.time()-t1:.2f}s", flush=True)
        snap(f"after-recovery{rnd}")
    time.sleep(3); snap("end+3s")
finally:
    ev.terminate(); app.terminate()
    try: ev.wait(10)
    except Exception: ev.kill()
    app.wait()
    print("envoy rc", ev.returncode, "log tail:", open(f"{W}/envoy.log").read()[-1500:])
    time.sleep(0.5)
    try:
        os.rmdir(cg)
    except OSError as e:
        print(f"cgroup {cg} left: {e}")
    shutil.rmtree(D, ignore_errors=True)
