//! The ingress filter kept in place while the container runs. It is installed in the
//! container's netns before the app starts, but root in the container with
//! `CAP_NET_ADMIN` shares that netns and could delete or loosen it. The supervisor,
//! also in that netns, subscribes to nf_tables' change notifications there
//! (`sys::nfnetlink::RulesetWatch`: no polling, nothing to do while nothing changes)
//! and after each one compares the table with the listing taken when it started;
//! anything else is put back within milliseconds, counted and logged.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::nat::ingress;
use crate::sys::nfnetlink::RulesetWatch;

/// What a look at the filter found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact,
    /// Gone, or not what was installed: to be put back.
    Restore(&'static str),
}

/// Compare the table now with the listing taken after it was installed. Pure.
pub fn judge(baseline: &str, now: Option<&str>) -> Verdict {
    match now {
        None => Verdict::Restore("removed"),
        Some(n) if n != baseline => Verdict::Restore("changed"),
        Some(_) => Verdict::Intact,
    }
}

/// What a check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Intact,
    /// Put back after being removed or changed.
    Restored(&'static str),
    /// Putting it back failed.
    Failed(String),
}

pub struct IngressGuard {
    watch: RulesetWatch,
    nft: PathBuf,
    table: String,
    ports: Vec<u16>,
    baseline: String,
}

impl IngressGuard {
    /// Start guarding in the calling thread's network namespace (the container's).
    /// The filter is installed again first (an idempotent replace), so the baseline
    /// is what we install even when this supervisor replaces one that died while the
    /// table was tampered with; the second value says what was there before, if it
    /// was not that (`None`: the same).
    pub fn start(
        nft: PathBuf,
        table: String,
        ports: Vec<u16>,
    ) -> Result<(IngressGuard, Option<&'static str>)> {
        // Subscribe before the first look: a change in between still wakes us.
        let watch = RulesetWatch::open()
            .map_err(|e| Error::Nat(format!("subscribing to nf_tables changes: {e}")))?;
        let before = ingress::listing(&nft, &table);
        ingress::install_here(&nft, &table, &ports)?;
        let baseline = ingress::listing(&nft, &table)
            .ok_or_else(|| Error::Nat(format!("table inet {table} not listed after install")))?;
        let found = match judge(&baseline, before.as_deref()) {
            Verdict::Intact => None,
            Verdict::Restore(what) => Some(what),
        };
        Ok((
            IngressGuard {
                watch,
                nft,
                table,
                ports,
                baseline,
            },
            found,
        ))
    }

    pub fn fd(&self) -> &OwnedFd {
        self.watch.fd()
    }

    /// After a wake-up on [`IngressGuard::fd`]: read the notifications, look at the
    /// table, put it back if it is not what was installed. Our own re-install is
    /// announced too: the next check finds the table intact.
    pub fn check(&mut self) -> Outcome {
        if !self.watch.drain() {
            return Outcome::Intact;
        }
        match judge(
            &self.baseline,
            ingress::listing(&self.nft, &self.table).as_deref(),
        ) {
            Verdict::Intact => Outcome::Intact,
            Verdict::Restore(what) => {
                match ingress::install_here(&self.nft, &self.table, &self.ports) {
                    Ok(()) => Outcome::Restored(what),
                    Err(e) => Outcome::Failed(crate::error::render(&e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anything_but_the_installed_table_is_restored() {
        let base = "table inet envoy_sidecar_ingress {\n\tchain input {\n...}\n}\n";
        assert_eq!(judge(base, Some(base)), Verdict::Intact);
        assert_eq!(judge(base, None), Verdict::Restore("removed"));
        let loosened = base.replace("...", "");
        assert_eq!(judge(base, Some(&loosened)), Verdict::Restore("changed"));
    }
}
