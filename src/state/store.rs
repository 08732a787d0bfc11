//! Per-container state under `<state_dir>/<namespace>/<id>/`, the host-wide lock
//! that serialises allocation between concurrent `create`s (separate processes), and
//! the allocation index beside them (`index`).
//!
//! The state files *are* the allocation records; the index is their union, kept so
//! that a create reads and writes a constant amount. Every change of the set of state
//! files goes through `create` and `remove` here, under the lock, with the index
//! written first (see `index` for why that is crash-safe).

use std::fs::{self, File};
use std::io::ErrorKind;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::state::index::{self, Claim, INDEX_FILE, Index, Stale};
use crate::state::leases::{LEASE_DIR, Leases, Owner};
use crate::sys::fault;
use crate::sys::fs as fsutil;

pub const STATE_FILE: &str = "state.json";
pub const CREDENTIALS_DIR: &str = "credentials";
const LOCK_FILE: &str = ".lock";
const STATE_VERSION: u32 = 1;

/// One entry of `CF_INSTANCE_PORTS`, field order as the reference prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub internal_tls_proxy: u16,
    pub external_tls_proxy: u16,
    pub internal: u16,
    /// Absent when unproxied port mappings are disabled.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub external: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// What the user asked for; `None` = no limit.
    pub requested_bytes: Option<u64>,
    /// What the container got (requested + additional); `None` = no limit.
    pub limit_bytes: Option<u64>,
    pub additional_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub version: u32,
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    /// Configuration file the container was created with (hooks reuse it).
    pub config: Option<PathBuf>,
    pub instance_guid: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub app_guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub space_guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub org_guid: Option<String>,
    pub ports: Vec<PortMapping>,
    /// Allocated and reported whatever the admin listener; Envoy listens on it only
    /// when `admin_socket` is `None`.
    pub admin_port: u16,
    /// Envoy's admin API as a unix socket (`[proxy] admin_listener = "unix"`, the
    /// default); `None`: on `127.0.0.1:admin_port` in the container's netns.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub admin_socket: Option<PathBuf>,
    /// ALPN Envoy advertises: "h2,http/1.1", "http/1.1" or "none".
    pub alpn: String,
    pub host_ip: IpAddr,
    pub memory: Memory,
    pub user: User,
    /// The uid (and gid) this container's Envoy runs as, unique among live containers.
    pub envoy_uid: u32,
    pub credentials_dir: PathBuf,
    /// runc's `--root` at create; `None`: runc's default.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub runc_root: Option<PathBuf>,
    pub created_at: String,
    /// Set by the createRuntime hook.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub init_pid: Option<i32>,
    /// Set by the poststart hook.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<String>,
    /// A Kubernetes pod's proxy (this record is the pod sandbox's): its containers.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<Pod>,
    /// The ingress filter's nft table when it is not [`crate::nat::ingress::TABLE`]:
    /// a container that joined a network namespace another proxied container filters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_table: Option<String>,
    /// App ports whose host ports are published on these host addresses only
    /// (nerdctl's `-p ADDR:H:C`); absent: on every address.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub host_ips: std::collections::BTreeMap<u16, Vec<IpAddr>>,
}

/// The proxy of a CRI pod: one per pod network namespace, keyed by the sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pod {
    /// `<namespace>/<name>` of the Kubernetes pod, when CRI says.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// The pod's containers that took the pod's proxy (`CF_INSTANCE_*`, credentials).
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// The memory limit the container asked for (not raised under CRI: Envoy's
    /// allocation is the RuntimeClass overhead); `None`: no limit.
    #[serde(default)]
    pub requested_bytes: Option<u64>,
    /// Whether its own spec declares ports (a stopping signal to it drains the proxy).
    #[serde(default)]
    pub declares_ports: bool,
    /// When its create took the pod's proxy (RFC 3339; gc leaves young ones alone).
    #[serde(default)]
    pub joined_at: String,
}

