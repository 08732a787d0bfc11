//! Host-wide leases on Envoy uids: one file per uid in use, in one directory for the
//! whole host (`/run/envoy-sidecar-uids`), whatever the number of configurations and
//! state directories. An Envoy uid reads its container's private key, so two
//! containers must never share one — not even when they belong to two configurations
//! with separate state directories (each with its own allocation index).
//!
//! A lease names its owner (state directory, namespace, id). It is live while the
//! owner's `state.json` exists and records that uid; otherwise (a create that died, a
//! state directory wiped) it is stale and may be taken over — at once by a create of
//! the same state directory (which holds that directory's lock, so the owner cannot be
//! between its claim and its state), by others only after [`LEASE_GRACE`] (the owner
//! may be a create of another configuration that has claimed and not yet written its
//! state). `gc` removes its own state directory's stale leases. Leases live on tmpfs:
//! they go with a reboot, as the containers do.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::ops::RangeInclusive;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Where the leases of every configuration on the host live.
pub const LEASE_DIR: &str = "/run/envoy-sidecar-uids";

/// How long a lease whose owner has no state is still respected by other state
/// directories' creates: far longer than a create takes from its claim to its state.
pub const LEASE_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub state_dir: PathBuf,
    pub namespace: String,
    pub id: String,
}

impl Owner {
    /// Whether the owner still holds `uid`: its state exists and records it.
    fn holds(&self, uid: u32) -> bool {
        let path = self
            .state_dir
            .join(&self.namespace)
            .join(&self.id)
            .join(super::store::STATE_FILE);
        let Ok(bytes) = fs::read(path) else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["envoy_uid"].as_u64())
            == Some(u64::from(uid))
    }
}

#[derive(Debug, Clone)]
pub struct Leases {
    dir: PathBuf,
}

