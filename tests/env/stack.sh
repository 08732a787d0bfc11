#!/usr/bin/env bash
# Engine stacks for the integration tests: containerd + runc (+ crun) of a Debian
# release, side by side with the host's, nothing of the host changed.
#
# Usage: tests/env/stack.sh STACK fetch|up|down|env|versions|test [cargo test args...]
#
#   STACK     bookworm  the host's own packages (Debian 12: containerd 1.6, runc 1.1)
#             trixie    Debian 13's containerd 1.7 and runc 1.1
#             sid       Debian unstable's containerd 2.x, runc 1.3 and crun
#   fetch     download the suite's packages with apt's own options (a private sources
#             list, lists and cache under the stack's directory), unpack them with
#             dpkg -x, and make runnable copies of containerd, ctr, the runc shim,
#             runc and crun in <dir>/bin: patchelf points each at the same suite's
#             libc6 (these binaries need a newer glibc than the host's). Idempotent.
#   up        fetch, then start the private containerd (tests/env/containerd.sh) with
#             the stack's binaries first in its PATH, its own root and a config in the
#             version that containerd speaks. One stack runs at a time.
#   down      stop it (tests/env/containerd.sh down).
#   env       export lines for running tests against the stack by hand.
#   versions  the stack's containerd / runc / crun versions, one line each.
#   test      up, run `cargo test` with the stack's environment (extra arguments go
#             to cargo test), down.
#
# Everything lives under /var/lib/envoy-sidecar-stacks/<STACK> (bookworm: links to
# the host's binaries; nothing is downloaded).
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SCRIPT")"
BASE=/var/lib/envoy-sidecar-stacks
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIRROR="${ES_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { echo "stack.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    echo "usage: $0 bookworm|trixie|sid fetch|up|down|env|versions|test [cargo test args...]" >&2
    exit 2
}

[ $# -ge 2 ] || usage
STACK=$1
CMD=$2
shift 2
case "$STACK" in
    bookworm) SUITES="" ;;
    trixie) SUITES="trixie trixie-updates" ;;
    sid) SUITES="sid" ;;
    *) log "unknown stack '$STACK' (known: bookworm, trixie, sid)"; usage ;;
esac
DIR=$BASE/$STACK
BIN=$DIR/bin
ROOT=$DIR/root

# Binaries a stack provides: name in bin/ -> path inside the package tree.
BINARIES="containerd:usr/bin/containerd ctr:usr/bin/ctr
containerd-shim-runc-v2:usr/bin/containerd-shim-runc-v2 runc:usr/sbin/runc"
PACKAGES="containerd runc libc6 libseccomp2"
# crun is on sid only (the order in which it runs poststart hooks differs from runc's);
# its libraries beyond libc come from the same suite.
if [ "$STACK" = sid ]; then
    BINARIES="$BINARIES crun:usr/bin/crun"
    PACKAGES="$PACKAGES crun libblake3-0 libjson-c5 libcap2 libsystemd0"
fi

apt_opts() {
    echo "-o Dir::Etc::sourcelist=$DIR/apt/sources.list -o Dir::Etc::sourceparts=/nonexistent \
-o Dir::State::Lists=$DIR/apt/lists -o Dir::Cache=$DIR/apt/cache -o Dir::State::status=$DIR/apt/status \
-o APT::Architecture=amd64 -o Debug::NoLocking=1"
}

fetch_bookworm() {
    mkdir -p "$BIN"
    local pair name src
    for pair in $BINARIES; do
        name=${pair%%:*}
        src=$(command -v "$name" 2>/dev/null || true)
        [ -n "$src" ] || src=/$(echo "${pair#*:}")
        [ -x "$src" ] || die "$src not found: run scripts/install-deps.sh"
        ln -sfn "$src" "$BIN/$name"
    done
}

