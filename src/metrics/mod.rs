//! Memory metrics that hide the proxy's allocation from the user, the way Diego's rep
//! does: usage rescaled linearly to the quota the user asked for — or, as an
//! alternative the reference lacks, exact attribution from Envoy's own child cgroup.
//!
//! Usage comes from containerd's task metrics API (cgroup v1 and v2 payloads); the
//! figure used is the working set: usage minus inactive file cache (what the kernel
//! cannot simply drop, and what the OOM killer is about).

pub mod exporter;

use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::MetricsRequest;
use prost::Message;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::state::layout::Paths;
use crate::state::store::{ContainerState, Store};

pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";

/// `io.containerd.cgroups.v1.Metrics`, the fields we read.
#[derive(Clone, PartialEq, Message)]
struct V1Metrics {
    #[prost(message, optional, tag = "4")]
    memory: Option<V1MemoryStat>,
}

#[derive(Clone, PartialEq, Message)]
struct V1MemoryStat {
    #[prost(uint64, tag = "30")]
    total_inactive_file: u64,
    #[prost(message, optional, tag = "33")]
    usage: Option<V1MemoryEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct V1MemoryEntry {
    #[prost(uint64, tag = "1")]
    limit: u64,
    #[prost(uint64, tag = "2")]
    usage: u64,
}

/// `io.containerd.cgroups.v2.Metrics`, the fields we read.
#[derive(Clone, PartialEq, Message)]
struct V2Metrics {
    #[prost(message, optional, tag = "4")]
    memory: Option<V2MemoryStat>,
}

#[derive(Clone, PartialEq, Message)]
struct V2MemoryStat {
    #[prost(uint64, tag = "13")]
    inactive_file: u64,
    #[prost(uint64, tag = "32")]
    usage: u64,
    #[prost(uint64, tag = "33")]
    usage_limit: u64,
}

/// A container's memory as containerd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Raw {
    pub usage_bytes: u64,
    pub working_set_bytes: u64,
    pub limit_bytes: u64,
}

/// Decode the `data` of a containerd `Metric`.
pub fn decode(type_url: &str, value: &[u8]) -> Result<Raw> {
    let bad = |e: prost::DecodeError| Error::Metrics(format!("{type_url}: {e}"));
    match type_url.trim_start_matches("type.googleapis.com/") {
        "io.containerd.cgroups.v1.Metrics" => {
            let m = V1Metrics::decode(value)
                .map_err(bad)?
                .memory
                .unwrap_or_default();
            let u = m.usage.unwrap_or_default();
            Ok(Raw {
                usage_bytes: u.usage,
                working_set_bytes: u.usage.saturating_sub(m.total_inactive_file),
                limit_bytes: u.limit,
            })
        }
        "io.containerd.cgroups.v2.Metrics" => {
            let m = V2Metrics::decode(value)
                .map_err(bad)?
                .memory
                .unwrap_or_default();
            Ok(Raw {
                usage_bytes: m.usage,
                working_set_bytes: m.usage.saturating_sub(m.inactive_file),
                limit_bytes: m.usage_limit,
            })
        }
        other => Err(Error::Metrics(format!(
            "unsupported metrics type {other:?}; valid: io.containerd.cgroups.v1.Metrics, io.containerd.cgroups.v2.Metrics"
        ))),
    }
}

/// `[metrics] mode`: how the proxy's allocation is hidden (defined with the config).
pub use crate::config::MetricsMode as Mode;

/// What the user sees for one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub namespace: String,
    pub id: String,
    /// Usage against the user's quota (rescaled or attributed).
    pub memory_bytes: u64,
    /// The quota the user asked for (0: no limit).
    pub memory_bytes_quota: u64,
    pub raw_usage_bytes: u64,
    pub raw_working_set_bytes: u64,
    pub raw_limit_bytes: u64,
    /// Envoy's own working set, when its child cgroup can be read (cgroup v1).
    pub envoy_bytes: Option<u64>,
    /// "linear", "exact", or "unscaled" (no proxy memory to hide).
    pub method: &'static str,
}

