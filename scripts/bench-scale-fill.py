#!/usr/bin/env python3
"""Fill containers for scripts/bench-scale.sh: state files and NAT elements of proxied
containers that the host "already holds", written directly (no container is run).

Fill container i (0 <= i < COUNT) of a set is the shape `envoy-sidecar/ports=
8080,9999,2222` gives (unproxied mappings on): host ports PORT_BASE + 6i .. +5 (the 3
externals, then the 3 TLS proxy ports, as the product allocates them), container IP
IP_BASE + i, Envoy uid UID_BASE + i, no memory limit (capacity never binds).

Usage:
  bench-scale-fill.py state STATE_DIR NS PREFIX COUNT PORT_BASE IP_BASE UID_BASE HOST_IP
                      RUNC_ROOT CREATED_AT [--nat-json]
      writes STATE_DIR/NS/PREFIX<i>/state.json (ContainerState, version 1, the shape of
      `sample()` in src/state/store.rs), an empty credentials/ beside it, and with
      --nat-json the nat.json record (what NAT was applied) the supervisor writes.
  bench-scale-fill.py nft add|delete COUNT PORT_BASE IP_BASE
      prints one `nft -f` script adding (deleting) the set's elements.
  bench-scale-fill.py ours IP_NET PORT_LO PORT_HI [--delete-script]
                      < `nft -j list map ip envoy_sidecar ports`
      prints the elements (nft syntax, one a line) whose container IP is in IP_NET and
      whose host port is in PORT_LO..PORT_HI: what the bench must remove; with
      --delete-script, an `nft -f` script deleting them instead (nothing if none).
"""

import ipaddress
import json
import os
import sys

APP = (8080, 9999, 2222)
PROXY = (61001, 61002, 61003)
TABLE, MAP = "envoy_sidecar", "ports"


def die(msg):
    sys.stderr.write(f"bench-scale-fill: error: {msg}\n")
    sys.exit(1)


def mappings(i, port_base, ip_base):
    """(host_port, ip, container_port) of fill container i."""
    ip = str(ipaddress.IPv4Address(ip_base) + i)
    base = port_base + 6 * i
    if base + 5 > 65535:
        die(f"fill container {i}: host port {base + 5} > 65535")
    ext = [(base + k, ip, APP[k]) for k in range(3)]
    tls = [(base + 3 + k, ip, PROXY[k]) for k in range(3)]
    return ext, tls


def cmd_state(args):
    nat_json = "--nat-json" in args
    args = [a for a in args if a != "--nat-json"]
    if len(args) != 10:
        die("state: expected STATE_DIR NS PREFIX COUNT PORT_BASE IP_BASE UID_BASE HOST_IP RUNC_ROOT CREATED_AT")
    root, ns, prefix, count, port_base, ip_base, uid_base, host_ip, runc_root, created = args
    count, port_base, uid_base = int(count), int(port_base), int(uid_base)
    for i in range(count):
        cid = f"{prefix}{i}"
        d = os.path.join(root, ns, cid)
        creds = os.path.join(d, "credentials")
        os.makedirs(creds, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        os.chmod(creds, 0o500)
        ext, tls = mappings(i, port_base, ip_base)
        state = {
            "version": 1,
            "namespace": ns,
            "id": cid,
            "bundle": f"/run/envoy-sidecar-bench/bundles/{cid}",
            "config": None,
            "instance_guid": cid,
            "ports": [
                {
                    "internal_tls_proxy": PROXY[k],
                    "external_tls_proxy": tls[k][0],
                    "internal": APP[k],
                    "external": ext[k][0],
                }
                for k in range(3)
            ],
            "admin_port": 61004,
            "alpn": "h2,http/1.1",
            "host_ip": host_ip,
            "memory": {"requested_bytes": None, "limit_bytes": None, "additional_bytes": 0},
            "user": {"uid": 0, "gid": 0},
            "envoy_uid": uid_base + i,
            "credentials_dir": creds,
            "runc_root": runc_root,
            "created_at": created,
            "init_pid": None,
            "started_at": None,
        }
        write(os.path.join(d, "state.json"), state)
        if nat_json:
            maps = []
            for k in range(3):  # control::mappings order: external, then TLS, per port
                maps.append({"host_port": ext[k][0], "container_ip": ext[k][1], "container_port": ext[k][2]})
                maps.append({"host_port": tls[k][0], "container_ip": tls[k][1], "container_port": tls[k][2]})
            write(os.path.join(d, "nat.json"), {"mappings": maps})


def write(path, obj):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def cmd_nft(args):
    if len(args) != 4 or args[0] not in ("add", "delete"):
        die("nft: expected add|delete COUNT PORT_BASE IP_BASE")
    op, count, port_base, ip_base = args[0], int(args[1]), int(args[2]), args[3]
    elems = []
    for i in range(count):
        ext, tls = mappings(i, port_base, ip_base)
        elems += [f"tcp . {h} : {ip} . {p}" for h, ip, p in ext + tls]
    print_script(op, elems)


def print_script(op, elems):
    # One statement per 6000 elements keeps each line of the script reasonable; the
    # file is still one transaction.
    for k in range(0, len(elems), 6000):
        print(f"{op} element ip {TABLE} {MAP} {{ {', '.join(elems[k:k + 6000])} }}")


def cmd_ours(args):
    script = "--delete-script" in args
    args = [a for a in args if a != "--delete-script"]
    if len(args) != 3:
        die("ours: expected IP_NET PORT_LO PORT_HI [--delete-script]")
    net = ipaddress.IPv4Network(args[0])
    lo, hi = int(args[1]), int(args[2])
    text = sys.stdin.read()
    if not text.strip():
        return
    found = []
    for item in json.loads(text).get("nftables", []):
        for e in item.get("map", {}).get("elem", []) or []:
            try:
                proto, port = e[0]["concat"]
                ip, cport = e[1]["concat"]
            except (KeyError, TypeError, ValueError, IndexError):
                continue
            if proto == "tcp" and lo <= port <= hi and ipaddress.IPv4Address(ip) in net:
                found.append(f"tcp . {port} : {ip} . {cport}")
    if script:
        print_script("delete", found)
    else:
        for e in found:
            print(e)


def main():
    if len(sys.argv) < 2:
        die(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"state": cmd_state, "nft": cmd_nft, "ours": cmd_ours}.get(cmd, lambda _: die(f"unknown command {cmd!r}"))(args)


if __name__ == "__main__":
    main()
