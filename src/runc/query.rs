//! The real runc, run as a child for the questions the product asks it.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Whether runc knows container `id` (`runc <global flags> state <id>` succeeds).
/// `global` are runc's global flags as the caller was given them (`--root R`, ...).
pub fn knows<S: AsRef<OsStr>>(runc: &Path, global: &[S], id: &str) -> bool {
    Command::new(runc)
        .args(global)
        .args(["state", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The init pid of container `id` if runc says it is running (or created: a pod
/// sandbox's pause is running by the time its containers are created).
pub fn pid_of<S: AsRef<OsStr>>(runc: &Path, global: &[S], id: &str) -> Option<i32> {
    let out = Command::new(runc)
        .args(global)
        .args(["state", id])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let running = matches!(
        v.get("status").and_then(serde_json::Value::as_str),
        Some("running" | "created")
    );
    v.get("pid")
        .and_then(serde_json::Value::as_i64)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| running && *p > 0)
}

/// What the product asks runc: the seam gc's decisions run against (faked in tests).
pub trait RuncQuery {
    /// Whether runc, with state under `root`, knows container `id`.
    fn knows(&self, root: &Path, id: &str) -> bool;
    /// Every container runc knows under `root` (one `runc list`), or `None` if that
    /// could not be told (the caller falls back to `knows`).
    fn list(&self, root: &Path) -> Option<BTreeSet<String>>;
}

/// What runc knows, asked once per root (`runc list`), falling back to `knows` when a
/// root cannot be listed: for callers that ask about many containers (gc, status).
pub struct Listing<'a> {
    runc: &'a dyn RuncQuery,
    roots: std::collections::BTreeMap<PathBuf, Option<BTreeSet<String>>>,
}

impl<'a> Listing<'a> {
    pub fn new(runc: &'a dyn RuncQuery) -> Listing<'a> {
        Listing {
            runc,
            roots: Default::default(),
        }
    }

    pub fn knows(&mut self, root: &Path, id: &str) -> bool {
        let runc = self.runc;
        match self
            .roots
            .entry(root.to_path_buf())
            .or_insert_with(|| runc.list(root))
        {
            Some(ids) => ids.contains(id),
            None => runc.knows(root, id),
        }
    }
}

/// The real runc binary.
#[derive(Debug, Clone)]
pub struct RuncBinary {
    pub path: PathBuf,
}

impl RuncQuery for RuncBinary {
    fn knows(&self, root: &Path, id: &str) -> bool {
        // A missing root (e.g. /run wiped by a reboot) knows nothing.
        root.exists() && knows(&self.path, &[Path::new("--root"), root], id)
    }

    fn list(&self, root: &Path) -> Option<BTreeSet<String>> {
        if !root.exists() {
            return Some(BTreeSet::new());
        }
        let out = Command::new(&self.path)
            .arg("--root")
            .arg(root)
            .args(["list", "-q"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }
}

/// A runc that knows exactly the `(root, id)` pairs it is given.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeRunc {
    pub known: Vec<(PathBuf, String)>,
}

#[cfg(test)]
impl RuncQuery for FakeRunc {
    fn knows(&self, root: &Path, id: &str) -> bool {
        self.known.iter().any(|(r, i)| r == root && i == id)
    }
    fn list(&self, root: &Path) -> Option<BTreeSet<String>> {
        Some(
            self.known
                .iter()
                .filter(|(r, _)| r == root)
                .map(|(_, i)| i.clone())
                .collect(),
        )
    }
}
