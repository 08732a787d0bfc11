//! The sidecar's lifecycle as seen from outside the supervisor: how the wrapper, the
//! hooks and gc start, drain and stop it, and map its host ports.

use std::path::Path;
use std::time::Duration;

use crate::envoy::admin;
use crate::error::{Error, IoContext, Result};
use crate::host::Host;
use crate::nat::{self, Applied, Mapping};
pub use crate::state::layout::{ENVOY_DIR, Paths};
pub use crate::state::record::Record;
use std::net::IpAddr;

use crate::state::store::{ContainerState, Store};
use crate::sys::fs as fsutil;
use crate::sys::netns::Addresses;
use crate::sys::process::{self, Processes};

/// How long the supervisor gets to stop Envoy and leave after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Start the supervisor for a container, fully detached: own session, stdio to its log
/// file, nothing inherited from runc (runc waits for its hooks' pipes to close).
pub fn launch(
    procs: &dyn Processes,
    config: Option<&Path>,
    store: &Store,
    ns: &str,
    id: &str,
) -> Result<()> {
    let exe = std::env::current_exe().at("/proc/self/exe")?;
    launch_as(procs, &exe, config, store, ns, id)
}

/// [`launch`] from a process that is not the CLI (the wrapper): `exe` is the CLI.
pub fn launch_as(
    procs: &dyn Processes,
    exe: &Path,
    config: Option<&Path>,
    store: &Store,
    ns: &str,
    id: &str,
) -> Result<()> {
    let paths = Paths::new(store, ns, id);
    let mut args = Vec::new();
    if let Some(c) = config {
        args.extend(["--config".to_string(), c.display().to_string()]);
    }
    args.extend(["supervise", id, "--namespace", ns].map(String::from));
    procs
        .spawn_detached(exe, &args, &paths.supervisor_log())
        .map_err(|e| Error::process(format!("starting the supervisor of {ns}/{id}"), e))
}

/// Stop the supervisor and Envoy and empty Envoy's cgroups, so that runc can remove
/// the container's cgroup. Idempotent; works after a supervisor crash (by pid record
/// and by cgroup membership).
pub fn stop(store: &Store, host: &Host, ns: &str, id: &str) -> Result<()> {
    let paths = Paths::new(store, ns, id);
    let Some(rec) = paths.read_record()? else {
        return Ok(());
    };
    if let Some(s) = rec.supervisor {
        host.procs.terminate(&s, STOP_GRACE);
    }
    if let Some(e) = rec.envoy {
        host.procs.terminate(&e, Duration::from_secs(2));
    }
    // The supervisor may have recorded the cgroup after we read the record.
    let rec = paths.read_record()?.unwrap_or(rec);
    host.cgroups.kill_and_remove(&rec.cgroup)?;
    // Envoy is gone: its admin socket directory too (the uid goes back to the pool).
    if let Some(dir) = store
        .read(ns, id)?
        .and_then(|s| s.admin_socket)
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        fsutil::remove_dir_all_if_exists(&dir)?;
    }
    Ok(())
}

/// Ask a container's supervisor to re-issue its credentials now (SIGHUP; it re-reads
/// the CA files first). Returns the supervisor's pid.
pub fn request_rotation(store: &Store, ns: &str, id: &str) -> Result<i32> {
    let what = || {
        Error::Supervisor {
        container: format!("{ns}/{id}"),
        msg: "no running supervisor (not proxied, not started, or stopped; see `envoy-sidecar status`)".into(),
    }
    };
    store.read(ns, id)?.ok_or_else(what)?;
    let sup = Paths::new(store, ns, id)
        .read_record()?
        .and_then(|r| r.supervisor)
        .ok_or_else(what)?;
    if !sup.signal(libc::SIGHUP) {
        return Err(what());
    }
    Ok(sup.pid)
}

/// What a drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// How long the wait for open connections took.
    pub waited: Duration,
    /// Downstream connections still open when the wait ended (0: all finished).
    pub open: u64,
}

