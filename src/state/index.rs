//! The host-wide allocation index, `<state_dir>/.index.json`: which host ports and
//! Envoy uids are taken and how much memory is committed, so that a `create` reads and
//! writes one small file instead of every container's state.
//!
//! The per-container state files stay the source of truth; the index is a cache of
//! their union, only read and written under the store lock, and rebuilt from them when
//! it is missing, unreadable, from another boot (a power loss may have lost its last
//! write: it is not fsynced), or made for another Envoy uid pool.
//!
//! Crash safety without a second fsync'd ledger: every change names itself in
//! `pending` and is written *before* the state file it accounts for (created or
//! removed). The next holder of the lock looks at that one state file: if the change
//! did not happen (the writer died in between), it is undone. So after a SIGKILL at
//! any point no port or uid is handed out twice, and none stays taken.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::state::store::ContainerState;

pub const INDEX_FILE: &str = ".index.json";
const INDEX_VERSION: u32 = 1;
const PORTS: u32 = 1 << 16;

/// A fixed-size set of small integers. On disk: the hex of the bytes between the
/// first and the last non-zero byte, so its size is bounded by the pool, not by the
/// number of containers (and tiny when allocation is lowest-first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bits {
    bytes: Vec<u8>,
}

impl Bits {
    pub fn new(len: u32) -> Bits {
        Bits {
            bytes: vec![0; usize::try_from(len.div_ceil(8)).expect("u32 fits usize")],
        }
    }

    pub fn len(&self) -> u32 {
        u32::try_from(self.bytes.len() * 8).unwrap_or(u32::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.iter().all(|b| *b == 0)
    }

    fn at(i: u32) -> (usize, u8) {
        (
            usize::try_from(i / 8).expect("u32 fits usize"),
            1 << (i % 8),
        )
    }

    pub fn get(&self, i: u32) -> bool {
        let (b, m) = Self::at(i);
        self.bytes.get(b).is_some_and(|v| v & m != 0)
    }

    /// Out-of-range indices are ignored (a uid outside the pool is never handed out).
    pub fn set(&mut self, i: u32, on: bool) {
        let (b, m) = Self::at(i);
        if let Some(v) = self.bytes.get_mut(b) {
            if on {
                *v |= m;
            } else {
                *v &= !m;
            }
        }
    }

    pub fn count(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    /// Members, ascending.
    pub fn members(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).filter(|i| self.get(*i))
    }

    fn to_wire(&self) -> WireBits {
        let first = self.bytes.iter().position(|b| *b != 0);
        let last = self.bytes.iter().rposition(|b| *b != 0);
        let (start, hex) = match (first, last) {
            (Some(f), Some(l)) => (
                f,
                self.bytes[f..=l]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            ),
            _ => (0, String::new()),
        };
        WireBits {
            len: self.len(),
            start: u32::try_from(start).unwrap_or(0),
            hex,
        }
    }

    fn from_wire(w: &WireBits) -> Option<Bits> {
        let mut b = Bits::new(w.len);
        let start = usize::try_from(w.start).ok()?;
        if !w.hex.len().is_multiple_of(2) || start + w.hex.len() / 2 > b.bytes.len() {
            return None;
        }
        for (i, pair) in w.hex.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).ok()?;
            b.bytes[start + i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(b)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WireBits {
    len: u32,
    start: u32,
    hex: String,
}

/// What one container holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub host_ports: Vec<u16>,
    pub envoy_uid: u32,
    pub memory_limit_bytes: u64,
}

impl Claim {
    pub fn of(s: &ContainerState) -> Claim {
        Claim {
            host_ports: s.host_ports().collect(),
            envoy_uid: s.envoy_uid,
            // A pod's containers keep the limits the kubelet gave them; what the
            // pod's proxy adds (the RuntimeClass overhead) is its claim.
            memory_limit_bytes: if s.pod.is_some() {
                s.memory.additional_bytes
            } else {
                s.memory.limit_bytes.unwrap_or(0)
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The index counts the claim; its `state.json` is being written.
    Add,
    /// The index no longer counts the claim; its `state.json` is being removed.
    Remove,
}

/// The last change, until the next holder of the lock confirms it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub op: Op,
    pub namespace: String,
    pub id: String,
    pub claim: Claim,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub boot_id: String,
    /// The Envoy uid pool the `uids` bits are relative to.
    pub uid_base: u32,
    pub ports: Bits,
    pub uids: Bits,
    pub memory_limit_bytes: u64,
    pub containers: u64,
    pub pending: Option<Pending>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    version: u32,
    boot_id: String,
    uid_base: u32,
    host_ports: WireBits,
    envoy_uids: WireBits,
    memory_limit_bytes: u64,
    containers: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Pending>,
}

/// Why an index on disk is not used as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    Missing,
    Unreadable(String),
    OtherBoot,
    OtherUidPool,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Missing => f.write_str("missing"),
            Stale::Unreadable(e) => write!(f, "unreadable ({e})"),
            Stale::OtherBoot => f.write_str("written before the last boot"),
            Stale::OtherUidPool => f.write_str("made for another Envoy uid pool"),
        }
    }
}

impl Index {
    pub fn empty(uid_pool: &RangeInclusive<u32>, boot_id: &str) -> Index {
        Index {
            boot_id: boot_id.into(),
            uid_base: *uid_pool.start(),
            ports: Bits::new(PORTS),
            uids: Bits::new(pool_len(uid_pool)),
            memory_limit_bytes: 0,
            containers: 0,
            pending: None,
        }
    }

