//! The one status an operator reads for a proxied container, decided from what the
//! supervisor knows. Pure: the supervisor gathers the inputs, this says which state
//! they amount to and why, and the supervisor records (and logs) it when it changes.

use std::time::Duration;

use crate::sidecar::policy::Phase;
use crate::state::record::{Network, State};

/// What the status is decided from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub phase: Phase,
    pub network: Network,
    /// The container has an IPv4 address.
    pub has_ip: bool,
    /// How long it has been without one (zero when it has one).
    pub without_ip_for: Duration,
    /// `[proxy] network_wait`.
    pub network_wait: Duration,
    /// The last failure to apply host NAT, while it stands.
    pub nat_error: Option<&'a str>,
    /// The last failure to issue credentials, while it stands.
    pub rotation_error: Option<&'a str>,
    /// Why Envoy is not running or not ready (its start error, exit, probe failure).
    pub envoy_error: Option<&'a str>,
    /// The ingress filter could not be put back, while that stands.
    pub ingress_error: Option<&'a str>,
    pub stopping: bool,
}

/// The state and, when degraded, the reason.
pub fn decide(i: &Inputs) -> (State, Option<String>) {
    if i.stopping || i.phase == Phase::Stopped {
        return (State::Stopping, None);
    }
    let degraded = |why: String| (State::Degraded, Some(why));
    match i.phase {
        // Envoy cannot start (missing binary, unreadable files), keeps dying, or was
        // killed for not answering (liveness): down until its restart is ready.
        Phase::Down { .. } if i.envoy_error.is_some() => {
            let e = i.envoy_error.unwrap_or_default();
            return degraded(if e.starts_with("unresponsive") {
                format!("Envoy restarting: {e}")
            } else {
                format!("Envoy cannot start: {e}")
            });
        }
        Phase::Killing { .. } => {
            return degraded(format!(
                "readiness failing: {}",
                i.envoy_error.unwrap_or("no TLS handshake")
            ));
        }
        _ => {}
    }
    if let Some(e) = i.ingress_error {
        return degraded(format!("ingress filter: {e}"));
    }
    if let Some(e) = i.nat_error {
        return degraded(format!("NAT failed: {e}"));
    }
    if let Some(e) = i.rotation_error {
        return degraded(format!("rotation failing: {e}"));
    }
    if i.network == Network::Namespace && !i.has_ip {
        if i.without_ip_for >= i.network_wait {
            return degraded(format!(
                "no network: no IPv4 or IPv6 address in the container's network namespace after {:?}; \
                 the engine has not configured its network (e.g. `ctr run` without --cni, or a \
                 failed CNI plugin): no host NAT, and the certificate has no IP SAN",
                i.network_wait
            ));
        }
        return (State::WaitingForNetwork, None);
    }
    match i.phase {
        Phase::Running { .. } => (State::Ready, None),
        _ => (State::Starting, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn base() -> Inputs<'static> {
        Inputs {
            phase: Phase::Running {
                since: Instant::now(),
            },
            network: Network::Namespace,
            has_ip: true,
            without_ip_for: Duration::ZERO,
            network_wait: Duration::from_secs(30),
            nat_error: None,
            rotation_error: None,
            envoy_error: None,
            ingress_error: None,
            stopping: false,
        }
    }

    #[test]
    fn running_with_network_is_ready() {
        assert_eq!(decide(&base()), (State::Ready, None));
        let probing = Inputs {
            phase: Phase::Probing {
                since: Instant::now(),
            },
            ..base()
        };
        assert_eq!(decide(&probing).0, State::Starting);
    }

    #[test]
    fn no_address_waits_then_degrades_with_the_likely_cause() {
        let waiting = Inputs {
            has_ip: false,
            without_ip_for: Duration::from_secs(29),
            ..base()
        };
        assert_eq!(decide(&waiting), (State::WaitingForNetwork, None));
        let late = Inputs {
            without_ip_for: Duration::from_secs(30),
            ..waiting
        };
        let (s, why) = decide(&late);
        assert_eq!(s, State::Degraded);
        let why = why.unwrap();
        assert!(
            why.contains("no IPv4 or IPv6 address") && why.contains("--cni"),
            "{why}"
        );
    }

    #[test]
    fn host_network_never_waits_for_an_address() {
        let host = Inputs {
            network: Network::Host,
            has_ip: false,
            without_ip_for: Duration::from_secs(3600),
            ..base()
        };
        assert_eq!(decide(&host), (State::Ready, None));
    }

    #[test]
    fn each_fault_degrades_with_its_reason() {
        let cases = [
            (
                Inputs {
                    phase: Phase::Down { at: Instant::now() },
                    envoy_error: Some("starting proxy.envoy_path /x: denied"),
                    ..base()
                },
                "Envoy cannot start: starting proxy.envoy_path /x: denied",
            ),
            (
                Inputs {
                    phase: Phase::Killing {
                        since: Instant::now(),
                    },
                    envoy_error: Some("handshake reset"),
                    ..base()
                },
                "readiness failing: handshake reset",
            ),
            (
                Inputs {
                    nat_error: Some("nft rejected"),
                    ..base()
                },
                "NAT failed: nft rejected",
            ),
            (
                Inputs {
                    rotation_error: Some("CA key unreadable"),
                    ..base()
                },
                "rotation failing: CA key unreadable",
            ),
            (
                Inputs {
                    ingress_error: Some("nft rejected"),
                    nat_error: Some("also"),
                    ..base()
                },
                "ingress filter: nft rejected",
            ),
        ];
        for (i, want) in cases {
            assert_eq!(decide(&i), (State::Degraded, Some(want.to_string())));
        }
    }

    #[test]
    fn stopping_wins_over_everything() {
        let i = Inputs {
            stopping: true,
            nat_error: Some("x"),
            ..base()
        };
        assert_eq!(decide(&i), (State::Stopping, None));
    }

    #[test]
    fn the_first_start_is_not_a_fault() {
        let i = Inputs {
            phase: Phase::Down { at: Instant::now() },
            ..base()
        };
        assert_eq!(decide(&i), (State::Starting, None));
    }
}
