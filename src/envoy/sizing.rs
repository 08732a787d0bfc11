//! How much memory a container's Envoy sidecar needs: a value for
//! `proxy.additional_memory_allocation_mb` (MiB, as that key counts), as a function of
//! the peak number of concurrent connections an instance must hold.
//!
//! The model is measured: `make bench` runs `scripts/bench-memory.sh`, which holds 0,
//! 100, 1000 and 2000 concurrent TLS connections (and the same with mutual TLS) against
//! one real Envoy with the generated configuration and fits `RssAnon = base + slope × N`
//! by least squares; table, fit and method are in `docs/BENCHMARKS.md`, section "Sidecar
//! memory per connection (sizing)". The values below: Envoy 1.40.0 (BoringSSL,
//! `--concurrency 1`), kernel 6.18, cgroup v1, three runs on 2026-11-26. Rerun the
//! benchmark and update them when Envoy or the generated configuration changes; its
//! section shows these constants next to the fresh fit.
//!
//! A memory limit enforces the cgroup's `memory.usage_in_bytes`. For Envoy's cgroup that
//! is its private memory (`RssAnon`) plus the kernel memory of its sockets. The ~50 MiB
//! of Envoy binary pages it maps (`RssFile`) are page cache that the supervisor pre-reads
//! outside the container's cgroup, shared by all sidecars and not charged to the
//! container (docs/RUNTIME.md), so they are not in this model.
//! Envoy does not return its private memory after connections close (tcmalloc keeps
//! and reuses the pages): `connections` is the peak, not the average.
//!
//! Pure: no I/O, std only.

/// Private memory (`RssAnon`) of an idle Envoy with a TLS listener, KiB (13.8 MiB).
pub const TLS_BASE_KIB: u64 = 14_131;
/// Private memory (`RssAnon`) of an idle Envoy requiring client certificates, KiB
/// (13.8 MiB: the same).
pub const MTLS_BASE_KIB: u64 = 14_131;
/// Private memory per concurrent open TLS connection (the downstream TLS connection
/// and its upstream connection to the app, both idle), bytes (23.5 KiB: least-squares
/// slope, r² > 0.999; three runs gave 23.4–23.6 KiB).
pub const TLS_PER_CONNECTION_BYTES: u64 = 24_064;
/// The same with mutual TLS, bytes (29.9 KiB; three runs gave 29.7–29.9 KiB); the
/// extra is presumably the client's certificate chain, which BoringSSL keeps with each
/// connection.
pub const MTLS_PER_CONNECTION_BYTES: u64 = 30_618;
/// Kernel memory charged to Envoy's cgroup at idle (listening sockets, epoll, ...),
/// KiB (0.47 MiB; cgroup v1 `memory.kmem.usage_in_bytes`, part of `usage_in_bytes`).
pub const KERNEL_BASE_KIB: u64 = 480;
/// Kernel memory per connection charged to Envoy's cgroup: its two sockets (socket,
/// file and epoll structures), bytes (5.6 KiB: least-squares slope). No RSS figure
/// shows it, but the cgroup's usage includes it. It is returned when the connections
/// close.
pub const KERNEL_PER_CONNECTION_BYTES: u64 = 5_734;
/// Headroom on the per-connection part, percent. The measured connections were idle; a
/// connection with data in flight also holds Envoy's buffers (bounded by
/// `per_connection_buffer_limit_bytes` = 32 KiB per direction: ~75 KiB for a stalled
/// connection) and BoringSSL's record buffers while a record is pending. 25 % of the
/// ~30–35 KiB per connection covers about one connection in ten being mid-transfer at
/// the same moment, and tcmalloc's size-class rounding when the mix of allocations
/// differs from the benchmark's. It also covers what closing many connections at once
/// allocates on top of the peak (measured: ≤ 1.6 KiB per connection, also kept).
pub const PER_CONNECTION_HEADROOM_PERCENT: u64 = 25;
/// Fixed headroom, KiB (4 MiB): the benchmark had one app port, and each further port
/// adds a listener, a cluster and their stats (~0.1 MiB each); a certificate rotation
/// builds a new TLS context while open connections still hold the old one; admin
/// requests; and run-to-run variation of the idle figure.
pub const FIXED_OVERHEAD_KIB: u64 = 4_096;

/// The least the derived `max_connections` allows for: an allocation too small for an
/// idle Envoy still gets a working one (and `check-config` says the allocation is
/// short).
pub const MIN_CONNECTIONS: u64 = 64;

const MIB: u128 = 1 << 20;

