//! Host port NAT: `<host address>:<host port>` -> `<container IP>:<container port>`, in
//! nftables tables the product owns: `ip envoy_sidecar` for IPv4 and `ip6
//! envoy_sidecar` for IPv6 (created the first time a container with an IPv6 address is
//! mapped, so a host without IPv6 never needs the second). A container with both
//! addresses has each host port in both maps; one transaction changes both.
//!
//! One verdict map keyed by protocol and host port holds every mapping, so a packet
//! costs one hash lookup however many containers there are, and adding or removing a
//! container is a constant-size element change that never rewrites other containers'
//! rules. Each container's elements go in (or out) in one nf_tables transaction over
//! netlink (`sys::nfnetlink`): all or none, and no process spawned on the container's
//! create/delete path. Rules are fixed and created once (`nft -f`, once per host); the
//! slow paths (listing after a refusal, gc) use `nft -j`.

pub mod foreign;
pub mod ingress;

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::nfnetlink::{self, ElemOp, Element, Netfilter};

pub const TABLE: &str = "envoy_sidecar";
pub const MAP: &str = "ports";
/// Host ports published on one host address only (nerdctl's `-p ADDR:H:C`): keyed by
/// that address too. A host port is in one of the two maps, never both.
pub const MAP_AT: &str = "ports_at";

/// One host port forwarded to one container port (TCP), over IPv4 or IPv6 (the
/// container address's family; the host address is any of the host's own of it, or
/// `host_ip` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mapping {
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
    /// Published on this host address only (of the container address's family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl Mapping {
    /// The map it is an element of.
    pub fn map(&self) -> &'static str {
        if self.host_ip.is_some() { MAP_AT } else { MAP }
    }

    pub fn family(&self) -> Family {
        match self.container_ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Which of the two tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The nftables family keyword.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => nfnetlink::NFPROTO_IPV4,
            Family::V6 => nfnetlink::NFPROTO_IPV6,
        }
    }
}

/// The fixed part of one family's table: the map and the two DNAT rules. Prerouting
/// covers traffic arriving from outside; output covers connections made on the host
/// itself to any of its addresses (loopback excluded: DNAT from 127.0.0.1 or ::1 to a
/// container is a martian).
pub fn skeleton_of(f: Family) -> String {
    let (fam, addr, loopback) = family_words(f);
    format!(
        "add table {fam} {TABLE}\n\
         add map {fam} {TABLE} {MAP} {{ type inet_proto . inet_service : {addr} . inet_service; }}\n\
         add chain {fam} {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain {fam} {TABLE} output {{ type nat hook output priority -100; policy accept; }}\n\
         add rule {fam} {TABLE} prerouting fib daddr type local dnat {fam} to meta l4proto . th dport map @{MAP}\n\
         add rule {fam} {TABLE} output {loopback} fib daddr type local dnat {fam} to meta l4proto . th dport map @{MAP}\n{}",
        skeleton_at(f)
    )
}

fn family_words(f: Family) -> (&'static str, &'static str, &'static str) {
    match f {
        Family::V4 => ("ip", "ipv4_addr", "ip daddr != 127.0.0.0/8"),
        Family::V6 => ("ip6", "ipv6_addr", "ip6 daddr != ::1"),
    }
}

/// The address-bound map and its two rules: part of the skeleton, and added on its
/// own to a table an earlier version made without them. A lookup that finds nothing
/// ends its rule, so the two maps' rules never stand in each other's way.
pub fn skeleton_at(f: Family) -> String {
    let (fam, addr, loopback) = family_words(f);
    format!(
        "add map {fam} {TABLE} {MAP_AT} {{ type {addr} . inet_proto . inet_service : {addr} . inet_service; }}\n\
         add rule {fam} {TABLE} prerouting fib daddr type local dnat {fam} to {fam} daddr . meta l4proto . th dport map @{MAP_AT}\n\
         add rule {fam} {TABLE} output {loopback} fib daddr type local dnat {fam} to {fam} daddr . meta l4proto . th dport map @{MAP_AT}\n"
    )
}

/// The IPv4 table's skeleton.
pub fn skeleton() -> String {
    skeleton_of(Family::V4)
}

