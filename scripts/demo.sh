#!/usr/bin/env bash
# `make demo`: a container started through envoy-sidecar-runc with three proxied ports
# and a memory limit, showing what the app sees and what the host decided.
# Needs root, the release build and the private containerd (`make demo` does both).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$PWD/target/release
DEMO=/tmp/envoy-sidecar-demo
SOCK=/run/envoy-sidecar-test/containerd.sock
NS=envoy-sidecar-test
IMAGE=localhost/envoy-sidecar/busybox:latest
ID=demo-$$
ctr_() { ctr --address "$SOCK" -n "$NS" "$@"; }

mkdir -p "$DEMO"
[ -f "$DEMO/ca/ca.crt" ] || "$BIN/envoy-sidecar" generate-ca --out "$DEMO/ca" >/dev/null
cat >"$DEMO/config.toml" <<TOML
[proxy]
enabled = true
additional_memory_allocation_mb = 32
[instance_identity]
ca_cert = "$DEMO/ca/ca.crt"
ca_key = "$DEMO/ca/ca.key"
[runtime]
state_dir = "$DEMO/state"
[host]
address = "198.51.100.249"
TOML
"$BIN/envoy-sidecar" --config "$DEMO/config.toml" check-config

# containerd's shim does not pass ctr's environment to the runtime, so the demo's
# config reaches the wrapper through a one-line script (production: /etc/envoy-sidecar).
cat >"$DEMO/runc" <<SH
#!/bin/sh
ENVOY_SIDECAR_CONFIG=$DEMO/config.toml exec $BIN/envoy-sidecar-runc "\$@"
SH
chmod +x "$DEMO/runc"

# The container's network: a namespace with a veth to the host (documentation range),
# as CNI would give it; the host plays the router. Like `ctr run --cni` and Garden,
# the address is configured only after the container has started.
# A "router" in its own namespace, linked to the host like a router on another host:
# it reaches the app only through the host's address and the mapped host ports.
NETNS=es-demo-$$ HOSTIF=esdemo$$ HOST_IP=198.51.100.245 IP=198.51.100.246
ROUTER=es-demo-r$$ ROUTERIF=esdemor$$ ROUTER_HOST_IP=198.51.100.249 ROUTER_IP=198.51.100.250
cleanup() { ctr_ task kill -s SIGKILL "$ID" >/dev/null 2>&1 || true; sleep 0.2
            ctr_ task rm "$ID" >/dev/null 2>&1 || true; ctr_ containers rm "$ID" >/dev/null 2>&1 || true
            ip netns del "$NETNS" 2>/dev/null || true; ip netns del "$ROUTER" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
ip netns add "$ROUTER"
ip link add "$ROUTERIF" type veth peer name eth0 netns "$ROUTER"
ip addr add "$ROUTER_HOST_IP/30" dev "$ROUTERIF" && ip link set "$ROUTERIF" up
ip -n "$ROUTER" addr add "$ROUTER_IP/30" dev eth0 && ip -n "$ROUTER" link set eth0 up

echo "== ctr run --runc-binary $DEMO/runc --annotation envoy-sidecar/ports=8080,9999,2222 --annotation envoy-sidecar/alpn=http/1.1 --memory-limit 256MiB ... httpd -p 8080"
echo "   (busybox httpd speaks only HTTP/1.1: the alpn annotation stops Envoy advertising h2)"
ctr_ run -d --runc-binary "$DEMO/runc" \
    --annotation envoy-sidecar/ports=8080,9999,2222 \
    --annotation envoy-sidecar/app-guid=demo-app \
    --annotation envoy-sidecar/alpn=http/1.1 \
    --with-ns "network:/var/run/netns/$NETNS" \
    --memory-limit $((256 << 20)) "$IMAGE" "$ID" /bin/httpd -f -p 8080 -h /www

status() { "$BIN/envoy-sidecar" --config "$DEMO/config.toml" status --namespace "$NS"; }
for _ in $(seq 1 100); do status | grep -q waiting-for-network && break; sleep 0.05; done
echo
echo "== envoy-sidecar status: the container runs, its netns has no address yet"
status
echo
echo "== the engine configures the network now (veth + $IP), as CNI or Garden's networker would"
ip link add "$HOSTIF" type veth peer name eth0 netns "$NETNS"
ip addr add "$HOST_IP/30" dev "$HOSTIF" && ip link set "$HOSTIF" up
ip -n "$NETNS" addr add "$IP/30" dev eth0 && ip -n "$NETNS" link set eth0 up
ip -n "$NETNS" route add default via "$HOST_IP"
for _ in $(seq 1 100); do status | grep -q " ready " && break; sleep 0.05; done
echo "== envoy-sidecar status: NAT follows the address, the certificate carries it"
status

echo
echo "== inside the container: CF_INSTANCE_PORTS"
ctr_ task exec --exec-id show "$ID" /bin/sh -c 'echo "$CF_INSTANCE_PORTS"' | jq .
echo "== inside the container: the other CF_INSTANCE_* variables and the credentials mount"
ctr_ task exec --exec-id env "$ID" /bin/sh -c 'env | grep ^CF_INSTANCE_ | grep -v PORTS | sort; grep cf-instance-credentials /proc/mounts'

pid=$(ctr_ task ls | awk -v id="$ID" '$1 == id {print $2}')
memcg=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/$pid/cgroup)
if [ -n "$memcg" ]; then limit=$(cat /sys/fs/cgroup/memory$memcg/memory.limit_in_bytes)
else limit=$(cat /sys/fs/cgroup$(awk -F: '$1 == 0 {print $3}' /proc/$pid/cgroup)/memory.max); fi
echo
echo "== on the host: memory limit $((limit >> 20)) MiB (256 MiB requested + 32 MiB for the proxy)"
echo "== on the host: envoy-sidecar inspect $ID --namespace $NS"
"$BIN/envoy-sidecar" --config "$DEMO/config.toml" inspect "$ID" --namespace "$NS"

echo
EXT=$("$BIN/envoy-sidecar" --config "$DEMO/config.toml" inspect "$ID" --namespace "$NS" | jq '.ports[0].external_tls_proxy')
echo "== from the router namespace: HTTPS to the host's port $EXT (external_tls_proxy) -> NAT -> Envoy -> app port 8080"
rcurl() { ip netns exec "$ROUTER" curl "$@" --cacert "$DEMO/ca/ca.crt" --resolve "$ID:$EXT:$ROUTER_HOST_IP" "https://$ID:$EXT/"; }
for _ in $(seq 1 100); do rcurl -s >/dev/null && break; sleep 0.05; done
echo "\$ ip netns exec $ROUTER curl --cacert $DEMO/ca/ca.crt --resolve $ID:$EXT:$ROUTER_HOST_IP https://$ID:$EXT/"
rcurl -sS
echo
echo "== the certificate Envoy served (instance identity, signed by the demo CA)"
ip netns exec "$ROUTER" openssl s_client -connect "$ROUTER_HOST_IP:$EXT" -servername "$ID" </dev/null 2>/dev/null \
    | openssl x509 -noout -subject -issuer -ext subjectAltName,extendedKeyUsage -dates

cleanup
trap - EXIT
left=$( (ls "$DEMO/state/$NS" 2>/dev/null || true) | wc -l)
echo
echo "== removed; state left behind: $left container(s)"
[ "$left" -eq 0 ]
