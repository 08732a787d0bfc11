//! `envoy-sidecar gc`: compare what the product holds (state under `state_dir`, NAT
//! elements, supervisor and Envoy processes, Envoy cgroups) with the containers runc
//! still knows, and remove what belongs to containers that no longer exist — after a
//! crashed hook, a killed supervisor, a containerd restart, or a reboot that wiped
//! `/run` but not the nftables table.
//!
//! Three steps: `observe` reads the host (through the `Host` seam), `plan` decides —
//! a pure function from what was seen to a typed list of actions, unit-tested without
//! root — and `apply` carries the actions out (not with `--dry-run`).
//!
//! A container younger than the grace period is left alone: between the wrapper
//! recording its state and runc creating it, runc does not know it yet.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::host::Host;
use crate::nat::{Applied, Mapping};
use crate::sidecar::control::{self, Paths, Record};
use crate::state::index::{Index, Stale};
use crate::state::store::{self, Lock, Store};
use crate::sys::cgroup::SidecarCgroup;
use crate::sys::process::ProcId;

/// runc's own default `--root`.
pub const RUNC_DEFAULT_ROOT: &str = "/run/runc";
/// How long a stray process gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

pub struct Options<'a> {
    pub dry_run: bool,
    pub grace: Duration,
    /// This configuration's host port pool: NAT elements outside it are not ours.
    pub pool: std::ops::RangeInclusive<u16>,
    /// This configuration's Envoy uid pool (the allocation index is made for it).
    pub uid_pool: std::ops::RangeInclusive<u32>,
    /// The configuration file, handed to supervisors gc restarts.
    pub config: Option<&'a Path>,
}

/// One container with state, as observed.
#[derive(Debug, Clone, Default)]
pub struct SeenContainer {
    pub namespace: String,
    pub id: String,
    pub age: Duration,
    /// Whether runc knows it; `None` when not asked (younger than the grace period).
    pub runc_knows: Option<bool>,
    /// `started_at` is set: the wrapper after create, or the poststart hook, started
    /// the sidecar (it should be supervised).
    pub started: bool,
    /// Its init process still exists.
    pub init_running: bool,
    pub host_ports: Vec<u16>,
    /// The Envoy uid its state records.
    pub envoy_uid: u32,
    /// `nat.json`: what was mapped for it.
    pub applied: Vec<Mapping>,
    pub record: Record,
    /// Whether the recorded supervisor is still alive.
    pub supervisor_alive: bool,
    /// A pod's proxy: its members (older than the grace period) runc no longer knows.
    pub gone_members: Vec<String>,
}

/// A container directory without a state file (a create that died early).
#[derive(Debug, Clone)]
pub struct SeenDir {
    pub namespace: String,
    pub id: String,
    pub dir: PathBuf,
    pub age: Duration,
    pub record: Record,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Supervisor,
    Envoy,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Kind::Supervisor => "supervisor",
            Kind::Envoy => "envoy",
        })
    }
}

/// A supervisor or Envoy of this state root, found in the process table.
#[derive(Debug, Clone)]
pub struct SeenProcess {
    pub proc: ProcId,
    pub namespace: String,
    pub id: String,
    pub kind: Kind,
}

/// An Envoy child cgroup found on the host.
#[derive(Debug, Clone)]
pub struct SeenCgroup {
    pub namespace: String,
    pub id: String,
    pub cgroup: SidecarCgroup,
    /// The container's own cgroup still has processes.
    pub container_busy: bool,
}

/// Everything gc decides from.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub containers: Vec<SeenContainer>,
    pub interrupted: Vec<SeenDir>,
    pub nat: Vec<Mapping>,
    pub processes: Vec<SeenProcess>,
    pub cgroups: Vec<SeenCgroup>,
    /// Host-wide uid leases this state directory may remove: its own whose owner has
    /// no state recording the uid, and unreadable ones past the grace period.
    pub stale_leases: Vec<u32>,
    /// `<state_dir>/.admin/<uid>` directories, by uid.
    pub admin_dirs: Vec<(u32, PathBuf)>,
}

/// What gc does, one action each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A running container's supervisor died: start a new one (it takes over Envoy).
    RestartSupervisor {
        namespace: String,
        id: String,
        why: String,
    },
    /// runc no longer knows the container: stop its sidecar, unmap it, drop its state.
    RemoveContainer {
        namespace: String,
        id: String,
        supervisor: Option<i32>,
        envoy: Option<i32>,
        mappings: usize,
    },
    /// A directory without state (an interrupted create): tear down and remove it.
    RemoveInterrupted {
        namespace: String,
        id: String,
        dir: PathBuf,
    },
    /// A NAT element in our pool that no container claims.
    RemoveNat(Mapping),
    /// The allocation index disagrees with the state files: rewrite it from them.
    RebuildIndex { reasons: Vec<String> },
    /// Pod-member markers (`<state_dir>/.pods/<ns>/<id>`) no pod record confirms: a
    /// create or a leave that died between marker and record.
    RemovePodMarkers { paths: Vec<PathBuf> },
    /// A supervisor or Envoy of a container without state.
    Kill {
        proc: ProcId,
        kind: Kind,
        namespace: String,
        id: String,
    },
    /// Envoy cgroups of a container without state whose own cgroup is empty.
    RemoveCgroups {
        namespace: String,
        id: String,
        cgroup: SidecarCgroup,
    },
    /// An Envoy uid lease whose owner no longer holds the uid (a create that died, a
    /// state wiped): taken over by the next create anyway, removed so that the lease
    /// directory lists only uids in use.
    RemoveLease { uid: u32 },
    /// `<state_dir>/.admin/<uid>` of a uid no container's state records (its stop did
    /// not finish).
    RemoveAdminDir { uid: u32, dir: PathBuf },
    /// Containers of a live pod that runc no longer knows (deleted without the
    /// wrapper seeing it): out of the pod's member list. The pod keeps its proxy.
    PruneMembers {
        namespace: String,
        id: String,
        members: Vec<String>,
    },
}