/// The families `maps` need, each once.
fn families(maps: &[Mapping]) -> Vec<Family> {
    let mut f: Vec<Family> = maps.iter().map(Mapping::family).collect();
    f.sort_unstable();
    f.dedup();
    f
}

/// nft's element syntax; an IPv6 address in brackets is not needed (`.` separates).
fn elements(maps: &[Mapping]) -> String {
    maps.iter()
        .map(|m| {
            let at = m.host_ip.map(|a| format!("{a} . ")).unwrap_or_default();
            format!(
                "{at}tcp . {} : {} . {}",
                m.host_port, m.container_ip, m.container_port
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// IPPROTO_TCP (netinet/in.h), the `inet_proto` of every element.
const IPPROTO_TCP: u8 = 6;

/// The map's elements as nf_tables holds them: key `inet_proto . inet_service`,
/// value `ipv4_addr . inet_service` (or `ipv6_addr . ...`), each component padded to
/// 4 bytes (checked against `nft -j list map` in tests/nfnetlink.rs).
pub fn netlink_elements(maps: &[Mapping]) -> Vec<Element> {
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    maps.iter()
        .map(|m| {
            let port = m.host_port.to_be_bytes();
            let key = match m.host_ip {
                // `ports_at`: the host address first.
                Some(a) => nfnetlink::concat(&[&octets(a), &[IPPROTO_TCP], &port]),
                None => nfnetlink::concat(&[&[IPPROTO_TCP], &port]),
            };
            Element {
                key,
                data: Some(nfnetlink::concat(&[
                    &octets(m.container_ip),
                    &m.container_port.to_be_bytes(),
                ])),
            }
        })
        .collect()
}

/// The (family, map) groups of `maps`, each once, in order.
fn groups(maps: &[Mapping]) -> Vec<(Family, &'static str)> {
    let mut g: Vec<(Family, &'static str)> = maps.iter().map(|m| (m.family(), m.map())).collect();
    g.sort_unstable();
    g.dedup();
    g
}

/// `maps` of family `f` only.
fn of_family(maps: &[Mapping], f: Family) -> Vec<Mapping> {
    maps.iter().filter(|m| m.family() == f).copied().collect()
}

fn script(verb: &str, maps: &[Mapping]) -> String {
    groups(maps)
        .into_iter()
        .map(|(f, map)| {
            let these: Vec<Mapping> = of_family(maps, f)
                .into_iter()
                .filter(|m| m.map() == map)
                .collect();
            format!(
                "{verb} element {} {TABLE} {map} {{ {} }}\n",
                f.nft(),
                elements(&these)
            )
        })
        .collect()
}

pub fn add_script(maps: &[Mapping]) -> String {
    script("add", maps)
}

pub fn delete_script(maps: &[Mapping]) -> String {
    script("delete", maps)
}

/// Parse `nft -j list map ip envoy_sidecar ports` (or `ip6`).
pub fn parse_listing(json: &str) -> Result<Vec<Mapping>> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| Error::Nat(format!("nft -j output: {e}")))?;
    let mut out = Vec::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(elems) = item.pointer("/map/elem").and_then(|e| e.as_array()) else {
            continue;
        };
        for e in elems {
            let key = e.pointer("/0/concat");
            let val = e.pointer("/1/concat");
            let (Some(k), Some(v)) = (key, val) else {
                continue;
            };
            // `ports`: tcp . port; `ports_at`: address . tcp . port.
            let at = k.as_array().is_some_and(|k| k.len() == 3);
            let (proto, port) = if at { (1, 2) } else { (0, 1) };
            let m = (|| {
                Some(Mapping {
                    host_port: u16::try_from(k.get(port)?.as_u64()?).ok()?,
                    container_ip: v.get(0)?.as_str()?.parse().ok()?,
                    container_port: u16::try_from(v.get(1)?.as_u64()?).ok()?,
                    host_ip: if at {
                        Some(k.get(0)?.as_str()?.parse().ok()?)
                    } else {
                        None
                    },
                })
            })();
            if k.get(proto).and_then(|p| p.as_str()) == Some("tcp")
                && let Some(m) = m
            {
                out.push(m);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The kernel's table, changed over netlink; the nft command-line tool for creating
/// the table and listing it (the seam tests can point elsewhere).
pub struct Nat {
    pub nft: PathBuf,
}

impl Default for Nat {
    fn default() -> Self {
        Nat {
            nft: find_tool("nft"),
        }
    }
}

/// Hooks may run with an empty environment (podman runs OCI hooks without PATH):
/// look in the usual places rather than rely on PATH.
pub(crate) fn find_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

impl Nat {
    /// Add or delete elements in one transaction (netlink, no process); on refusal
    /// also say what kind it was, from the kernel's errno. The message names the
    /// change in nft syntax.
    fn change(
        &self,
        nf: &mut Netfilter,
        op: ElemOp,
        maps: &[Mapping],
    ) -> std::result::Result<(), (Refusal, Error)> {
        let groups = groups(maps);
        let elems: Vec<Vec<Element>> = groups
            .iter()
            .map(|&(f, map)| {
                let these: Vec<Mapping> = of_family(maps, f)
                    .into_iter()
                    .filter(|m| m.map() == map)
                    .collect();
                netlink_elements(&these)
            })
            .collect();
        let changes: Vec<nfnetlink::SetChange<'_>> = groups
            .iter()
            .zip(&elems)
            .map(|((f, map), e)| nfnetlink::SetChange {
                family: f.nfproto(),
                table: TABLE,
                set: map,
                elems: e,
            })
            .collect();
        nf.change_sets(op, &changes).map_err(|e| {
            let script = match op {
                ElemOp::Add => add_script(maps),
                ElemOp::Delete => delete_script(maps),
            };
            (
                Refusal::of(&e),
                Error::Nat(format!("nf_tables refused {:?}: {e}", script.trim())),
            )
        })
    }

    fn change_or_fail(&self, nf: &mut Netfilter, op: ElemOp, maps: &[Mapping]) -> Result<()> {
        self.change(nf, op, maps).map_err(|(_, e)| e)
    }

    /// A netlink socket in the caller's network namespace.
    fn netfilter() -> Result<Netfilter> {
        Netfilter::open()
            .map_err(|e| Error::Nat(format!("opening a netfilter netlink socket: {e}")))
    }

    /// Whether family `f`'s table and its rules are there. Lists one chain (two
    /// rules), not the table: that would print every element of the map.
    pub fn table_exists(&self, f: Family) -> bool {
        self.nft_succeeds(&["list", "chain", f.nft(), TABLE, "output"])
    }

    /// Whether `nft ARGS` exits 0 (its output discarded).
    fn nft_succeeds(&self, args: &[&str]) -> bool {
        Command::new(&self.nft)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Create the tables of `fams` once; callers hold the store lock so two creates
    /// cannot both add the rules.
    pub fn ensure_tables(&self, fams: &[Family]) -> Result<()> {
        for &f in fams {
            if !self.table_exists(f) {
                run_nft(&self.nft, &skeleton_of(f))?;
            } else if !self.map_exists(f, MAP_AT) {
                // A table from before address-bound mappings: add their map and rules.
                run_nft(&self.nft, &skeleton_at(f))?;
            }
        }
        Ok(())
    }

    fn map_exists(&self, f: Family, map: &str) -> bool {
        self.nft_succeeds(&["-t", "list", "map", f.nft(), TABLE, map])
    }

    /// Every mapping in the tables (none from a table that does not exist).
    pub fn list(&self) -> Result<Vec<Mapping>> {
        let mut all = Vec::new();
        for f in Family::ALL {
            if !self.table_exists(f) {
                continue;
            }
            for map in [MAP, MAP_AT] {
                if map == MAP_AT && !self.map_exists(f, map) {
                    continue; // a table from before address-bound mappings
                }
                let out = Command::new(&self.nft)
                    .args(["-j", "list", "map", f.nft(), TABLE, map])
                    .output()
                    .map_err(|e| Error::Nat(format!("running nft: {e}")))?;
                if !out.status.success() {
                    return Err(Error::Nat(format!(
                        "nft list map {} {TABLE} {map}: {}",
                        f.nft(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                all.extend(parse_listing(&String::from_utf8_lossy(&out.stdout))?);
            }
        }
        all.sort();
        Ok(all)
    }

    /// Add one container's mappings atomically: one nf_tables transaction, whatever
    /// the size of the map. Mappings already present as they are (a repeated hook) are
    /// fine — the kernel accepts an identical element; a host port mapped elsewhere
    /// is a conflict — the kernel refuses it (EEXIST) and the whole transaction with
    /// it. Only then, or when the table is missing, is anything listed.
    pub fn add(&self, maps: &[Mapping]) -> Result<()> {
        if maps.is_empty() {
            return Ok(());
        }
        ensure_forwarding(maps)?;
        let mut nf = Self::netfilter()?;
        match self.change(&mut nf, ElemOp::Add, maps) {
            Ok(()) => Ok(()),
            Err((Refusal::Missing, _)) => {
                // First container (of its family, or a flushed ruleset): create the
                // tables, then add.
                self.ensure_tables(&families(maps))?;
                self.change_or_fail(&mut nf, ElemOp::Add, maps)
            }
            Err((Refusal::Exists, e)) => {
                // Name the conflicting element (slow path, errors only).
                to_add(&self.list()?, maps)?;
                Err(e)
            }
            Err((Refusal::Other, e)) => Err(e),
        }
    }

    /// Remove mappings that are still present (idempotent), then drop the conntrack
    /// entries that would keep forwarding to the container IP once it is reused.
    ///
    /// One transaction when all are present (the usual case). The kernel deletes by
    /// key (host port): safe because a host port belongs to one container's allocation
    /// record until that container's removal — NAT first, state after. When some are
    /// already gone the transaction is refused (ENOENT) and only then is the map
    /// listed, to delete exactly what is still there.
    ///
    /// Both over one netlink socket, closed at the end: see `sys::nfnetlink::Netfilter`
    /// for why (the close waits out the deleted elements' RCU grace period, which the
    /// conntrack dump overlaps).
    pub fn remove(&self, maps: &[Mapping]) -> Result<()> {
        if maps.is_empty() {
            return Ok(());
        }
        let mut nf = Self::netfilter()?;
        // A nested netlink attribute holds at most 64 KiB: gc removing many containers
        // at once goes in transactions of REMOVE_CHUNK mappings, on one socket.
        let mut listed: Option<std::collections::BTreeSet<Mapping>> = None;
        for chunk in maps.chunks(REMOVE_CHUNK) {
            match self.change(&mut nf, ElemOp::Delete, chunk) {
                Ok(()) => {}
                Err((Refusal::Missing, _)) => {
                    if listed.is_none() {
                        listed = Some(self.list()?.into_iter().collect());
                    }
                    let present = listed.as_ref().expect("just listed");
                    let gone: Vec<Mapping> = chunk
                        .iter()
                        .filter(|m| present.contains(m))
                        .copied()
                        .collect();
                    if !gone.is_empty() {
                        self.change_or_fail(&mut nf, ElemOp::Delete, &gone)?;
                    }
                }
                Err((_, e)) => return Err(e),
            }
        }
        let ips: Vec<IpAddr> = maps.iter().map(|m| m.container_ip).collect();
        // The elements are gone (the kernel acknowledged the deletes): the host ports
        // may be handed out again. What remains is slow and needs no one to wait for
        // it: the conntrack flush (what `conntrack -D --reply-src IP` did, for every IP
        // in one walk of the kernel's table, 5-10 ms) and the socket's close (which
        // waits out the kernel's release of the deleted elements, 5-15 ms). Both run
        // on a thread of their own while the caller goes on (`runc delete`, for the
        // wrapper); [`settle`] waits for them before the process exits.
        let h = std::thread::spawn(move || {
            // Best effort, as before: a connection left tracked only lingers until
            // its timeout.
            let _ = nf.ct_delete_reply_srcs(&ips);
            drop(nf);
        });
        BACKGROUND
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(h);
        Ok(())
    }
}

/// DNAT to containers is forwarding; CNI's bridge plugin turns it on the same way,
/// for each family it gives an address of. IPv6 forwarding only for IPv6 mappings:
/// it turns the host into a router for IPv6 (the kernel then ignores router
/// advertisements on interfaces with `accept_ra` 1).
fn ensure_forwarding(maps: &[Mapping]) -> Result<()> {
    let mut knobs = Vec::new();
    if maps.iter().any(|m| m.container_ip.is_ipv4()) {
        knobs.push("/proc/sys/net/ipv4/ip_forward");
    }
    if maps.iter().any(|m| m.container_ip.is_ipv6()) {
        knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for p in knobs {
        if std::fs::read_to_string(p)
            .map_err(|e| Error::Nat(format!("{p}: {e}")))?
            .trim()
            != "1"
        {
            std::fs::write(p, "1").map_err(|e| Error::Nat(format!("{p}: {e}")))?;
        }
    }
    Ok(())
}

/// What [`Nat::remove`] left running.
static BACKGROUND: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Wait for the conntrack flushes and socket closes [`Nat::remove`] left running.
/// The executables call it before they exit (exiting would cut a flush short).
pub fn settle() {
    let pending = std::mem::take(
        &mut *BACKGROUND
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for h in pending {
        let _ = h.join();
    }
}

/// Mappings per element transaction when removing many (gc): well inside one
/// netlink attribute's 64 KiB.
const REMOVE_CHUNK: usize = 512;

/// `nft -f -` with `script` on stdin, in the calling thread's network namespace (the
/// table's skeleton here, a container's ingress filter from `ingress`).
pub(crate) fn run_nft(nft: &Path, script: &str) -> Result<()> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::Nat(format!(
                "running {}: {e} (is nftables installed?)",
                nft.display()
            ))
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| Error::Nat(format!("writing to nft: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Nat(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(Error::Nat(format!(
            "nft rejected {:?}: {}",
            script.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Why the kernel refused an element change, from its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// ENOENT: the table, the map or an element to delete is not there.
    Missing,
    /// EEXIST: an element with that key (host port) exists with another value.
    Exists,
    Other,
}

impl Refusal {
    pub fn of(e: &std::io::Error) -> Refusal {
        match e.raw_os_error() {
            Some(libc::ENOENT) => Refusal::Missing,
            Some(libc::EEXIST) => Refusal::Exists,
            _ => Refusal::Other,
        }
    }
}

/// Of `maps`, those not yet in `present`; an error if a host port is already mapped
/// to somewhere else.
pub fn to_add(present: &[Mapping], maps: &[Mapping]) -> Result<Vec<Mapping>> {
    if let Some((m, other)) = maps.iter().find_map(|m| {
        present
            .iter()
            .find(|p| {
                p.host_port == m.host_port
                    && p.family() == m.family()
                    && p.host_ip == m.host_ip
                    && *p != m
            })
            .map(|p| (m, p))
    }) {
        return Err(Error::Nat(format!(
            "host port {} is already mapped to {} (a leftover? `envoy-sidecar gc` removes mappings no container claims)",
            m.host_port,
            std::net::SocketAddr::new(other.container_ip, other.container_port)
        )));
    }
    Ok(maps
        .iter()
        .filter(|m| !present.contains(m))
        .copied()
        .collect())
}

/// The NAT tables as the product's decisions use it: the seam with an in-memory fake.
pub trait Backend {
    /// Add one container's mappings, all or none (present ones are fine).
    fn add(&self, maps: &[Mapping]) -> Result<()>;
    /// Remove mappings (absent ones are fine) and the connections tracked to them.
    fn remove(&self, maps: &[Mapping]) -> Result<()>;
    /// Every mapping in the table.
    fn list(&self) -> Result<Vec<Mapping>>;
}

impl Backend for Nat {
    fn add(&self, maps: &[Mapping]) -> Result<()> {
        Nat::add(self, maps)
    }
    fn remove(&self, maps: &[Mapping]) -> Result<()> {
        Nat::remove(self, maps)
    }
    fn list(&self) -> Result<Vec<Mapping>> {
        Nat::list(self)
    }
}

/// An in-memory NAT table with the kernel's rules: one element per host port and
/// family.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeNat {
    pub elements: std::cell::RefCell<std::collections::BTreeSet<Mapping>>,
}

#[cfg(test)]
impl Backend for FakeNat {
    fn add(&self, maps: &[Mapping]) -> Result<()> {
        let present: Vec<Mapping> = self.elements.borrow().iter().copied().collect();
        let new = to_add(&present, maps)?;
        self.elements.borrow_mut().extend(new);
        Ok(())
    }
    fn remove(&self, maps: &[Mapping]) -> Result<()> {
        let mut e = self.elements.borrow_mut();
        for m in maps {
            e.remove(m);
        }
        Ok(())
    }
    fn list(&self) -> Result<Vec<Mapping>> {
        Ok(self.elements.borrow().iter().copied().collect())
    }
}

/// What was applied for one container (`nat.json` beside its state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub mappings: Vec<Mapping>,
}

impl Applied {
    pub fn read(path: &Path) -> Result<Option<Applied>> {
        crate::sys::fs::read_json_or_none(path, "NAT record")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified_from_the_errno() {
        let os = std::io::Error::from_raw_os_error;
        assert_eq!(Refusal::of(&os(libc::ENOENT)), Refusal::Missing);
        assert_eq!(Refusal::of(&os(libc::EEXIST)), Refusal::Exists);
        assert_eq!(Refusal::of(&os(libc::EPERM)), Refusal::Other);
        assert_eq!(
            Refusal::of(&std::io::Error::other("timed out")),
            Refusal::Other
        );
    }

    #[test]
    fn elements_are_laid_out_as_the_maps_registers() {
        let e = netlink_elements(&[m(61008, "203.0.113.5", 8080)]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, [6, 0, 0, 0, 0xee, 0x50, 0, 0]);
        assert_eq!(
            e[0].data.as_deref(),
            Some(&[203, 0, 113, 5, 0x1f, 0x90, 0, 0][..])
        );
    }

    #[test]
    fn fake_table_follows_the_kernels_rules() {
        let m = |p, last| Mapping {
            host_port: p,
            container_ip: IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, last)),
            container_port: 61001,
            host_ip: None,
        };
        let nat = FakeNat::default();
        nat.add(&[m(61010, 1), m(61011, 1)]).unwrap();
        nat.add(&[m(61010, 1)]).unwrap(); // identical: fine
        // Another container's IP on a taken port: refused, all or none.
        let e = nat
            .add(&[m(61012, 2), m(61010, 2)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host port 61010 is already mapped to 203.0.113.1"),
            "{e}"
        );
        assert_eq!(nat.list().unwrap(), vec![m(61010, 1), m(61011, 1)]);
        nat.remove(&[m(61011, 1), m(61099, 1)]).unwrap(); // absent: fine
        assert_eq!(nat.list().unwrap(), vec![m(61010, 1)]);
    }

    fn m(h: u16, ip: &str, c: u16) -> Mapping {
        Mapping {
            host_port: h,
            container_ip: ip.parse().unwrap(),
            container_port: c,
            host_ip: None,
        }
    }

    fn at(h: u16, host: &str, ip: &str, c: u16) -> Mapping {
        Mapping {
            host_ip: Some(host.parse().unwrap()),
            ..m(h, ip, c)
        }
    }

    #[test]
    fn address_bound_mappings_are_keyed_by_the_host_address_in_their_own_map() {
        let e = netlink_elements(&[at(61008, "192.0.2.7", "203.0.113.5", 61001)]);
        assert_eq!(e[0].key, [192, 0, 2, 7, 6, 0, 0, 0, 0xee, 0x50, 0, 0]);
        assert_eq!(
            e[0].data.as_deref(),
            Some(&[203, 0, 113, 5, 0xee, 0x49, 0, 0][..])
        );
        let maps = [
            m(61010, "203.0.113.5", 61001),
            at(61011, "192.0.2.7", "203.0.113.5", 61002),
        ];
        assert_eq!(
            add_script(&maps),
            "add element ip envoy_sidecar ports { tcp . 61010 : 203.0.113.5 . 61001 }\n\
             add element ip envoy_sidecar ports_at { 192.0.2.7 . tcp . 61011 : 203.0.113.5 . 61002 }\n"
        );
        let sk = skeleton();
        assert!(
            sk.contains("add map ip envoy_sidecar ports_at { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }"),
            "{sk}"
        );
        assert!(
            sk.contains("output ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @ports_at"),
            "{sk}"
        );
        assert!(
            skeleton_of(Family::V6).contains("ip6 daddr . meta l4proto . th dport map @ports_at")
        );
        let j = r#"{"nftables": [{"map": {"family": "ip", "name": "ports_at", "elem": [[{"concat": ["192.0.2.7", "tcp", 61011]}, {"concat": ["203.0.113.5", 61002]}]]}}]}"#;
        assert_eq!(parse_listing(j).unwrap(), vec![maps[1]]);
        // The kernel's rule per map and key: another address is another key.
        let nat = FakeNat::default();
        nat.add(&[maps[1]]).unwrap();
        nat.add(&[at(61011, "192.0.2.8", "203.0.113.6", 61002)])
            .unwrap();
        let e = nat
            .add(&[at(61011, "192.0.2.7", "203.0.113.6", 61002)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host port 61011 is already mapped to 203.0.113.5:61002"),
            "{e}"
        );
    }

    #[test]
    fn scripts() {
        let maps = [
            m(61008, "203.0.113.5", 8080),
            m(61011, "203.0.113.5", 61001),
        ];
        assert_eq!(
            add_script(&maps),
            "add element ip envoy_sidecar ports { tcp . 61008 : 203.0.113.5 . 8080, tcp . 61011 : 203.0.113.5 . 61001 }\n"
        );
        assert!(
            delete_script(&maps).starts_with("delete element ip envoy_sidecar ports { tcp . 61008")
        );
        assert!(skeleton().contains("dnat ip to meta l4proto . th dport map @ports"));
        let v6 = skeleton_of(Family::V6);
        assert!(v6.contains("add table ip6 envoy_sidecar"), "{v6}");
        assert!(v6.contains("ipv6_addr . inet_service"), "{v6}");
        assert!(
            v6.contains("ip6 daddr != ::1 fib daddr type local dnat ip6 to"),
            "{v6}"
        );
        // A dual-stack container: one statement per table.
        let both = [m(61008, "203.0.113.5", 8080), m(61008, "2001:db8::5", 8080)];
        assert_eq!(
            add_script(&both),
            "add element ip envoy_sidecar ports { tcp . 61008 : 203.0.113.5 . 8080 }\n\
             add element ip6 envoy_sidecar ports { tcp . 61008 : 2001:db8::5 . 8080 }\n"
        );
    }

    #[test]
    fn ipv6_elements_carry_the_16_byte_address() {
        let e = netlink_elements(&[m(61008, "2001:db8::5", 8080)]);
        let mut want = vec![0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        want.extend_from_slice(&[0x1f, 0x90, 0, 0]);
        assert_eq!(e[0].data.as_deref(), Some(&want[..]));
    }

    #[test]
    fn the_same_host_port_in_both_families_is_no_conflict() {
        let nat = FakeNat::default();
        nat.add(&[m(61010, "203.0.113.5", 61001)]).unwrap();
        nat.add(&[m(61010, "2001:db8::5", 61001)]).unwrap();
        let e = nat
            .add(&[m(61010, "2001:db8::6", 61001)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("already mapped to [2001:db8::5]:61001"), "{e}");
        assert_eq!(nat.list().unwrap().len(), 2);
    }

    #[test]
    fn listing() {
        let j = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip", "name": "ports", "table": "envoy_sidecar", "type": ["inet_proto", "inet_service"], "handle": 3, "map": "ipv4_addr . inet_service", "elem": [[{"concat": ["tcp", 61001]}, {"concat": ["203.0.113.5", 61001]}], [{"concat": ["udp", 53]}, {"concat": ["203.0.113.5", 53]}]]}}]}"#;
        assert_eq!(
            parse_listing(j).unwrap(),
            vec![m(61001, "203.0.113.5", 61001)]
        );
        let j6 = r#"{"nftables": [{"map": {"family": "ip6", "name": "ports", "elem": [[{"concat": ["tcp", 61001]}, {"concat": ["2001:db8::5", 61001]}]]}}]}"#;
        assert_eq!(
            parse_listing(j6).unwrap(),
            vec![m(61001, "2001:db8::5", 61001)]
        );
        let empty = r#"{"nftables": [{"metainfo": {}}, {"map": {"name": "ports"}}]}"#;
        assert!(parse_listing(empty).unwrap().is_empty());
        assert!(parse_listing("nope").is_err());
    }
}