/// How often the open connections are counted while waiting.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Ask Envoy to stop accepting new connections (before the app is signalled), then
/// wait up to `wait` until its open downstream connections have finished. Runs in a
/// thread that enters the container's netns, where the admin port is. `Ok(None)`: no
/// proxy or no Envoy running (nothing to drain).
pub fn drain(store: &Store, ns: &str, id: &str, wait: Duration) -> Result<Option<Drained>> {
    let Some(state) = store.read(ns, id)? else {
        return Ok(None);
    };
    let paths = Paths::new(store, ns, id);
    let envoy_up = paths
        .read_record()?
        .and_then(|r| r.envoy)
        .is_some_and(|e| e.alive());
    let Some(pid) = state.init_pid.filter(|_| envoy_up) else {
        return Ok(None);
    };
    let at = admin::Endpoint::of(&state);
    let what = match &at {
        admin::Endpoint::Loopback(_) => format!("/proc/{pid}/ns/net ({at})"),
        admin::Endpoint::Unix(p) => p.display().to_string(),
    };
    let t = std::thread::spawn(move || -> std::io::Result<Drained> {
        // A unix socket is reached from any netns; the loopback port only from the
        // container's.
        if matches!(at, admin::Endpoint::Loopback(_)) {
            process::enter_netns(pid)?;
        }
        admin::drain_listeners(&at, Duration::from_secs(2))?;
        let start = std::time::Instant::now();
        loop {
            let open = if wait.is_zero() {
                0
            } else {
                admin::active_downstream(&at, Duration::from_secs(2))?
            };
            let waited = start.elapsed();
            if open == 0 || waited >= wait {
                return Ok(Drained { waited, open });
            }
            std::thread::sleep(DRAIN_POLL.min(wait - waited));
        }
    });
    let d = t
        .join()
        .map_err(|_| Error::Hook("drain thread panicked".into()))?
        .at(what)?;
    Ok(Some(d))
}

/// The host port mappings of a container at `addrs`: each TLS proxy port and, with
/// unproxied mappings on, each app port, for each of its addresses (IPv4 and IPv6 use
/// the same host ports, in their own tables).
pub fn mappings(state: &ContainerState, addrs: &Addresses) -> Vec<Mapping> {
    let mut maps = Vec::new();
    for ip in addrs.list() {
        maps.extend(mappings_to(state, ip));
    }
    maps
}

fn mappings_to(state: &ContainerState, ip: IpAddr) -> Vec<Mapping> {
    let mut maps = Vec::new();
    for p in &state.ports {
        // Every host address, or only those the user bound (nerdctl `-p ADDR:H:C`) of
        // this address's family. Loopback ones cannot be DNATed to a container (a
        // martian) and get nothing: `status` shows where each port is published.
        let at: Vec<Option<IpAddr>> = match state.host_ips.get(&p.internal) {
            None => vec![None],
            Some(addrs) => addrs
                .iter()
                .filter(|a| a.is_ipv4() == ip.is_ipv4() && !a.is_loopback())
                .map(|a| Some(*a))
                .collect(),
        };
        for host_ip in at {
            if let Some(ext) = p.external {
                maps.push(Mapping {
                    host_port: ext,
                    container_ip: ip,
                    container_port: p.internal,
                    host_ip,
                });
            }
            maps.push(Mapping {
                host_port: p.external_tls_proxy,
                container_ip: ip,
                container_port: p.internal_tls_proxy,
                host_ip,
            });
        }
    }
    maps
}