/// Heap Envoy's allocator reports in use (tcmalloc `generic.current_allocated_bytes`,
/// admin `/memory` `allocated`) at idle with one TLS listener, KiB (5.9 MiB; the same
/// with client-certificate verification). What `envoy.resource_monitors.fixed_heap`
/// measures with `envoy.reloadable_features.fixed_heap_use_allocated` on (see
/// [`heap_budget_bytes`]). Measured on Envoy 1.40.0, `--concurrency 1`, 2026-12-02,
/// with the generated listener's shape and 600 held connections, two runs each
/// (`scripts/heap-budget.py`; `docs/BENCHMARKS.md`, "Envoy heap budget").
pub const HEAP_IDLE_KIB: u64 = 6_042;
/// Allocated heap per open TLS connection (downstream TLS + upstream to the app,
/// idle), bytes (22.2 KiB in both runs; of the 29.6 KiB the cgroup counted per
/// connection in the same runs, the rest is kernel socket memory and tcmalloc's
/// caches).
pub const TLS_HEAP_PER_CONNECTION_BYTES: u64 = 22_733;
/// The same with mutual TLS, bytes (30.8 KiB in both runs; cgroup 37.9 KiB).
pub const MTLS_HEAP_PER_CONNECTION_BYTES: u64 = 31_539;
/// Heap pressure (allocated / [`heap_budget_bytes`]), percent, at which Envoy refuses
/// new connections (`envoy.overload_actions.reject_incoming_connections`). Below 100
/// because the monitor is sampled (every `overload_manager.refresh_interval`, 100 ms)
/// while a flood keeps handshaking: measured, floods of 4000 reached 93–97 % with this
/// threshold (438–448 TLS or 360–385 mTLS connections taken of the 32 MiB budget).
pub const HEAP_REJECT_PERCENT: u64 = 90;

fn per_connection(mtls: bool) -> (u64, u64) {
    if mtls {
        (MTLS_BASE_KIB, MTLS_PER_CONNECTION_BYTES)
    } else {
        (TLS_BASE_KIB, TLS_PER_CONNECTION_BYTES)
    }
}