/// The reference's rescaling: usage × requested / (requested + additional). A
/// container without a limit or without an additional allocation is reported unscaled.
pub fn linear(usage: u64, requested: Option<u64>, additional: u64) -> Option<u64> {
    let r = requested.filter(|r| *r > 0)?;
    if additional == 0 {
        return None;
    }
    let scaled = u128::from(usage) * u128::from(r) / (u128::from(r) + u128::from(additional));
    // At most `usage` (r / (r + additional) <= 1), so it fits.
    Some(u64::try_from(scaled).unwrap_or(usage))
}

/// The quota the user asked for. A pod's is the sum of its containers' limits (the
/// kubelet's pod cgroup limit less the RuntimeClass overhead); `None` (no limit) when
/// it has no containers yet or one of them has none.
pub fn requested(s: &ContainerState) -> Option<u64> {
    match &s.pod {
        None => s.memory.requested_bytes,
        Some(p) if p.members.is_empty() => None,
        Some(p) => p.members.iter().try_fold(0u64, |sum, m| {
            m.requested_bytes.map(|r| sum.saturating_add(r))
        }),
    }
}

/// The ids containerd is asked about for `s`: a pod's sandbox and its containers.
pub fn ids_of(s: &ContainerState) -> Vec<String> {
    std::iter::once(s.id.clone())
        .chain(
            s.pod
                .iter()
                .flat_map(|p| p.members.iter().map(|m| m.id.clone())),
        )
        .collect()
}

/// `s`'s raw memory from containerd's answers: a pod's is the sum over its sandbox
/// (pause and Envoy) and its containers; `None` if the sandbox was not reported.
pub fn raw_of(s: &ContainerState, raws: &[(String, Raw)]) -> Option<Raw> {
    let find = |id: &str| raws.iter().find(|(i, _)| i == id).map(|(_, r)| *r);
    let mut total = find(&s.id)?;
    for id in ids_of(s).iter().skip(1) {
        if let Some(r) = find(id) {
            total.usage_bytes = total.usage_bytes.saturating_add(r.usage_bytes);
            total.working_set_bytes = total.working_set_bytes.saturating_add(r.working_set_bytes);
            total.limit_bytes = total.limit_bytes.saturating_add(r.limit_bytes);
        }
    }
    Some(total)
}

pub fn report(s: &ContainerState, raw: Raw, envoy: Option<u64>, mode: Mode) -> Report {
    let requested = requested(s);
    let used = raw.working_set_bytes;
    let (value, method) = match (
        mode,
        envoy,
        linear(used, requested, s.memory.additional_bytes),
    ) {
        (Mode::Exact, Some(e), _) if requested.is_some() => (used.saturating_sub(e), "exact"),
        (_, _, Some(scaled)) => (scaled, "linear"),
        _ => (used, "unscaled"),
    };
    Report {
        namespace: s.namespace.clone(),
        id: s.id.clone(),
        memory_bytes: value,
        memory_bytes_quota: requested.unwrap_or(0),
        raw_usage_bytes: raw.usage_bytes,
        raw_working_set_bytes: used,
        raw_limit_bytes: raw.limit_bytes,
        envoy_bytes: envoy,
        method,
    }
}

/// Envoy's working set from its child memory cgroup (cgroup v1 only).
pub fn envoy_working_set(store: &Store, s: &ContainerState) -> Option<u64> {
    let rec = Paths::new(store, &s.namespace, &s.id)
        .read_record()
        .ok()??;
    rec.cgroup.working_set()
}

