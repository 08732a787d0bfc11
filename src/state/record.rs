//! What the supervisor records about itself (`supervisor.json`, written only by it).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::sys::cgroup::SidecarCgroup;
use crate::sys::process::ProcId;

/// The supervisor's record of one container's sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub supervisor: Option<ProcId>,
    pub envoy: Option<ProcId>,
    pub envoy_restarts: u32,
    /// RFC 3339 time of the first successful TLS handshake of the current Envoy.
    pub ready_at: Option<String>,
    pub container_ip: Option<IpAddr>,
    pub cert_serial: Option<String>,
    /// Unix seconds.
    pub cert_not_after: Option<u64>,
    pub cgroup: SidecarCgroup,
    pub last_error: Option<String>,
}