fn pid_or_dash(p: Option<i32>) -> String {
    p.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Action::RestartSupervisor { namespace, id, why } => {
                write!(f, "restarting the supervisor of {namespace}/{id} ({why})")
            }
            Action::RemoveContainer {
                namespace,
                id,
                supervisor,
                envoy,
                mappings,
            } => write!(
                f,
                "container {namespace}/{id} is gone: stopping its sidecar (supervisor {}, envoy {}), removing {mappings} NAT mappings and its state",
                pid_or_dash(*supervisor),
                pid_or_dash(*envoy)
            ),
            Action::RemoveInterrupted { dir, .. } => write!(
                f,
                "removing {} (no state: an interrupted create)",
                dir.display()
            ),
            Action::RemoveNat(m) => write!(
                f,
                "removing NAT mapping host port {} -> {} (no container claims it)",
                m.host_port,
                std::net::SocketAddr::new(m.container_ip, m.container_port)
            ),
            Action::RemoveLease { uid } => write!(
                f,
                "removing the lease of Envoy uid {uid} (its owner holds it no more)"
            ),
            Action::RemoveAdminDir { uid, dir } => write!(
                f,
                "removing {} (no container has Envoy uid {uid})",
                dir.display()
            ),
            Action::RebuildIndex { reasons } => write!(
                f,
                "rebuilding the allocation index from the state files ({})",
                reasons.join("; ")
            ),
            Action::RemovePodMarkers { paths } => write!(
                f,
                "removing {} pod-member marker(s) no pod record lists: {}",
                paths.len(),
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Action::Kill {
                proc,
                kind,
                namespace,
                id,
            } => write!(
                f,
                "killing {kind} pid {} of {namespace}/{id} (no state)",
                proc.pid
            ),
            Action::RemoveCgroups {
                namespace,
                id,
                cgroup,
            } => write!(
                f,
                "removing cgroups {:?} of {namespace}/{id} (no state)",
                cgroup.dirs
            ),
            Action::PruneMembers {
                namespace,
                id,
                members,
            } => write!(
                f,
                "pod {namespace}/{id}: {} gone, out of its members (the pod keeps its proxy)",
                members.join(",")
            ),
        }
    }
}

/// What gc did (or, with `dry_run`, would do), and what failed.
#[derive(Debug, Default)]
pub struct Report {
    pub actions: Vec<Action>,
    /// Actions that failed, with the reason (every other action was still carried out).
    pub failures: Vec<(Action, Error)>,
}

fn since(t: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or(Duration::ZERO)
}

fn age(created_at: &str, now: SystemTime) -> Duration {
    humantime::parse_rfc3339(created_at)
        .map(|t| since(t, now))
        .unwrap_or(Duration::MAX)
}

/// Read everything gc decides from. runc is asked only about containers older than
/// `grace` (one `runc state` each); nothing is changed.
pub fn observe(store: &Store, host: &Host, grace: Duration) -> Result<Observed> {
    let now = host.clock.wall();
    let mut o = Observed::default();
    // One `runc list` per runc root, not one `runc state` per container.
    let mut known = crate::runc::query::Listing::new(host.runc.as_ref());
    for s in store.list()? {
        let paths = Paths::new(store, &s.namespace, &s.id);
        let record = paths.read_record().ok().flatten().unwrap_or_default();
        let root = s
            .runc_root
            .clone()
            .unwrap_or_else(|| PathBuf::from(RUNC_DEFAULT_ROOT));
        let gone_members = s
            .pod
            .iter()
            .flat_map(|p| &p.members)
            .filter(|m| age(&m.joined_at, now) >= grace && !known.knows(&root, &m.id))
            .map(|m| m.id.clone())
            .collect();
        let age = age(&s.created_at, now);
        o.containers.push(SeenContainer {
            gone_members,
            runc_knows: (age >= grace).then(|| known.knows(&root, &s.id)),
            started: s.started_at.is_some(),
            init_running: s.init_pid.is_some_and(|p| host.procs.exists(p)),
            host_ports: s.host_ports().collect(),
            envoy_uid: s.envoy_uid,
            applied: Applied::read(&paths.nat())
                .ok()
                .flatten()
                .unwrap_or_default()
                .mappings,
            supervisor_alive: record.supervisor.is_some_and(|p| host.procs.alive(&p)),
            record,
            age,
            namespace: s.namespace,
            id: s.id,
        });
    }
    for (ns, id) in dirs_without_state(store)? {
        let dir = store.dir(&ns, &id);
        let age = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .map(|t| since(t, now))
            .unwrap_or(Duration::MAX);
        let record = Paths::new(store, &ns, &id)
            .read_record()
            .ok()
            .flatten()
            .unwrap_or_default();
        o.interrupted.push(SeenDir {
            namespace: ns,
            id,
            dir,
            age,
            record,
        });
    }
    o.nat = host.nat.list()?;
    for (proc, args) in host.procs.scan() {
        let found = supervisor_args(&args, store.root())
            .map(|(n, i)| (n, i, Kind::Supervisor))
            .or_else(|| envoy_args(&args, store.root()).map(|(n, i)| (n, i, Kind::Envoy)));
        if let Some((namespace, id, kind)) = found {
            o.processes.push(SeenProcess {
                proc,
                namespace,
                id,
                kind,
            });
        }
    }
    for f in host.cgroups.envoy_children() {
        o.cgroups.push(SeenCgroup {
            container_busy: host.cgroups.container_busy(&f.cgroup),
            namespace: f.namespace,
            id: f.id,
            cgroup: f.cgroup,
        });
    }
    o.stale_leases = store.leases().stale(store.root());
    o.admin_dirs = std::fs::read_dir(store.root().join(crate::state::layout::ADMIN_DIR))
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                Some((e.file_name().to_str()?.parse().ok()?, e.path()))
            })
            .collect()
        })
        .unwrap_or_default();
    o.admin_dirs.sort_unstable();
    Ok(o)
}

