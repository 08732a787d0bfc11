//! `envoy-sidecar gc`: compare what the product holds (state under `state_dir`, NAT
//! elements, supervisor and Envoy processes, Envoy cgroups) with the containers runc
//! still knows, and remove what belongs to containers that no longer exist — after a
//! crashed hook, a killed supervisor, a containerd restart, or a reboot that wiped
//! `/run` but not the nftables table.
//!
//! A container younger than the grace period is left alone: between the wrapper
//! recording its state and runc creating it, runc does not know it yet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::nat::{Applied, Mapping, Nat};
use crate::sidecar::control::{self, Paths};
use crate::state::store::{self, ContainerState, Store};
use crate::sys::cgroup::{self, SidecarCgroup};
use crate::sys::process::ProcId;

/// runc's own default `--root`.
const RUNC_DEFAULT_ROOT: &str = "/run/runc";

pub struct Options<'a> {
    pub runc: &'a Path,
    pub dry_run: bool,
    pub grace: Duration,
    /// Root of the cgroup v1 memory/pids hierarchies (tests may point elsewhere).
    pub cgroup_root: &'a Path,
    /// This configuration's host port pool: NAT elements outside it are not ours.
    pub pool: std::ops::RangeInclusive<u16>,
    /// The configuration file, handed to supervisors gc restarts.
    pub config: Option<&'a Path>,
}

/// What gc did (or, with `dry_run`, would do), one line per action.
#[derive(Debug, Default)]
pub struct Report {
    pub actions: Vec<String>,
}

fn exists_in_runc(runc: &Path, root: Option<&Path>, id: &str) -> bool {
    let root = root.unwrap_or(Path::new(RUNC_DEFAULT_ROOT));
    if !root.exists() {
        return false; // e.g. /run wiped by a reboot
    }
    crate::runc::query::knows(runc, &[Path::new("--root"), root], id)
}

fn age(created_at: &str) -> Duration {
    humantime::parse_rfc3339(created_at)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or(Duration::MAX)
}

pub fn run(store: &Store, nat: &Nat, o: &Options) -> Result<Report> {
    let mut r = Report::default();
    let _lock = store.lock()?;

    // 1. State of containers runc no longer knows.
    let mut live: Vec<ContainerState> = Vec::new();
    for s in store.list()? {
        if age(&s.created_at) < o.grace || exists_in_runc(o.runc, s.runc_root.as_deref(), &s.id) {
            // A running container whose supervisor died (killed, OOM): its Envoy
            // would serve on unsupervised and never get a rotated certificate.
            if let Some(dead) = unsupervised(store, &s).filter(|_| age(&s.created_at) >= o.grace) {
                r.actions.push(format!(
                    "restarting the supervisor of {}/{} ({dead})",
                    s.namespace, s.id
                ));
                if !o.dry_run {
                    control::launch(o.config, store, &s.namespace, &s.id)?;
                }
            }
            live.push(s);
            continue;
        }
        let who = format!("{}/{}", s.namespace, s.id);
        let paths = Paths::new(store, &s.namespace, &s.id);
        let rec = paths.read_record().ok().flatten().unwrap_or_default();
        let maps = Applied::read(&paths.nat())
            .ok()
            .flatten()
            .unwrap_or_default();
        r.actions.push(format!(
            "container {who} is gone: stopping its sidecar (supervisor {}, envoy {}), removing {} NAT mappings and its state",
            rec.supervisor.map(|p| p.pid.to_string()).unwrap_or_else(|| "-".into()),
            rec.envoy.map(|p| p.pid.to_string()).unwrap_or_else(|| "-".into()),
            maps.mappings.len()
        ));
        if !o.dry_run {
            control::teardown(store, &s.namespace, &s.id)?;
            store.remove(&s.namespace, &s.id)?;
        }
    }

    // 2. Directories of creates that died before writing their state.
    for (ns, id) in dirs_without_state(store)? {
        let dir = store.dir(&ns, &id);
        let old = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|a| a >= o.grace);
        if old {
            r.actions.push(format!(
                "removing {} (no state: an interrupted create)",
                dir.display()
            ));
            if !o.dry_run {
                control::teardown(store, &ns, &id)?;
                store.remove(&ns, &id)?;
            }
        }
    }

    // 3. NAT elements no live container claims (state lost, table kept).
    let claimed: BTreeSet<Mapping> = live
        .iter()
        .filter_map(|s| {
            Applied::read(&Paths::new(store, &s.namespace, &s.id).nat())
                .ok()
                .flatten()
        })
        .flat_map(|a| a.mappings)
        .collect();
    let live_ports: BTreeSet<u16> = live
        .iter()
        .flat_map(|s| s.host_ports().collect::<Vec<_>>())
        .collect();
    let stray: Vec<Mapping> = nat
        .list()?
        .into_iter()
        // A live container between claiming a port and recording its NAT keeps it.
        .filter(|m| {
            o.pool.contains(&m.host_port)
                && !claimed.contains(m)
                && !live_ports.contains(&m.host_port)
        })
        .collect();
    for m in &stray {
        r.actions.push(format!(
            "removing NAT mapping host port {} -> {}:{} (no container claims it)",
            m.host_port, m.container_ip, m.container_port
        ));
    }
    if !stray.is_empty() && !o.dry_run {
        nat.remove(&stray)?;
    }

    // 4. Supervisors and Envoys of containers without state.
    let known: BTreeSet<(String, String)> = live
        .iter()
        .map(|s| (s.namespace.clone(), s.id.clone()))
        .collect();
    for (pid, ns, id, what) in our_processes(store.root()) {
        if known.contains(&(ns.clone(), id.clone())) {
            continue;
        }
        r.actions
            .push(format!("killing {what} pid {pid} of {ns}/{id} (no state)"));
        if !o.dry_run
            && let Some(p) = ProcId::of(pid)
        {
            p.terminate(Duration::from_secs(2));
        }
    }

    // 5. Envoy cgroups of containers without state whose own cgroup is empty (the
    //    container is gone; a live container's init is still in it).
    for (ns, id, cg) in our_cgroups(o.cgroup_root) {
        if known.contains(&(ns.clone(), id.clone())) || container_cgroup_busy(&cg) {
            continue;
        }
        r.actions.push(format!(
            "removing cgroups {:?} of {ns}/{id} (no state)",
            cg.dirs
        ));
        if !o.dry_run {
            cg.kill_and_remove()?;
        }
    }
    Ok(r)
}