    /// The union of the given containers' claims.
    pub fn rebuild<'a>(
        states: impl IntoIterator<Item = &'a ContainerState>,
        uid_pool: &RangeInclusive<u32>,
        boot_id: &str,
    ) -> Index {
        let mut ix = Index::empty(uid_pool, boot_id);
        for s in states {
            ix.count(&Claim::of(s), true);
        }
        ix
    }

    fn count(&mut self, c: &Claim, on: bool) {
        for p in &c.host_ports {
            self.ports.set(u32::from(*p), on);
        }
        if let Some(u) = c.envoy_uid.checked_sub(self.uid_base) {
            self.uids.set(u, on);
        }
        if on {
            self.memory_limit_bytes = self.memory_limit_bytes.saturating_add(c.memory_limit_bytes);
            self.containers += 1;
        } else {
            self.memory_limit_bytes = self.memory_limit_bytes.saturating_sub(c.memory_limit_bytes);
            self.containers = self.containers.saturating_sub(1);
        }
    }

    /// Settle the previous change: `state_exists` says whether its `state.json` is
    /// there now. A change that did not happen is undone.
    pub fn settle(&mut self, state_exists: bool) {
        if let Some(p) = self.pending.take() {
            match (p.op, state_exists) {
                (Op::Add, false) => self.count(&p.claim, false),
                (Op::Remove, true) => self.count(&p.claim, true),
                _ => {}
            }
        }
    }

    /// Count a container about to be recorded (pending until its state exists).
    pub fn add(&mut self, ns: &str, id: &str, c: Claim) {
        debug_assert!(self.pending.is_none(), "settle first");
        self.count(&c, true);
        self.pending = Some(Pending {
            op: Op::Add,
            namespace: ns.into(),
            id: id.into(),
            claim: c,
        });
    }

    /// Release a container about to be forgotten (pending until its state is gone).
    pub fn release(&mut self, ns: &str, id: &str, c: Claim) {
        debug_assert!(self.pending.is_none(), "settle first");
        self.count(&c, false);
        self.pending = Some(Pending {
            op: Op::Remove,
            namespace: ns.into(),
            id: id.into(),
            claim: c,
        });
    }

    pub fn port_taken(&self, p: u16) -> bool {
        self.ports.get(u32::from(p))
    }

    /// Whether this index counts `uid` as taken.
    pub fn uid_taken(&self, uid: u32) -> bool {
        uid.checked_sub(self.uid_base)
            .is_some_and(|i| self.uids.get(i))
    }

    /// The lowest free uid of the pool.
    pub fn free_uid(&self, pool: &RangeInclusive<u32>) -> Option<u32> {
        pool.clone().find(|u| {
            !u.checked_sub(self.uid_base)
                .is_some_and(|i| self.uids.get(i))
        })
    }

    /// Same claims (ports, uids, memory, count), whatever is pending.
    pub fn same_claims(&self, other: &Index) -> bool {
        self.ports == other.ports
            && self.uids == other.uids
            && self.uid_base == other.uid_base
            && self.memory_limit_bytes == other.memory_limit_bytes
            && self.containers == other.containers
    }