/// The peak number of concurrent connections `mb` MiB of additional allocation hold by
/// [`recommend_mb`]'s rule (headroom included): the largest N with
/// `recommend_mb(N, mtls) <= mb`, 0 when `mb` does not hold an idle Envoy.
pub fn connections_for_mb(mb: u64, mtls: bool) -> u64 {
    let (base_kib, per_conn) = per_connection(mtls);
    let fixed = u128::from(base_kib + KERNEL_BASE_KIB + FIXED_OVERHEAD_KIB) * 1024;
    let have = u128::from(mb) * MIB;
    let per = u128::from(per_conn + KERNEL_PER_CONNECTION_BYTES)
        * u128::from(100 + PER_CONNECTION_HEADROOM_PERCENT);
    let n = have.saturating_sub(fixed) * 100 / per;
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `proxy.max_connections` when the configuration does not set it: what the additional
/// allocation holds ([`connections_for_mb`]), at least [`MIN_CONNECTIONS`], at most
/// `max`.
pub fn default_max_connections(mb: u64, mtls: bool, max: u64) -> u64 {
    connections_for_mb(mb, mtls).clamp(MIN_CONNECTIONS, max)
}

/// `max_heap_size_bytes` of Envoy's heap monitor for `mb` MiB of additional
/// allocation: the heap (allocated bytes, not resident memory) of an idle Envoy plus
/// that of the connections the allocation holds less [`FIXED_OVERHEAD_KIB`], at the
/// measured cost per connection without the per-connection headroom of
/// [`recommend_mb`] — so it holds more connections than [`connections_for_mb`] (the
/// default connection cap trips first on idle connections) but fewer when connections
/// carry data, and when an explicit `max_connections` exceeds the allocation it is
/// what stops Envoy. Never less than what makes [`HEAP_REJECT_PERCENT`] of it hold
/// [`MIN_CONNECTIONS`] connections. 16.4 MiB (TLS) / 17.8 MiB (mTLS) for 32 MiB.
///
/// Why allocated bytes: tcmalloc keeps the pages of closed connections in its caches,
/// so Envoy's resident heap (what the monitor counts by default) does not fall after a
/// flood closes and a threshold on it would refuse every new connection for good.
pub fn heap_budget_bytes(mb: u64, mtls: bool) -> u64 {
    let (base_kib, per_conn) = per_connection(mtls);
    let heap_per_conn = u128::from(if mtls {
        MTLS_HEAP_PER_CONNECTION_BYTES
    } else {
        TLS_HEAP_PER_CONNECTION_BYTES
    });
    let fixed = u128::from(base_kib + KERNEL_BASE_KIB + FIXED_OVERHEAD_KIB) * 1024;
    let per = u128::from(per_conn + KERNEL_PER_CONNECTION_BYTES);
    let n = (u128::from(mb) * MIB).saturating_sub(fixed) / per;
    let idle = u128::from(HEAP_IDLE_KIB) * 1024;
    let budget = idle + n * heap_per_conn;
    let floor = ((idle + u128::from(MIN_CONNECTIONS) * heap_per_conn) * 100)
        .div_ceil(u128::from(HEAP_REJECT_PERCENT));
    u64::try_from(budget.max(floor)).unwrap_or(u64::MAX)
}

/// How many idle connections Envoy takes before its heap budget refuses more:
/// [`HEAP_REJECT_PERCENT`] of [`heap_budget_bytes`], less the idle heap, at the heap
/// cost per connection (407 TLS / 336 mTLS for 32 MiB; a flood overshoots it by what
/// arrives within one monitor refresh: 448 / 384 measured). Fewer when connections
/// carry data.
pub fn heap_budget_connections(mb: u64, mtls: bool) -> u64 {
    let heap_per_conn = if mtls {
        MTLS_HEAP_PER_CONNECTION_BYTES
    } else {
        TLS_HEAP_PER_CONNECTION_BYTES
    };
    let reject = u128::from(heap_budget_bytes(mb, mtls)) * u128::from(HEAP_REJECT_PERCENT) / 100;
    let n = reject.saturating_sub(u128::from(HEAP_IDLE_KIB) * 1024) / u128::from(heap_per_conn);
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The heap monitor's sampling interval (`overload_manager.refresh_interval`) when the
/// connection cap trips before the heap budget would on idle connections (cap ≤
/// [`heap_budget_connections`]; so the default cap from 27 MiB of allocation up): the
/// cap, enforced at accept, stops a flood, and the monitor is a backstop for
/// connections that carry data. One sample costs Envoy ~0.1 ms of CPU (tcmalloc's
/// statistics, measured on Envoy 1.40: 1.0 ms/s at 100 ms, 0.1 ms/s at 1 s;
/// docs/BENCHMARKS.md, "Envoy heap budget").
pub const HEAP_REFRESH_CAPPED_MS: u64 = 1_000;
/// The interval when the cap exceeds what the heap budget holds (an explicit
/// `max_connections`, or an allocation under 27 MiB): the monitor is then what stops
/// a flood, and it must sample while one arrives — a flood takes ~600 connections a
/// second on one worker; measured with 4000 offered: at 100 ms 448–512 taken (cgroup
/// ≤ 31.4 MiB of 32), at 500 ms up to 640 (33.2 MiB), at 1 s up to 1088 (46.5 MiB).
pub const HEAP_REFRESH_UNCAPPED_MS: u64 = 100;

/// `overload_manager.refresh_interval` for a cap of `max_connections` and `mb` MiB of
/// additional allocation, milliseconds (see the two constants).
pub fn heap_refresh_ms(max_connections: u64, mb: u64, mtls: bool) -> u64 {
    if max_connections <= heap_budget_connections(mb, mtls) {
        HEAP_REFRESH_CAPPED_MS
    } else {
        HEAP_REFRESH_UNCAPPED_MS
    }
}

/// Recommended `proxy.additional_memory_allocation_mb` (MiB) for an instance that must
/// hold a peak of `connections` concurrent connections, with (`mtls`) or without
/// client-certificate verification:
/// ceil(base + kernel base + fixed headroom
///      + N × (per-connection + kernel per-connection) × (1 + headroom)).
/// Computed in `u128`: no overflow for any input.
pub fn recommend_mb(connections: u64, mtls: bool) -> u64 {
    let (base_kib, per_conn) = if mtls {
        (MTLS_BASE_KIB, MTLS_PER_CONNECTION_BYTES)
    } else {
        (TLS_BASE_KIB, TLS_PER_CONNECTION_BYTES)
    };
    let fixed = u128::from(base_kib + KERNEL_BASE_KIB + FIXED_OVERHEAD_KIB) * 1024;
    let per = u128::from(per_conn + KERNEL_PER_CONNECTION_BYTES)
        * u128::from(100 + PER_CONNECTION_HEADROOM_PERCENT);
    let variable = (u128::from(connections) * per).div_ceil(100);
    u64::try_from((fixed + variable).div_ceil(MIB)).unwrap_or(u64::MAX)
}

/// The reference's rule (Diego, "Choosing a value for the additional memory
/// allocation", measured on a 2018 Envoy: 5–10 MB initially, ~30 KB per connection):
/// `10 + 0.03 × N` MB, rounded to the nearest integer (halves up). Computed in `u128`:
/// no overflow for any input.
pub fn reference_mb(connections: u64) -> u64 {
    // round(10 + 3N/100) = floor((1000 + 3N + 50) / 100), exactly, in integers.
    let v = (1000 + 3 * u128::from(connections) + 50) / 100;
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_refresh_is_slow_under_the_derived_cap_and_fast_past_it() {
        let cap = default_max_connections(32, false, 100_000);
        assert_eq!(cap, 386);
        assert_eq!(heap_refresh_ms(cap, 32, false), HEAP_REFRESH_CAPPED_MS);
        assert_eq!(heap_refresh_ms(100, 32, true), HEAP_REFRESH_CAPPED_MS);
        assert_eq!(heap_refresh_ms(4096, 32, false), HEAP_REFRESH_UNCAPPED_MS);
        assert_eq!(heap_budget_connections(32, false), 407);
        assert_eq!(heap_refresh_ms(407, 32, false), HEAP_REFRESH_CAPPED_MS);
        assert_eq!(heap_refresh_ms(408, 32, false), HEAP_REFRESH_UNCAPPED_MS);
        // Small allocations: the derived cap exceeds the heap budget's floor.
        let small = default_max_connections(21, false, 100_000);
        assert_eq!(heap_refresh_ms(small, 21, false), HEAP_REFRESH_UNCAPPED_MS);
        // From 27 MiB the derived cap trips first, TLS and mutual TLS.
        for mb in 27..=4096 {
            for mtls in [false, true] {
                let cap = default_max_connections(mb, mtls, 100_000);
                assert_eq!(
                    heap_refresh_ms(cap, mb, mtls),
                    HEAP_REFRESH_CAPPED_MS,
                    "{mb} {mtls}"
                );
            }
        }
    }

    #[test]
    fn reference_values() {
        assert_eq!(reference_mb(0), 10);
        assert_eq!(reference_mb(16), 10); // 10.48
        assert_eq!(reference_mb(17), 11); // 10.51
        assert_eq!(reference_mb(50), 12); // 11.5: halves round up
        assert_eq!(reference_mb(100), 13);
        assert_eq!(reference_mb(1000), 40);
        assert_eq!(reference_mb(2000), 70);
        assert_eq!(reference_mb(u64::MAX), 553_402_322_211_286_558);
    }

    #[test]
    fn recommend_values() {
        // 13.8 MiB + 0.47 MiB kernel + 4 MiB fixed = 18.27 MiB → 19
        assert_eq!(recommend_mb(0, false), 19);
        assert_eq!(recommend_mb(0, true), 19);
        // + N × (23.5 + 5.6) KiB × 1.25 = 36.4 KiB per connection
        assert_eq!(recommend_mb(100, false), 22);
        assert_eq!(recommend_mb(1000, false), 54);
        assert_eq!(recommend_mb(2000, false), 90);
        // + N × (29.9 + 5.6) KiB × 1.25 = 44.4 KiB per connection
        assert_eq!(recommend_mb(100, true), 23);
        assert_eq!(recommend_mb(1000, true), 62);
        assert_eq!(recommend_mb(2000, true), 105);
    }

    #[test]
    fn monotonic_in_connections() {
        for mtls in [false, true] {
            let mut prev = recommend_mb(0, mtls);
            for n in (1..=20_000).step_by(7) {
                let r = recommend_mb(n, mtls);
                assert!(r >= prev, "recommend_mb({n}, {mtls}) = {r} < {prev}");
                prev = r;
            }
            assert!(recommend_mb(1_000_000, mtls) > recommend_mb(100_000, mtls));
        }
        let mut prev = reference_mb(0);
        for n in 1..=20_000 {
            let r = reference_mb(n);
            assert!(r >= prev, "reference_mb({n}) = {r} < {prev}");
            prev = r;
        }
    }

    #[test]
    fn mtls_needs_at_least_as_much() {
        for n in [0, 1, 100, 1000, 2000, 4096, 10_000, 1_000_000, u64::MAX] {
            assert!(recommend_mb(n, true) >= recommend_mb(n, false), "N = {n}");
        }
    }

    #[test]
    fn covers_what_was_measured() {
        // The highest cgroup memory.usage_in_bytes seen at each point (MiB;
        // docs/BENCHMARKS.md), N open; closing them afterwards stayed below this.
        for (n, mtls, measured_mib) in [
            (0, false, 14.5),
            (100, false, 17.8),
            (1000, false, 42.7),
            (2000, false, 71.9),
            (0, true, 14.7),
            (100, true, 18.2),
            (1000, true, 49.0),
            (2000, true, 83.9),
        ] {
            let r = recommend_mb(n, mtls);
            assert!(r as f64 > measured_mib, "N = {n}, mTLS {mtls}: {r} MiB");
        }
    }

    #[test]
    fn above_the_reference() {
        // Today's Envoy starts bigger than the 2018 one; per connection it is close.
        for n in [0, 100, 1000, 2000, 10_000] {
            assert!(recommend_mb(n, false) > reference_mb(n), "N = {n}");
        }
    }

    #[test]
    fn connections_for_mb_inverts_recommend_mb() {
        for mtls in [false, true] {
            for mb in [0, 1, 18, 19, 20, 32, 54, 64, 90, 128, 1024, 65536] {
                let n = connections_for_mb(mb, mtls);
                if n > 0 || recommend_mb(0, mtls) <= mb {
                    assert!(recommend_mb(n, mtls) <= mb, "mb {mb} mTLS {mtls}: N {n}");
                }
                assert!(recommend_mb(n + 1, mtls) > mb, "mb {mb} mTLS {mtls}: N {n}");
            }
        }
        // The default allocation: docs/METRICS.md's "386 TLS (316 mTLS) connections".
        assert_eq!(connections_for_mb(32, false), 386);
        assert_eq!(connections_for_mb(32, true), 316);
        assert_eq!(connections_for_mb(0, false), 0);
        assert_eq!(
            default_max_connections(0, false, 1_000_000),
            MIN_CONNECTIONS
        );
        assert_eq!(default_max_connections(32, false, 1_000_000), 386);
        assert_eq!(default_max_connections(65536, false, 1_000_000), 1_000_000);
    }

    #[test]
    fn heap_budget_values() {
        // 32 MiB: 14.3 MiB idle + 0.47 kernel + 4 fixed leaves 13.7 MiB, 483 TLS
        // connections at 29.1 KiB → 5.9 MiB + 483 × 22.2 KiB = 16.4 MiB of heap.
        assert_eq!(heap_budget_bytes(32, false), 6_042 * 1024 + 483 * 22_733);
        assert_eq!(heap_budget_bytes(32, true), 6_042 * 1024 + 396 * 31_539);
        // Refusal at 90 % of it holds more than the default cap (386 / 316) ...
        for mtls in [false, true] {
            let heap_per = if mtls {
                MTLS_HEAP_PER_CONNECTION_BYTES
            } else {
                TLS_HEAP_PER_CONNECTION_BYTES
            };
            for mb in [19, 32, 54, 90, 128, 1024] {
                let reject = heap_budget_bytes(mb, mtls) * HEAP_REJECT_PERCENT / 100;
                let cap = default_max_connections(mb, mtls, 1_000_000);
                assert!(
                    reject >= HEAP_IDLE_KIB * 1024 + cap * heap_per,
                    "mb {mb} mTLS {mtls}: heap budget below the default cap {cap}"
                );
                // ... and fewer than the whole allocation would, with no headroom at all.
                let (base_kib, per_conn) = per_connection(mtls);
                let full = (mb * 1024 - base_kib - KERNEL_BASE_KIB) * 1024
                    / (per_conn + KERNEL_PER_CONNECTION_BYTES);
                assert!(reject < HEAP_IDLE_KIB * 1024 + full * heap_per, "mb {mb}");
            }
        }
        assert_eq!(heap_budget_connections(32, false), 407);
        assert_eq!(heap_budget_connections(32, true), 336);
        // No allocation: still room for MIN_CONNECTIONS before refusal.
        for mtls in [false, true] {
            let b = heap_budget_bytes(0, mtls);
            assert_eq!(b, heap_budget_bytes(5, mtls));
            assert_eq!(heap_budget_connections(0, mtls), MIN_CONNECTIONS);
            assert!(
                b * HEAP_REJECT_PERCENT / 100 >= HEAP_IDLE_KIB * 1024 + MIN_CONNECTIONS * 22_733
            );
        }
        assert!(heap_budget_bytes(u64::MAX, true) > heap_budget_bytes(65_536, true));
    }

    #[test]
    fn heap_budget_monotonic() {
        for mtls in [false, true] {
            let mut prev = heap_budget_bytes(0, mtls);
            for mb in 1..=4096 {
                let b = heap_budget_bytes(mb, mtls);
                assert!(b >= prev, "mb {mb}");
                prev = b;
            }
        }
    }

    #[test]
    fn no_overflow_at_the_extremes() {
        let max = recommend_mb(u64::MAX, true);
        assert!(max > recommend_mb(u64::MAX / 2, true));
        assert!(max < u64::MAX);
    }
}