/// Decide, from what was seen, what to remove and what to restart. Pure.
pub fn plan(seen: &Observed, grace: Duration, pool: &std::ops::RangeInclusive<u16>) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut live = Vec::new();
    // Processes and cgroups a teardown below already covers (by its record).
    let mut covered_procs: BTreeSet<ProcId> = BTreeSet::new();
    let mut covered_cgroups: Vec<&SidecarCgroup> = Vec::new();
    let mut covered_nat: BTreeSet<Mapping> = BTreeSet::new();

    // 1. Containers: kept while young or known to runc, else removed.
    for c in &seen.containers {
        let young = c.age < grace;
        if young || c.runc_knows == Some(true) {
            // A running container whose supervisor died (killed, OOM): its Envoy
            // would serve on unsupervised and never get a rotated certificate.
            if !young && c.started && c.init_running && !c.supervisor_alive {
                let why = match c.record.supervisor {
                    Some(p) => format!("supervisor pid {} is gone", p.pid),
                    None => "no supervisor recorded".into(),
                };
                actions.push(Action::RestartSupervisor {
                    namespace: c.namespace.clone(),
                    id: c.id.clone(),
                    why,
                });
            }
            if !c.gone_members.is_empty() {
                actions.push(Action::PruneMembers {
                    namespace: c.namespace.clone(),
                    id: c.id.clone(),
                    members: c.gone_members.clone(),
                });
            }
            live.push(c);
            continue;
        }
        actions.push(Action::RemoveContainer {
            namespace: c.namespace.clone(),
            id: c.id.clone(),
            supervisor: c.record.supervisor.map(|p| p.pid),
            envoy: c.record.envoy.map(|p| p.pid),
            mappings: c.applied.len(),
        });
        covered_procs.extend(c.record.supervisor.into_iter().chain(c.record.envoy));
        covered_cgroups.push(&c.record.cgroup);
        covered_nat.extend(c.applied.iter().copied());
    }

    // 2. Directories of creates that died before writing their state.
    for d in seen.interrupted.iter().filter(|d| d.age >= grace) {
        actions.push(Action::RemoveInterrupted {
            namespace: d.namespace.clone(),
            id: d.id.clone(),
            dir: d.dir.clone(),
        });
        covered_procs.extend(d.record.supervisor.into_iter().chain(d.record.envoy));
        covered_cgroups.push(&d.record.cgroup);
    }
    let young_dirs: BTreeSet<(&str, &str)> = seen
        .interrupted
        .iter()
        .filter(|d| d.age < grace)
        .map(|d| (d.namespace.as_str(), d.id.as_str()))
        .collect();

    // 3. NAT elements no live container claims (state lost, table kept). A live
    //    container between claiming a port and recording its NAT keeps it.
    let claimed: BTreeSet<Mapping> = live
        .iter()
        .flat_map(|c| c.applied.iter().copied())
        .chain(covered_nat)
        .collect();
    let live_ports: BTreeSet<u16> = live
        .iter()
        .flat_map(|c| c.host_ports.iter().copied())
        .collect();
    for m in &seen.nat {
        if pool.contains(&m.host_port) && !claimed.contains(m) && !live_ports.contains(&m.host_port)
        {
            actions.push(Action::RemoveNat(*m));
        }
    }

    // 4. Supervisors and Envoys of containers without (live) state.
    let known: BTreeSet<(&str, &str)> = live
        .iter()
        .map(|c| (c.namespace.as_str(), c.id.as_str()))
        .chain(young_dirs.iter().copied())
        .collect();
    for p in &seen.processes {
        if known.contains(&(p.namespace.as_str(), p.id.as_str())) || covered_procs.contains(&p.proc)
        {
            continue;
        }
        actions.push(Action::Kill {
            proc: p.proc,
            kind: p.kind,
            namespace: p.namespace.clone(),
            id: p.id.clone(),
        });
    }

    // 5. Envoy cgroups of containers without state whose own cgroup is empty (the
    //    container is gone; a live container's init is still in it).
    for g in &seen.cgroups {
        if known.contains(&(g.namespace.as_str(), g.id.as_str()))
            || g.container_busy
            || covered_cgroups.contains(&&g.cgroup)
        {
            continue;
        }
        actions.push(Action::RemoveCgroups {
            namespace: g.namespace.clone(),
            id: g.id.clone(),
            cgroup: g.cgroup.clone(),
        });
    }

    // 6. Leases and admin socket directories of uids no state records. Any state,
    //    young or removed above: a removal releases its own lease and directory.
    let uids: BTreeSet<u32> = seen.containers.iter().map(|c| c.envoy_uid).collect();
    for &uid in seen.stale_leases.iter().filter(|u| !uids.contains(u)) {
        actions.push(Action::RemoveLease { uid });
    }
    for (uid, dir) in seen.admin_dirs.iter().filter(|(u, _)| !uids.contains(u)) {
        actions.push(Action::RemoveAdminDir {
            uid: *uid,
            dir: dir.clone(),
        });
    }
    actions
}

