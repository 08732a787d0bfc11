#!/usr/bin/env python3
"""Measuring helpers of scripts/bench-density.sh (density: N real proxied containers).

Usage:
  bench-density.py create OUT.jsonl FIRST COUNT  (the rest from the environment, below)
      creates containers D_PREFIX<FIRST> .. D_PREFIX<FIRST+COUNT-1> one after another:
      `ctr run -d --cni --runc-binary D_RUNTIME --annotation D_ANN IMAGE ID APP...`, then
      the container's IP (host-local's lease to `<namespace>-<id>` in D_LEASES) and its
      TLS proxy port (`envoy-sidecar inspect`: ports[0].internal_tls_proxy), then polls
      HTTPS on IP:port every 3 ms (python ssl = OpenSSL, verifying against D_CA, server
      name = the id) until the app's answer comes back. One JSON line per container:
      run_return_ms, ready_ms (from invoking `ctr run -d`), ip, port, attempts, or
      "error" when it never answered within D_READY_TIMEOUT s; runtime_ms and runc_ms:
      the create + start invocations of the runtime (envoy-sidecar-runc) and of the
      runc it runs, from the logs D_RUNTIME_TIMES and D_RUNC_TIMES. Exits 1 only when
      `ctr run -d` itself fails (the container is then the caller's to remove).
  bench-density.py sample OUT.json SECONDS [NAME=PID ...]
      CPU over SECONDS of idle: the host's /proc/stat (busy = all but idle and iowait)
      and, per process, utime+stime from /proc/PID/stat (clock ticks) and the sum of
      its threads' /proc/PID/task/*/schedstat run times (ns), at the start and the end
      (a process whose start time changed or that went away is counted apart). Classes:
      envoy (comm `envoy`, command line under D_STATE/), supervisor (command line
      `envoy-sidecar ... supervise` mentioning D_TMP/), shim (containerd-shim whose
      `-id` starts with D_PREFIX), containerd (pid in D_CONTAINERD_PID), and each NAME=PID
      given; every other process by its comm (the 12 busiest). Also RssAnon/VmRSS (kB)
      of every process of a class, read at the end.
  bench-density.py breakdown-bootstraps DIR PORT_BASE UPSTREAM_PORT PRODUCT_BOOTSTRAP
      writes DIR/{a,b,c,d}.json: (a) one static tcp_proxy listener on 127.0.0.1 and
      Envoy's defaults; (b) + stats_flush_on_admin and 60 s watchdogs; (c) (b) + the
      product's overload_manager and layered_runtime (from PRODUCT_BOOTSTRAP) with
      refresh_interval 0.1s; (d) as (c) with 1s; and DIR/e.json, PRODUCT_BOOTSTRAP with
      every listener moved to 127.0.0.1 (ports PORT_BASE+4, +5, ...; no additional
      addresses) and its admin socket to DIR/e-admin.sock.
"""

import glob
import json
import os
import socket
import ssl
import subprocess
import sys
import time

HELLO = b"hello from envoy-sidecar test app"
REQ = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
POLL_S = 0.003


def die(msg):
    sys.stderr.write(f"bench-density.py: error: {msg}\n")
    sys.exit(1)


# ---- create -------------------------------------------------------------------------

def lease_ip(leases_dir, cni_id):
    for path in glob.glob(os.path.join(leases_dir, "*")):
        name = os.path.basename(path)
        if name.count(".") != 3:
            continue
        try:
            with open(path) as f:
                if f.readline().strip() == cni_id:
                    return name
        except OSError:
            pass
    return None


def attempt(ctx, ip, port, cid):
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
    except (OSError, ssl.SSLError) as e:
        if not data:
            return f"{type(e).__name__}: {e}"
    if data.startswith(b"HTTP/1.") and HELLO in data:
        return None
    return f"unexpected response: {data[:200]!r}"


def runtime_ms(path, cid):
    """Milliseconds the create and start invocations of `cid` took, from a log of
    `ID SUBCOMMAND START_NS END_NS` lines (the timing scripts of bench-density.sh);
    None when the log has neither."""
    total, seen = 0, False
    try:
        with open(path) as f:
            for line in f:
                w = line.split()
                if len(w) == 4 and w[0] == cid and w[1] in ("create", "start"):
                    total += int(w[3]) - int(w[2])
                    seen = True
    except (OSError, ValueError):
        return None
    return total / 1e6 if seen else None


