//! Proxied containers that share one network namespace outside a Kubernetes pod:
//! `nerdctl --network container:<id>`, `--network host`, two `ctr run --with-ns` on
//! one bind-mounted namespace. Each keeps an Envoy of its own, so the second one's
//! proxy and admin ports must not be the first one's (it would crash-loop on 61001),
//! nor any port something already listens on there, and its app ports must not be
//! the first one's proxy ports.
//!
//! Who is already there: for the host's namespace and for `/proc/<pid>/ns/net` (a
//! running container's), the records of this store whose init shares the namespace
//! (a scan of the records, paid only by these rare specs); for a bind mount, the
//! listeners in it, and the scan only when something listens there (a namespace CNI
//! or `ctr --cni` just made — every `ctr --cni` create — has none and costs nothing).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::create::spec::NetTarget;
use crate::error::{Error, Result};
use crate::state::store::{ContainerState, Store};

/// A network namespace's identity: its nsfs inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsKey {
    dev: u64,
    ino: u64,
}

pub fn key_of(path: &Path) -> std::io::Result<NetnsKey> {
    let m = std::fs::metadata(path)?;
    Ok(NetnsKey {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// What is already in the namespace a new container joins.
#[derive(Debug, Default)]
pub struct Neighbours {
    /// Ports something listens on there now.
    pub listening: BTreeSet<u16>,
    /// Proxied containers of this store already there.
    pub proxied: Vec<ContainerState>,
}

impl Neighbours {
    /// Not to be a proxy or admin port of the new container.
    pub fn taken(&self, p: u16) -> bool {
        self.listening.contains(&p) || self.proxied.iter().any(|s| ports_of(s).any(|q| q == p))
    }

    /// The neighbour whose proxy or admin port `p` is, and which it is.
    pub fn proxy_port_owner(&self, p: u16) -> Option<(&ContainerState, &'static str)> {
        self.proxied.iter().find_map(|s| {
            if s.admin_port == p {
                Some((s, "Envoy admin port"))
            } else if s.ports.iter().any(|m| m.internal_tls_proxy == p) {
                Some((s, "TLS proxy port"))
            } else {
                None
            }
        })
    }

    /// The refusal for app ports that are a neighbour's proxy ports.
    pub fn check_app_ports(&self, app_ports: &[u16]) -> Result<()> {
        for &p in app_ports {
            if let Some((s, what)) = self.proxy_port_owner(p) {
                return Err(Error::Ports(format!(
                    "app port {p} is the {what} of {}/{}, which shares this container's \
                     network namespace; valid: app ports none of its ports ({}) use",
                    s.namespace,
                    s.id,
                    ports_of(s)
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// A record's ports in its namespace: app, proxy and admin.
fn ports_of(s: &ContainerState) -> impl Iterator<Item = u16> + '_ {
    s.ports
        .iter()
        .flat_map(|m| [m.internal, m.internal_tls_proxy])
        .chain([s.admin_port])
}

/// Who is in `target` (see the module text). A namespace path that cannot be opened
/// is left to runc to report.
pub fn look(target: &NetTarget, store: &Store) -> Neighbours {
    let (key, listening, scan) = match target {
        NetTarget::Fresh => return Neighbours::default(),
        NetTarget::Host => (
            key_of(Path::new("/proc/self/ns/net")),
            crate::sys::listeners::host_tcp_listeners(),
            true,
        ),
        NetTarget::Path(p) => {
            let listening = crate::sys::listeners::tcp_listeners_in(p).unwrap_or_default();
            let of_a_process = p.starts_with("/proc");
            let scan = of_a_process || !listening.is_empty();
            (key_of(p), listening, scan)
        }
    };
    let Ok(key) = key else {
        return Neighbours::default();
    };
    let proxied = if scan {
        in_namespace(store.list().unwrap_or_default(), key, |pid| {
            key_of(Path::new(&format!("/proc/{pid}/ns/net"))).ok()
        })
    } else {
        Vec::new()
    };
    Neighbours { listening, proxied }
}

/// The records whose init is in `key` (`key_of_pid`: a process's namespace, `None`
/// when it is gone).
pub fn in_namespace(
    states: Vec<ContainerState>,
    key: NetnsKey,
    key_of_pid: impl Fn(i32) -> Option<NetnsKey>,
) -> Vec<ContainerState> {
    states
        .into_iter()
        .filter(|s| s.init_pid.and_then(&key_of_pid) == Some(key))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::sample;

    const K: NetnsKey = NetnsKey {
        dev: 4,
        ino: 4026532001,
    };
    const OTHER: NetnsKey = NetnsKey {
        dev: 4,
        ino: 4026532002,
    };

    fn with_pid(id: &str, pid: Option<i32>, ports: (u16, Option<u16>)) -> ContainerState {
        let mut s = sample("default", id, Path::new("/r"), ports);
        s.init_pid = pid;
        s
    }

    #[test]
    fn only_records_whose_init_is_in_the_namespace() {
        let states = vec![
            with_pid("a", Some(10), (61010, None)),
            with_pid("b", Some(11), (61011, None)),
            with_pid("c", None, (61012, None)),
            with_pid("d", Some(12), (61013, None)),
        ];
        let got = in_namespace(states, K, |pid| match pid {
            10 => Some(K),
            11 => Some(OTHER),
            _ => None, // 12: gone
        });
        assert_eq!(got.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn a_neighbours_ports_are_taken_and_its_proxy_ports_refused_as_app_ports() {
        let a = with_pid("a", Some(10), (61010, None));
        let (app, proxy, admin) = (
            a.ports[0].internal,
            a.ports[0].internal_tls_proxy,
            a.admin_port,
        );
        let n = Neighbours {
            listening: [9000].into(),
            proxied: vec![a],
        };
        for p in [app, proxy, admin, 9000] {
            assert!(n.taken(p), "{p}");
        }
        assert!(!n.taken(61999));
        assert!(
            n.check_app_ports(&[app, 9000]).is_ok(),
            "an app's own ports may overlap"
        );
        let e = n.check_app_ports(&[8080, proxy]).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "app port {proxy} is the TLS proxy port of default/a"
            )) && e.contains("valid:"),
            "{e}"
        );
        let e = n.check_app_ports(&[admin]).unwrap_err().to_string();
        assert!(e.contains("Envoy admin port"), "{e}");
        assert!(Neighbours::default().check_app_ports(&[proxy]).is_ok());
    }
}