/// Why a started, still running container has no live supervisor, if it has none.
fn unsupervised(store: &Store, s: &ContainerState) -> Option<String> {
    let pid = s.init_pid?;
    s.started_at.as_ref()?;
    if !crate::sys::process::exists(pid) {
        return None; // stopped: nothing to supervise
    }
    let rec = Paths::new(store, &s.namespace, &s.id).read_record().ok()?;
    match rec.and_then(|r| r.supervisor) {
        Some(p) if p.alive() => None,
        Some(p) => Some(format!("supervisor pid {} is gone", p.pid)),
        None => Some("no supervisor recorded".into()),
    }
}

fn dirs_without_state(store: &Store) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let Ok(nss) = std::fs::read_dir(store.root()) else {
        return Ok(out);
    };
    for ns in nss.flatten() {
        let Some(ns_name) = ns.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if ns_name.starts_with('.') || !ns.path().is_dir() {
            continue;
        }
        for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            if let Some(id) = c.file_name().to_str()
                && !id.starts_with('.')
                && c.path().is_dir()
                && !c.path().join(store::STATE_FILE).exists()
            {
                out.push((ns_name.clone(), id.to_string()));
            }
        }
    }
    Ok(out)
}

/// `(pid, namespace, id, what)` for every supervisor (`... supervise ID --namespace NS`)
/// and every Envoy whose bootstrap lies under `state_root/<ns>/<id>/`.
fn our_processes(state_root: &Path) -> Vec<(i32, String, String, &'static str)> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(found) = supervisor_args(&args, state_root) {
            out.push((pid, found.0, found.1, "supervisor"));
        } else if let Some(found) = envoy_args(&args, state_root) {
            out.push((pid, found.0, found.1, "envoy"));
        }
    }
    out
}