/// Ask containerd for the raw memory of `ids` in `namespace`. Containers containerd
/// does not report (gone, not running) are simply absent from the result.
pub fn fetch(
    address: &Path,
    namespace: &str,
    ids: &[String],
    timeout: Duration,
) -> Result<Vec<(String, Raw)>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::Metrics(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let fut = async {
            let channel = containerd_client::connect(address).await.map_err(|e| {
                Error::Metrics(format!(
                    "connecting to containerd at {}: {e}",
                    address.display()
                ))
            })?;
            let mut tasks =
                containerd_client::services::v1::tasks_client::TasksClient::new(channel);
            let filters = ids.iter().map(|id| format!("id=={id}")).collect();
            let mut req = tonic::Request::new(MetricsRequest { filters });
            req.metadata_mut().insert(
                "containerd-namespace",
                namespace.parse().map_err(|_| {
                    Error::Metrics(format!(
                        "namespace {namespace:?} is not a valid header value"
                    ))
                })?,
            );
            let resp = tasks.metrics(req).await.map_err(|e| {
                Error::Metrics(format!(
                    "containerd task metrics in namespace {namespace}: {}",
                    e.message()
                ))
            })?;
            let mut out = Vec::new();
            for m in resp.into_inner().metrics {
                if let Some(data) = m.data {
                    out.push((m.id, decode(&data.type_url, &data.value)?));
                }
            }
            Ok(out)
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            Error::Metrics(format!(
                "containerd at {} did not answer within {timeout:?}",
                address.display()
            ))
        })?
    })
}