impl ContainerState {
    pub fn host_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports
            .iter()
            .flat_map(|p| [Some(p.external_tls_proxy), p.external])
            .flatten()
    }
}

pub struct Store {
    root: PathBuf,
    leases: Leases,
}

/// Held while allocating; released on drop.
pub struct Lock(#[allow(dead_code)] File);

impl Store {
    /// The store under `root`, with the host-wide uid leases at their default place.
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store::with_leases(root, LEASE_DIR)
    }

    pub fn with_leases(root: impl Into<PathBuf>, lease_dir: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            leases: Leases::new(lease_dir),
        }
    }

    /// The store a configuration names (`runtime.state_dir`, `runtime.uid_lease_dir`).
    pub fn of(cfg: &crate::config::Config) -> Store {
        Store::with_leases(&cfg.runtime.state_dir, &cfg.runtime.uid_lease_dir)
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Who holds a lease for `ns/id` of this store.
    pub fn owner(&self, ns: &str, id: &str) -> Owner {
        Owner {
            state_dir: self.root.clone(),
            namespace: ns.into(),
            id: id.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, ns: &str, id: &str) -> PathBuf {
        self.root.join(ns).join(id)
    }

    /// Exclusive host-wide lock. The state root is created root-only.
    pub fn lock(&self) -> Result<Lock> {
        fsutil::lock_in(&self.root, LOCK_FILE).map(Lock)
    }

    pub fn read(&self, ns: &str, id: &str) -> Result<Option<ContainerState>> {
        let path = self.dir(ns, id).join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => parse_state(&path, &bytes).map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    /// Every state file under the root. A directory without `state.json` (a create that
    /// died before writing it) claims nothing.
    pub fn list(&self) -> Result<Vec<ContainerState>> {
        let mut out = Vec::new();
        for ns in read_dir_names(&self.root)? {
            let ns_dir = self.root.join(&ns);
            if !ns_dir.is_dir() {
                continue;
            }
            for id in read_dir_names(&ns_dir)? {
                if let Some(s) = self.read(&ns, &id)? {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }

    /// The pod record (in `ns`) that lists container `id` among its members. Asked on
    /// every `delete` and `kill` of an id with no record of its own (`ctr run --rm`
    /// deletes twice), so it must not read every record: the member's marker
    /// (`<state_dir>/.pods/<ns>/<id>`, naming its pod) gives the one record to read,
    /// and that record, the source of truth, confirms it. Without the markers
    /// directory (a state dir from before markers, until the next create writes them)
    /// every record of the namespace is read, as before.
    pub fn pod_of_member(&self, ns: &str, id: &str) -> Result<Option<ContainerState>> {
        if !self.markers_kept() {
            return self.scan_pod_of_member(ns, id);
        }
        let marker = self.marker(ns, id);
        let pod = match fs::read_to_string(&marker) {
            Ok(p) => p,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Io {
                    path: marker,
                    source: e,
                });
            }
        };
        // A marker is a hint: one naming no valid id, a record gone, or one that no
        // longer lists the member (a leave that died before clearing it) is not a pod.
        let pod = pod.trim();
        if check_id(pod).is_err() {
            return Ok(None);
        }
        Ok(self
            .read(ns, pod)
            .ok()
            .flatten()
            .filter(|s| lists_member(s, id)))
    }

    fn scan_pod_of_member(&self, ns: &str, id: &str) -> Result<Option<ContainerState>> {
        for other in read_dir_names(&self.root.join(ns))? {
            // A record being removed meanwhile, or unreadable, is not this one's pod.
            if let Ok(Some(s)) = self.read(ns, &other)
                && lists_member(&s, id)
            {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    fn markers_root(&self) -> PathBuf {
        self.root.join(crate::state::layout::POD_MARKERS_DIR)
    }

    fn marker(&self, ns: &str, member: &str) -> PathBuf {
        self.markers_root().join(ns).join(member)
    }

    /// Whether pod-member markers are kept in this state dir (written by every create
    /// since they exist; see [`Store::ensure_markers_locked`]).
    fn markers_kept(&self) -> bool {
        self.markers_root().is_dir()
    }

    /// Start keeping markers (the first create of a state dir, or the first after an
    /// upgrade): one for every member of every pod record, written into a fresh
    /// directory that is then renamed into place, so that `pod_of_member` switches
    /// from the scan to the markers only when they are complete.
    fn ensure_markers_locked(&self, _lock: &Lock) -> Result<()> {
        let root = self.markers_root();
        if root.is_dir() {
            return Ok(());
        }
        let tmp = self
            .root
            .join(format!("{}.tmp", crate::state::layout::POD_MARKERS_DIR));
        fsutil::remove_dir_all_if_exists(&tmp)?;
        let build = || -> Result<()> {
            fs::DirBuilder::new().mode(0o700).create(&tmp).at(&tmp)?;
            for s in self.list()? {
                for m in s.pod.iter().flat_map(|p| &p.members) {
                    write_marker(&tmp.join(&s.namespace).join(&m.id), &s.id)?;
                }
            }
            fs::rename(&tmp, &root).at(&root)
        };
        // Not fatal: without markers `pod_of_member` scans, which is right, only slower
        // (a record that does not parse, say, until gc or its delete removes it).
        if let Err(e) = build() {
            tracing::warn!(error = %e, "pod-member markers not written; lookups scan the records");
            let _ = fsutil::remove_dir_all_if_exists(&tmp);
        }
        Ok(())
    }

    /// Markers of members that joined pod record `s` (before the record lists them).
    fn mark_members(&self, s: &ContainerState) -> Result<()> {
        for m in s.pod.iter().flat_map(|p| &p.members) {
            let path = self.marker(&s.namespace, &m.id);
            if fs::read_to_string(&path).is_ok_and(|p| p.trim() == s.id) {
                continue;
            }
            write_marker(&path, &s.id)?;
        }
        Ok(())
    }

    /// Remove the markers of `members` that still name pod `pod` (after its record no
    /// longer lists them); best effort: a marker left behind is only a hint that
    /// `pod_of_member` checks, and gc removes it.
    fn unmark_members<'a>(&self, ns: &str, pod: &str, members: impl Iterator<Item = &'a str>) {
        for m in members {
            let path = self.marker(ns, m);
            if fs::read_to_string(&path).is_ok_and(|p| p.trim() == pod) {
                let _ = fs::remove_file(&path);
            }
        }
        let _ = fs::remove_dir(self.markers_root().join(ns));
    }

    /// Markers that name no pod record listing their member (a create or leave that
    /// died between marker and record): for gc.
    pub fn stale_pod_markers(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.markers_root();
        for ns in read_dir_names(&root).unwrap_or_default() {
            for member in read_dir_names(&root.join(&ns)).unwrap_or_default() {
                if !matches!(self.pod_of_member(&ns, &member), Ok(Some(_))) {
                    out.push(root.join(&ns).join(member));
                }
            }
        }
        out
    }

    /// Remove markers [`Store::stale_pod_markers`] returned (gc, holding the lock).
    pub fn remove_pod_markers_locked(&self, _lock: &Lock, paths: &[PathBuf]) -> Result<()> {
        for p in paths {
            fsutil::remove_if_exists(p)?;
            if let Some(dir) = p.parent() {
                let _ = fs::remove_dir(dir);
            }
        }
        Ok(())
    }

    /// Take `gone` out of the members of pod record `ns/pod` (gc, holding the lock).
    pub fn prune_members_locked(
        &self,
        _lock: &Lock,
        ns: &str,
        pod: &str,
        gone: &[String],
    ) -> Result<()> {
        let Some(mut s) = self.read(ns, pod)? else {
            return Ok(());
        };
        if let Some(p) = s.pod.as_mut() {
            p.members.retain(|m| !gone.contains(&m.id));
        }
        self.write(&s)
    }

    /// Take `id` out of its pod's members (its `delete`); whether it was one.
    pub fn leave_pod(&self, ns: &str, id: &str) -> Result<bool> {
        let lock = self.lock()?;
        let Some(pod) = self.pod_of_member(ns, id)? else {
            return Ok(false);
        };
        self.prune_members_locked(&lock, ns, &pod.id, &[id.to_string()])?;
        Ok(true)
    }

    fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    /// The index as it is on disk, its last change settled; why not, when it cannot
    /// be used. `uid_pool`: `None` accepts any pool (removal needs none).
    fn load_index(
        &self,
        uid_pool: Option<&RangeInclusive<u32>>,
    ) -> Result<std::result::Result<Index, Stale>> {
        let path = self.index_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Err(Stale::Missing)),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let mut ix = match Index::from_json(&bytes, uid_pool, &index::boot_id()) {
            Ok(ix) => ix,
            Err(stale) => return Ok(Err(stale)),
        };
        if let Some(p) = &ix.pending {
            let exists = self.dir(&p.namespace, &p.id).join(STATE_FILE).exists();
            ix.settle(exists);
        }
        Ok(Ok(ix))
    }

    /// The host-wide claims for allocating under `_lock`: the index, or (missing,
    /// unreadable, from another boot or uid pool) a rebuild from every state file.
    pub fn index(&self, _lock: &Lock, uid_pool: &RangeInclusive<u32>) -> Result<Index> {
        match self.load_index(Some(uid_pool))? {
            Ok(ix) => Ok(ix),
            Err(_) => self.rebuild_index(uid_pool),
        }
    }

    /// The union of the state files, as an index (not written).
    pub fn rebuild_index(&self, uid_pool: &RangeInclusive<u32>) -> Result<Index> {
        Ok(Index::rebuild(&self.list()?, uid_pool, &index::boot_id()))
    }

    /// The index on disk with its last change settled, or why it is not usable
    /// (read-only: for `doctor` and `gc`).
    pub fn stored_index(&self) -> Result<std::result::Result<Index, Stale>> {
        self.load_index(None)
    }

    /// Replace the index (gc, after finding it disagrees with the state files).
    pub fn write_index(&self, _lock: &Lock, ix: &Index) -> Result<()> {
        // Not fsynced: a power loss changes the boot id, and an index from another
        // boot is rebuilt.
        fsutil::write_atomic(&self.index_path(), &ix.to_json(), 0o600)
    }

    /// Record a new container: counted in the index (`ix`, from [`Store::index`]),
    /// then its directory (and the credentials directory owned by the container user)
    /// and its state, written atomically.
    pub fn create(&self, lock: &Lock, ix: &mut Index, s: &ContainerState) -> Result<()> {
        self.ensure_markers_locked(lock)?;
        ix.add(&s.namespace, &s.id, Claim::of(s));
        self.write_index(lock, ix)?;
        fault::kill_point("create:index-written");
        let dir = self.dir(&s.namespace, &s.id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .at(&dir)?;
        let creds = &s.credentials_dir;
        match fs::DirBuilder::new().mode(0o500).create(creds) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::Io {
                    path: creds.clone(),
                    source: e,
                });
            }
        }
        std::os::unix::fs::chown(creds, Some(s.user.uid), Some(s.user.gid)).at(creds)?;
        self.write(s)
    }

    /// Write a record. A pod record's members get their markers first and lose
    /// them after (those the previous version listed and this one does not), so a
    /// marker exists for every member the record lists at any moment.
    pub fn write(&self, s: &ContainerState) -> Result<()> {
        let path = self.dir(&s.namespace, &s.id).join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(s).expect("state serialises");
        let Some(pod) = s.pod.as_ref().filter(|_| self.markers_kept()) else {
            return fsutil::write_atomic(&path, &bytes, 0o600);
        };
        let before = self.read(&s.namespace, &s.id).ok().flatten();
        self.mark_members(s)?;
        fsutil::write_atomic(&path, &bytes, 0o600)?;
        let left = before
            .iter()
            .flat_map(|b| b.pod.iter().flat_map(|p| &p.members))
            .filter(|m| !pod.members.iter().any(|n| n.id == m.id))
            .map(|m| m.id.as_str());
        self.unmark_members(&s.namespace, &s.id, left);
        Ok(())
    }

    /// Forget a container: released in the index, then `state.json` removed
    /// (atomically: its claims go with it), then the rest of its directory.
    /// Idempotent. Takes the lock; holders of it call [`Store::remove_locked`].
    pub fn remove(&self, ns: &str, id: &str) -> Result<bool> {
        let lock = self.lock()?;
        self.remove_locked(&lock, ns, id)
    }

    pub fn remove_locked(&self, lock: &Lock, ns: &str, id: &str) -> Result<bool> {
        let dir = self.dir(ns, id);
        let state = dir.join(STATE_FILE);
        // A state file that does not parse still goes; the index is then rebuilt.
        let record = self.read(ns, id).ok().flatten();
        let claim = record.as_ref().map(Claim::of);
        let uid = claim.as_ref().map(|c| c.envoy_uid);
        let existed = state.exists();
        if existed {
            match (claim, self.load_index(None)?) {
                (Some(c), Ok(mut ix)) => {
                    ix.release(ns, id, c);
                    self.write_index(lock, &ix)?;
                    fault::kill_point("remove:index-written");
                }
                // Nothing trustworthy to update: the next create rebuilds it.
                _ => fsutil::remove_if_exists(&self.index_path())?,
            }
        }
        fsutil::remove_if_exists(&state)?;
        // After the state: a lease whose owner has no state is stale anyway.
        if let Some(uid) = uid {
            self.leases.release(uid, &self.owner(ns, id))?;
        }
        fsutil::remove_dir_all_if_exists(&dir)?;
        if let Some(p) = record.as_ref().and_then(|r| r.pod.as_ref()) {
            self.unmark_members(ns, id, p.members.iter().map(|m| m.id.as_str()));
        }
        // An empty namespace directory is noise for `ls` and gc; a concurrent create
        // recreates it (DirBuilder is recursive), and a non-empty one is left alone.
        let _ = fs::remove_dir(self.root.join(ns));
        Ok(existed)
    }
}

fn lists_member(s: &ContainerState, id: &str) -> bool {
    s.pod
        .as_ref()
        .is_some_and(|p| p.members.iter().any(|m| m.id == id))
}

/// A marker: the pod's id, in a root-only directory made on demand.
fn write_marker(path: &Path, pod: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .at(dir)?;
    }
    fsutil::write_atomic(path, pod.as_bytes(), 0o600)
}

fn parse_state(path: &Path, bytes: &[u8]) -> Result<ContainerState> {
    let s: ContainerState = serde_json::from_slice(bytes).map_err(|e| Error::State {
        path: path.to_path_buf(),
        msg: format!(
            "malformed ({e}); it still holds host ports and memory — remove the container or run `envoy-sidecar gc`"
        ),
    })?;
    if s.version != STATE_VERSION {
        return Err(Error::State {
            path: path.to_path_buf(),
            msg: format!("version {} is not {STATE_VERSION}", s.version),
        });
    }
    Ok(s)
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                path: dir.into(),
                source: e,
            });
        }
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e.at(dir)?;
        if let Some(n) = e.file_name().to_str()
            && !n.starts_with('.')
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