fetch_debian() {
    if [ -f "$DIR/fetched" ] && [ "$(cat "$DIR/fetched")" = "$PACKAGES" ]; then
        return 0
    fi
    command -v patchelf >/dev/null || die "patchelf not found (Debian: patchelf; scripts/install-deps.sh installs it)"
    [ -r "$KEYRING" ] || die "$KEYRING missing (Debian: debian-archive-keyring)"
    rm -rf "$DIR"
    mkdir -p "$DIR/apt/lists/partial" "$DIR/apt/cache/archives/partial" "$DIR/debs" "$ROOT" "$BIN"
    : >"$DIR/apt/status"
    local s
    for s in $SUITES; do
        echo "deb [signed-by=$KEYRING] $MIRROR $s main"
    done >"$DIR/apt/sources.list"
    # shellcheck disable=SC2046
    apt-get $(apt_opts) -qq update >"$DIR/apt/update.log" 2>&1 || {
        cat "$DIR/apt/update.log" >&2
        die "apt-get update for $SUITES failed"
    }
    # apt drops privileges to _apt for downloads; a root-owned private directory is fine
    # with it unsandboxed (the warning it prints about that is expected).
    # shellcheck disable=SC2046
    (cd "$DIR/debs" && apt-get $(apt_opts) -o APT::Sandbox::User=root -qq download $PACKAGES) \
        >"$DIR/apt/download.log" 2>&1 || {
        cat "$DIR/apt/download.log" >&2
        die "apt-get download $PACKAGES from $SUITES failed"
    }
    local deb
    for deb in "$DIR"/debs/*.deb; do
        dpkg -x "$deb" "$ROOT"
    done
    local libdir=$ROOT/usr/lib/x86_64-linux-gnu
    local ld=$libdir/ld-linux-x86-64.so.2
    [ -e "$ld" ] || die "no dynamic loader in the $STACK libc6 package ($ld)"
    local pair name src
    for pair in $BINARIES; do
        name=${pair%%:*}
        src=$ROOT/${pair#*:}
        [ -x "$src" ] || die "$src not in the $STACK packages"
        install -m 0755 "$src" "$BIN/$name"
        # The suite's own loader and libraries first; the host's (via ld.so.cache) for
        # anything the suite's packages here do not carry.
        patchelf --set-interpreter "$ld" --set-rpath "$libdir" "$BIN/$name"
    done
    echo "$PACKAGES" >"$DIR/fetched"
}

cmd_fetch() {
    [ "$(id -u)" = 0 ] || die "must be root"
    if [ "$STACK" = bookworm ]; then fetch_bookworm; else fetch_debian; fi
    # Every binary must run here, or the stack is not usable.
    "$BIN/containerd" --version >/dev/null || die "$BIN/containerd does not run"
    "$BIN/runc" --version >/dev/null || die "$BIN/runc does not run"
    cmd_versions >"$DIR/versions"
    log "$STACK: $(tr '\n' ' ' <"$DIR/versions")"
}

cmd_versions() {
    echo "containerd $("$BIN/containerd" --version | awk '{print $3}')"
    echo "runc $("$BIN/runc" --version | awk 'NR==1{print $3}')"
    if [ -x "$BIN/crun" ]; then
        echo "crun $("$BIN/crun" --version 2>/dev/null | awk 'NR==1{print $3}')"
    fi
}

stack_env() {
    echo "export ES_STACK=$STACK"
    echo "export ES_STACK_BIN=$BIN"
    echo "export ES_RUNC=$BIN/runc"
    echo "export CONTAINERD_BIN=$BIN/containerd"
    echo "export CTR_BIN=$BIN/ctr"
    echo "export PATH=$BIN:\$PATH"
    ES_STACK=$STACK "$HERE/containerd.sh" env
}

case "$CMD" in
    fetch) cmd_fetch ;;
    up)
        cmd_fetch
        eval "$(stack_env)"
        "$HERE/containerd.sh" up
        ;;
    down)
        [ -d "$BIN" ] || { log "$STACK was never fetched; nothing to stop"; exit 0; }
        eval "$(stack_env)"
        "$HERE/containerd.sh" down
        ;;
    env)
        [ -d "$BIN" ] || die "$STACK not fetched: run $0 $STACK fetch"
        stack_env
        ;;
    versions)
        [ -d "$BIN" ] || die "$STACK not fetched: run $0 $STACK fetch"
        cmd_versions
        ;;
    test)
        if [ "$(id -u)" != 0 ]; then
            echo "stack.sh: SKIP: not root (uid $(id -u)); the $STACK stack needs root, integration tests will skip"
            cd "$HERE/../.." && exec cargo test "$@"
        fi
        cmd_fetch
        eval "$(stack_env)"
        "$HERE/containerd.sh" up
        rc=0
        (cd "$HERE/../.." && cargo test "$@") || rc=$?
        "$HERE/containerd.sh" down || true
        exit $rc
        ;;
    *) usage ;;
esac