    /// What differs from `truth` (the rebuild from the state files), for gc and doctor.
    pub fn differences(&self, truth: &Index) -> Vec<String> {
        let mut out = Vec::new();
        let diff = |a: &Bits, b: &Bits| -> (Vec<u32>, Vec<u32>) {
            let extra = a.members().filter(|i| !b.get(*i)).collect();
            let missing = b.members().filter(|i| !a.get(*i)).collect();
            (extra, missing)
        };
        let (extra, missing) = diff(&self.ports, &truth.ports);
        if !extra.is_empty() {
            out.push(format!(
                "host ports {} taken but claimed by no container",
                list(&extra, 0)
            ));
        }
        if !missing.is_empty() {
            out.push(format!(
                "host ports {} claimed but not taken",
                list(&missing, 0)
            ));
        }
        let (extra, missing) = diff(&self.uids, &truth.uids);
        if !extra.is_empty() {
            out.push(format!(
                "Envoy uids {} taken but claimed by no container",
                list(&extra, self.uid_base)
            ));
        }
        if !missing.is_empty() {
            out.push(format!(
                "Envoy uids {} claimed but not taken",
                list(&missing, self.uid_base)
            ));
        }
        if self.memory_limit_bytes != truth.memory_limit_bytes {
            out.push(format!(
                "committed memory {} bytes, the containers' limits add up to {}",
                self.memory_limit_bytes, truth.memory_limit_bytes
            ));
        }
        if self.containers != truth.containers {
            out.push(format!(
                "{} containers counted, {} state files",
                self.containers, truth.containers
            ));
        }
        out
    }

    pub fn to_json(&self) -> Vec<u8> {
        let w = Wire {
            version: INDEX_VERSION,
            boot_id: self.boot_id.clone(),
            uid_base: self.uid_base,
            host_ports: self.ports.to_wire(),
            envoy_uids: self.uids.to_wire(),
            memory_limit_bytes: self.memory_limit_bytes,
            containers: self.containers,
            pending: self.pending.clone(),
        };
        serde_json::to_vec(&w).expect("index serialises")
    }

    /// Parse, and check it is usable for this boot and uid pool.
    pub fn from_json(
        bytes: &[u8],
        uid_pool: Option<&RangeInclusive<u32>>,
        boot_id: &str,
    ) -> Result<Index, Stale> {
        let w: Wire =
            serde_json::from_slice(bytes).map_err(|e| Stale::Unreadable(e.to_string()))?;
        if w.version != INDEX_VERSION {
            return Err(Stale::Unreadable(format!(
                "version {} is not {INDEX_VERSION}",
                w.version
            )));
        }
        if w.boot_id != boot_id {
            return Err(Stale::OtherBoot);
        }
        let bad = |what: &str| Stale::Unreadable(format!("bad {what} bits"));
        let ports = Bits::from_wire(&w.host_ports).ok_or_else(|| bad("host port"))?;
        let uids = Bits::from_wire(&w.envoy_uids).ok_or_else(|| bad("uid"))?;
        if ports.len() != PORTS {
            return Err(bad("host port"));
        }
        if let Some(pool) = uid_pool
            && (w.uid_base != *pool.start() || uids.len() != Bits::new(pool_len(pool)).len())
        {
            return Err(Stale::OtherUidPool);
        }
        Ok(Index {
            boot_id: w.boot_id,
            uid_base: w.uid_base,
            ports,
            uids,
            memory_limit_bytes: w.memory_limit_bytes,
            containers: w.containers,
            pending: w.pending,
        })
    }
}

fn pool_len(pool: &RangeInclusive<u32>) -> u32 {
    (pool.end() - pool.start()).saturating_add(1)
}

