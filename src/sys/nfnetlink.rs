//! nfnetlink (`NETLINK_NETFILTER`) without a helper process: nf_tables set-element
//! changes as one batch transaction, and ctnetlink's "delete every connection whose
//! reply comes from this address" (`conntrack -D --reply-src IP`).
//!
//! A socket acts on the network namespace of the thread that opened it: callers open
//! a `Netfilter` (cheap: socket + bind) where `nft` would have run
//! (`sys::netns::run_in`) and keep it for the requests of one operation; the free
//! functions open one per call.
//!
//! Wire format (linux/netlink.h): every message is a `nlmsghdr` (length, type, flags,
//! sequence, port id; host byte order) followed here by a `nfgenmsg` (family, version,
//! resource id in network order) and attributes (`nlattr`: length, type; payload padded
//! to 4 bytes). Message and attribute encoding and parsing are pure functions below, so
//! they are unit-tested without root.
//!
//! Kernel semantics of `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM`, observed on Linux
//! 6.18 (the root tests in `tests/nfnetlink.rs` re-check them):
//! - add with `NLM_F_CREATE` (what `nft add element` sends): an element identical to
//!   one present (same key, same data) is accepted; the same key with other data is
//!   refused with EEXIST and nothing of the batch is applied (the new keys of the same
//!   batch are absent afterwards). With `NLM_F_EXCL` added (`nft create element`) even
//!   the identical element is EEXIST, so it is not set. Without `NLM_F_CREATE` the
//!   results were the same (identical OK, conflict EEXIST, new key added); we send it
//!   as nft does.
//! - delete of a key that is absent: ENOENT, and nothing of the batch applied (the
//!   present keys of the same batch stay). Deletion matches by key: we send keys only;
//!   `nft delete element` given `key : other-data` deletes the element too.
//! - a table or map that does not exist: ENOENT, for add and delete.
//! - errors come back as `NLMSG_ERROR` carrying the failing message's sequence number;
//!   the batch begin/end messages get no reply unless they fail (or ask for an ack).
//! - `nft add element` run twice with the same element exits 0; with a conflicting
//!   element it fails "File exists" and applies nothing; `nft delete element` with one
//!   absent key fails "No such file or directory" and deletes nothing: the same.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

// linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
pub(crate) const NLMSG_ERROR: u16 = 0x2;
pub(crate) const NLMSG_DONE: u16 = 0x3;
const NLMSG_MIN_TYPE: u16 = 0x10;
pub(crate) const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_MULTI: u16 = 0x02;
const NLM_F_ACK: u16 = 0x04;
pub(crate) const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// linux/netfilter/nfnetlink.h
const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = NLMSG_MIN_TYPE;
const NFNL_MSG_BATCH_END: u16 = NLMSG_MIN_TYPE + 1;
const NFGENMSG_LEN: usize = 4;

// linux/netfilter.h
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;

// linux/netfilter/nfnetlink_conntrack.h
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const IPCTNL_MSG_CT_GET_STATS: u16 = 5;
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;

/// A dump datagram is at most 32 KiB (the kernel's cap on dump skbs); an error reply
/// echoes the request, a few hundred bytes for one container's elements.
const RECV_BUF: usize = 64 * 1024;
/// A kernel that never answers must not hang a hook.
const RECV_TIMEOUT_SECS: i64 = 5;
/// Conntrack deletions sent per datagram before their acks are read.
const DELETE_CHUNK: usize = 32;

/// `nfnl` message type: subsystem in the high byte.
const fn nfnl_type(subsys: u16, msg: u16) -> u16 {
    (subsys << 8) | msg
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "netlink message too long")
}

/// Netlink messages being built into one buffer (one datagram).
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Start a message with its nfgenmsg; returns its offset for `end_msg`.
    fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_msg
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(NFNETLINK_V0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end_msg(&mut self, start: usize) -> io::Result<()> {
        let len = u32::try_from(self.buf.len() - start).map_err(|_| too_long())?;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        Ok(())
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> io::Result<()> {
        let len = u16::try_from(NLA_HDRLEN + data.len()).map_err(|_| too_long())?;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING).
    fn attr_str(&mut self, ty: u16, s: &str) -> io::Result<()> {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v)
    }

    fn begin_nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end_nest(&mut self, start: usize) -> io::Result<()> {
        let len = u16::try_from(self.buf.len() - start).map_err(|_| too_long())?;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        Ok(())
    }
}

/// One received netlink message.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// What follows the header (nfgenmsg and attributes, or an nlmsgerr).
    pub payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink reply: {what}"),
    )
}