def cmd_create(args):
    out_path, first, count = args[0], int(args[1]), int(args[2])
    e = os.environ
    sock, ns, image, runtime = e["D_SOCK"], e["D_NS"], e["D_IMAGE"], e["D_RUNTIME"]
    ann, prefix, cli, config = e["D_ANN"], e["D_PREFIX"], e["D_CLI"], e["D_CONFIG"]
    leases, ca, tmp = e["D_LEASES"], e["D_CA"], e["D_TMP"]
    app = e["D_APP"].split()
    timeout_s = float(e.get("D_READY_TIMEOUT", "60"))
    ctx = ssl.create_default_context(cafile=ca)
    with open(out_path, "a") as out:
        for i in range(first, first + count):
            cid = f"{prefix}{i}"
            cmd = ["ctr", "--address", sock, "-n", ns, "run", "-d", "--cni",
                   "--runc-binary", runtime, "--annotation", ann, image, cid] + app
            log_path = os.path.join(tmp, "run-logs", f"{cid}.log")
            rec = {"id": cid, "index": i}
            with open(log_path, "wb") as lf:
                t0 = time.monotonic()
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT)
                t_ret = time.monotonic()
            rec["run_return_ms"] = (t_ret - t0) * 1e3
            for key, var in (("runtime_ms", "D_RUNTIME_TIMES"), ("runc_ms", "D_RUNC_TIMES")):
                ms = runtime_ms(e[var], cid) if var in e else None
                if ms is not None:
                    rec[key] = ms
            if r.returncode != 0:
                die(f"{cid}: ctr run -d exited {r.returncode}: " + open(log_path, errors="replace").read())
            ip = lease_ip(leases, f"{ns}-{cid}")
            ins = subprocess.run([cli, "--config", config, "inspect", cid, "--namespace", ns],
                                 capture_output=True)
            port = None
            if ins.returncode == 0:
                try:
                    p0 = json.loads(ins.stdout)["ports"][0]
                    port = int(p0["internal_tls_proxy"])
                    rec["host_tls_port"] = p0.get("external_tls_proxy")
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
            rec["ip"], rec["port"] = ip, port
            if ip is None or port is None:
                rec["error"] = (f"no lease for {ns}-{cid} in {leases}" if ip is None
                                else f"inspect gave no TLS proxy port: {ins.stdout[:300]!r} {ins.stderr[:300]!r}")
            else:
                attempts, last = 0, "no attempt"
                while True:
                    attempts += 1
                    last = attempt(ctx, ip, port, cid)
                    now = time.monotonic()
                    if last is None:
                        rec["ready_ms"] = (now - t0) * 1e3
                        break
                    if now - t0 > timeout_s:
                        rec["error"] = f"no HTTPS answer from {ip}:{port} within {timeout_s:.0f} s; last: {last}"
                        break
                    time.sleep(POLL_S)
                rec["attempts"] = attempts
            out.write(json.dumps(rec) + "\n")
            out.flush()
            state = "ready %.0f ms (ctr returned %.0f ms)" % (rec["ready_ms"], rec["run_return_ms"]) \
                if "ready_ms" in rec else "NOT READY: " + rec["error"]
            if (i + 1) % 10 == 0 or "error" in rec or i == first + count - 1:
                sys.stderr.write(f"bench-density:   {i + 1 - first}/{count} {cid} {ip}: {state}\n")


# ---- sample -------------------------------------------------------------------------

def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def host_cpu():
    f = [int(x) for x in read("/proc/stat").splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    # user..steal (guest is inside user); and the split of the busy part
    return sum(f[:8]), idle, {"user": f[0] + f[1], "system": f[2], "irq": f[5], "softirq": f[6], "steal": f[7]}


def proc_cpu(pid):
    s = read(f"/proc/{pid}/stat")
    rest = s[s.rindex(")") + 2:].split()
    ticks = int(rest[11]) + int(rest[12])
    start = int(rest[19])
    ns = 0
    for t in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            ns += int(read(t).split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return start, ticks, ns


def mem(pid):
    d = {}
    for line in read(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0])
    return d


def classify(named):
    e = os.environ
    tmp, state, prefix = e["D_TMP"] + "/", e["D_STATE"] + "/", e["D_PREFIX"]
    cd_pid = None
    try:
        cd_pid = int(read(e["D_CONTAINERD_PID"]).strip())
    except (OSError, ValueError, KeyError):
        pass
    by_pid = {int(p): n for n, p in named.items()}
    found = {}
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d[6:])
        if pid == os.getpid():
            continue
        try:
            argv = read(f"{d}/cmdline", "rb").decode(errors="replace").split("\0")
            comm = read(f"{d}/comm").strip()
        except OSError:
            continue
        line = " ".join(argv)
        cls = None
        if pid in by_pid:
            cls = by_pid[pid]
        elif comm == "envoy" and state in line:
            cls = "envoy"
        elif tmp in line and "supervise" in argv and comm.startswith("envoy-sidecar"):
            cls = "supervisor"
        elif comm.startswith("containerd-shim") and "-id" in argv \
                and argv.index("-id") + 1 < len(argv) and argv[argv.index("-id") + 1].startswith(prefix):
            cls = "shim"
        elif pid == cd_pid:
            cls = "containerd"
        if cls is None:
            cls = "other:" + comm
        found[pid] = cls
    return found


