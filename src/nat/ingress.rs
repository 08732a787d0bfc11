//! The ingress filter inside a proxied container's network namespace: with unproxied
//! port mappings off, the container's declared app ports accept connections only over
//! loopback (from Envoy, which shares the netns and connects to 127.0.0.1), so the
//! only way in from anywhere else — another container on the bridge, a client routed
//! through the host, the host itself — is TLS through Envoy. The proxy ports, and
//! every port the container did not declare, are left alone.
//!
//! One `inet` table (IPv4 and IPv6) per netns, a handful of rules whatever the number
//! of containers on the host, gone with the netns. It is installed by the
//! createRuntime hook, before the app's first instruction runs.

use std::path::Path;

use crate::error::{Error, Result};

pub const TABLE: &str = "envoy_sidecar_ingress";

/// The filter for `app_ports`, as one nft transaction that replaces any earlier one
/// (add, delete, add: idempotent whether or not the table exists).
pub fn script(app_ports: &[u16]) -> String {
    let mut ports: Vec<u16> = app_ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let set = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "add table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tiif \"lo\" accept\n\
         \t\ttcp dport {{ {set} }} reject with tcp reset\n\
         \t}}\n\
         }}\n"
    )
}

/// Whether a container gets the filter: its app ports have no unproxied host mapping
/// (decided at create and recorded in its state, so a later config change does not
/// open a running container).
pub fn wanted(state: &crate::state::store::ContainerState) -> bool {
    !state.ports.is_empty() && state.ports.iter().all(|p| p.external.is_none())
}

/// The filter as `nft list table` prints it in the calling thread's network
/// namespace; `None` when it is not there.
pub fn listing(nft: &Path) -> Option<String> {
    let o = std::process::Command::new(nft)
        .args(["list", "table", "inet", TABLE])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Install (or replace) the filter in the calling thread's network namespace.
pub fn install_here(nft: &Path, app_ports: &[u16]) -> Result<()> {
    super::run_nft(nft, &script(app_ports))
}

/// Install the filter in the network namespace of `pid` (nft runs on a thread that
/// entered it: a child inherits the thread's namespace).
pub fn install(nft: &Path, pid: i32, app_ports: &[u16]) -> Result<()> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|e| Error::Nat(format!("{path}: {e}")))?;
    let nft = nft.to_path_buf();
    let script = script(app_ports);
    crate::sys::netns::run_in(&ns, move || super::run_nft(&nft, &script))
        .map_err(|e| Error::Nat(format!("entering {path}: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_each_app_port_once_and_lets_loopback_in() {
        let s = script(&[9999, 8080, 9999]);
        assert!(
            s.starts_with("add table inet envoy_sidecar_ingress\ndelete table"),
            "{s}"
        );
        assert!(s.contains("iif \"lo\" accept"), "{s}");
        assert!(
            s.contains("tcp dport { 8080, 9999 } reject with tcp reset"),
            "{s}"
        );
        // Loopback is accepted before the app ports are refused.
        assert!(s.find("iif").unwrap() < s.find("reject").unwrap());
    }

    #[test]
    fn wanted_only_without_unproxied_mappings() {
        let root = Path::new("/nonexistent");
        let mut s = crate::state::store::tests::sample("ns", "c", root, (61001, Some(61002)));
        assert!(!wanted(&s));
        s.ports[0].external = None;
        assert!(wanted(&s));
        s.ports.clear();
        assert!(!wanted(&s));
    }
}