/// Map the container's host ports to `addrs`, moving them if they pointed at another
/// IP (`nat.json` says what was mapped). Recorded in `nat.json` before the NAT change,
/// so removal deletes exactly what was added even after a crash. Idempotent. Must run
/// in the host's network namespace (the netlink sockets and nft act on the caller's).
pub fn map_to(
    store: &Store,
    nat: &dyn nat::Backend,
    state: &ContainerState,
    addrs: &Addresses,
) -> Result<Vec<Mapping>> {
    let maps = mappings(state, addrs);
    let paths = Paths::new(store, &state.namespace, &state.id);
    let _lock = store.lock()?;
    // What stays in the kernel whatever happens below: the old elements that are
    // still wanted.
    let mut kept: Vec<Mapping> = Vec::new();
    if let Some(old) = Applied::read(&paths.nat())? {
        // Moving: the old elements hold the same host ports. Only what changed goes
        // out, so a new IPv6 address leaves the IPv4 mappings serving throughout.
        let (stay, gone): (Vec<Mapping>, Vec<Mapping>) =
            old.mappings.iter().partition(|m| maps.contains(m));
        nat.remove(&gone)?;
        kept = stay;
    }
    fsutil::write_json_atomic(
        &paths.nat(),
        &Applied {
            mappings: maps.clone(),
        },
        0o600,
    )?;
    if let Err(e) = nat.add(&maps) {
        // All or none: only the kept elements are there; the record says so, so
        // that removal still deletes them.
        let _ = if kept.is_empty() {
            fsutil::remove_if_exists(&paths.nat())
        } else {
            fsutil::write_json_atomic(&paths.nat(), &Applied { mappings: kept }, 0o600)
        };
        return Err(e);
    }
    Ok(maps)
}

/// At poststart, when the container's network is already configured (CRI, nerdctl,
/// a netns made beforehand): map its host ports before `create` returns, so they
/// work from the app's first instruction. Without an address yet (Garden's and
/// `ctr run --cni`'s order) nothing happens here; the supervisor follows the address
/// either way. Must run in the host's network namespace.
pub fn map_if_addressed(
    store: &Store,
    nat: &dyn nat::Backend,
    state: &ContainerState,
    init_pid: i32,
) -> Result<Option<Addresses>> {
    if crate::sys::netns::same(process::self_pid(), init_pid) {
        return Ok(None); // the host's network: nothing to map
    }
    let path = format!("/proc/{init_pid}/ns/net");
    let ns = std::fs::File::open(&path).at(&path)?;
    let addrs = crate::sys::netns::run_in(&ns, crate::sys::netns::addresses).at(&path)?;
    if addrs.is_empty() {
        return Ok(None);
    }
    map_to(store, nat, state, &addrs)?;
    Ok(Some(addrs))
}

/// Remove what `map_to` added. Idempotent. Must run in the host's network namespace.
/// Takes no lock (gc calls it holding the store's): callers stop the supervisor, the
/// only other writer of `nat.json`, first.
pub fn remove_nat(store: &Store, nat: &dyn nat::Backend, ns: &str, id: &str) -> Result<()> {
    let paths = Paths::new(store, ns, id);
    let Some(applied) = Applied::read(&paths.nat())? else {
        return Ok(());
    };
    nat.remove(&applied.mappings)?;
    fsutil::remove_if_exists(&paths.nat())
}

/// Everything of a container's sidecar except its state: processes, cgroups, NAT.
/// Both steps are attempted; the first error is returned.
pub fn teardown(store: &Store, host: &Host, ns: &str, id: &str) -> Result<()> {
    let stopped = stop(store, host, ns, id);
    let unmapped = remove_nat(store, host.nat.as_ref(), ns, id);
    stopped.and(unmapped)
}

/// With unproxied mappings off, only loopback (Envoy) may reach the app ports: the
/// filter goes into the container's netns before the app starts. Failing here fails
/// the create: the container must not run without the protection asked for. A
/// container in the host's network namespace cannot be filtered without filtering
/// the host: it is created, with a warning.
pub fn ingress_filter(s: &ContainerState) -> Result<()> {
    use crate::nat::ingress;
    let Some(pid) = s.init_pid.filter(|_| ingress::wanted(s)) else {
        return Ok(());
    };
    if crate::sys::netns::same(process::self_pid(), pid) {
        tracing::warn!(
            "{}/{} shares the host's network namespace: its app ports are not filtered",
            s.namespace,
            s.id
        );
        return Ok(());
    }
    let ports: Vec<u16> = s.ports.iter().map(|p| p.internal).collect();
    ingress::install(&nat::Nat::default().nft, pid, ingress::table_of(s), &ports)
}