/// Held while choosing a uid (creates under different state directories do not share
/// a store lock).
struct DirLock(#[allow(dead_code)] fs::File);

impl Leases {
    pub fn new(dir: impl Into<PathBuf>) -> Leases {
        Leases { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, uid: u32) -> PathBuf {
        self.dir.join(uid.to_string())
    }

    fn lock(&self) -> Result<DirLock> {
        crate::sys::fs::lock_in(&self.dir, ".lock").map(DirLock)
    }

    /// The owner of `uid`'s lease, if there is one that parses.
    pub fn owner(&self, uid: u32) -> Option<Owner> {
        let bytes = fs::read(self.path(uid)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether `uid`'s lease may be taken over or removed by a holder of
    /// `state_dir`'s lock: its owner does not hold it, and the owner is of that same
    /// state directory or the lease is older than [`LEASE_GRACE`]. An unreadable
    /// lease counts as another directory's.
    fn stale_for(&self, uid: u32, state_dir: &Path) -> bool {
        let owner = self.owner(uid);
        if owner.as_ref().is_some_and(|o| o.holds(uid)) {
            return false;
        }
        if owner.is_some_and(|o| o.state_dir == state_dir) {
            return true;
        }
        let age = fs::metadata(self.path(uid))
            .and_then(|m| m.modified())
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
        age.is_ok_and(|a| a >= LEASE_GRACE)
    }

    /// The uids whose leases a holder of `state_dir`'s lock may remove (gc): stale
    /// ones of that directory, and unreadable ones past the grace period.
    pub fn stale(&self, state_dir: &Path) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut uids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&uid| {
                let mine_or_unknown = self.owner(uid).is_none_or(|o| o.state_dir == state_dir);
                mine_or_unknown && self.stale_for(uid, state_dir)
            })
            .collect();
        uids.sort_unstable();
        uids
    }

    /// Remove `uid`'s lease if it is still stale for `state_dir` (checked again under
    /// the lease lock). Returns whether it was removed.
    pub fn remove_stale(&self, uid: u32, state_dir: &Path) -> Result<bool> {
        let _lock = self.lock()?;
        if !self.path(uid).exists() || !self.stale_for(uid, state_dir) {
            return Ok(false);
        }
        crate::sys::fs::remove_if_exists(&self.path(uid))?;
        Ok(true)
    }

    /// The lowest uid of `pool` that `taken` (this state directory's index) does not
    /// hold and no live lease holds, leased to `owner`. Stale leases are taken over.
    pub fn claim(
        &self,
        pool: &RangeInclusive<u32>,
        taken: impl Fn(u32) -> bool,
        owner: &Owner,
    ) -> Result<Option<u32>> {
        let _lock = self.lock()?;
        let bytes = serde_json::to_vec(owner).expect("an owner serialises");
        for uid in pool.clone().filter(|u| !taken(*u)) {
            let path = self.path(uid);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(&bytes).at(&path)?;
                    return Ok(Some(uid));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    // Ours already (a repeated create of the same container).
                    if self.owner(uid).as_ref() == Some(owner) {
                        return Ok(Some(uid));
                    }
                    if !self.stale_for(uid, &owner.state_dir) {
                        continue;
                    }
                    // Stale: replace it (under the lock).
                    crate::sys::fs::write_atomic(&path, &bytes, 0o600)?;
                    return Ok(Some(uid));
                }
                Err(e) => return Err(Error::Io { path, source: e }),
            }
        }
        Ok(None)
    }

    /// Give `uid` back if `owner` holds its lease. Idempotent.
    pub fn release(&self, uid: u32, owner: &Owner) -> Result<()> {
        if self.owner(uid).as_ref() == Some(owner) {
            crate::sys::fs::remove_if_exists(&self.path(uid))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::tempdir;

    fn owner(state: &Path, id: &str) -> Owner {
        Owner {
            state_dir: state.into(),
            namespace: "ns".into(),
            id: id.into(),
        }
    }

    /// A state file for `id` recording `uid`, as the store writes it.
    fn live(state: &Path, id: &str, uid: u32) {
        let d = state.join("ns").join(id);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("state.json"), format!("{{\"envoy_uid\":{uid}}}")).unwrap();
    }

    #[test]
    fn two_state_dirs_never_share_a_uid() {
        let root = tempdir("leases");
        let leases = Leases::new(root.join("leases"));
        let (a, b) = (root.join("a"), root.join("b"));
        let pool = 5000..=5009;
        // Each state dir's own index knows nothing of the other's uids.
        let ua = leases.claim(&pool, |_| false, &owner(&a, "c1")).unwrap();
        live(&a, "c1", ua.unwrap());
        let ub = leases.claim(&pool, |_| false, &owner(&b, "c1")).unwrap();
        live(&b, "c1", ub.unwrap());
        assert_eq!((ua, ub), (Some(5000), Some(5001)));
        // The same container again: its own lease.
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&a, "c1")).unwrap(),
            Some(5000)
        );
        // Released: free for the next.
        leases.release(5000, &owner(&a, "c1")).unwrap();
        leases.release(5001, &owner(&a, "c1")).unwrap(); // not a's: kept
        assert!(leases.owner(5001).is_some());
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&b, "c2")).unwrap(),
            Some(5000)
        );
        fs::remove_dir_all(root).unwrap();
    }

    /// Make `uid`'s lease look `age` old.
    fn age(leases: &Leases, uid: u32, age: Duration) {
        let f = fs::File::options()
            .write(true)
            .open(leases.path(uid))
            .unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn another_state_dirs_lease_without_state_is_respected_until_the_grace_ends() {
        let root = tempdir("leases-grace");
        let leases = Leases::new(root.join("leases"));
        let (a, b) = (root.join("a"), root.join("b"));
        let pool = 6000..=6001;
        // a's create has claimed 6000 and not yet written its state.
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&a, "c1")).unwrap(),
            Some(6000)
        );
        // b's create must not take it meanwhile.
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&b, "c1")).unwrap(),
            Some(6001)
        );
        live(&b, "c1", 6001);
        assert_eq!(
            leases.stale(&b),
            Vec::<u32>::new(),
            "a's is not b's to sweep"
        );
        // a's create died long ago: now it is anyone's.
        age(&leases, 6000, LEASE_GRACE + Duration::from_secs(1));
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&b, "c2")).unwrap(),
            Some(6000)
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn gc_sweeps_its_own_stale_leases_and_unreadable_old_ones() {
        let root = tempdir("leases-sweep");
        let leases = Leases::new(root.join("leases"));
        let (a, b) = (root.join("a"), root.join("b"));
        let pool = 8000..=8009;
        let kept = leases
            .claim(&pool, |_| false, &owner(&a, "live"))
            .unwrap()
            .unwrap();
        live(&a, "live", kept);
        let dead = leases
            .claim(&pool, |_| false, &owner(&a, "dead"))
            .unwrap()
            .unwrap();
        let others = leases
            .claim(&pool, |_| false, &owner(&b, "dead"))
            .unwrap()
            .unwrap();
        fs::write(leases.path(8009), b"garbage").unwrap();
        assert_eq!(leases.stale(&a), vec![dead], "young garbage is left");
        age(&leases, 8009, LEASE_GRACE * 2);
        assert_eq!(leases.stale(&a), vec![dead, 8009]);
        for uid in leases.stale(&a) {
            assert!(leases.remove_stale(uid, &a).unwrap());
        }
        assert!(leases.owner(kept).is_some(), "a live lease stays");
        assert!(leases.owner(others).is_some(), "b's lease is b's gc's");
        assert!(!leases.remove_stale(kept, &a).unwrap());
        assert_eq!(leases.stale(&a), Vec::<u32>::new());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn stale_leases_are_taken_over_and_a_full_pool_says_so() {
        let root = tempdir("leases-stale");
        let leases = Leases::new(root.join("leases"));
        let a = root.join("a");
        let pool = 7000..=7001;
        // A create that died: lease, no state.
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&a, "dead")).unwrap(),
            Some(7000)
        );
        // A state that records another uid does not hold this one either.
        live(&a, "dead", 7001);
        assert_eq!(
            leases.claim(&pool, |_| false, &owner(&a, "next")).unwrap(),
            Some(7000)
        );
        live(&a, "next", 7000);
        // The index's own uids are skipped without looking at leases.
        assert_eq!(
            leases
                .claim(&pool, |u| u == 7001, &owner(&a, "third"))
                .unwrap(),
            None
        );
        fs::remove_dir_all(root).unwrap();
    }
}
