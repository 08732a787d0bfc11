#!/usr/bin/env python3
"""TLS load client for scripts/bench-memory.sh (python3 standard library only).

    tls-load.py probe --host IP --port P --ca CA --server-name NAME
                      [--cert CRT --key KEY] [--expect TEXT] [--timeout S]

        One complete HTTP/1.1 request (`Connection: close`) through the TLS listener,
        retried every 20 ms until the response carries TEXT or S seconds have passed.
        Prints {"attempts", "ms"} as JSON; exit 1 on timeout.

    tls-load.py hold --host IP --port P --ca CA --server-name NAME
                     [--cert CRT --key KEY] --n N --ready-file FILE
                     [--parallel K] [--open-timeout S] [--hold-max S]
                     [--keep-partial] [--finish]

        Opens N TLS connections (each a completed handshake that verified the server
        against CA with server name NAME, and presented CRT/KEY when given), and on each
        sends the start of an HTTP/1.1 request: the request line and headers
        (`Connection: keep-alive`) without the final blank line. Why not a complete
        request: busybox httpd answers one request per connection and then closes it,
        and Envoy's tcp_proxy then closes the client's side too, so a completed request
        does not stay open. A request whose header block is still arriving keeps the
        app reading (busybox httpd gives up after 60 s) and so keeps both of Envoy's
        connections, downstream (TLS) and upstream (to the app), open and idle.
        Once all N are open it writes {"opened", "failed", "retries", "open_s"} to FILE
        (atomically) and holds them until SIGTERM/SIGINT, or --hold-max seconds, or a
        connection is closed by the other side; then closes them all (close_notify,
        then FIN; RST for any that does not finish in 10 s) and prints
        {"opened", "dropped", "first_drop_s", "held_s", "released_by"} as JSON.
        Bounded: N <= 50000, at most K handshakes in flight (default 32), each
        connection tried at most 3 times, opening gives up after --open-timeout
        (default 60 s), holding ends after --hold-max (default 45 s). Exit 0 when all N
        were opened (drops are reported, not an error), 1 otherwise.
        --keep-partial: a refused connection is not retried, and those that did open
        are held all the same (exit 0; "failed" says how many were refused): for
        testing a server that is expected to refuse past a limit.
        --finish: at release, first complete the request on every held connection (the
        final blank line) and read the response; "answered" counts those that got an
        HTTP response, i.e. the connections that still worked at the end.

RLIMIT_NOFILE is raised (up to the hard limit) as N needs.
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import ssl
import sys
import time

MAX_N = 50000
ATTEMPTS = 3


def context(a):
    ctx = ssl.create_default_context(cafile=a.ca)  # CERT_REQUIRED, hostname checked
    if a.cert:
        ctx.load_cert_chain(a.cert, a.key)
    return ctx


def request(a, keep_alive):
    conn = "keep-alive" if keep_alive else "close"
    return (f"GET / HTTP/1.1\r\nHost: {a.server_name}\r\nUser-Agent: tls-load\r\n"
            f"Connection: {conn}\r\n").encode()


def probe(a):
    ctx = context(a)
    req = request(a, False) + b"\r\n"
    expect = a.expect.encode()
    t0 = time.monotonic()
    attempts, last = 0, "no attempt"
    while True:
        attempts += 1
        data = b""
        try:
            with socket.create_connection((a.host, a.port), timeout=2) as s:
                with ctx.wrap_socket(s, server_hostname=a.server_name) as t:
                    t.sendall(req)
                    while True:
                        chunk = t.recv(65536)
                        if not chunk:
                            break
                        data += chunk
        except (OSError, ssl.SSLError) as e:  # refused, reset, EOF without close_notify
            last = f"{type(e).__name__}: {e}"
        if data.startswith(b"HTTP/1.") and expect in data:
            print(json.dumps({"attempts": attempts, "ms": (time.monotonic() - t0) * 1e3}))
            return 0
        if data:
            last = f"unexpected response: {data[:200]!r}"
        if time.monotonic() - t0 > a.timeout:
            sys.stderr.write(f"tls-load probe: no response within {a.timeout:.0f} s; last: {last}\n")
            return 1
        time.sleep(0.02)


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < want:
        sys.exit(f"tls-load: RLIMIT_NOFILE hard limit {hard} is too low for {n} connections")


async def hold(a):
    loop = asyncio.get_running_loop()
    ctx = context(a)
    partial = request(a, True)  # no final blank line: see the module docstring
    sem = asyncio.Semaphore(a.parallel)
    conns = []  # (reader, writer)
    failed, retries = [], 0
    release = asyncio.Event()
    released_by = ["hold-max"]
    drops = []
    t_start = time.monotonic()

    def on_signal(name):
        released_by[0] = name
        release.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, signal.Signals(sig).name)

    async def open_one(i):
        nonlocal retries
        last = None
        for attempt in range(1 if a.keep_partial else ATTEMPTS):
            async with sem:
                try:
                    r, w = await asyncio.wait_for(
                        asyncio.open_connection(a.host, a.port, ssl=ctx,
                                                server_hostname=a.server_name,
                                                ssl_handshake_timeout=10),
                        timeout=15)
                    w.write(partial)
                    await w.drain()
                    conns.append((r, w))
                    return
                except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
                    last = f"{type(e).__name__}: {e}"
            retries += 1
            await asyncio.sleep(0.1 * (attempt + 1))
        failed.append(last)

    try:
        await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(a.n))),
                               timeout=a.open_timeout)
    except asyncio.TimeoutError:
        failed.append(f"opening did not finish within {a.open_timeout} s")
    t_open = time.monotonic()
    opened = len(conns)

    async def watch(r):
        # Any byte or EOF before the release means the other side closed (or answered).
        try:
            await r.read(1)
        except (OSError, ssl.SSLError):
            pass
        drops.append(time.monotonic() - t_open)
        if a.release_on_drop:
            released_by[0] = "drop"
            release.set()

    watchers = [asyncio.ensure_future(watch(r)) for r, _ in conns]
    ready = {"opened": opened, "failed": len(failed), "retries": retries,
             "open_s": round(t_open - t_start, 3),
             "first_failure": failed[0] if failed else None}
    tmp = a.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ready, f)
    os.replace(tmp, a.ready_file)

    if opened == a.n or a.keep_partial:
        try:
            await asyncio.wait_for(release.wait(), timeout=a.hold_max)
        except asyncio.TimeoutError:
            pass
    else:
        released_by[0] = "open-failed"
    t_release = time.monotonic()
    for wt in watchers:
        wt.cancel()
    answered = 0
    if a.finish:
        async def finish(r, w):
            try:
                w.write(b"\r\n")
                await w.drain()
                data = await asyncio.wait_for(r.read(64), timeout=10)
                return data.startswith(b"HTTP/1.")
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                return False
        answered = sum(await asyncio.gather(*(finish(r, w) for r, w in conns)))
    for _, w in conns:
        w.close()  # close_notify, then FIN

    async def closed(w):
        try:
            await w.wait_closed()
        except (OSError, ssl.SSLError):
            pass

    try:
        await asyncio.wait_for(asyncio.gather(*(closed(w) for _, w in conns)), timeout=10)
    except asyncio.TimeoutError:
        for _, w in conns:
            w.transport.abort()
    print(json.dumps({"opened": opened, "failed": len(failed), "dropped": len(drops),
                      "first_drop_s": round(min(drops), 3) if drops else None,
                      "held_s": round(t_release - t_open, 3),
                      "released_by": released_by[0], "answered": answered,
                      "first_failure": failed[0] if failed else None}))
    return 0 if opened == a.n or a.keep_partial else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "hold"):
        s = sub.add_parser(name)
        s.add_argument("--host", required=True)
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--ca", required=True)
        s.add_argument("--server-name", required=True)
        s.add_argument("--cert")
        s.add_argument("--key")
        if name == "probe":
            s.add_argument("--expect", default="hello from envoy-sidecar test app")
            s.add_argument("--timeout", type=float, default=30.0)
        else:
            s.add_argument("--n", type=int, required=True)
            s.add_argument("--ready-file", required=True)
            s.add_argument("--parallel", type=int, default=32)
            s.add_argument("--open-timeout", type=float, default=60.0)
            s.add_argument("--hold-max", type=float, default=45.0)
            s.add_argument("--keep-partial", action="store_true")
            s.add_argument("--finish", action="store_true")
            s.add_argument("--release-on-drop", action="store_true",
                           help="end the hold at the first connection the other side closes")
    a = p.parse_args()
    if bool(a.cert) != bool(a.key):
        p.error("--cert and --key go together")
    if a.cmd == "probe":
        sys.exit(probe(a))
    if not 1 <= a.n <= MAX_N:
        p.error(f"--n must be 1..{MAX_N}")
    if not 1 <= a.parallel <= 1024:
        p.error("--parallel must be 1..1024")
    if not (0 < a.open_timeout <= 600 and 0 < a.hold_max <= 600):
        p.error("--open-timeout and --hold-max must be in (0, 600] seconds")
    raise_nofile(a.n)
    sys.exit(asyncio.run(hold(a)))


if __name__ == "__main__":
    main()
