#!/usr/bin/env bash
# The cgroup v2 suite: the integration tests that touch cgroups, run inside the guest
# of tests/env/vm.sh against the guest's own containerd 1.6 and runc 1.1 (bookworm's),
# the same way tests/env/stack.sh runs them on the host. The guest is 6-18x slower
# than the host, so it runs only these; everything else runs on the host.
#
# Usage: tests/env/vm-suite.sh targets     the cargo test targets the suite needs
#        tests/env/vm-suite.sh stacks      the engine stacks it runs on
#        tests/env/vm-suite.sh run         inside the guest (vm.sh test does this), with
#                                          ES_VM_BINS="target=/path/to/binary ..."
#
# Every test named below must run and pass: a filter that matches fewer tests than it
# names (a renamed test) fails the suite, and nothing may be ignored or skipped.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# target[@stack]  tests (exact names; "ALL" = every test of the target, #[ignore]d ones
# too). @stack: on that stack only (crun is in sid's; it cannot run on the host's
# hybrid cgroups, so this is where it is proven).
SUITE="
cgroups ALL
create memory_limit_raised_and_credentials_mounted
sidecar tls_proxy_serves_the_app_with_its_identity sigterm_drains_new_connections_but_finishes_open_ones journal_gets_the_supervisors_lines_with_the_container_id
ingress unproxied_off_with_mutual_tls_only_envoy_reaches_the_app_ports an_ingress_filter_removed_or_loosened_inside_the_container_is_put_back
nat gc_cleans_a_crash_and_spares_the_living
faults wrapper_sigkill_mid_create_then_gc_cleans
metrics rescaled_and_exact_figures_for_a_known_allocation
engines@sid crun_under_ctr_cni
nerdctl nerdctl_p_reaches_the_app_only_through_tls_when_unproxied_mappings_are_off nerdctl_stop_start_and_rm_f_bring_the_sidecar_back_and_leave_nothing nerdctl_network_container_gives_the_joiner_its_own_envoy_on_ports_of_its_own
"

log() { echo "vm-suite.sh: $*" >&2; }

# The engine stacks it runs on (tests/env/stack.sh names): the guest's own bookworm
# containerd 1.6 / runc 1.1, and Debian unstable's containerd 2.x / runc 1.3.
STACKS="${ES_VM_STACKS:-bookworm sid}"

case "${1:-}" in
    targets)
        echo "$SUITE" | awk 'NF { sub(/@.*/, "", $1); print $1 }' | sort -u
        exit 0 ;;
    stacks)
        echo "$STACKS"
        exit 0 ;;
    run) ;;
    *) echo "usage: $0 targets|stacks|run" >&2; exit 2 ;;
esac

[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] \
    || { log "error: /sys/fs/cgroup is $(stat -fc %T /sys/fs/cgroup), not cgroup v2"; exit 1; }
declare -A BIN
for kv in ${ES_VM_BINS:-}; do BIN[${kv%%=*}]=${kv#*=}; done

export CI=true ES_EXPECT_CGROUP=v2
# One engine stack at a time (tests/env/stack.sh; the newer ones are shared from the
# host at the same path), each twice: containerd's default cgroupfs layout
# (/<namespace>/<id>), then runc's systemd cgroup driver for every ctr run
# (ES_SYSTEMD_CGROUP=1, tests/common: the container a scope system.slice/es-<id>.scope),
# as Kubernetes and nerdctl use it on systemd hosts.
run_stack() {
    local stack=$1 rc=0 driver target tests bin args want t0 out ok line passed ignored skipped
    if [ "$stack" != bookworm ]; then
        eval "$("$HERE/stack.sh" "$stack" env)"
    else
        eval "$("$HERE/containerd.sh" env)"
    fi
    "$HERE/containerd.sh" up >/dev/null
    log "stack $stack: $("$HERE/stack.sh" "$stack" versions 2>/dev/null | tr '\n' ' ')"
    for driver in cgroupfs systemd; do
        if [ "$driver" = systemd ]; then export ES_SYSTEMD_CGROUP=1; else unset ES_SYSTEMD_CGROUP; fi
        while read -r target tests; do
            [ -n "$target" ] || continue
            case "$target" in
                *@*) [ "${target#*@}" = "$stack" ] || continue; target=${target%@*} ;;
            esac
            bin=${BIN[$target]:-}
            [ -x "$bin" ] || { log "error: no test binary for '$target' (ES_VM_BINS)"; rc=1; continue; }
            if [ "$tests" = ALL ]; then
                args=(--include-ignored)
                want=$("$bin" --list --include-ignored 2>/dev/null | grep -c ': test$')
            else
                # shellcheck disable=SC2206
                names=($tests)
                args=(--exact "${names[@]}")
                want=${#names[@]}
            fi
            t0=$SECONDS
            out=$("$bin" "${args[@]}" --test-threads=1 2>&1) && ok=1 || ok=0
            line=$(echo "$out" | grep '^test result:' | tail -1)
            passed=$(echo "$line" | sed -n 's/.* \([0-9]\+\) passed.*/\1/p')
            ignored=$(echo "$line" | sed -n 's/.* \([0-9]\+\) ignored.*/\1/p')
            skipped=$(echo "$out" | grep -c 'SKIP' || true)
            if [ "$ok" = 1 ] && [ "${passed:-0}" = "$want" ] && [ "${ignored:-0}" = 0 ] && [ "$skipped" = 0 ]; then
                log "ok: $stack/$driver: $target: $passed test(s) in $((SECONDS - t0)) s"
            else
                echo "$out"
                log "FAILED: $stack/$driver: $target: want $want passed, got '${line:-no result}' ($skipped skip line(s))"
                rc=1
            fi
        done <<< "$SUITE"
    done
    "$HERE/containerd.sh" down >/dev/null || true
    return $rc
}

rc=0
failed=""
start=$SECONDS
for stack in $STACKS; do
    ( run_stack "$stack" ) || { rc=1; failed+=" $stack"; }
done
if [ $rc -eq 0 ]; then
    log "cgroup v2 suite green in $((SECONDS - start)) s ($STACKS; cgroupfs and systemd drivers)"
else
    log "cgroup v2 suite FAILED on:$failed"
fi
exit $rc