/// Carry the actions out. Every action is attempted; those that fail are returned
/// with their error.
pub fn apply(
    store: &Store,
    lock: &Lock,
    host: &Host,
    config: Option<&Path>,
    actions: &[Action],
) -> Vec<(Action, Error)> {
    let mut failures = Vec::new();
    let mut removed = remove_batched(store, lock, host, actions);
    for (i, a) in actions.iter().enumerate() {
        let r = match a {
            Action::RestartSupervisor { namespace, id, .. } => {
                control::launch(host.procs.as_ref(), config, store, namespace, id)
            }
            Action::RemoveContainer { .. }
            | Action::RemoveInterrupted { .. }
            | Action::RemoveNat(_) => removed.remove(&i).unwrap_or(Ok(())),
            // Checked and carried out by `run`, after everything else.
            Action::RebuildIndex { .. } | Action::RemovePodMarkers { .. } => Ok(()),
            Action::Kill { proc, .. } => {
                if host.procs.alive(proc) {
                    host.procs.terminate(proc, KILL_GRACE);
                }
                Ok(())
            }
            Action::RemoveCgroups { cgroup, .. } => host.cgroups.kill_and_remove(cgroup),
            Action::RemoveLease { uid } => {
                store.leases().remove_stale(*uid, store.root()).map(drop)
            }
            Action::RemoveAdminDir { dir, .. } => crate::sys::fs::remove_dir_all_if_exists(dir),
            Action::PruneMembers {
                namespace,
                id,
                members,
            } => store.prune_members_locked(lock, namespace, id, members),
        };
        if let Err(e) = r {
            failures.push((a.clone(), e));
        }
    }
    failures
}

/// The removals of `actions` (containers, interrupted creates, stray NAT elements),
/// with their outcomes. Each sidecar is stopped on its own, but all their NAT elements
/// go in one removal (one walk of the conntrack table, not one per container), then
/// their state. If that batch fails, each container's NAT is removed on its own, so
/// that the failure is reported against the container it belongs to.
fn remove_batched(
    store: &Store,
    lock: &Lock,
    host: &Host,
    actions: &[Action],
) -> std::collections::BTreeMap<usize, Result<()>> {
    let mut out = std::collections::BTreeMap::new();
    let stray: Vec<(usize, Mapping)> = actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Action::RemoveNat(m) => Some((i, *m)),
            _ => None,
        })
        .collect();
    let mut gone: Vec<(usize, &str, &str)> = Vec::new();
    for (i, a) in actions.iter().enumerate() {
        if let Action::RemoveContainer { namespace, id, .. }
        | Action::RemoveInterrupted { namespace, id, .. } = a
        {
            match control::stop(store, host, namespace, id) {
                Ok(()) => gone.push((i, namespace, id)),
                Err(e) => {
                    out.insert(i, Err(e));
                }
            }
        }
    }
    let mut all: Vec<Mapping> = stray.iter().map(|(_, m)| *m).collect();
    for (_, ns, id) in &gone {
        let nat = Paths::new(store, ns, id).nat();
        if let Ok(Some(applied)) = Applied::read(&nat) {
            all.extend(applied.mappings);
        }
    }
    let batch = host.nat.remove(&all);
    // Stray elements: reported once, with the first.
    if let Some((first, _)) = stray.first() {
        let r = match &batch {
            Ok(()) => Ok(()),
            Err(_) => host
                .nat
                .remove(&stray.iter().map(|(_, m)| *m).collect::<Vec<_>>()),
        };
        out.insert(*first, r);
    }
    for (a, ns, id) in gone {
        let unmapped = match &batch {
            Ok(()) => crate::sys::fs::remove_if_exists(&Paths::new(store, ns, id).nat()),
            Err(_) => control::remove_nat(store, host.nat.as_ref(), ns, id),
        };
        out.insert(
            a,
            unmapped.and_then(|()| store.remove_locked(lock, ns, id).map(drop)),
        );
    }
    out
}