/// A supervisor of *this* state root: `envoy-sidecar [--config C] supervise ID --namespace NS`.
/// Supervisors of another configuration's state root are not ours to judge.
fn supervisor_args(args: &[String], state_root: &Path) -> Option<(String, String)> {
    let exe = Path::new(args.first()?).file_name()?.to_str()?;
    if exe != crate::CLI_NAME {
        return None;
    }
    let i = args.iter().position(|a| a == "supervise")?;
    let id = args.get(i + 1)?.clone();
    let ns = args
        .iter()
        .position(|a| a == "--namespace")
        .and_then(|j| args.get(j + 1))
        .cloned()
        .unwrap_or_else(|| "default".into());
    let config = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|j| args.get(j + 1))
        .map(PathBuf::from);
    let root = crate::config::Config::load(config.as_deref())
        .map(|c| c.runtime.state_dir)
        .ok()?;
    (root == state_root).then_some((ns, id))
}

/// Envoy started by us: `-c <state_root>/<ns>/<id>/envoy/bootstrap.json`.
fn envoy_args(args: &[String], state_root: &Path) -> Option<(String, String)> {
    let i = args.iter().position(|a| a == "-c")?;
    let rel = Path::new(args.get(i + 1)?).strip_prefix(state_root).ok()?;
    let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
    let (ns, id) = (parts.next()?, parts.next()?);
    (parts.next().as_deref() == Some(control::ENVOY_DIR)).then_some((ns, id))
}

fn container_cgroup_busy(cg: &SidecarCgroup) -> bool {
    cg.dirs
        .first()
        .and_then(|d| d.parent())
        .is_some_and(|parent| {
            std::fs::read_to_string(parent.join("cgroup.procs")).is_ok_and(|t| !t.trim().is_empty())
        })
}

/// Envoy child cgroups under `<root>/memory/<ns>/<id>/envoy-sidecar` (the layout
/// containerd's `/<ns>/<id>` cgroups path gives), with their pids counterparts.
fn our_cgroups(root: &Path) -> Vec<(String, String, SidecarCgroup)> {
    let mut out = Vec::new();
    let mem = root.join("memory");
    for ns in std::fs::read_dir(&mem).into_iter().flatten().flatten() {
        for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let child = c.path().join(cgroup::CHILD);
            if !child.is_dir() {
                continue;
            }
            let (ns_name, id) = (
                ns.file_name().to_string_lossy().into_owned(),
                c.file_name().to_string_lossy().into_owned(),
            );
            let mut dirs = vec![child];
            let pids = root
                .join("pids")
                .join(&ns_name)
                .join(&id)
                .join(cgroup::CHILD);
            if pids.is_dir() {
                dirs.push(pids);
            }
            out.push((ns_name, id, SidecarCgroup { dirs }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_our_processes_only() {
        let root = Path::new("/run/envoy-sidecar");
        let envoy: Vec<String> = [
            "/usr/local/bin/envoy",
            "-c",
            "/run/envoy-sidecar/k8s.io/c1/envoy/bootstrap.json",
            "--concurrency",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            envoy_args(&envoy, root),
            Some(("k8s.io".into(), "c1".into()))
        );
        let other: Vec<String> = ["/usr/local/bin/envoy", "-c", "/etc/envoy/envoy.yaml"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(envoy_args(&other, root), None);
        let sup: Vec<String> = [
            "/usr/local/bin/envoy-sidecar",
            "supervise",
            "c2",
            "--namespace",
            "n1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Without a config file the built-in state root applies.
        if !Path::new(crate::config::DEFAULT_CONFIG_PATH).exists()
            && std::env::var_os(crate::config::CONFIG_ENV).is_none()
        {
            assert_eq!(
                supervisor_args(&sup, root),
                Some(("n1".into(), "c2".into()))
            );
        }
        let not_ours: Vec<String> = ["/usr/bin/python3", "supervise", "c2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(supervisor_args(&not_ours, root), None);
    }

    #[test]
    fn cgroup_scan() {
        let root = crate::state::store::tests::tempdir("gc-cg");
        std::fs::create_dir_all(root.join("memory/ns1/c1/envoy-sidecar")).unwrap();
        std::fs::create_dir_all(root.join("pids/ns1/c1/envoy-sidecar")).unwrap();
        std::fs::create_dir_all(root.join("memory/ns1/c2")).unwrap();
        let found = our_cgroups(&root);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0.as_str(), found[0].1.as_str()), ("ns1", "c1"));
        assert_eq!(found[0].2.dirs.len(), 2);
        std::fs::remove_dir_all(root).unwrap();
    }
}