/// "61001-61003, 61007" (the first few runs).
fn list(members: &[u32], base: u32) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for m in members {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == *m => *end = *m,
            _ => runs.push((*m, *m)),
        }
    }
    let shown: Vec<String> = runs
        .iter()
        .take(5)
        .map(|(a, b)| {
            if a == b {
                format!("{}", a + base)
            } else {
                format!("{}-{}", a + base, b + base)
            }
        })
        .collect();
    let more = if runs.len() > 5 { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// This boot's id: an index written before a reboot is not trusted.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::sample;
    use std::path::Path;

    const UIDS: RangeInclusive<u32> = 2_000_000_000..=2_000_065_535;

    fn two() -> Vec<ContainerState> {
        let root = Path::new("/nonexistent");
        let a = sample("default", "a", root, (61001, Some(61002)));
        let mut b = sample("k8s.io", "b", root, (61005, None));
        b.envoy_uid += 1;
        vec![a, b]
    }

    #[test]
    fn rebuild_is_the_union() {
        let ix = Index::rebuild(&two(), &UIDS, "boot");
        assert_eq!(
            ix.ports.members().collect::<Vec<_>>(),
            vec![61001, 61002, 61005]
        );
        assert_eq!(ix.uids.members().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(ix.memory_limit_bytes, 264 << 20);
        assert_eq!(ix.containers, 2);
        assert_eq!(ix.free_uid(&UIDS), Some(2_000_000_002));
        assert!(ix.port_taken(61002) && !ix.port_taken(61003));
    }

    #[test]
    fn round_trip_is_small_and_exact() {
        let mut ix = Index::rebuild(&two(), &UIDS, "boot");
        ix.add("default", "c", Claim::of(&two()[0]));
        let bytes = ix.to_json();
        // Three ports and two uids: a few hundred bytes, not 16 KiB of zeros.
        assert!(bytes.len() < 600, "{}", String::from_utf8_lossy(&bytes));
        let back = Index::from_json(&bytes, Some(&UIDS), "boot").unwrap();
        assert_eq!(back, ix);
        assert_eq!(
            Index::from_json(&bytes, Some(&UIDS), "other"),
            Err(Stale::OtherBoot)
        );
        assert_eq!(
            Index::from_json(&bytes, Some(&(1000..=1999)), "boot"),
            Err(Stale::OtherUidPool)
        );
        assert!(matches!(
            Index::from_json(b"{\"version\":1}", None, "boot"),
            Err(Stale::Unreadable(_))
        ));
        let mut w: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        w["host_ports"]["hex"] = "zz".into();
        assert!(matches!(
            Index::from_json(w.to_string().as_bytes(), None, "boot"),
            Err(Stale::Unreadable(_))
        ));
    }

    #[test]
    fn settle_undoes_what_did_not_happen() {
        let states = two();
        let base = Index::rebuild(&states[..1], &UIDS, "boot");
        let claim = Claim::of(&states[1]);

        // Add, and the state file was written: kept.
        let mut ix = base.clone();
        ix.add("k8s.io", "b", claim.clone());
        ix.settle(true);
        assert!(ix.same_claims(&Index::rebuild(&states, &UIDS, "boot")));
        assert_eq!(ix.pending, None);

        // Add, and the writer died before the state file: undone.
        let mut ix = base.clone();
        ix.add("k8s.io", "b", claim.clone());
        ix.settle(false);
        assert!(ix.same_claims(&base));

        // Remove, and the state file is still there: undone.
        let mut ix = Index::rebuild(&states, &UIDS, "boot");
        ix.release("k8s.io", "b", claim.clone());
        ix.settle(true);
        assert!(ix.same_claims(&Index::rebuild(&states, &UIDS, "boot")));

        // Remove, and it is gone: kept.
        let mut ix = Index::rebuild(&states, &UIDS, "boot");
        ix.release("k8s.io", "b", claim);
        ix.settle(false);
        assert!(ix.same_claims(&base));
    }

    #[test]
    fn differences_name_ports_and_uids() {
        let states = two();
        let truth = Index::rebuild(&states, &UIDS, "boot");
        let mut ix = truth.clone();
        ix.ports.set(61009, true);
        ix.ports.set(61001, false);
        ix.uids.set(7, true);
        ix.containers += 1;
        let d = ix.differences(&truth).join("; ");
        assert!(d.contains("host ports 61009 taken"), "{d}");
        assert!(d.contains("host ports 61001 claimed but not taken"), "{d}");
        assert!(d.contains("Envoy uids 2000000007 taken"), "{d}");
        assert!(d.contains("3 containers counted, 2 state files"), "{d}");
        assert!(truth.differences(&truth).is_empty());
    }

    #[test]
    fn uids_outside_the_pool_are_ignored() {
        let mut s = two();
        s[0].envoy_uid = 5000;
        let ix = Index::rebuild(&s, &UIDS, "boot");
        assert_eq!(ix.uids.count(), 1);
        assert_eq!(ix.free_uid(&UIDS), Some(2_000_000_000));
    }
}
