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

/// The table of a container that joined a network namespace where another proxied
/// container already filters its own ports (`nerdctl --network container:<id>`): one
/// table each, so neither replaces the other's (an input chain that accepts lets the
/// packet on to the next table's; a reset in any one ends it).
pub fn table_for_joiner(namespace: &str, id: &str) -> String {
    // FNV-1a: short, stable, and nft's name alphabet; recorded in the state, so
    // nothing needs to compute it again.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes().chain([b'/']).chain(id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{TABLE}_{h:016x}")
}

/// The table `state` is filtered by.
pub fn table_of(state: &crate::state::store::ContainerState) -> &str {
    state.ingress_table.as_deref().unwrap_or(TABLE)
}

/// The filter for `app_ports` in `table`, as one nft transaction that replaces any
/// earlier one (add, delete, add: idempotent whether or not the table exists).
pub fn script(table: &str, app_ports: &[u16]) -> String {
    let mut ports: Vec<u16> = app_ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let set = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "add table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
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
pub fn listing(nft: &Path, table: &str) -> Option<String> {
    let o = std::process::Command::new(nft)
        .args(["list", "table", "inet", table])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Install (or replace) the filter in the calling thread's network namespace.
pub fn install_here(nft: &Path, table: &str, app_ports: &[u16]) -> Result<()> {
    super::run_nft(nft, &script(table, app_ports))
}

/// Install the filter in the network namespace of `pid` (nft runs on a thread that
/// entered it: a child inherits the thread's namespace).
pub fn install(nft: &Path, pid: i32, table: &str, app_ports: &[u16]) -> Result<()> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|e| Error::Nat(format!("{path}: {e}")))?;
    let nft = nft.to_path_buf();
    let script = script(table, app_ports);
    crate::sys::netns::run_in(&ns, move || super::run_nft(&nft, &script))
        .map_err(|e| Error::Nat(format!("entering {path}: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_each_app_port_once_and_lets_loopback_in() {
        let s = script(TABLE, &[9999, 8080, 9999]);
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
    fn a_joiner_gets_a_table_of_its_own() {
        let a = table_for_joiner("default", "c1");
        assert!(a.starts_with("envoy_sidecar_ingress_") && a.len() == TABLE.len() + 17);
        assert_eq!(a, table_for_joiner("default", "c1"));
        assert_ne!(a, table_for_joiner("default", "c2"));
        assert_ne!(a, table_for_joiner("other", "c1"));
        let s = script(&a, &[80]);
        assert!(s.contains(&format!("table inet {a} {{")), "{s}");
        assert!(!s.contains("table inet envoy_sidecar_ingress {"), "{s}");
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