pub fn run(store: &Store, host: &Host, o: &Options) -> Result<Report> {
    let lock = store.lock()?;
    let seen = observe(store, host, o.grace)?;
    let mut actions = plan(&seen, o.grace, &o.pool);
    let mut failures = if o.dry_run {
        Vec::new()
    } else {
        apply(store, &lock, host, o.config, &actions)
    };
    // After the removals (which keep the index in step): does it match the files?
    let truth = store.rebuild_index(&o.uid_pool)?;
    let reasons = index_disagreement(store.stored_index()?, &truth, &o.uid_pool);
    if !reasons.is_empty() {
        let a = Action::RebuildIndex { reasons };
        if !o.dry_run
            && let Err(e) = store.write_index(&lock, &truth)
        {
            failures.push((a.clone(), e));
        }
        actions.push(a);
    }
    let stale = store.stale_pod_markers();
    if !stale.is_empty() {
        let a = Action::RemovePodMarkers { paths: stale };
        if !o.dry_run
            && let Action::RemovePodMarkers { paths } = &a
            && let Err(e) = store.remove_pod_markers_locked(&lock, paths)
        {
            failures.push((a.clone(), e));
        }
        actions.push(a);
    }
    Ok(Report { actions, failures })
}

/// Why the stored index (its last change settled) is not the union of the state
/// files; empty when it is. A missing index on a host without containers is fine.
pub fn index_disagreement(
    stored: std::result::Result<Index, Stale>,
    truth: &Index,
    uid_pool: &std::ops::RangeInclusive<u32>,
) -> Vec<String> {
    match stored {
        Ok(ix) if ix.uid_base != *uid_pool.start() || ix.uids.len() != truth.uids.len() => {
            vec![Stale::OtherUidPool.to_string()]
        }
        Ok(ix) => ix.differences(truth),
        Err(Stale::Missing) if truth.containers == 0 => Vec::new(),
        Err(stale) => vec![format!("index {stale}")],
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

    // ---- plan: every case the fault suite covers, without root ----

    use std::net::Ipv4Addr;

    const GRACE: Duration = Duration::from_secs(60);
    const POOL: std::ops::RangeInclusive<u16> = 61001..=65534;
    const UIDS: std::ops::RangeInclusive<u32> = 2_000_000_000..=2_000_065_535;
    const OLD: Duration = Duration::from_secs(3600);

    fn proc(pid: i32) -> ProcId {
        ProcId { pid, start_time: 7 }
    }

    fn map(host_port: u16, last: u8, container_port: u16) -> Mapping {
        Mapping {
            host_port,
            container_ip: std::net::IpAddr::V4(Ipv4Addr::new(203, 0, 113, last)),
            container_port,
            host_ip: None,
        }
    }

    fn cg(id: &str) -> SidecarCgroup {
        SidecarCgroup {
            dirs: vec![PathBuf::from(format!(
                "/sys/fs/cgroup/memory/ns/{id}/envoy-sidecar"
            ))],
        }
    }

    /// A started, running, supervised container runc knows, with NAT applied.
    fn running(id: &str, last: u8, port: u16) -> SeenContainer {
        SeenContainer {
            namespace: "ns".into(),
            id: id.into(),
            age: OLD,
            runc_knows: Some(true),
            started: true,
            init_running: true,
            host_ports: vec![port],
            envoy_uid: 2_000_000_000 + u32::from(last),
            applied: vec![map(port, last, 61001)],
            record: Record {
                supervisor: Some(proc(100 + last as i32)),
                envoy: Some(proc(200 + last as i32)),
                cgroup: cg(id),
                ..Record::default()
            },
            supervisor_alive: true,
            gone_members: vec![],
        }
    }

    fn healthy() -> Observed {
        let a = running("a", 1, 61010);
        Observed {
            nat: a.applied.clone(),
            processes: vec![
                SeenProcess {
                    proc: proc(101),
                    namespace: "ns".into(),
                    id: "a".into(),
                    kind: Kind::Supervisor,
                },
                SeenProcess {
                    proc: proc(201),
                    namespace: "ns".into(),
                    id: "a".into(),
                    kind: Kind::Envoy,
                },
            ],
            cgroups: vec![SeenCgroup {
                namespace: "ns".into(),
                id: "a".into(),
                cgroup: cg("a"),
                container_busy: true,
            }],
            containers: vec![a],
            interrupted: vec![],
            stale_leases: vec![],
            admin_dirs: vec![(2_000_000_001, PathBuf::from("/run/es/.admin/2000000001"))],
        }
    }

    #[test]
    fn plan_prunes_a_live_pods_gone_containers_and_keeps_its_proxy() {
        let mut seen = healthy();
        seen.containers[0].gone_members = vec!["c-old".into()];
        assert_eq!(
            plan(&seen, GRACE, &POOL),
            vec![Action::PruneMembers {
                namespace: "ns".into(),
                id: "a".into(),
                members: vec!["c-old".into()],
            }]
        );
    }

    #[test]
    fn observe_finds_pod_members_runc_forgot_after_the_grace_only() {
        use crate::state::store::{Member, Pod};
        let root = crate::state::store::tests::tempdir("gc-members");
        let store = Store::with_leases(root.join("state"), root.join("leases"));
        let mut s = crate::state::store::tests::sample("ns", "sb", store.root(), (61010, None));
        let m = |id: &str, joined: &str| Member {
            id: id.into(),
            name: None,
            requested_bytes: None,
            declares_ports: true,
            joined_at: joined.into(),
        };
        s.pod = Some(Pod {
            name: None,
            members: vec![
                m("kept", "2026-01-01T00:00:00Z"),
                m("gone", "2026-01-01T00:00:00Z"),
                // The fake clock's now.
                m("young", "2027-01-15T08:00:00Z"),
            ],
        });
        crate::state::store::tests::record(&store, &s);
        let fakes = crate::host::fake::Fakes {
            runc: std::rc::Rc::new(crate::runc::query::FakeRunc {
                known: vec![
                    (PathBuf::from(RUNC_DEFAULT_ROOT), "sb".into()),
                    (PathBuf::from(RUNC_DEFAULT_ROOT), "kept".into()),
                ],
            }),
            ..Default::default()
        };
        let host = fakes.host();
        let o = observe(&store, &host, GRACE).unwrap();
        assert_eq!(o.containers[0].gone_members, ["gone"]);
        let lock = store.lock().unwrap();
        let failed = apply(&store, &lock, &host, None, &plan(&o, GRACE, &POOL));
        assert!(failed.is_empty(), "{failed:?}");
        drop(lock);
        let ids: Vec<String> = store
            .read("ns", "sb")
            .unwrap()
            .unwrap()
            .pod
            .unwrap()
            .members
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["kept", "young"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn plan_sweeps_leases_and_admin_dirs_no_state_records() {
        let mut seen = healthy();
        // 2000000001 is container a's: kept even if its lease looked stale (a state
        // written between the two looks).
        seen.stale_leases = vec![2_000_000_001, 2_000_000_007];
        seen.admin_dirs
            .push((2_000_000_009, PathBuf::from("/run/es/.admin/2000000009")));
        assert_eq!(
            plan(&seen, GRACE, &POOL),
            vec![
                Action::RemoveLease { uid: 2_000_000_007 },
                Action::RemoveAdminDir {
                    uid: 2_000_000_009,
                    dir: PathBuf::from("/run/es/.admin/2000000009")
                },
            ]
        );
    }

    #[test]
    fn plan_healthy_host_does_nothing() {
        assert_eq!(plan(&healthy(), GRACE, &POOL), vec![]);
    }

    #[test]
    fn plan_vanished_container_is_removed_with_what_its_record_covers() {
        let mut seen = healthy();
        seen.containers[0].runc_knows = Some(false);
        seen.containers[0].init_running = false;
        seen.cgroups[0].container_busy = false;
        let actions = plan(&seen, GRACE, &POOL);
        assert_eq!(
            actions,
            vec![Action::RemoveContainer {
                namespace: "ns".into(),
                id: "a".into(),
                supervisor: Some(101),
                envoy: Some(201),
                mappings: 1,
            }],
            "its recorded processes, cgroup and NAT go with the teardown, not twice"
        );
        assert!(actions[0].to_string().contains("ns/a is gone"));
    }

    #[test]
    fn plan_young_container_is_left_alone_even_unknown_to_runc() {
        let mut seen = healthy();
        seen.containers[0].age = Duration::from_secs(5);
        seen.containers[0].runc_knows = None;
        seen.containers[0].supervisor_alive = false;
        assert_eq!(plan(&seen, GRACE, &POOL), vec![]);
    }

    #[test]
    fn plan_dead_supervisor_is_restarted() {
        let mut seen = healthy();
        seen.containers[0].supervisor_alive = false;
        seen.processes.remove(0);
        let actions = plan(&seen, GRACE, &POOL);
        assert_eq!(
            actions,
            vec![Action::RestartSupervisor {
                namespace: "ns".into(),
                id: "a".into(),
                why: "supervisor pid 101 is gone".into(),
            }]
        );
        assert!(
            actions[0]
                .to_string()
                .starts_with("restarting the supervisor of ns/a")
        );
        // Never recorded one at all: also restarted, and said so.
        seen.containers[0].record.supervisor = None;
        assert!(matches!(&plan(&seen, GRACE, &POOL)[0],
            Action::RestartSupervisor { why, .. } if why == "no supervisor recorded"));
    }

    #[test]
    fn plan_does_not_restart_what_is_not_running() {
        let mut seen = healthy();
        seen.containers[0].supervisor_alive = false;
        seen.containers[0].init_running = false; // stopped, not yet deleted
        assert_eq!(plan(&seen, GRACE, &POOL), vec![]);
        seen.containers[0].init_running = true;
        seen.containers[0].started = false; // created, never started
        assert_eq!(plan(&seen, GRACE, &POOL), vec![]);
    }

    #[test]
    fn plan_orphan_envoy_and_supervisor_without_state_are_killed() {
        let mut seen = healthy();
        for (pid, kind) in [(301, Kind::Envoy), (302, Kind::Supervisor)] {
            seen.processes.push(SeenProcess {
                proc: proc(pid),
                namespace: "ns".into(),
                id: "ghost".into(),
                kind,
            });
        }
        let actions = plan(&seen, GRACE, &POOL);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert_eq!(
            actions[0].to_string(),
            "killing envoy pid 301 of ns/ghost (no state)"
        );
        assert!(matches!(
            actions[1],
            Action::Kill {
                kind: Kind::Supervisor,
                ..
            }
        ));
    }

    #[test]
    fn plan_unrecorded_process_of_a_vanished_container_is_killed_too() {
        let mut seen = healthy();
        seen.containers[0].runc_knows = Some(false);
        seen.processes.push(SeenProcess {
            proc: proc(999),
            namespace: "ns".into(),
            id: "a".into(),
            kind: Kind::Envoy,
        });
        let actions = plan(&seen, GRACE, &POOL);
        assert!(matches!(actions[0], Action::RemoveContainer { .. }));
        assert_eq!(
            actions[1..],
            [Action::Kill {
                proc: proc(999),
                kind: Kind::Envoy,
                namespace: "ns".into(),
                id: "a".into()
            }]
        );
    }

    #[test]
    fn plan_stray_nat_element_in_pool_is_removed_others_kept() {
        let mut seen = healthy();
        let stray = map(61020, 9, 61001);
        let foreign = map(8080, 9, 80); // outside our pool: another tool's
        let claimed_port_unrecorded = map(61010, 9, 61002); // live container's port
        seen.nat.extend([stray, foreign]);
        assert_eq!(plan(&seen, GRACE, &POOL), vec![Action::RemoveNat(stray)]);
        // A live container that claimed a port but has not recorded its NAT yet keeps it.
        seen.containers[0].applied.clear();
        seen.nat = vec![claimed_port_unrecorded];
        assert_eq!(plan(&seen, GRACE, &POOL), vec![]);
    }

    #[test]
    fn plan_leftover_cgroup_is_removed_only_when_its_container_is_empty() {
        let mut seen = healthy();
        seen.cgroups.push(SeenCgroup {
            namespace: "ns".into(),
            id: "gone".into(),
            cgroup: cg("gone"),
            container_busy: false,
        });
        seen.cgroups.push(SeenCgroup {
            namespace: "ns".into(),
            id: "other-tool".into(),
            cgroup: cg("other-tool"),
            container_busy: true,
        });
        assert_eq!(
            plan(&seen, GRACE, &POOL),
            vec![Action::RemoveCgroups {
                namespace: "ns".into(),
                id: "gone".into(),
                cgroup: cg("gone"),
            }]
        );
    }

    #[test]
    fn plan_interrupted_create_removed_after_grace_only() {
        let mut seen = healthy();
        seen.interrupted.push(SeenDir {
            namespace: "ns".into(),
            id: "half".into(),
            dir: PathBuf::from("/run/envoy-sidecar/ns/half"),
            age: Duration::from_secs(1),
            record: Record::default(),
        });
        seen.processes.push(SeenProcess {
            proc: proc(400),
            namespace: "ns".into(),
            id: "half".into(),
            kind: Kind::Supervisor,
        });
        assert_eq!(plan(&seen, GRACE, &POOL), vec![], "still being created");
        seen.interrupted[0].age = OLD;
        let actions = plan(&seen, GRACE, &POOL);
        assert_eq!(
            actions[0].to_string(),
            "removing /run/envoy-sidecar/ns/half (no state: an interrupted create)"
        );
        assert!(matches!(actions[1], Action::Kill { .. }));
    }

    // ---- apply, against the fake host ----

    #[test]
    fn apply_carries_out_each_action_through_the_host() {
        use crate::host::fake::Fakes;
        use crate::nat::Backend;
        let dir = crate::state::store::tests::tempdir("gc-apply");
        let store = Store::new(&dir);
        let fakes = Fakes::default();
        let host = fakes.host();
        let stray = map(61020, 9, 61001);
        let keep = map(61010, 1, 61001);
        fakes.nat.add(&[stray, keep]).unwrap();
        let orphan = fakes.procs.add(301, &["/usr/local/bin/envoy"]);
        fakes
            .cgroups
            .found
            .borrow_mut()
            .push(crate::sys::cgroup::Found {
                namespace: "ns".into(),
                id: "gone".into(),
                cgroup: cg("gone"),
            });
        let actions = vec![
            Action::RemoveNat(stray),
            Action::Kill {
                proc: orphan,
                kind: Kind::Envoy,
                namespace: "ns".into(),
                id: "ghost".into(),
            },
            Action::RemoveCgroups {
                namespace: "ns".into(),
                id: "gone".into(),
                cgroup: cg("gone"),
            },
            Action::RestartSupervisor {
                namespace: "ns".into(),
                id: "a".into(),
                why: "test".into(),
            },
        ];
        let lock = store.lock().unwrap();
        let failures = apply(&store, &lock, &host, None, &actions);
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(fakes.nat.list().unwrap(), vec![keep]);
        assert_eq!(*fakes.procs.terminated.borrow(), vec![orphan]);
        assert_eq!(*fakes.cgroups.removed.borrow(), vec![cg("gone")]);
        let spawned = fakes.procs.spawned.borrow();
        assert_eq!(spawned.len(), 1);
        assert_eq!(spawned[0][..], ["supervise", "a", "--namespace", "ns"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn observe_and_run_on_a_fake_host_remove_a_vanished_container() {
        use crate::host::fake::Fakes;
        use crate::nat::Backend;
        let dir = crate::state::store::tests::tempdir("gc-run");
        let store = Store::new(&dir);
        let st = crate::state::store::tests::sample("ns", "gone", &dir, (61010, None));
        crate::state::store::tests::record(&store, &st);
        let paths = Paths::new(&store, "ns", "gone");
        let sup = ProcId {
            pid: 4242,
            start_time: 1,
        };
        paths
            .write_record(&Record {
                supervisor: Some(sup),
                ..Record::default()
            })
            .unwrap();
        let m = map(st.ports[0].external_tls_proxy, 3, 61001);
        crate::sys::fs::write_json_atomic(&paths.nat(), &Applied { mappings: vec![m] }, 0o600)
            .unwrap();
        let fakes = Fakes::default();
        fakes.nat.add(&[m]).unwrap();
        let host = fakes.host();
        let o = Options {
            dry_run: true,
            grace: Duration::ZERO,
            pool: POOL,
            uid_pool: UIDS,
            config: None,
        };
        let seen = observe(&store, &host, o.grace).unwrap();
        assert_eq!(seen.containers.len(), 1);
        assert_eq!(seen.containers[0].runc_knows, Some(false));
        assert_eq!(seen.containers[0].applied, vec![m]);
        // Dry run: reported, nothing touched.
        let r = run(&store, &host, &o).unwrap();
        assert!(matches!(
            r.actions[..],
            [Action::RemoveContainer { mappings: 1, .. }]
        ));
        assert_eq!(fakes.nat.list().unwrap(), vec![m]);
        assert!(store.read("ns", "gone").unwrap().is_some());
        // For real: NAT element, state and record gone.
        let r = run(
            &store,
            &host,
            &Options {
                dry_run: false,
                ..o
            },
        )
        .unwrap();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(fakes.nat.list().unwrap(), vec![]);
        assert!(store.read("ns", "gone").unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn run_rewrites_an_index_that_disagrees_with_the_state_files() {
        use crate::host::fake::Fakes;
        let dir = crate::state::store::tests::tempdir("gc-index");
        let store = Store::new(&dir);
        let root = dir.join("runc-root");
        let mut st = crate::state::store::tests::sample("ns", "alive", &dir, (61010, None));
        st.runc_root = Some(root.clone());
        crate::state::store::tests::record(&store, &st);
        // A state file written behind the index's back (an older version, by hand).
        let mut other = crate::state::store::tests::sample("ns", "other", &dir, (61011, None));
        other.runc_root = Some(root.clone());
        other.envoy_uid += 1;
        std::fs::create_dir_all(store.dir("ns", "other")).unwrap();
        store.write(&other).unwrap();
        let fakes = Fakes {
            runc: std::rc::Rc::new(crate::runc::query::FakeRunc {
                known: vec![
                    (root.clone(), "alive".into()),
                    (root.clone(), "other".into()),
                ],
            }),
            ..Fakes::default()
        };
        let host = fakes.host();
        let o = Options {
            dry_run: true,
            grace: Duration::ZERO,
            pool: POOL,
            uid_pool: UIDS,
            config: None,
        };
        let r = run(&store, &host, &o).unwrap();
        let [Action::RebuildIndex { reasons }] = &r.actions[..] else {
            panic!("{:?}", r.actions);
        };
        assert!(reasons.iter().any(|m| m.contains("61011")), "{reasons:?}");
        let real = Options {
            dry_run: false,
            ..o
        };
        let r = run(&store, &host, &real).unwrap();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(r.actions.len(), 1);
        let lock = store.lock().unwrap();
        assert!(store.index(&lock, &UIDS).unwrap().port_taken(61011));
        drop(lock);
        assert!(run(&store, &host, &real).unwrap().actions.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn observe_asks_runc_once_per_root() {
        use crate::host::fake::Fakes;
        let dir = crate::state::store::tests::tempdir("gc-list");
        let store = Store::new(&dir);
        let root = dir.join("runc-root");
        std::fs::create_dir_all(&root).unwrap();
        for (id, port, uid) in [("alive", 61010, 0), ("gone", 61012, 1)] {
            let mut st = crate::state::store::tests::sample("ns", id, &dir, (port, None));
            st.runc_root = Some(root.clone());
            st.envoy_uid += uid;
            crate::state::store::tests::record(&store, &st);
        }
        let fakes = Fakes {
            runc: std::rc::Rc::new(crate::runc::query::FakeRunc {
                known: vec![(root.clone(), "alive".into())],
            }),
            ..Fakes::default()
        };
        let seen = observe(&store, &fakes.host(), Duration::ZERO).unwrap();
        let knows: Vec<(&str, Option<bool>)> = seen
            .containers
            .iter()
            .map(|c| (c.id.as_str(), c.runc_knows))
            .collect();
        assert_eq!(knows, [("alive", Some(true)), ("gone", Some(false))]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