/// The messages of one datagram, in order.
pub fn messages(mut buf: &[u8]) -> io::Result<Vec<Message<'_>>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = usize::try_from(u32_at(buf, 0).unwrap_or(0)).map_err(|_| malformed("length"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed("message length"));
        }
        out.push(Message {
            ty: u16_at(buf, 4).unwrap_or(0),
            flags: u16_at(buf, 6).unwrap_or(0),
            seq: u32_at(buf, 8).unwrap_or(0),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The attributes in `buf` as (type without the nested/byte-order flags, payload).
/// A truncated trailing attribute ends the list.
pub fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = usize::from(u16_at(buf, 0).unwrap_or(0));
        if len < NLA_HDRLEN || len > buf.len() {
            break;
        }
        out.push((
            u16_at(buf, 2).unwrap_or(0) & NLA_TYPE_MASK,
            &buf[NLA_HDRLEN..len],
        ));
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    out
}

fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf)
        .into_iter()
        .find(|(t, _)| *t == ty)
        .map(|(_, v)| v)
}

/// The errno of an `NLMSG_ERROR` payload: `Some(0)` for an ack.
pub(crate) fn error_code(payload: &[u8]) -> Option<i32> {
    let e = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    Some(e.checked_neg().unwrap_or(i32::MAX))
}

/// A concatenation key or value as nf_tables lays it out in registers: each component
/// padded with zeros to a multiple of 4 bytes (a `u8` protocol takes 4, a port 4, an
/// IPv4 address 4). Components are in network byte order, as the kernel compares them.
pub fn concat(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
        v.resize(align4(v.len()), 0);
    }
    v
}

/// One set or map element: key, and for a map the value it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u8>,
    pub data: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemOp {
    /// `nft add element`: identical elements are fine, another value for a key is
    /// EEXIST.
    Add,
    /// `nft delete element`: any absent key is ENOENT.
    Delete,
}

/// One set's part of a transaction: `elems` of `family table set`.
#[derive(Debug, Clone, Copy)]
pub struct SetChange<'a> {
    pub family: u8,
    pub table: &'a str,
    pub set: &'a str,
    pub elems: &'a [Element],
}

/// The datagram of one nf_tables transaction changing `elems` of `family table set`:
/// batch begin (`seq`), the change (`seq + 1`, acked), batch end (`seq + 2`).
pub fn setelem_batch(
    op: ElemOp,
    family: u8,
    table: &str,
    set: &str,
    elems: &[Element],
    seq: u32,
) -> io::Result<Vec<u8>> {
    setelem_batch_of(
        op,
        &[SetChange {
            family,
            table,
            set,
            elems,
        }],
        seq,
    )
}

