#!/usr/bin/env python3
"""Report of scripts/bench-density.sh: reads its run directory (create-N.jsonl,
idle-N.json, status-N.json, cmds-N, level-N.json, breakdown.json, ref.jsonl) and the
B_* environment, writes the `density` section of docs/BENCHMARKS.md to OUT and prints
the tables.

Usage: bench-density-report.py RUN_DIR OUT
"""

import json
import os
import statistics
import sys

TARGET_RATIO = 1.2      # last10 / first10 ready time at N = 200
TARGET_HOST_PCT = 5.0   # host busy share at N = 200, % of the whole host
TARGET_ENVOY_MS = 0.3   # ms CPU per s per Envoy
TARGET_STATUS_MS = 200  # `envoy-sidecar status` wall time
MIB = 1024.0


def load_jsonl(p):
    return [json.loads(l) for l in open(p) if l.strip()]


def med(v):
    return statistics.median(v) if v else float("nan")


def main():
    run, out = sys.argv[1], sys.argv[2]
    e = os.environ
    levels = [int(x) for x in e["B_LEVELS"].split()]
    bd = json.load(open(os.path.join(run, "breakdown.json")))
    ref = load_jsonl(os.path.join(run, "ref.jsonl"))[0]
    clk = bd["clk_tck"]

    def cpu(c, secs, count=None):
        """(% of one core, ms/s per process) from ticks and from schedstat."""
        count = count or c["count"] or 1
        t_s = c["ticks"] / clk
        n_s = c["ns"] / 1e9
        return {
            "pct_core": t_s / secs * 100, "ms_per_s_each": t_s * 1e3 / secs / count,
            "pct_core_ns": n_s / secs * 100, "ms_per_s_each_ns": n_s * 1e3 / secs / count,
        }

    # ---- breakdown --------------------------------------------------------------------
    bsecs = bd["seconds"]
    floor_kib = bd["classes"]["a"]["rssanon_kb"][0]
    names = {
        "a": "(a) minimal static tcp_proxy Envoy, Envoy's defaults (the floor)",
        "b": "(b) (a) + `stats_flush_on_admin: true` + watchdogs 60 s",
        "c": "(c) (b) + the product's `overload_manager` (refresh 0.1 s) + `layered_runtime`",
        "d": "(d) as (c), `refresh_interval: 1s`",
        "e": "(e) a running container's own bootstrap, copied (listener and admin moved; no supervisor)",
        "real": "(e') that running container's own Envoy (its supervisor polling it)",
    }
    bd_rows = []
    bd_table = [
        "| Envoy | ms CPU/s (`/proc/PID/stat`, 10 ms ticks) | ms CPU/s (threads' `schedstat`) | `RssAnon` (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for k in ("a", "b", "c", "d", "e", "real"):
        c = bd["classes"].get(k)
        if not c or not c["count"]:
            bd_table.append(f"| {names[k]} | — | — | — |")
            continue
        x = cpu(c, bsecs)
        bd_rows.append((k, x))
        bd_table.append(
            f"| {names[k]} | {x['ms_per_s_each']:.2f} ({c['ticks']} ticks) | **{x['ms_per_s_each_ns']:.3f}** | "
            f"{c['rssanon_kb'][0] / MIB:.1f} |")
    bx = dict(bd_rows)

    def d_ns(k1, k0):
        if k1 in bx and k0 in bx:
            return bx[k1]["ms_per_s_each_ns"] - bx[k0]["ms_per_s_each_ns"]
        return float("nan")

    # ---- levels -----------------------------------------------------------------------
    per = []
    for n in levels:
        rows = load_jsonl(os.path.join(run, f"create-{n}.jsonl"))
        ok = [r for r in rows if "ready_ms" in r]
        bad = [r for r in rows if "ready_ms" not in r]
        ready = [r["ready_ms"] for r in sorted(ok, key=lambda r: r["index"])]
        srt = sorted(rows, key=lambda r: r["index"])
        first10 = [r["ready_ms"] for r in srt[:10] if "ready_ms" in r]
        last10 = [r["ready_ms"] for r in srt[-10:] if "ready_ms" in r]
        ret10 = (med([r["run_return_ms"] for r in srt[:10]]), med([r["run_return_ms"] for r in srt[-10:]]))
        def ends(key):
            return (med([r[key] for r in srt[:10] if key in r]),
                    med([r[key] for r in srt[-10:] if key in r]))
        rt10, runc10 = ends("runtime_ms"), ends("runc_ms")
        up10 = (med([r["ready_ms"] - r["run_return_ms"] for r in srt[:10] if "ready_ms" in r]),
                med([r["ready_ms"] - r["run_return_ms"] for r in srt[-10:] if "ready_ms" in r]))
        idle = json.load(open(os.path.join(run, f"idle-{n}.json")))
        secs = idle["seconds"]
        cl = idle["classes"]
        empty = {"count": 0, "ticks": 0, "ns": 0, "lost": 0, "rssanon_kb": [], "vmrss_kb": []}
        env, sup = cl.get("envoy", empty), cl.get("supervisor", empty)
        shim, cd = cl.get("shim", empty), cl.get("containerd", empty)
        host_busy = (idle["host_total_ticks"] - idle["host_idle_ticks"]) / idle["host_total_ticks"] * 100
        cmds = {}
        for line in open(os.path.join(run, f"cmds-{n}")):
            c, ms = line.split()
            cmds.setdefault(c, []).append(float(ms))
        try:
            st = json.load(open(os.path.join(run, f"status-{n}.json")))
        except (OSError, ValueError):
            st = []
        lv = json.load(open(os.path.join(run, f"level-{n}.json")))
        per.append({
            "n": n, "ok": len(ok), "bad": bad,
            "first10": med(first10), "last10": med(last10),
            "ratio": med(last10) / med(first10) if first10 and last10 else float("nan"),
            "ready_med": med(ready), "ready_max": max(ready) if ready else float("nan"),
            "ret_med": med([r["run_return_ms"] for r in rows]),
            "env": env, "sup": sup, "shim": shim, "cd": cd, "secs": secs,
            "env_cpu": cpu(env, secs), "sup_cpu": cpu(sup, secs),
            "shim_cpu": cpu(shim, secs), "cd_cpu": cpu(cd, secs, 1),
            "host_busy": host_busy,
            "env_anon_sum": sum(env["rssanon_kb"]) / MIB, "sup_anon_sum": sum(sup["rssanon_kb"]) / MIB,
            "env_anon_each": (sum(env["rssanon_kb"]) / len(env["rssanon_kb"]) / MIB) if env["rssanon_kb"] else float("nan"),
            "sup_anon_each": (sum(sup["rssanon_kb"]) / len(sup["rssanon_kb"]) / MIB) if sup["rssanon_kb"] else float("nan"),
            "cmds": {k: med(v) for k, v in cmds.items()}, "cmds_all": cmds,
            "st_rows": len(st), "st_ready": sum(1 for r in st if r.get("status") == "ready"),
            "st_nat": sum(1 for r in st if r.get("nat_applied") is True),
            "st_restarts": sum(int(r.get("restarts") or 0) for r in st),
            "lv": lv, "ret10": ret10, "up10": up10, "rt10": rt10, "runc10": runc10,
            "split": {k: v / idle["host_total_ticks"] * 100 for k, v in idle.get("host_split_ticks", {}).items()},
            "others": idle.get("others", {}),
        })

    H = ["| Figure | " + " | ".join(f"N = {p['n']}" for p in per) + " |",
         "|---|" + "---:|" * len(per)]

    def row(label, f):
        return f"| {label} | " + " | ".join(f(p) for p in per) + " |"

    f1 = lambda x: f"{x:.1f}"
    f0 = lambda x: f"{x:.0f}"
    main_t = H + [
        row("containers TLS-ready / created", lambda p: f"{p['ok']} / {p['n']}"),
        row("`status`: ready / NAT applied / Envoy restarts (after the idle window)",
            lambda p: f"{p['st_ready']} / {p['st_nat']} / {p['st_restarts']}"),
        row("NAT elements of the pool (2 a container)", lambda p: str(p["lv"]["nat_elements"])),
        row("**`ctr run -d` → first HTTPS response, median of the first 10 (ms)**", lambda p: f0(p["first10"])),
        row("**… of the last 10 (ms)**", lambda p: f0(p["last10"])),
        row("**last 10 ÷ first 10**", lambda p: f"**{p['ratio']:.2f}**"),
        row("… median of all / max (ms)", lambda p: f"{p['ready_med']:.0f} / {p['ready_max']:.0f}"),
        row("… of which `ctr run -d` invoked → returned, median first 10 / last 10 (ms)",
            lambda p: f"{p['ret10'][0]:.0f} / {p['ret10'][1]:.0f}"),
        row("… … of it the runtime's `create` + `start` (envoy-sidecar-runc with the supervisor's start after runc's create, and runc), first 10 / last 10 (ms)",
            lambda p: f"{p['rt10'][0]:.0f} / {p['rt10'][1]:.0f}"),
        row("… … … of which runc's own `create` + `start`",
            lambda p: f"{p['runc10'][0]:.0f} / {p['runc10'][1]:.0f}"),
        row("… and returned → first HTTPS response, median first 10 / last 10 (ms)",
            lambda p: f"{p['up10'][0]:.0f} / {p['up10'][1]:.0f}"),
        row("1-min load average before the level (s waited for it)",
            lambda p: f"{p['lv'].get('load_before', float('nan')):.2f} ({p['lv'].get('load_waited_s', 0)})"),
        row("creating all N, one after another (s)", lambda p: str(p["lv"]["create_s"])),
        row("Envoys: `RssAnon` sum (MiB)", lambda p: f1(p["env_anon_sum"])),
        row("Envoys: `RssAnon` per Envoy (MiB)", lambda p: f1(p["env_anon_each"])),
        row(f"… ÷ the floor Envoy (a) ({floor_kib / MIB:.1f} MiB)", lambda p: f"{p['env_anon_each'] * MIB / floor_kib:.2f}×"),
        row("supervisors: `RssAnon` sum (MiB)", lambda p: f1(p["sup_anon_sum"])),
        row("supervisors: `RssAnon` per supervisor (MiB)", lambda p: f"{p['sup_anon_each']:.2f}"),
        row(f"**host CPU busy over {per[0]['secs']:.0f} s idle, % of the whole {bd['nproc']}-core host** (`/proc/stat`)",
            lambda p: f"**{p['host_busy']:.2f} %**"),
        row("… of which user / system / softirq, % of the host",
            lambda p: " / ".join(f"{p['split'].get(k, float('nan')):.2f}" for k in ("user", "system", "softirq"))),
        row("all Envoys, % of one core (ticks; schedstat)",
            lambda p: f"{p['env_cpu']['pct_core']:.2f}; {p['env_cpu']['pct_core_ns']:.2f}"),
        row("**per Envoy, ms CPU per s** (ticks; schedstat)",
            lambda p: f"**{p['env_cpu']['ms_per_s_each']:.3f}**; {p['env_cpu']['ms_per_s_each_ns']:.3f}"),
        row("all supervisors, % of one core (ticks; schedstat)",
            lambda p: f"{p['sup_cpu']['pct_core']:.2f}; {p['sup_cpu']['pct_core_ns']:.2f}"),
        row("per supervisor, ms CPU per s (ticks; schedstat)",
            lambda p: f"{p['sup_cpu']['ms_per_s_each']:.3f}; {p['sup_cpu']['ms_per_s_each_ns']:.3f}"),
        row("all containerd shims, % of one core (ticks; schedstat)",
            lambda p: f"{p['shim_cpu']['pct_core']:.2f}; {p['shim_cpu']['pct_core_ns']:.2f}"),
        row("containerd, % of one core (ticks; schedstat)",
            lambda p: f"{p['cd_cpu']['pct_core']:.2f}; {p['cd_cpu']['pct_core_ns']:.2f}"),
        row("rest of the host (busy − the above, ticks), % of one core",
            lambda p: f"{p['host_busy'] * bd['nproc'] - p['env_cpu']['pct_core'] - p['sup_cpu']['pct_core'] - p['shim_cpu']['pct_core'] - p['cd_cpu']['pct_core']:.2f}"),
        row(f"**`envoy-sidecar status`**, median of {len(per[0]['cmds_all'].get('status', []))} (ms)",
            lambda p: f"**{p['cmds'].get('status', float('nan')):.0f}**"),
        row("`envoy-sidecar metrics` (ms)", lambda p: f0(p["cmds"].get("metrics", float("nan")))),
        row("`envoy-sidecar gc --dry-run` (ms)", lambda p: f0(p["cmds"].get("gc", float("nan")))),
        row("teardown of all N: kill + `task rm` + `container rm`, one after another (s)",
            lambda p: f"{p['lv']['teardown_ms'] / 1000:.1f}"),
        row("… per container (ms)", lambda p: f0(p["lv"]["teardown_ms"] / p["n"])),
        row("then CNI DEL of all N (not the product's; s)", lambda p: f"{p['lv']['cni_del_ms'] / 1000:.1f}"),
        row("leak check", lambda p: "passed"),
    ]

    top = max(per, key=lambda p: p["n"])
    verdicts = []

    def verdict(label, value, ok, fmt):
        return f"- {label}: {fmt} — **{'met' if ok else 'not met'}**"

    at = f"N = {top['n']}" + ("" if top["n"] == 200 else " (no N = 200 in this run)")
    verdicts.append(verdict(f"last 10 ÷ first 10 ≤ {TARGET_RATIO} at {at}", top["ratio"],
                            top["ratio"] <= TARGET_RATIO, f"{top['ratio']:.2f}"))
    verdicts.append(verdict(f"host CPU busy ≤ {TARGET_HOST_PCT:.0f} % at {at}", top["host_busy"],
                            top["host_busy"] <= TARGET_HOST_PCT, f"{top['host_busy']:.2f} %"))
    for p in per:
        x = p["env_cpu"]
        verdicts.append(verdict(f"≤ {TARGET_ENVOY_MS} ms CPU/s per Envoy at N = {p['n']}", x["ms_per_s_each"],
                                x["ms_per_s_each"] <= TARGET_ENVOY_MS,
                                f"{x['ms_per_s_each']:.3f} (ticks), {x['ms_per_s_each_ns']:.3f} (schedstat)"))
    verdicts.append(verdict(f"`status` ≤ {TARGET_STATUS_MS} ms at {at}", top["cmds"].get("status"),
                            top["cmds"].get("status", 1e9) <= TARGET_STATUS_MS, f"{top['cmds'].get('status', float('nan')):.0f} ms"))
    others_txt = []
    for p in per:
        top5 = list(p["others"].items())[:6]
        others_txt.append(
            f"- N = {p['n']}: " + ", ".join(
                f"`{k}` ×{v['count']} {v['ns'] / 1e9 / p['secs'] * 100:.2f} %" for k, v in top5))
    not_ready = [r for p in per for r in p["bad"]]
    nr_txt = ("Every container answered." if not not_ready else
              "Containers that never became TLS-ready: " + "; ".join(f"{r['id']}: {r['error']}" for r in not_ready))

    costs = (
        f"From the schedstat column: the watchdogs at 60 s and stats flushed on admin "
        f"requests only, (b) − (a), change {d_ns('b', 'a'):+.3f} ms/s; the overload manager "
        f"at 0.1 s, (c) − (b), {d_ns('c', 'b'):+.3f} ms/s; at 1 s, (d) − (b), "
        f"{d_ns('d', 'b'):+.3f} ms/s; the rest of the product's bootstrap (TLS listener "
        f"with SDS file watch, admin, its cluster), (e) − (c), {d_ns('e', 'c'):+.3f} ms/s; "
        f"the supervisor's checks of its Envoy, (e') − (e), {d_ns('real', 'e'):+.3f} ms/s."
    )

    levels_txt = ", ".join(str(p["n"]) for p in per)
    doc = f"""## Density: N proxied containers on one host

What N real proxied containers cost together, N = {levels_txt}, each level from an empty
host: N containers created one after another, each

    ctr --address SOCK -n envoy-sidecar-test run -d --cni --runc-binary WRAPPER-SCRIPT \\
        --annotation {e['B_ANN']} localhost/envoy-sidecar/busybox:latest ID {e['B_APP']}

(proxy on, a fresh CA, the bench's own config, state dir and host port pool {e['B_POOL']};
`[host] address` = the CNI bridge's gateway {e['B_GATEWAY']}, so each container's 2
host ports are NAT-mapped). ctr's CNI network is the bench's own: a bridge on
{e['B_SUBNET']} (host-local IPAM) installed as the first conflist of `/etc/cni/net.d`
for the run. The clock starts when `ctr run -d` is invoked and stops at the first
HTTPS response from the app through the container's IP (host-local's lease) and its
TLS proxy port (`envoy-sidecar inspect`: `ports[0].internal_tls_proxy`), verified
against the CA with server name = the id (python3 `ssl`, i.e. OpenSSL, polling every
3 ms from the host); the next container is created once the previous one answered.
Then, {e['B_SETTLE']} s after the last one answered, {e['B_IDLE']} s of idle with all N
running: the host's CPU busy share from `/proc/stat` (all but idle and iowait, of
the whole host) and, per process, `utime + stime` from `/proc/PID/stat` (in 10 ms
ticks: one Envoy at 0.3 ms/s makes 0.6 of a tick in 20 s, so per-process figures from
ticks are only meaningful summed over many) and its threads' run time from
`/proc/PID/task/*/schedstat` (ns) beside it; `RssAnon` (private memory) of every Envoy
and supervisor at the end of the window. Then `envoy-sidecar status`, `metrics` and
`gc --dry-run`, 3 times each, and the teardown of all N as bench-scale does it
(SIGKILL, `ctr task rm`, `ctr container rm`, one container after another), then the
CNI DEL that `ctr run -d` never does, and a leak check: no container or task of the
run, nothing in the state dir but the product's own files, no NAT element to the
subnet or from the pool, no Envoy, supervisor or shim of the run, no veth on the
bridge, no lease, no libcni cache file, no memory cgroup, no new named netns.

**Command:** `{e['B_CMD']}` (`make bench` runs it after the other benchmarks;
`DENSITY_NS`, `DENSITY_IDLE`, `DENSITY_SETTLE` change it).

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}, cgroup {e['B_CGROUP']}  
**Runtime:** containerd {e['B_CONTAINERD']}, runc {e['B_RUNC']}, {e['B_NFT']}, Envoy {e['B_ENVOY']}

{chr(10).join(main_t)}

Targets (from the issue):

{chr(10).join(verdicts)}

{nr_txt}

The busiest other processes in the idle window (by comm, threads' schedstat, % of one
core; the lead's own work on this shared machine would show here too):

{chr(10).join(others_txt)}

### Idle timers of one Envoy

Before the levels, in the same run: single Envoys side by side, all running at once
for {bsecs:.0f} s of idle (so noise hits all alike), each `{e['B_ENVOY_PATH']} -c BOOTSTRAP
{e['B_BD_FLAGS']}` (the product's flags), CPU from `/proc/PID/stat` and, finer, from its
threads' `schedstat`. (a) is one static listener on 127.0.0.1 with a `tcp_proxy` to one
static cluster and nothing else (Envoy's defaults: stats flushed every 5 s, watchdogs
at their defaults, no overload manager); (b) adds `stats_flush_on_admin: true` and
`watchdogs` with `miss_timeout`/`megamiss_timeout` 60 s for the main thread and the
workers; (c) adds the `overload_manager` (downstream connections and fixed-heap
monitors, the reject action) and `layered_runtime` blocks of a real container's
`bootstrap.json` at a refresh of 0.1 s (the product's past an explicit cap); (d) the same at 1 s (its own under the derived cap); (e) the
whole bootstrap of one running container of this run, its listener moved to
127.0.0.1 (no `[::]` address) and its admin to a socket of its own, with no supervisor
talking to it; (e') that container's own Envoy in its netns
(`{e['B_REF_ARGV'].strip()}`), whose supervisor checks it. (a)'s `RssAnon` is the
memory floor in the table above.

{chr(10).join(bd_table)}

{costs}

**How to read this.** The machine is shared (2 cores) and noisy, and every figure is
one run: the ready-time medians scatter by tens of ms between runs, and the idle CPU
figures are small enough that a neighbour's burst shows; the host busy share includes
everything on the host, not only the product (the "rest" row). The shims and
containerd are the engine's cost, not the product's, but are there for every container
whatever the runtime. `RssAnon` is what each further container adds in memory; the
binaries' pages (`RssFile`) are shared through the page cache and not counted.
"""
    with open(out, "w") as f:
        f.write(doc)
    print()
    print(f"Density ({e['B_DATE']})")
    print()
    print("\n".join(main_t))
    print()
    print("\n".join(verdicts))
    print(nr_txt)
    print("\n".join(others_txt))
    print()
    print("\n".join(bd_table))
    print()
    print(costs)


if __name__ == "__main__":
    main()