/// The sidecar of a pod whose sandbox (init `pid`) already runs — its proxy set up by
/// a container's annotation, after the sandbox's hooks had nothing to do: what the
/// createRuntime and poststart hooks do for a container of its own, done now, before
/// that container's `create` goes on.
pub fn start_for_running(
    store: &Store,
    host: &Host,
    (cli, config): (&Path, Option<&Path>),
    mut s: ContainerState,
    pid: i32,
) -> Result<()> {
    s.init_pid = Some(pid);
    s.started_at = Some(crate::sys::fs::now_rfc3339());
    store.write(&s)?;
    ingress_filter(&s)?;
    if let Err(e) = map_if_addressed(store, host.nat.as_ref(), &s, pid) {
        tracing::warn!(
            "NAT for {}/{}: {} (the supervisor retries)",
            s.namespace,
            s.id,
            crate::error::render(&e)
        );
    }
    launch_as(host.procs.as_ref(), cli, config, store, &s.namespace, &s.id)
}

/// Each NAT conflict case the create/delete path meets, against the in-memory table
/// with the kernel's rules (`nat::FakeNat`: one element per host port, identical
/// re-adds accepted, a port mapped elsewhere refused all-or-none).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{Backend, FakeNat};
    use crate::state::store::tests::{record, sample, tempdir};

    fn setup(tag: &str) -> (std::path::PathBuf, Store, ContainerState) {
        let root = tempdir(tag);
        let store = Store::new(&root);
        let s = sample("ns", "c1", &root, (61010, Some(61011)));
        record(&store, &s);
        (root, store, s)
    }

    use std::net::{Ipv4Addr, Ipv6Addr};

    const V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
    const IP: Addresses = Addresses {
        v4: Some(V4),
        v6: None,
    };

    fn v4(ip: Ipv4Addr) -> Addresses {
        Addresses {
            v4: Some(ip),
            v6: None,
        }
    }

    #[test]
    fn a_repeated_mapping_is_accepted_and_recorded_once() {
        let (root, store, s) = setup("nat-again");
        let nat = FakeNat::default();
        let first = map_to(&store, &nat, &s, &IP).unwrap();
        let again = map_to(&store, &nat, &s, &IP).unwrap();
        assert_eq!(first, again);
        assert_eq!(nat.list().unwrap().len(), 2);
        let rec = Applied::read(&Paths::new(&store, "ns", "c1").nat()).unwrap();
        assert_eq!(rec.unwrap().mappings, first);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_host_port_mapped_elsewhere_is_refused_and_nothing_is_left() {
        let (root, store, s) = setup("nat-taken");
        let nat = FakeNat::default();
        // A leftover element holds the TLS host port for another IP.
        let other = Mapping {
            host_port: 61010,
            container_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
            container_port: 61001,
            host_ip: None,
        };
        nat.add(&[other]).unwrap();
        let e = map_to(&store, &nat, &s, &IP).unwrap_err().to_string();
        assert!(e.contains("61010") && e.contains("203.0.113.9"), "{e}");
        assert_eq!(nat.list().unwrap(), vec![other], "all or none");
        let rec = Applied::read(&Paths::new(&store, "ns", "c1").nat()).unwrap();
        assert_eq!(rec, None, "no record of what was not applied");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_new_address_moves_the_elements() {
        let (root, store, s) = setup("nat-move");
        let nat = FakeNat::default();
        map_to(&store, &nat, &s, &IP).unwrap();
        let new_ip = Ipv4Addr::new(203, 0, 113, 6);
        let moved = map_to(&store, &nat, &s, &v4(new_ip)).unwrap();
        assert_eq!(nat.list().unwrap(), {
            let mut m = moved.clone();
            m.sort();
            m
        });
        assert!(
            nat.list()
                .unwrap()
                .iter()
                .all(|m| m.container_ip == IpAddr::V4(new_ip))
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_dual_stack_container_gets_each_host_port_in_both_families() {
        let (root, store, s) = setup("nat-dual");
        let nat = FakeNat::default();
        let v6: Ipv6Addr = "2001:db8:e5::5".parse().unwrap();
        let both = Addresses {
            v4: Some(V4),
            v6: Some(v6),
        };
        let maps = map_to(&store, &nat, &s, &both).unwrap();
        assert_eq!(maps.len(), 4, "2 host ports x 2 families: {maps:?}");
        let ports = |f: nat::Family| -> Vec<u16> {
            let mut p: Vec<u16> = nat
                .list()
                .unwrap()
                .iter()
                .filter(|m| m.family() == f)
                .map(|m| m.host_port)
                .collect();
            p.sort_unstable();
            p
        };
        assert_eq!(ports(nat::Family::V4), ports(nat::Family::V6));
        // A new IPv6 address moves the IPv6 elements only.
        let v6b: Ipv6Addr = "2001:db8:e5::6".parse().unwrap();
        let removed = std::cell::RefCell::new(Vec::new());
        let spy = Spy {
            inner: &nat,
            removed: &removed,
        };
        map_to(
            &store,
            &spy,
            &s,
            &Addresses {
                v4: Some(V4),
                v6: Some(v6b),
            },
        )
        .unwrap();
        assert!(
            removed
                .borrow()
                .iter()
                .all(|m| m.container_ip == IpAddr::V6(v6)),
            "only the old IPv6 elements go out: {:?}",
            removed.borrow()
        );
        assert_eq!(removed.borrow().len(), 2);
        assert_eq!(nat.list().unwrap().len(), 4);
        // The address gone altogether: nothing left.
        remove_nat(&store, &nat, "ns", "c1").unwrap();
        assert!(nat.list().unwrap().is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_refused_new_address_leaves_the_kept_mappings_recorded() {
        let (root, store, s) = setup("nat-refused-v6");
        let nat = FakeNat::default();
        let v4_maps = map_to(&store, &nat, &s, &IP).unwrap();
        // A leftover IPv6 element holds the TLS host port for another address.
        let leftover = Mapping {
            host_port: 61010,
            container_ip: "2001:db8:e5::9".parse().unwrap(),
            container_port: 61001,
            host_ip: None,
        };
        nat.add(&[leftover]).unwrap();
        let both = Addresses {
            v4: Some(V4),
            v6: Some("2001:db8:e5::5".parse().unwrap()),
        };
        let e = map_to(&store, &nat, &s, &both).unwrap_err().to_string();
        assert!(e.contains("[2001:db8:e5::9]:61001"), "{e}");
        let rec = Applied::read(&Paths::new(&store, "ns", "c1").nat()).unwrap();
        assert_eq!(
            rec.unwrap().mappings,
            v4_maps,
            "the IPv4 elements are still there"
        );
        remove_nat(&store, &nat, "ns", "c1").unwrap();
        assert_eq!(nat.list().unwrap(), vec![leftover], "nothing of ours left");
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The fake table, noting what was removed.
    struct Spy<'a> {
        inner: &'a FakeNat,
        removed: &'a std::cell::RefCell<Vec<Mapping>>,
    }

    impl nat::Backend for Spy<'_> {
        fn add(&self, maps: &[Mapping]) -> Result<()> {
            self.inner.add(maps)
        }
        fn remove(&self, maps: &[Mapping]) -> Result<()> {
            self.removed.borrow_mut().extend_from_slice(maps);
            self.inner.remove(maps)
        }
        fn list(&self) -> Result<Vec<Mapping>> {
            self.inner.list()
        }
    }

    #[test]
    fn removal_is_idempotent_and_tolerates_elements_already_gone() {
        let (root, store, s) = setup("nat-remove");
        let nat = FakeNat::default();
        let maps = map_to(&store, &nat, &s, &IP).unwrap();
        // Someone (gc, a flush) removed one element already.
        nat.remove(&maps[..1]).unwrap();
        remove_nat(&store, &nat, "ns", "c1").unwrap();
        assert!(nat.list().unwrap().is_empty());
        assert_eq!(
            Applied::read(&Paths::new(&store, "ns", "c1").nat()).unwrap(),
            None
        );
        remove_nat(&store, &nat, "ns", "c1").unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }
}