/// The datagram of one nf_tables transaction making every change of `changes` (all
/// or none, whatever their families): batch begin (`seq`), the changes (`seq + 1` ..
/// `seq + n`, each acked), batch end (`seq + n + 1`).
pub fn setelem_batch_of(op: ElemOp, changes: &[SetChange<'_>], seq: u32) -> io::Result<Vec<u8>> {
    let mut w = Writer::default();
    let m = w.begin_msg(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        AF_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end_msg(m)?;
    let (ty, flags) = match op {
        ElemOp::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
        ElemOp::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
    };
    let mut next = seq;
    for c in changes {
        next = next.wrapping_add(1);
        let m = w.begin_msg(
            nfnl_type(NFNL_SUBSYS_NFTABLES, ty),
            flags,
            next,
            c.family,
            0,
        );
        w.attr_str(NFTA_SET_ELEM_LIST_TABLE, c.table)?;
        w.attr_str(NFTA_SET_ELEM_LIST_SET, c.set)?;
        let list = w.begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in c.elems {
            let el = w.begin_nest(NFTA_LIST_ELEM);
            let k = w.begin_nest(NFTA_SET_ELEM_KEY);
            w.attr(NFTA_DATA_VALUE, &e.key)?;
            w.end_nest(k)?;
            if let (ElemOp::Add, Some(data)) = (op, &e.data) {
                let d = w.begin_nest(NFTA_SET_ELEM_DATA);
                w.attr(NFTA_DATA_VALUE, data)?;
                w.end_nest(d)?;
            }
            w.end_nest(el)?;
        }
        w.end_nest(list)?;
        w.end_msg(m)?;
    }
    let m = w.begin_msg(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next.wrapping_add(1),
        AF_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end_msg(m)?;
    Ok(w.buf)
}

/// A `NETLINK_NETFILTER` socket in the network namespace of the thread that opened
/// it, for several requests in a row.
///
/// Closing such a socket waits for nf_tables' pending element releases (the kernel's
/// NETLINK_URELEASE handler flushes its destroy work, an RCU grace period: 5-15 ms
/// measured here after a `DELSETELEM`; nothing after a `NEWSETELEM`). Deleting
/// elements and then flushing conntrack on the same socket lets that grace period pass
/// during the conntrack dump instead of being waited for twice.
pub struct Netfilter {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

impl Netfilter {
    pub fn open() -> io::Result<Netfilter> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(RECV_TIMEOUT_SECS),
        )?;
        Ok(Netfilter {
            fd,
            buf: vec![0; RECV_BUF],
            seq: 1,
        })
    }

    /// `n` fresh sequence numbers; returns the first.
    fn seqs(&mut self, n: u32) -> u32 {
        let first = self.seq;
        self.seq = self.seq.wrapping_add(n);
        first
    }

    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        loop {
            match sendto(
                self.fd.as_fd().as_raw_fd(),
                datagram,
                &NetlinkAddr::new(0, 0),
                MsgFlags::empty(),
            ) {
                Ok(n) if n == datagram.len() => return Ok(()),
                Ok(_) => return Err(io::Error::other("short netlink send")),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One datagram. MSG_TRUNC makes the kernel report its full length: a truncated
    /// one is kept only if it is a single error reply (its code comes first).
    fn recv(&mut self) -> io::Result<&[u8]> {
        let n = loop {
            match recv(
                self.fd.as_fd().as_raw_fd(),
                &mut self.buf,
                MsgFlags::MSG_TRUNC,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no netlink reply from the kernel",
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        };
        if n > self.buf.len() {
            if u16_at(&self.buf, 4) == Some(NLMSG_ERROR) {
                // Clamp the header's length to what we have: code and request header.
                let have = u32::try_from(self.buf.len()).map_err(|_| too_long())?;
                self.buf[..4].copy_from_slice(&have.to_ne_bytes());
                return Ok(&self.buf[..]);
            }
            return Err(malformed("datagram larger than the receive buffer"));
        }
        Ok(&self.buf[..n])
    }
}

/// nf_tables' multicast group (linux/netfilter/nfnetlink.h `NFNLGRP_NFTABLES`): every
/// ruleset change in the namespace is announced there.
const NFNLGRP_NFTABLES: u32 = 7;

/// A netfilter socket subscribed to ruleset changes in the network namespace of the
/// thread that opened it: readable whenever a table, chain, rule or set changes (by
/// anyone, us included). Receiving needs CAP_NET_ADMIN in that namespace.
pub struct RulesetWatch {
    fd: OwnedFd,
}

impl RulesetWatch {
    pub fn open() -> io::Result<RulesetWatch> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)),
        )?;
        Ok(RulesetWatch { fd })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Read every pending notification; true if there was any.
    pub fn drain(&self) -> bool {
        crate::sys::netns::drain_notifications(&self.fd)
    }
}

/// `Netfilter::change_set_elements` on a socket of its own.
pub fn change_set_elements(
    op: ElemOp,
    family: u8,
    table: &str,
    set: &str,
    elems: &[Element],
) -> io::Result<()> {
    Netfilter::open()?.change_set_elements(op, family, table, set, elems)
}

/// `Netfilter::ct_delete_reply_src` on a socket of its own.
pub fn ct_delete_reply_src(ip: IpAddr) -> io::Result<usize> {
    Netfilter::open()?.ct_delete_reply_src(ip)
}

/// `Netfilter::ct_count` on a socket of its own.
pub fn ct_count() -> io::Result<u32> {
    Netfilter::open()?.ct_count()
}

impl Netfilter {
    /// Apply one set-element change to `family table set` as one transaction: all
    /// elements or none. Returns the kernel's errno (as `io::Error::raw_os_error`) when it
    /// refuses; see the module comment for which errno means what.
    pub fn change_set_elements(
        &mut self,
        op: ElemOp,
        family: u8,
        table: &str,
        set: &str,
        elems: &[Element],
    ) -> io::Result<()> {
        self.change_sets(
            op,
            &[SetChange {
                family,
                table,
                set,
                elems,
            }],
        )
    }

    /// Apply several sets' element changes (e.g. an IPv4 and an IPv6 map) as one
    /// transaction: all or none.
    pub fn change_sets(&mut self, op: ElemOp, changes: &[SetChange<'_>]) -> io::Result<()> {
        let n = u32::try_from(changes.len()).map_err(|_| too_long())?;
        if n == 0 {
            return Ok(());
        }
        let begin = self.seqs(n + 2);
        let sock = self;
        sock.send(&setelem_batch_of(op, changes, begin)?)?;
        // Each change's reply (ack or error) always comes, the last change's last: a
        // failing batch begin (no permission, unknown subsystem) or commit is reported
        // before them (the kernel sends the commit error first, then the queued
        // per-message replies) and ends the batch. Keep the first errno seen.
        let last = begin.wrapping_add(n);
        let mut first: Option<i32> = None;
        loop {
            let dg = sock.recv()?;
            let mut done = false;
            for m in messages(dg)? {
                if m.ty != NLMSG_ERROR || m.seq.wrapping_sub(begin) >= n + 2 {
                    continue;
                }
                let code = error_code(m.payload).ok_or_else(|| malformed("short error"))?;
                if code != 0 && first.is_none() {
                    first = Some(code);
                }
                // The batch begin failing means nothing else is processed.
                if m.seq == last || (m.seq == begin && code != 0) {
                    done = true;
                }
            }
            if done {
                break;
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The request dumping every conntrack entry, IPv4 and IPv6 (`AF_UNSPEC`: the
/// kernel filters a dump by family only when one is named).
pub fn ct_dump_request(seq: u32) -> io::Result<Vec<u8>> {
    let mut w = Writer::default();
    let m = w.begin_msg(
        nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        AF_UNSPEC,
        0,
    );
    w.end_msg(m)?;
    Ok(w.buf)
}

/// What identifies a conntrack entry for deletion, from a dump message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// `AF_INET` or `AF_INET6`: a delete must name the entry's own family.
    pub family: u8,
    /// The nested `CTA_TUPLE_ORIG` payload as the kernel sent it.
    pub orig: Vec<u8>,
    pub reply_src: Option<IpAddr>,
    /// `CTA_ZONE` (a non-default zone must be named to find the entry).
    pub zone: Option<Vec<u8>>,
    /// `CTA_ID`: the delete then only hits this very entry, not a newer one that
    /// reused its tuple.
    pub id: Option<Vec<u8>>,
}

/// Parse one `IPCTNL_MSG_CT_NEW` dump message's payload (nfgenmsg + attributes).
pub fn parse_ct(payload: &[u8]) -> Option<CtEntry> {
    let family = *payload.first()?;
    let a = payload.get(NFGENMSG_LEN..)?;
    let orig = attr(a, CTA_TUPLE_ORIG)?.to_vec();
    let ip = attr(a, CTA_TUPLE_REPLY).and_then(|t| attr(t, CTA_TUPLE_IP));
    let reply_src = match family {
        AF_INET => ip
            .and_then(|ip| attr(ip, CTA_IP_V4_SRC))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        AF_INET6 => ip
            .and_then(|ip| attr(ip, CTA_IP_V6_SRC))
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    };
    Some(CtEntry {
        family,
        orig,
        reply_src,
        zone: attr(a, CTA_ZONE).map(<[u8]>::to_vec),
        id: attr(a, CTA_ID).map(<[u8]>::to_vec),
    })
}

/// Append the deletion of `e` (acked) to `w`.
fn ct_delete(w: &mut Writer, e: &CtEntry, seq: u32) -> io::Result<()> {
    let m = w.begin_msg(
        nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        e.family,
        0,
    );
    let t = w.begin_nest(CTA_TUPLE_ORIG);
    w.buf.extend_from_slice(&e.orig);
    w.pad();
    w.end_nest(t)?;
    if let Some(z) = &e.zone {
        w.attr(CTA_ZONE, z)?;
    }
    if let Some(id) = &e.id {
        w.attr(CTA_ID, id)?;
    }
    w.end_msg(m)
}

/// Send dump `request` (sequence `seq`) and hand each reply message of type `ty` to
/// `each` until the dump is done; an error reply ends it with the kernel's errno.
fn dump(
    sock: &mut Netfilter,
    request: &[u8],
    seq: u32,
    ty: u16,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    sock.send(request)?;
    loop {
        let dg = sock.recv()?;
        for m in messages(dg)? {
            if m.seq != seq {
                continue;
            }
            match m.ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => match error_code(m.payload) {
                    Some(0) => {}
                    Some(e) => return Err(io::Error::from_raw_os_error(e)),
                    None => return Err(malformed("short error")),
                },
                t if t == ty => each(m.payload),
                _ => {}
            }
            if m.flags & NLM_F_MULTI == 0 && m.ty != NLMSG_ERROR {
                // A single (non-multipart) reply is the whole answer.
                return Ok(());
            }
        }
    }
}

/// Every conntrack entry whose reply comes from one of `ips` (sorted): a full dump,
/// filtered here (what `conntrack -L --reply-src` does).
fn ct_matching(sock: &mut Netfilter, ips: &[IpAddr], seq: u32) -> io::Result<Vec<CtEntry>> {
    let mut found = Vec::new();
    let ty = nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW);
    dump(sock, &ct_dump_request(seq)?, seq, ty, |payload| {
        if let Some(e) = parse_ct(payload)
            && e.reply_src.is_some_and(|ip| ips.binary_search(&ip).is_ok())
        {
            found.push(e);
        }
    })?;
    Ok(found)
}

/// The request dumping every nf_tables rule of the namespace, all families.
pub fn rules_dump_request(seq: u32) -> io::Result<Vec<u8>> {
    let mut w = Writer::default();
    let m = w.begin_msg(
        nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETRULE),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        AF_UNSPEC,
        0,
    );
    w.end_msg(m)?;
    Ok(w.buf)
}

/// Every rule of this socket's namespace (`nft list ruleset` without set elements,
/// chains or the JSON): each `NFT_MSG_NEWRULE` payload's attributes, after nfgenmsg.
/// The kernel serialises the rules; no process, no libnftables.
pub fn dump_rules() -> io::Result<Vec<Vec<u8>>> {
    let mut sock = Netfilter::open()?;
    let seq = sock.seqs(1);
    let mut rules = Vec::new();
    let ty = nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWRULE);
    dump(&mut sock, &rules_dump_request(seq)?, seq, ty, |payload| {
        rules.push(payload.get(NFGENMSG_LEN..).unwrap_or(&[]).to_vec());
    })?;
    Ok(rules)
}

impl Netfilter {
    /// Delete every conntrack entry whose reply tuple's source is `ip` (`conntrack -D
    /// --reply-src IP`), in the socket's network namespace. Returns how many were
    /// deleted; an entry that went away meanwhile (ENOENT) is not counted and not an error.
    ///
    /// The dump walks the kernel's whole conntrack hash table (shared by all namespaces):
    /// its cost grows with `nf_conntrack_buckets`, not with the entries found.
    pub fn ct_delete_reply_src(&mut self, ip: IpAddr) -> io::Result<usize> {
        self.ct_delete_reply_srcs(&[ip])
    }

    /// [`Netfilter::ct_delete_reply_src`] for several addresses with one dump (gc
    /// removing many containers at once walks the table once, not once each).
    pub fn ct_delete_reply_srcs(&mut self, ips: &[IpAddr]) -> io::Result<usize> {
        let mut ips = ips.to_vec();
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() {
            return Ok(0);
        }
        let dump = self.seqs(1);
        let sock = self;
        let entries = ct_matching(sock, &ips, dump)?;
        let mut deleted = 0;
        for chunk in entries.chunks(DELETE_CHUNK) {
            let mut w = Writer::default();
            let n = u32::try_from(chunk.len()).map_err(|_| too_long())?;
            let first = sock.seqs(n);
            let mut seq = first;
            for e in chunk {
                ct_delete(&mut w, e, seq)?;
                seq = seq.wrapping_add(1);
            }
            sock.send(&w.buf)?;
            let mut pending = chunk.len();
            let mut err: Option<i32> = None;
            while pending > 0 {
                let dg = sock.recv()?;
                for m in messages(dg)? {
                    if m.ty != NLMSG_ERROR || m.seq.wrapping_sub(first) >= seq.wrapping_sub(first) {
                        continue;
                    }
                    pending = pending.saturating_sub(1);
                    match error_code(m.payload) {
                        Some(0) => deleted += 1,
                        Some(libc::ENOENT) => {}
                        Some(e) => {
                            err.get_or_insert(e);
                        }
                        None => return Err(malformed("short error")),
                    }
                }
            }
            if let Some(e) = err {
                return Err(io::Error::from_raw_os_error(e));
            }
        }
        Ok(deleted)
    }

    /// How many connections are tracked in this network namespace (`conntrack -C`): one
    /// small request, the check that ctnetlink answers.
    pub fn ct_count(&mut self) -> io::Result<u32> {
        let seq = self.seqs(1);
        let mut w = Writer::default();
        let m = w.begin_msg(
            nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET_STATS),
            NLM_F_REQUEST,
            seq,
            AF_UNSPEC,
            0,
        );
        w.end_msg(m)?;
        let sock = self;
        sock.send(&w.buf)?;
        loop {
            let dg = sock.recv()?;
            for m in messages(dg)? {
                if m.seq != seq {
                    continue;
                }
                if m.ty == NLMSG_ERROR {
                    return match error_code(m.payload) {
                        Some(0) | None => Err(malformed("no statistics")),
                        Some(e) => Err(io::Error::from_raw_os_error(e)),
                    };
                }
                let n = m
                    .payload
                    .get(NFGENMSG_LEN..)
                    .and_then(|a| attr(a, CTA_STATS_GLOBAL_ENTRIES))
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .ok_or_else(|| malformed("no entry count"))?;
                return Ok(u32::from_be_bytes(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenation_pads_each_component() {
        assert_eq!(
            concat(&[&[6], &61008u16.to_be_bytes()]),
            [6, 0, 0, 0, 0xee, 0x50, 0, 0]
        );
        assert_eq!(
            concat(&[&[203, 0, 113, 5], &8080u16.to_be_bytes()]),
            [203, 0, 113, 5, 0x1f, 0x90, 0, 0]
        );
        assert!(concat(&[]).is_empty());
    }

    #[test]
    fn attributes_are_padded_and_parse_back() {
        let mut w = Writer::default();
        w.attr_str(1, "m").unwrap(); // 4 + 2 bytes, padded to 8
        w.attr(2, &[1, 2, 3, 4]).unwrap(); // 8, no padding
        w.attr(3, &[9]).unwrap(); // 5, padded to 8
        assert_eq!(
            w.buf,
            [
                6, 0, 1, 0, b'm', 0, 0, 0, //
                8, 0, 2, 0, 1, 2, 3, 4, //
                5, 0, 3, 0, 9, 0, 0, 0,
            ]
        );
        let a = attrs(&w.buf);
        assert_eq!(
            a,
            vec![(1, &b"m\0"[..]), (2, &[1, 2, 3, 4][..]), (3, &[9][..])]
        );
        // A nested attribute carries NLA_F_NESTED; parsing masks it off.
        let mut w = Writer::default();
        let n = w.begin_nest(7);
        w.attr(1, &[0xaa]).unwrap();
        w.end_nest(n).unwrap();
        assert_eq!(w.buf, [12, 0, 7, 0x80, 5, 0, 1, 0, 0xaa, 0, 0, 0]);
        assert_eq!(attrs(&w.buf), vec![(7, &w.buf[4..])]);
        // A truncated attribute ends the list rather than reading past the buffer.
        assert_eq!(attrs(&[8, 0, 1, 0, 1]), vec![]);
    }

    /// Hand-checked against linux/netlink.h, nfnetlink.h and nf_tables.h (and against
    /// `nft --debug=mnl add element`, which sends the same change message plus a
    /// NFTA_SET_ELEM_LIST_SET_ID we do not need for an existing set).
    #[cfg(target_endian = "little")]
    #[test]
    fn one_add_of_two_elements_is_byte_exact() {
        let e = |port: u16, ip: [u8; 4], cport: u16| Element {
            key: concat(&[&[6], &port.to_be_bytes()]),
            data: Some(concat(&[&ip, &cport.to_be_bytes()])),
        };
        let elems = [
            e(61008, [203, 0, 113, 5], 8080),
            e(61011, [203, 0, 113, 5], 61001),
        ];
        let got = setelem_batch(ElemOp::Add, NFPROTO_IPV4, "t1", "m", &elems, 7).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // NFNL_MSG_BATCH_BEGIN: len 20, type 0x10, flags REQUEST, seq 7, pid 0
            20, 0, 0, 0, 0x10, 0, 0x01, 0, 7, 0, 0, 0, 0, 0, 0, 0,
            // nfgenmsg: AF_UNSPEC, v0, res_id NFNL_SUBSYS_NFTABLES (be16)
            0, 0, 0x00, 0x0a,
            // NFT_MSG_NEWSETELEM: len 112, type 0x0a0c, REQUEST|ACK|CREATE = 0x405, seq 8
            112, 0, 0, 0, 0x0c, 0x0a, 0x05, 0x04, 8, 0, 0, 0, 0, 0, 0, 0,
            // nfgenmsg: NFPROTO_IPV4, v0, res_id 0
            2, 0, 0, 0,
            // NFTA_SET_ELEM_LIST_TABLE "t1\0"
            7, 0, 1, 0, b't', b'1', 0, 0,
            // NFTA_SET_ELEM_LIST_SET "m\0"
            6, 0, 2, 0, b'm', 0, 0, 0,
            // NFTA_SET_ELEM_LIST_ELEMENTS (nested), 76 bytes
            76, 0, 3, 0x80,
              // NFTA_LIST_ELEM (nested), 36 bytes
              36, 0, 1, 0x80,
                // NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE tcp . 61008 }
                16, 0, 1, 0x80, 12, 0, 1, 0, 6, 0, 0, 0, 0xee, 0x50, 0, 0,
                // NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE 203.0.113.5 . 8080 }
                16, 0, 2, 0x80, 12, 0, 1, 0, 203, 0, 113, 5, 0x1f, 0x90, 0, 0,
              36, 0, 1, 0x80,
                16, 0, 1, 0x80, 12, 0, 1, 0, 6, 0, 0, 0, 0xee, 0x53, 0, 0,
                16, 0, 2, 0x80, 12, 0, 1, 0, 203, 0, 113, 5, 0xee, 0x49, 0, 0,
            // NFNL_MSG_BATCH_END: type 0x11, seq 9
            20, 0, 0, 0, 0x11, 0, 0x01, 0, 9, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0x00, 0x0a,
        ];
        assert_eq!(got, want);
        // Deleting: no data, no CREATE, type NFT_MSG_DELSETELEM.
        let del = setelem_batch(ElemOp::Delete, NFPROTO_IPV4, "t1", "m", &elems, 7).unwrap();
        let ms = messages(&del).unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!((ms[1].ty, ms[1].flags, ms[1].seq), (0x0a0e, 0x05, 8));
        let list = attr(&ms[1].payload[4..], NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
        for (t, el) in attrs(list) {
            assert_eq!(t, NFTA_LIST_ELEM);
            assert!(attr(el, NFTA_SET_ELEM_KEY).is_some());
            assert!(attr(el, NFTA_SET_ELEM_DATA).is_none());
        }
    }

    /// One `IPCTNL_MSG_CT_NEW` message of a real dump (Linux 6.18, x86-64): a closed
    /// TCP connection 10.200.1.2:59544 -> 10.200.1.1:61001, DNAT'd to
    /// 10.200.2.2:8080, so the reply tuple is 10.200.2.2:8080 -> 10.200.1.2:59544.
    /// `conntrack -L` showed it as `tcp 6 9 CLOSE src=10.200.1.2 dst=10.200.1.1
    /// sport=59544 dport=61001 src=10.200.2.2 dst=10.200.1.2 sport=8080 dport=59544
    /// [ASSURED] mark=0 use=1`.
    #[cfg(target_endian = "little")]
    #[rustfmt::skip]
    const CAPTURED_CT: &[u8] = &[
    0xd4, 0x00, 0x00, 0x00, 0x00, 0x01, 0x22, 0x00, 0x01, 0x00, 0x00, 0x00, 0xf4, 0x1a, 0x00, 0x00,
    0x02, 0x00, 0x00, 0x00, 0x34, 0x00, 0x01, 0x80, 0x14, 0x00, 0x01, 0x80, 0x08, 0x00, 0x01, 0x00,
    0x0a, 0xc8, 0x01, 0x02, 0x08, 0x00, 0x02, 0x00, 0x0a, 0xc8, 0x01, 0x01, 0x1c, 0x00, 0x02, 0x80,
    0x05, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00, 0x00, 0x06, 0x00, 0x02, 0x00, 0xe8, 0x98, 0x00, 0x00,
    0x06, 0x00, 0x03, 0x00, 0xee, 0x49, 0x00, 0x00, 0x34, 0x00, 0x02, 0x80, 0x14, 0x00, 0x01, 0x80,
    0x08, 0x00, 0x01, 0x00, 0x0a, 0xc8, 0x02, 0x02, 0x08, 0x00, 0x02, 0x00, 0x0a, 0xc8, 0x01, 0x02,
    0x1c, 0x00, 0x02, 0x80, 0x05, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00, 0x00, 0x06, 0x00, 0x02, 0x00,
    0x1f, 0x90, 0x00, 0x00, 0x06, 0x00, 0x03, 0x00, 0xe8, 0x98, 0x00, 0x00, 0x08, 0x00, 0x03, 0x00,
    0x00, 0x00, 0x01, 0xae, 0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x0c, 0x00,
    0xb6, 0xa2, 0xab, 0x26, 0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x07, 0x00,
    0x00, 0x00, 0x00, 0x09, 0x30, 0x00, 0x04, 0x80, 0x2c, 0x00, 0x01, 0x80, 0x05, 0x00, 0x01, 0x00,
    0x08, 0x00, 0x00, 0x00, 0x05, 0x00, 0x02, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x05, 0x00, 0x03, 0x00,
    0x0a, 0x00, 0x00, 0x00, 0x06, 0x00, 0x04, 0x00, 0x27, 0x00, 0x00, 0x00, 0x06, 0x00, 0x05, 0x00,
    0x23, 0x00, 0x00, 0x00,
    ];

    #[cfg(target_endian = "little")]
    #[test]
    fn a_captured_dump_message_parses() {
        let ms = messages(CAPTURED_CT).unwrap();
        assert_eq!(ms.len(), 1);
        assert_eq!(ms[0].ty, 0x0100);
        assert_ne!(ms[0].flags & NLM_F_MULTI, 0);
        let e = parse_ct(ms[0].payload).unwrap();
        assert_eq!(e.reply_src, Some(IpAddr::V4(Ipv4Addr::new(10, 200, 2, 2))));
        assert_eq!(e.family, AF_INET);
        let ip = attr(&e.orig, CTA_TUPLE_IP).unwrap();
        assert_eq!(attr(ip, CTA_IP_V4_SRC), Some(&[10, 200, 1, 2][..]));
        assert_eq!(attr(ip, 2), Some(&[10, 200, 1, 1][..])); // CTA_IP_V4_DST
        let proto = attr(&e.orig, 2).unwrap(); // CTA_TUPLE_PROTO
        assert_eq!(attr(proto, 1), Some(&[6][..])); // CTA_PROTO_NUM: TCP
        assert_eq!(attr(proto, 3), Some(&61001u16.to_be_bytes()[..])); // dst port
        assert_eq!(e.id.as_deref(), Some(&[0xb6, 0xa2, 0xab, 0x26][..]));
        assert_eq!(e.zone, None);
        // The deletion names the original tuple and the id, nothing else.
        let mut w = Writer::default();
        ct_delete(&mut w, &e, 5).unwrap();
        let d = messages(&w.buf).unwrap();
        assert_eq!((d[0].ty, d[0].flags, d[0].seq), (0x0102, 0x05, 5));
        assert_eq!(d[0].payload[0], AF_INET, "the entry's own family");
        let a = &d[0].payload[4..];
        assert_eq!(attr(a, CTA_TUPLE_ORIG), Some(&e.orig[..]));
        assert_eq!(attr(a, CTA_ID), e.id.as_deref());
    }

    #[test]
    fn one_transaction_changes_an_ipv4_and_an_ipv6_map() {
        let e4 = [Element {
            key: concat(&[&[6], &61008u16.to_be_bytes()]),
            data: Some(concat(&[&[203, 0, 113, 5], &8080u16.to_be_bytes()])),
        }];
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let e6 = [Element {
            key: e4[0].key.clone(),
            data: Some(concat(&[&v6.octets(), &8080u16.to_be_bytes()])),
        }];
        let changes = [
            SetChange {
                family: NFPROTO_IPV4,
                table: "t",
                set: "m",
                elems: &e4,
            },
            SetChange {
                family: NFPROTO_IPV6,
                table: "t",
                set: "m",
                elems: &e6,
            },
        ];
        let b = setelem_batch_of(ElemOp::Add, &changes, 20).unwrap();
        let ms = messages(&b).unwrap();
        let seqs: Vec<u32> = ms.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [20, 21, 22, 23]);
        assert_eq!(
            (ms[0].ty, ms[3].ty),
            (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END)
        );
        assert_eq!(
            (ms[1].payload[0], ms[2].payload[0]),
            (NFPROTO_IPV4, NFPROTO_IPV6)
        );
        let value = |m: &Message<'_>| {
            let list = attr(&m.payload[4..], NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
            let el = attr(list, NFTA_LIST_ELEM).unwrap();
            let d = attr(el, NFTA_SET_ELEM_DATA).unwrap();
            attr(d, NFTA_DATA_VALUE).unwrap().to_vec()
        };
        assert_eq!(value(&ms[1]).len(), 8);
        assert_eq!(
            value(&ms[2]).len(),
            20,
            "16-byte address . port padded to 4"
        );
        // One change is the single-set batch, byte for byte.
        assert_eq!(
            setelem_batch_of(ElemOp::Delete, &changes[..1], 7).unwrap(),
            setelem_batch(ElemOp::Delete, NFPROTO_IPV4, "t", "m", &e4, 7).unwrap()
        );
    }

    #[test]
    fn an_ipv6_entry_names_its_reply_source() {
        let src: Ipv6Addr = "2001:db8:e5::2".parse().unwrap();
        let mut w = Writer::default();
        let t = w.begin_nest(CTA_TUPLE_ORIG);
        let ip = w.begin_nest(CTA_TUPLE_IP);
        w.attr(CTA_IP_V6_SRC, &[0; 16]).unwrap();
        w.end_nest(ip).unwrap();
        w.end_nest(t).unwrap();
        let t = w.begin_nest(CTA_TUPLE_REPLY);
        let ip = w.begin_nest(CTA_TUPLE_IP);
        w.attr(CTA_IP_V6_SRC, &src.octets()).unwrap();
        w.end_nest(ip).unwrap();
        w.end_nest(t).unwrap();
        let mut payload = vec![AF_INET6, 0, 0, 0];
        payload.extend_from_slice(&w.buf);
        let e = parse_ct(&payload).unwrap();
        assert_eq!((e.family, e.reply_src), (AF_INET6, Some(IpAddr::V6(src))));
    }

    #[test]
    fn dump_request_and_error_replies() {
        let r = ct_dump_request(3).unwrap();
        let ms = messages(&r).unwrap();
        assert_eq!((ms[0].ty, ms[0].flags, ms[0].seq), (0x0101, 0x301, 3));
        assert_eq!(ms[0].payload, [AF_UNSPEC, 0, 0, 0], "both families");
        // nlmsgerr: -ENOENT then the request's header.
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&0u16.to_ne_bytes());
        err.extend_from_slice(&8u32.to_ne_bytes());
        err.extend_from_slice(&0u32.to_ne_bytes());
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        let ms = messages(&err).unwrap();
        assert_eq!(ms[0].seq, 8);
        assert_eq!(error_code(ms[0].payload), Some(libc::ENOENT));
        assert!(messages(&err[..20]).is_err(), "length beyond the datagram");
    }
}