/// Reports for the given containers (all of the namespace's proxied ones when `ids`
/// is empty).
pub fn collect(
    store: &Store,
    address: &Path,
    namespace: &str,
    ids: &[String],
    mode: Mode,
) -> Result<Vec<Report>> {
    let states: Vec<ContainerState> = store
        .list()?
        .into_iter()
        .filter(|s| s.namespace == namespace && (ids.is_empty() || ids.contains(&s.id)))
        .collect();
    for id in ids {
        if !states.iter().any(|s| &s.id == id) {
            return Err(Error::Metrics(format!(
                "{namespace}/{id} was not created through envoy-sidecar (or is gone)"
            )));
        }
    }
    if states.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<String> = states.iter().flat_map(ids_of).collect();
    let raws = fetch(address, namespace, &wanted, Duration::from_secs(5))?;
    Ok(states
        .iter()
        .filter_map(|s| {
            let raw = raw_of(s, &raws)?;
            Some(report(s, raw, envoy_working_set(store, s), mode))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::{sample, tempdir};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_pod_is_rescaled_over_its_containers_limits() {
        use crate::state::store::{Member, Pod};
        let root = tempdir("metrics-pod");
        let mut s = sample("k8s.io", "sb", &root, (61010, None));
        s.memory = crate::state::store::Memory {
            requested_bytes: None,
            limit_bytes: None,
            additional_bytes: 32 * MIB,
        };
        let m = |id: &str, r: Option<u64>| Member {
            id: id.into(),
            name: None,
            requested_bytes: r,
            declares_ports: true,
            joined_at: String::new(),
        };
        s.pod = Some(Pod::default());
        assert_eq!(requested(&s), None, "no containers yet");
        s.pod = Some(Pod {
            name: None,
            members: vec![m("a", Some(64 * MIB)), m("b", Some(32 * MIB))],
        });
        assert_eq!(requested(&s), Some(96 * MIB));
        assert_eq!(ids_of(&s), ["sb", "a", "b"]);
        let r = |ws: u64| Raw {
            usage_bytes: ws,
            working_set_bytes: ws,
            limit_bytes: 0,
        };
        let raws = vec![
            ("sb".to_string(), r(16 * MIB)),
            ("a".to_string(), r(40 * MIB)),
            ("b".to_string(), r(8 * MIB)),
            ("other".to_string(), r(999 * MIB)),
        ];
        let total = raw_of(&s, &raws).unwrap();
        assert_eq!(total.working_set_bytes, 64 * MIB);
        let rep = report(&s, total, None, Mode::Linear);
        // 64 MiB x 96 / (96 + 32)
        assert_eq!((rep.memory_bytes, rep.method), (48 * MIB, "linear"));
        assert_eq!(rep.memory_bytes_quota, 96 * MIB);
        s.pod.as_mut().unwrap().members.push(m("c", None));
        assert_eq!(
            requested(&s),
            None,
            "a container without a limit: the pod has none"
        );
        assert!(raw_of(&s, &raws[1..]).is_none(), "sandbox not reported");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn decodes_v1_and_v2() {
        let v1 = V1Metrics {
            memory: Some(V1MemoryStat {
                total_inactive_file: 10,
                usage: Some(V1MemoryEntry {
                    limit: 1000,
                    usage: 110,
                }),
            }),
        };
        let raw = decode("io.containerd.cgroups.v1.Metrics", &v1.encode_to_vec()).unwrap();
        assert_eq!(
            raw,
            Raw {
                usage_bytes: 110,
                working_set_bytes: 100,
                limit_bytes: 1000
            }
        );
        let v2 = V2Metrics {
            memory: Some(V2MemoryStat {
                inactive_file: 5,
                usage: 50,
                usage_limit: 500,
            }),
        };
        let raw = decode("io.containerd.cgroups.v2.Metrics", &v2.encode_to_vec()).unwrap();
        assert_eq!(raw.working_set_bytes, 45);
        assert!(
            decode("io.containerd.cgroups.v3.Metrics", &[])
                .unwrap_err()
                .to_string()
                .contains("valid:")
        );
        assert!(decode("io.containerd.cgroups.v1.Metrics", &[0xff, 0xff]).is_err());
    }

    #[test]
    fn linear_rescaling_like_the_reference() {
        // 256 MiB requested + 16 MiB proxy: 272 MiB used reads as the full 256 MiB quota.
        assert_eq!(
            linear(272 * MIB, Some(256 * MIB), 16 * MIB),
            Some(256 * MIB)
        );
        assert_eq!(
            linear(136 * MIB, Some(256 * MIB), 16 * MIB),
            Some(128 * MIB)
        );
        // No limit, no allocation: unscaled; no division by zero, no overflow.
        assert_eq!(linear(100, None, 16), None);
        assert_eq!(linear(100, Some(0), 16), None);
        assert_eq!(linear(100, Some(256), 0), None);
        assert_eq!(
            linear(u64::MAX, Some(u64::MAX), u64::MAX),
            Some(u64::MAX / 2)
        );
    }

    #[test]
    fn exact_attribution_and_fallbacks() {
        let root = tempdir("metrics");
        let s = sample("default", "c1", &root, (61001, None)); // 100 MiB + 32 MiB
        let raw = Raw {
            usage_bytes: 70 * MIB,
            working_set_bytes: 66 * MIB,
            limit_bytes: 132 * MIB,
        };
        let lin = report(&s, raw, Some(16 * MIB), Mode::Linear);
        assert_eq!((lin.memory_bytes, lin.method), (50 * MIB, "linear"));
        assert_eq!(lin.memory_bytes_quota, 100 * MIB);
        let ex = report(&s, raw, Some(16 * MIB), Mode::Exact);
        assert_eq!((ex.memory_bytes, ex.method), (50 * MIB, "exact"));
        let ex = report(&s, raw, Some(30 * MIB), Mode::Exact);
        assert_eq!(ex.memory_bytes, 36 * MIB);
        // Exact without Envoy's cgroup (v2): linear.
        assert_eq!(report(&s, raw, None, Mode::Exact).method, "linear");
        // Envoy larger than the container (racy reads): never underflows.
        assert_eq!(report(&s, raw, Some(u64::MAX), Mode::Exact).memory_bytes, 0);
        let mut unlimited = s.clone();
        unlimited.memory.requested_bytes = None;
        unlimited.memory.additional_bytes = 0;
        let u = report(&unlimited, raw, Some(16 * MIB), Mode::Exact);
        assert_eq!(
            (u.memory_bytes, u.memory_bytes_quota, u.method),
            (66 * MIB, 0, "unscaled")
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
