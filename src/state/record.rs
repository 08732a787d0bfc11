//! What the supervisor records about itself (`supervisor.json`, written only by it).

use std::net::{IpAddr, Ipv6Addr};

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
    /// The container's IPv4 address (NAT, the IP SAN).
    pub container_ip: Option<IpAddr>,
    /// Its IPv6 address, when it has one beside (or instead of) IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_ipv6: Option<Ipv6Addr>,
    pub cert_serial: Option<String>,
    /// Unix seconds.
    pub cert_not_after: Option<u64>,
    pub cgroup: SidecarCgroup,
    pub last_error: Option<String>,
    /// The one status an operator reads (`envoy-sidecar status`).
    #[serde(default)]
    pub status: Option<Status>,
    /// Host NAT for the current container IP is in place.
    #[serde(default)]
    pub nat_applied: bool,
    /// How the container is networked, as the supervisor found it.
    #[serde(default)]
    pub network: Network,
    /// Times the ingress filter was found removed or changed inside the container and
    /// put back.
    #[serde(default)]
    pub ingress_repairs: u32,
    /// How the running Envoy is confined (`sidecar::sandbox::Level`, as logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

impl Record {
    /// The addresses recorded, as the supervisor found them.
    pub fn addresses(&self) -> crate::sys::netns::Addresses {
        crate::sys::netns::Addresses {
            v4: match self.container_ip {
                Some(IpAddr::V4(v4)) => Some(v4),
                _ => None,
            },
            v6: self.container_ipv6,
        }
    }

    pub fn set_addresses(&mut self, a: crate::sys::netns::Addresses) {
        self.container_ip = a.v4.map(IpAddr::V4);
        self.container_ipv6 = a.v6;
    }
}

/// Where a proxied container stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// No IPv4 or IPv6 address in the container's netns yet (the engine has not
    /// configured it): no host NAT, no IP SAN. Envoy already serves inside the container.
    WaitingForNetwork,
    /// Envoy started, not yet answering TLS on every listener.
    #[default]
    Starting,
    Ready,
    /// Something is wrong; `reason` says what.
    Degraded,
    Stopping,
    /// The engine no longer has the container (runc does not know it) but its record
    /// is still here: `gc` removes it. Said by `status` only, never recorded.
    Gone,
}

impl State {
    pub const ALL: [State; 6] = [
        State::WaitingForNetwork,
        State::Starting,
        State::Ready,
        State::Degraded,
        State::Stopping,
        State::Gone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::WaitingForNetwork => "waiting-for-network",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Degraded => "degraded",
            State::Stopping => "stopping",
            State::Gone => "gone",
        }
    }
}

/// A status, the time it was entered, and (degraded) why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// RFC 3339 time the container entered this state.
    pub since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The container's network as the supervisor sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// Its own network namespace (host NAT maps host ports to its IP).
    #[default]
    Namespace,
    /// The host's network namespace: its ports are the host's, there is nothing to
    /// map and no container IP for the certificate.
    Host,
}
