# Shared by the bench scripts (sourced): the paths they use, the leak check every bench
# ends with, and the machine facts every report states. Expects REPO, SOCK, RUNC,
# STATE, ID_PREFIX, ctr_ and die from the caller.

# The binaries under test: ENVOY_SIDECAR_BIN_DIR, else the release build under
# CARGO_TARGET_DIR (or target/); where the results go.
BIN_DIR="${ENVOY_SIDECAR_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/release}"
WRAPPER="$BIN_DIR/envoy-sidecar-runc"
CLI="$BIN_DIR/envoy-sidecar"
ENVOY=/usr/local/bin/envoy
OUT="$REPO/docs/BENCHMARKS.md"
MD_SECTION="$REPO/scripts/md-section.py"

# No container of this run left in containerd, and nothing but the host-wide lock file
# (and the host-wide allocation index, rebuilt from the state files; the empty .admin
# and .pods directories) left in the product's state directory.
bench_leak_check() {
    local left leaked
    left="$(ctr_ containers ls -q | grep -F "$ID_PREFIX" || true)"
    [ -z "$left" ] || die "containers left behind: $left"
    if [ -d "$STATE" ]; then
        leaked="$(find "$STATE" -mindepth 1 ! -path "$STATE/.lock" ! -path "$STATE/.index.json" ! -path "$STATE/.admin" ! -path "$STATE/.pods" -print)"
        [ -z "$leaked" ] || die "envoy-sidecar state dir $STATE not empty after the runs:"$'\n'"$leaked"
    fi
}

bench_cgroup_version() {
    if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
        echo "v2 (unified)"
    elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then
        echo "v1 (hybrid; v2 also mounted at /sys/fs/cgroup/unified)"
    else
        echo "v1"
    fi
}

# Exports B_DATE, B_NPROC, B_CPU, B_MEM, B_KERNEL, B_CONTAINERD, B_RUNC, B_CGROUP,
# B_COMMIT for the report generators.
bench_export_machine_facts() {
    local commit
    commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]; then
        commit="$commit (with uncommitted changes)"
    fi
    export B_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
    export B_NPROC="$(nproc)"
    export B_CPU="$(awk -F': *' '/^model name/{print $2; exit}' /proc/cpuinfo)"
    export B_MEM="$(free -g | awk '/^Mem:/{print $2}')"
    export B_KERNEL="$(uname -r)"
    export B_CONTAINERD="$(ctr --address "$SOCK" version | awk '/^Server:/{s=1} s && /Version:/{print $2; exit}')"
    export B_RUNC="$("$RUNC" --version 2>/dev/null | awk 'NR==1{print $3}')"
    export B_CGROUP="$(bench_cgroup_version)"
    export B_COMMIT="$commit"
}

# Kill and remove one container of this run (bounded waits).
remove_container() {
    local id="$1" i out
    ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    for ((i = 0; i < 100; i++)); do
        if out="$(ctr_ tasks rm "$id" 2>&1)" || grep -qi 'not found' <<<"$out"; then break; fi
        sleep 0.1
    done
    ctr_ containers rm "$id" >/dev/null 2>&1 || true
}

# Pids of processes whose command line mentions the run's temp dir $TMP (Envoy: its
# bootstrap in the state dir; the supervisor: --config; a load client: --ca). Only
# ever ours. (A process may exit between the glob and the read.)
our_pids() {
    local d pid
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [ "$pid" = "$$" ] && continue
        if { tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null | grep -qF "$TMP/"; then echo "$pid"; fi
    done
}

# Exit-trap work shared by the benches: leftover containers of this run first (removing
# one runs the wrapper, whose config and state live in $TMP), then leftover processes,
# then the run's network namespace (deleting it destroys the veth pair; the link delete
# is for a half-made setup) and $TMP.
bench_remove_leftovers() {
    local id pid
    for id in $( (echo "$CURRENT_ID"; ctr_ containers ls -q 2>/dev/null | grep -F "$ID_PREFIX") | sort -u); do
        log "removing leftover container $id"
        remove_container "$id"
    done
    for pid in $(our_pids); do
        log "killing leftover process $pid: $({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null)"
        kill -9 "$pid" 2>/dev/null || true
    done
    ip netns del "$NETNS" 2>/dev/null || true
    ip link del "$HOST_IF" 2>/dev/null || true
    rm -rf "$TMP"
}

# The timer every bench uses: `"$PY" -I -S "$TIMEIT" LOG CMD...` prints milliseconds.
TIMEIT="$REPO/scripts/timeit.py"

# One `ctr run --rm ... /bin/true` lifecycle of variant $1 (its `ctr run` options from
# the caller's `run_opts VARIANT`), timed; with $3 = 1 the figure goes to $RESULTS as
# "VARIANT MS". Dies, showing the run's output, when it fails or leaves its container.
# Uses PY, SOCK, NS, IMAGE, ID_PREFIX, TMP, RESULTS; sets CURRENT_ID while it runs (for
# the caller's cleanup trap).
bench_run_one() { # variant tag measured(0|1)
    local v="$1" tag="$2" measured="$3" ms
    CURRENT_ID="${ID_PREFIX}$v-$tag"
    # shellcheck disable=SC2046
    if ! ms="$("$PY" -I -S "$TIMEIT" "$TMP/run.log" \
            ctr --address "$SOCK" -n "$NS" run --rm $(run_opts "$v") "$IMAGE" "$CURRENT_ID" /bin/true)"; then
        echo "---- output of the failed run ----" >&2
        cat "$TMP/run.log" >&2
        die "variant $v run $tag ($CURRENT_ID) failed"
    fi
    if ctr_ containers info "$CURRENT_ID" >/dev/null 2>&1; then
        die "variant $v: container $CURRENT_ID still exists after 'ctr run --rm'"
    fi
    CURRENT_ID=""
    if [ "$measured" = 1 ]; then echo "$v $ms" >>"$RESULTS"; fi
}

# Round r runs the caller's VARIANTS rotated by r, so each holds each position equally
# often (noise on a shared machine hits all of them alike).
bench_round() { # index tag measured
    local r="$1" i n=${#VARIANTS[@]}
    for ((i = 0; i < n; i++)); do
        bench_run_one "${VARIANTS[(r + i) % n]}" "$2" "$3"
    done
}
