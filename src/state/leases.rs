//! Host-wide leases on Envoy uids: one file per uid in use, in one directory for the
//! whole host (`/run/envoy-sidecar-uids`), whatever the number of configurations and
//! state directories. An Envoy uid reads its container's private key, so two
//! containers must never share one — not even when they belong to two configurations
//! with separate state directories (each with its own allocation index).
//!
//! A lease names its owner (state directory, namespace, id). It is live while the
//! owner's `state.json` exists and records that uid; otherwise (a create that died, a
//! state directory wiped) it is stale and may be taken over. Leases live on tmpfs:
//! they go with a reboot, as the containers do.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::ops::RangeInclusive;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Where the leases of every configuration on the host live.
pub const LEASE_DIR: &str = "/run/envoy-sidecar-uids";

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
                    match self.owner(uid) {
                        // Ours already (a repeated create of the same container).
                        Some(o) if o == *owner => return Ok(Some(uid)),
                        Some(o) if o.holds(uid) => continue,
                        // Stale, or unreadable: replace it (under the lock).
                        _ => {
                            crate::sys::fs::write_atomic(&path, &bytes, 0o600)?;
                            return Ok(Some(uid));
                        }
                    }
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
