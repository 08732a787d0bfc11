//! How much memory a container's Envoy sidecar needs: the value for
//! `proxy.additional_memory_allocation_mb` (MiB, as the config key counts), as a function
//! of the number of concurrent connections an instance must hold.
//!
//! The model is measured, not guessed: `make bench` runs `scripts/bench-memory.sh`,
//! which holds 0, 100, 1000 and 2000 concurrent TLS connections (and the same with
//! mutual TLS) against one real Envoy with the generated configuration and fits
//! `RssAnon = base + slope × N` by least squares; the table, the fit and the method are
//! in `docs/BENCHMARKS.md`, section "Sidecar memory per connection (sizing)". Values
//! below: Envoy 1.40.0 (BoringSSL, `--concurrency 1`), kernel 6.18, cgroup v1, measured
//! 2026-11-26. Rerun the benchmark and update them when Envoy or the generated
//! configuration changes; the benchmark's section shows this module's constants next to
//! the fresh fit.
//!
//! What a memory limit enforces is the cgroup's `memory.usage_in_bytes`. For Envoy's
//! cgroup that is its private memory (`RssAnon`) plus the kernel memory of its sockets:
//! the ~50 MiB of Envoy binary pages it maps are page cache the supervisor pre-reads
//! outside the container's cgroup, shared by all sidecars and not charged to the
//! container (see README, "The sidecar at run time"), so they are not in this model.
//! Envoy does not return memory after connections close (tcmalloc keeps and reuses the
//! pages), so `connections` is the peak number of concurrent connections.
//!
//! Pure: no I/O, std only.

/// Private memory (`RssAnon`) of an idle Envoy with TLS listeners, KiB (13.8 MiB).
pub const TLS_BASE_KIB: u64 = 14_131;
/// Private memory (`RssAnon`) of an idle Envoy requiring client certificates, KiB.
pub const MTLS_BASE_KIB: u64 = 14_131;
/// Private memory per concurrent open TLS connection (downstream TLS connection plus
/// its upstream connection to the app), bytes (23.4 KiB; least-squares slope).
pub const TLS_PER_CONNECTION_BYTES: u64 = 24_064;
/// The same with mutual TLS (29.9 KiB): the client's certificate chain and its
/// verification state are kept per connection.
pub const MTLS_PER_CONNECTION_BYTES: u64 = 30_618;
/// Kernel memory charged to Envoy's cgroup at idle (listening sockets, epoll,
/// eventfds, ...), KiB (0.5 MiB; cgroup v1 `memory.kmem.usage_in_bytes`, which
/// `memory.usage_in_bytes` includes).
pub const KERNEL_BASE_KIB: u64 = 480;
/// Kernel memory per connection charged to Envoy's cgroup: its two sockets (struct
/// sock, file, dentry, epoll item), bytes (5.6 KiB; least-squares slope). Returned when
/// the connections close.
pub const KERNEL_PER_CONNECTION_BYTES: u64 = 5_734;
/// Headroom on the per-connection part, percent. The measured connections were idle; a
/// connection with data in flight also holds Envoy's buffers (bounded by
/// `per_connection_buffer_limit_bytes` = 32 KiB per direction: ~75 KiB for a stalled
/// connection) and BoringSSL's record buffers while a record is pending. 25 % of
/// ~30-35 KiB covers about one connection in ten being mid-transfer at the same
/// moment, and tcmalloc's size-class rounding when the mix of allocation sizes differs
/// from the benchmark's.
pub const PER_CONNECTION_HEADROOM_PERCENT: u64 = 25;
/// Fixed headroom, KiB (4 MiB): the benchmark had one app port; each further port adds
/// a listener, a cluster and their stats (~0.1 MiB each); a certificate rotation builds
/// a new TLS context while open connections still hold the old one; admin requests,
/// and run-to-run variation of the idle figure.
pub const FIXED_OVERHEAD_KIB: u64 = 4_096;

const MIB: u128 = 1 << 20;

/// Recommended `proxy.additional_memory_allocation_mb` (MiB) for an instance that must
/// hold `connections` concurrent connections (its peak: the memory is not returned),
/// with (`mtls`) or without client-certificate verification:
/// ceil(base + kernel base + fixed headroom + N × (per-connection + kernel
/// per-connection) × (1 + headroom)). Saturates at `u64::MAX`.
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
/// allocation", measured on a 2018 Envoy): `10 + 0.03 × N` MB, rounded to the nearest
/// integer (halves up). Saturates at `u64::MAX`.
pub fn reference_mb(connections: u64) -> u64 {
    // round(10 + 3N/100) = floor((1000 + 3N + 50) / 100), exactly, in integers.
    let v = (1000 + 3 * u128::from(connections) + 50) / 100;
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        assert_eq!(reference_mb(0), 10);
        assert_eq!(reference_mb(16), 10); // 10.48
        assert_eq!(reference_mb(17), 11); // 10.51
        assert_eq!(reference_mb(50), 12); // 11.5: halves round up
        assert_eq!(reference_mb(100), 13);
        assert_eq!(reference_mb(1000), 40);
        assert_eq!(reference_mb(2000), 70);
        assert_eq!(reference_mb(u64::MAX), u64::MAX);
    }

    #[test]
    fn recommend_values() {
        // base 13.8 + kernel 0.47 + fixed 4 MiB = 18.27 MiB → 19
        assert_eq!(recommend_mb(0, false), 19);
        assert_eq!(recommend_mb(0, true), 19);
        // + N × (23.45 + 5.6) KiB × 1.25 = 35.46 KiB per connection
        assert_eq!(recommend_mb(100, false), 22);
        assert_eq!(recommend_mb(1000, false), 53);
        assert_eq!(recommend_mb(2000, false), 88);
        // + N × (29.89 + 5.6) KiB × 1.25 = 44.36 KiB per connection
        assert_eq!(recommend_mb(100, true), 23);
        assert_eq!(recommend_mb(1000, true), 62);
        assert_eq!(recommend_mb(2000, true), 106);
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
            assert!(r >= prev);
            prev = r;
        }
    }

    #[test]
    fn mtls_needs_at_least_as_much() {
        for n in [0, 1, 100, 1000, 2000, 4096, 10_000, 1_000_000] {
            assert!(recommend_mb(n, true) >= recommend_mb(n, false), "N = {n}");
        }
    }

    #[test]
    fn covers_what_was_measured() {
        // The measured cgroup usage (RssAnon + kernel) at N must fit in the allocation.
        for (n, mtls, measured_kib) in [
            (0u64, false, 14_131 + 480),
            (2000, false, 14_131 + 480 + 2000 * (24_013 + 5_734) / 1024),
            (2000, true, 14_131 + 480 + 2000 * (30_607 + 5_734) / 1024),
        ] {
            assert!(recommend_mb(n, mtls) * 1024 > measured_kib, "N = {n}, mTLS {mtls}");
        }
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        assert_eq!(recommend_mb(u64::MAX, true), u64::MAX);
        assert!(recommend_mb(u64::MAX / 1_000_000, false) > 0);
    }
}