def cmd_sample(args):
    out_path, secs = args[0], float(args[1])
    named = dict(a.split("=", 1) for a in args[2:])
    procs0 = classify(named)
    h0 = host_cpu()
    c0 = {}
    for pid in procs0:
        try:
            c0[pid] = proc_cpu(pid)
        except OSError:
            pass
    t0 = time.monotonic()
    time.sleep(secs)
    h1 = host_cpu()
    t1 = time.monotonic()
    c1 = {}
    for pid in c0:
        try:
            c1[pid] = proc_cpu(pid)
        except OSError:
            pass
    classes, others = {}, {}
    for pid, cls in procs0.items():
        if cls.startswith("other:"):
            if pid in c0 and pid in c1 and c1[pid][0] == c0[pid][0]:
                o = others.setdefault(cls[6:], {"count": 0, "ticks": 0, "ns": 0})
                o["count"] += 1
                o["ticks"] += c1[pid][1] - c0[pid][1]
                o["ns"] += c1[pid][2] - c0[pid][2]
            continue
        c = classes.setdefault(cls, {"count": 0, "ticks": 0, "ns": 0, "lost": 0,
                                     "rssanon_kb": [], "vmrss_kb": [], "pids": []})
        if pid not in c0 or pid not in c1 or c1[pid][0] != c0[pid][0]:
            c["lost"] += 1
            continue
        c["count"] += 1
        c["pids"].append(pid)
        c["ticks"] += c1[pid][1] - c0[pid][1]
        c["ns"] += c1[pid][2] - c0[pid][2]
        try:
            m = mem(pid)
            c["rssanon_kb"].append(m.get("RssAnon", 0))
            c["vmrss_kb"].append(m.get("VmRSS", 0))
        except OSError:
            pass
    res = {
        "seconds": t1 - t0,
        "clk_tck": os.sysconf("SC_CLK_TCK"),
        "nproc": os.cpu_count(),
        "host_total_ticks": h1[0] - h0[0],
        "host_idle_ticks": h1[1] - h0[1],
        "host_split_ticks": {k: h1[2][k] - h0[2][k] for k in h0[2]},
        "classes": classes,
        "others": dict(sorted(others.items(), key=lambda kv: -kv[1]["ns"])[:12]),
    }
    with open(out_path, "w") as f:
        json.dump(res, f)


# ---- breakdown bootstraps -----------------------------------------------------------

def minimal(port, upstream_port):
    return {
        "static_resources": {
            "listeners": [{
                "name": "l0",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "l0", "cluster": "app"}}]}],
            }],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
            }],
        }
    }


def cmd_breakdown(args):
    out_dir, base, upstream, product = args[0], int(args[1]), int(args[2]), args[3]
    prod = json.load(open(product))
    for k in ("overload_manager", "layered_runtime"):
        if k not in prod:
            die(f"{product} has no {k}")
    wd = {"miss_timeout": "60s", "megamiss_timeout": "60s"}
    boots = {}
    boots["a"] = minimal(base, upstream)
    b = minimal(base + 1, upstream)
    b["stats_flush_on_admin"] = True
    b["watchdogs"] = {"main_thread_watchdog": dict(wd), "worker_watchdog": dict(wd)}
    boots["b"] = b
    for name, port, interval in (("c", base + 2, "0.1s"), ("d", base + 3, "1s")):
        c = json.loads(json.dumps(b))
        c["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
        c["overload_manager"] = json.loads(json.dumps(prod["overload_manager"]))
        c["overload_manager"]["refresh_interval"] = interval
        c["layered_runtime"] = json.loads(json.dumps(prod["layered_runtime"]))
        boots[name] = c
    # (e): the product's own bootstrap, its sockets moved to the host's loopback.
    e = json.loads(json.dumps(prod))
    nxt = base + 4
    for lst in e.get("static_resources", {}).get("listeners", []):
        lst.pop("additional_addresses", None)  # [::]:61001 would be the host's
        sa = lst.get("address", {}).get("socket_address")
        if sa is not None:
            sa["address"], sa["port_value"] = "127.0.0.1", nxt
            nxt += 1
        elif "pipe" in lst.get("address", {}):
            lst["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": nxt}}
            nxt += 1
    # The admin: a socket of its own (the product's path is the real Envoy's).
    adm = e.get("admin", {})
    if "pipe" in adm.get("address", {}):
        adm["address"]["pipe"]["path"] = os.path.join(out_dir, "e-admin.sock")
    elif "address" in adm:
        adm["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": nxt}}
        nxt += 1
    boots["e"] = e
    for name, doc in boots.items():
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=1)


def main():
    if len(sys.argv) < 2:
        die("usage: see the module docstring")
    cmd, args = sys.argv[1], sys.argv[2:]
    {"create": cmd_create, "sample": cmd_sample, "breakdown-bootstraps": cmd_breakdown}.get(
        cmd, lambda _: die(f"unknown command {cmd!r}"))(args)


if __name__ == "__main__":
    main()