pub fn new_state_version() -> u32 {
    STATE_VERSION
}

/// runc's own rule for container ids, which also makes them safe path components.
pub fn check_id(id: &str) -> Result<()> {
    // runc 1.1 (`libcontainer/factory_linux.go` validateID): `^[\w+-\.]+$` — Go's `\w`
    // is ASCII `[0-9A-Za-z_]` and `+-\.` is the range '+'..='.', i.e. `+ , - .` — and
    // `/` + id must be its own `CleanPath`, which refuses exactly `.` and `..`. No
    // length rule: like runc, an id longer than a file name fails at the file system.
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b',' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Args(format!(
            "container id {:?} is invalid; valid (runc's rule): letters, digits, '_', '+', ',', '-', '.', not \".\" or \"..\"",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// containerd's rule for namespace names.
pub fn check_namespace(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= 76
        && ns
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(Error::Args(format!(
            "namespace {:?} is invalid; valid: alphanumerics separated by single '.', '_' or '-'",
            ns.chars().take(80).collect::<String>()
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(
        ns: &str,
        id: &str,
        root: &Path,
        host_ports: (u16, Option<u16>),
    ) -> ContainerState {
        ContainerState {
            version: STATE_VERSION,
            namespace: ns.into(),
            id: id.into(),
            bundle: "/b".into(),
            config: None,
            instance_guid: id.into(),
            app_guid: None,
            space_guid: None,
            org_guid: None,
            ports: vec![PortMapping {
                internal_tls_proxy: 61001,
                external_tls_proxy: host_ports.0,
                internal: 8080,
                external: host_ports.1,
            }],
            admin_port: 61002,
            admin_socket: None,
            alpn: "h2,http/1.1".into(),
            host_ip: "192.0.2.10".parse().unwrap(),
            memory: Memory {
                requested_bytes: Some(100 << 20),
                limit_bytes: Some(132 << 20),
                additional_bytes: 32 << 20,
            },
            user: User {
                uid: nix_uid(),
                gid: nix_gid(),
            },
            envoy_uid: 2_000_000_000,
            credentials_dir: root.join(ns).join(id).join(CREDENTIALS_DIR),
            runc_root: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            init_pid: None,
            started_at: None,
            pod: None,
            ingress_table: None,
            host_ips: Default::default(),
        }
    }

    fn nix_uid() -> u32 {
        crate::sys::process::real_ids().0
    }
    fn nix_gid() -> u32 {
        crate::sys::process::real_ids().1
    }

    pub fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "es-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    const UIDS: RangeInclusive<u32> = 2_000_000_000..=2_000_065_535;

    /// Record through the index, as `create::prepare` does.
    pub fn record(st: &Store, s: &ContainerState) {
        let l = st.lock().unwrap();
        let mut ix = st.index(&l, &UIDS).unwrap();
        st.create(&l, &mut ix, s).unwrap();
    }

    #[test]
    fn index_follows_creates_and_removes() {
        let root = tempdir("store");
        let st = Store::new(&root);
        record(&st, &sample("default", "a", &root, (61001, Some(61002))));
        let mut b = sample("k8s.io", "b", &root, (61003, None));
        b.envoy_uid += 1;
        record(&st, &b);
        // A directory whose create died before writing state claims nothing.
        fs::create_dir_all(root.join("default").join("half")).unwrap();
        let l = st.lock().unwrap();
        let ix = st.index(&l, &UIDS).unwrap();
        assert_eq!(
            ix.ports.members().collect::<Vec<_>>(),
            vec![61001, 61002, 61003]
        );
        assert_eq!(ix.memory_limit_bytes, 264 << 20);
        assert_eq!(ix.containers, 2);
        assert!(ix.differences(&st.rebuild_index(&UIDS).unwrap()).is_empty());
        drop(l);

        assert!(st.remove("default", "a").unwrap());
        assert!(!st.remove("default", "a").unwrap());
        assert_eq!(st.read("default", "a").unwrap(), None);
        assert_eq!(st.list().unwrap().len(), 1);
        let l = st.lock().unwrap();
        let ix = st.index(&l, &UIDS).unwrap();
        assert_eq!(ix.ports.members().collect::<Vec<_>>(), vec![61003]);
        assert_eq!(ix.free_uid(&UIDS), Some(2_000_000_000));
        // Missing or corrupt: rebuilt from the state files.
        fs::remove_file(root.join(INDEX_FILE)).unwrap();
        assert!(st.index(&l, &UIDS).unwrap().same_claims(&ix));
        fs::write(root.join(INDEX_FILE), b"{garbage").unwrap();
        assert!(st.index(&l, &UIDS).unwrap().same_claims(&ix));
        fs::remove_dir_all(&root).unwrap();
    }

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            name: None,
            requested_bytes: None,
            declares_ports: false,
            joined_at: String::new(),
        }
    }

    fn pod_record(root: &Path, id: &str, uid_offset: u32, port: u16) -> ContainerState {
        let mut p = sample("k8s.io", id, root, (port, None));
        p.envoy_uid += uid_offset;
        p.pod = Some(Pod::default());
        p
    }

    fn join(st: &Store, pod: &mut ContainerState, m: &str) {
        pod.pod.as_mut().unwrap().members.push(member(m));
        st.write(pod).unwrap();
    }

    fn pod_id(st: &Store, m: &str) -> Option<String> {
        st.pod_of_member("k8s.io", m).unwrap().map(|s| s.id)
    }

    #[test]
    fn pod_members_are_found_by_their_markers_and_the_markers_follow_the_record() {
        let root = tempdir("store-markers");
        let st = Store::new(&root);
        let mut p = pod_record(&root, "sandbox1", 0, 61001);
        record(&st, &p);
        join(&st, &mut p, "app");
        join(&st, &mut p, "log");
        let marker = root.join(".pods/k8s.io/app");
        assert_eq!(fs::read_to_string(&marker).unwrap(), "sandbox1");
        assert_eq!(pod_id(&st, "app").as_deref(), Some("sandbox1"));
        assert_eq!(pod_id(&st, "log").as_deref(), Some("sandbox1"));
        assert_eq!(pod_id(&st, "other"), None);
        assert_eq!(st.pod_of_member("default", "app").unwrap(), None);

        // A member leaves: its marker goes with it, the other stays.
        assert!(st.leave_pod("k8s.io", "app").unwrap());
        assert!(!marker.exists());
        assert_eq!(pod_id(&st, "app"), None);
        assert_eq!(pod_id(&st, "log").as_deref(), Some("sandbox1"));

        // Found without reading other records: a record that does not parse in the
        // namespace does not get in the way (the scan would skip it too).
        fs::create_dir_all(root.join("k8s.io/broken")).unwrap();
        fs::write(root.join("k8s.io/broken/state.json"), b"{").unwrap();
        assert_eq!(pod_id(&st, "log").as_deref(), Some("sandbox1"));
        fs::remove_dir_all(root.join("k8s.io/broken")).unwrap();

        // The pod record goes: so do its members' markers and the namespace's dir.
        assert!(st.remove("k8s.io", "sandbox1").unwrap());
        assert_eq!(pod_id(&st, "log"), None);
        assert!(root.join(".pods").is_dir());
        assert_eq!(fs::read_dir(root.join(".pods")).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_state_dir_from_before_markers_is_scanned_until_a_create_writes_them() {
        let root = tempdir("store-upgrade");
        let st = Store::new(&root);
        let mut p = pod_record(&root, "sandbox1", 0, 61001);
        record(&st, &p);
        join(&st, &mut p, "app");
        // As an older version left it: pod records, no markers.
        fs::remove_dir_all(root.join(".pods")).unwrap();
        assert_eq!(pod_id(&st, "app").as_deref(), Some("sandbox1"), "scanned");
        // Without markers, a member's join writes none (they come complete, below).
        join(&st, &mut p, "log");
        assert!(!root.join(".pods").exists());
        assert_eq!(pod_id(&st, "log").as_deref(), Some("sandbox1"), "scanned");

        record(&st, &sample("default", "plain", &root, (61002, None)));
        for m in ["app", "log"] {
            assert_eq!(
                fs::read_to_string(root.join(".pods/k8s.io").join(m)).unwrap(),
                "sandbox1"
            );
            assert_eq!(pod_id(&st, m).as_deref(), Some("sandbox1"), "by marker");
        }
        assert!(!root.join(".pods.tmp").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_marker_no_record_confirms_is_no_pod_and_gc_finds_it() {
        let root = tempdir("store-stale-marker");
        let st = Store::new(&root);
        let mut p = pod_record(&root, "sandbox1", 0, 61001);
        record(&st, &p);
        join(&st, &mut p, "app");
        // A join that died after its marker, one naming a pod that is gone, and one
        // whose content is not an id.
        let dir = root.join(".pods/k8s.io");
        fs::write(dir.join("died"), "sandbox1").unwrap();
        fs::write(dir.join("orphan"), "sandbox9").unwrap();
        fs::write(dir.join("garbage"), "../../etc").unwrap();
        for m in ["died", "orphan", "garbage"] {
            assert_eq!(pod_id(&st, m), None, "{m}");
        }
        let mut stale = st.stale_pod_markers();
        stale.sort();
        assert_eq!(
            stale,
            vec![dir.join("died"), dir.join("garbage"), dir.join("orphan")]
        );
        let l = st.lock().unwrap();
        st.remove_pod_markers_locked(&l, &stale).unwrap();
        drop(l);
        assert!(st.stale_pod_markers().is_empty());
        assert_eq!(pod_id(&st, "app").as_deref(), Some("sandbox1"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_create_that_died_after_the_index_is_undone() {
        let root = tempdir("store-died");
        let st = Store::new(&root);
        record(&st, &sample("default", "a", &root, (61001, None)));
        let l = st.lock().unwrap();
        let before = st.index(&l, &UIDS).unwrap();
        // What a create killed between the index write and the state write leaves.
        let mut ix = before.clone();
        let mut ghost = sample("default", "ghost", &root, (61002, None));
        ghost.envoy_uid += 1;
        ix.add("default", "ghost", Claim::of(&ghost));
        st.write_index(&l, &ix).unwrap();
        assert!(st.index(&l, &UIDS).unwrap().same_claims(&before));
        // A remove killed before the state file went: still claimed.
        let a = st.read("default", "a").unwrap().unwrap();
        let mut ix = st.index(&l, &UIDS).unwrap();
        ix.release("default", "a", Claim::of(&a));
        st.write_index(&l, &ix).unwrap();
        assert!(st.index(&l, &UIDS).unwrap().same_claims(&before));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn malformed_state_names_the_file() {
        let root = tempdir("store-bad");
        let st = Store::new(&root);
        fs::create_dir_all(root.join("default/x")).unwrap();
        fs::write(root.join("default/x/state.json"), "{").unwrap();
        let e = st.list().unwrap_err().to_string();
        assert!(
            e.contains("default/x/state.json") && e.contains("gc"),
            "{e}"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ids_and_namespaces() {
        // runc 1.1.5 accepts these (`runc state ID` says "container does not exist")...
        for good in ["abc-1.2_3+x", "a,b", ",", "...", "a..b", ".a", "_", "+"] {
            check_id(good).unwrap();
        }
        // ... and refuses these ("invalid container ID format").
        for bad in [
            "", ".", "..", "a/b", "ab/", "a b", "a\n", "a:b", "\u{c4}", "a\0",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        check_namespace("default").unwrap();
        check_namespace("k8s.io").unwrap();
        for bad in ["", "a..b", "-a", "a/b", "../x"] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
