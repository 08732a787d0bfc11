//! Network namespaces: entering one, running a closure in another (the supervisor
//! lives in the container's netns but must change the host's NAT table), reading a
//! namespace's IPv4 and IPv6 addresses, and being woken when addresses change
//! (rtnetlink).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

/// rtnetlink multicast groups (linux/rtnetlink.h): IPv4 and IPv6 address changes.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Enter the network namespace of `pid` (this thread only: setns is per-thread).
pub fn enter(pid: i32) -> io::Result<()> {
    let f = File::open(format!("/proc/{pid}/ns/net"))?;
    enter_file(&f)
}

fn enter_file(ns: &File) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// A handle on this thread's current network namespace, to come back to (or to run
/// work in) after entering another.
pub fn current() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Run `f` on a short-lived thread inside the namespace `ns`, so the caller stays
/// where it is. Sockets `f` opens belong to `ns`, and processes it spawns start there
/// too (fork copies the calling thread's namespaces): how the supervisor changes the
/// host's NAT table over netlink (and runs `nft` for it).
pub fn run_in<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let ns = ns.try_clone()?;
    std::thread::spawn(move || -> io::Result<T> {
        enter_file(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// A container's addresses as the product serves them: one IPv4 and one IPv6 address
/// (the first of each family that others can reach it on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Addresses {
    /// From interface addresses in interface order: the first non-loopback IPv4, and
    /// the first IPv6 that is neither loopback, link-local (fe80::/10: not routable
    /// through the host, and scoped to one link) nor multicast.
    pub fn pick(addrs: impl IntoIterator<Item = IpAddr>) -> Addresses {
        let mut a = Addresses::default();
        for ip in addrs {
            match ip {
                IpAddr::V4(v4) if a.v4.is_none() && !v4.is_loopback() => a.v4 = Some(v4),
                IpAddr::V6(v6)
                    if a.v6.is_none()
                        && !v6.is_loopback()
                        && !v6.is_unicast_link_local()
                        && !v6.is_multicast()
                        && !v6.is_unspecified() =>
                {
                    a.v6 = Some(v6);
                }
                _ => {}
            }
        }
        a
    }

    /// Both, IPv4 first.
    pub fn list(&self) -> Vec<IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.list();
        if l.is_empty() {
            return f.write_str("none");
        }
        let s: Vec<String> = l.iter().map(ToString::to_string).collect();
        f.write_str(&s.join(" "))
    }
}

/// The current network namespace's [`Addresses`].
pub fn addresses() -> Addresses {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Addresses::default();
    };
    Addresses::pick(ifs.filter_map(|a| {
        let sa = a.address?;
        if let Some(v4) = sa.as_sockaddr_in() {
            return Some(IpAddr::V4(v4.ip()));
        }
        sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
    }))
}

/// Whether the kernel serves IPv6 (it may be compiled out or disabled at boot with
/// `ipv6.disable=1`; then an IPv6 socket cannot even be created). Per kernel, not
/// per namespace: `/proc/net/if_inet6` exists exactly when IPv6 is up.
pub fn ipv6_supported() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Whether two processes share a network namespace.
pub fn same(a: i32, b: i32) -> bool {
    let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    matches!((ns(a), ns(b)), (Some(x), Some(y)) if x == y)
}

/// An rtnetlink socket subscribed to address changes in the namespace it was opened
/// in: readable whenever an address is added or removed. What changed is read again
/// with `addresses` (the events only wake the reader; a missed or coalesced event
/// cannot leave it wrong).
pub struct AddrWatch {
    fd: OwnedFd,
}

impl AddrWatch {
    pub fn open() -> io::Result<AddrWatch> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
        )?;
        Ok(AddrWatch { fd })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Read every pending notification; true if there was any.
    pub fn drain(&self) -> bool {
        drain_notifications(&self.fd)
    }
}

/// Read every pending datagram of a netlink notification socket; true if there was
/// any. A receive-buffer overrun (ENOBUFS) means events were lost: also a change to
/// look at. The events only wake the reader, who looks again at what they are about.
pub(crate) fn drain_notifications(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 8192];
    let mut any = false;
    loop {
        match recv(fd.as_fd().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return any,
            Ok(_) => any = true,
            Err(nix::errno::Errno::ENOBUFS) => any = true,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return any,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_skip_loopback_and_link_local() {
        let ips = [
            "127.0.0.1",
            "::1",
            "fe80::1",
            "203.0.113.5",
            "2001:db8::5",
            "203.0.113.6",
            "2001:db8::6",
        ]
        .map(|s| s.parse::<IpAddr>().unwrap());
        let a = Addresses::pick(ips);
        assert_eq!(a.v4, Some(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(a.v6, Some("2001:db8::5".parse().unwrap()));
        assert_eq!(a.to_string(), "203.0.113.5 2001:db8::5");
        let only_local =
            Addresses::pick(["::1", "fe80::2", "127.0.0.1"].map(|s| s.parse().unwrap()));
        assert!(only_local.is_empty());
        assert_eq!(only_local.to_string(), "none");
        assert_eq!(only_local.list(), Vec::<IpAddr>::new());
    }

    #[test]
    fn address_watch_opens_and_drains_nothing_when_idle() {
        let w = AddrWatch::open().expect("rtnetlink socket");
        assert!(!w.drain(), "no address changed");
    }

    #[test]
    fn run_in_our_own_namespace_returns_the_value() {
        let me = current().unwrap();
        let v = run_in(&me, || 41 + 1).unwrap();
        assert_eq!(v, 42);
        assert!(same(
            crate::sys::process::self_pid(),
            crate::sys::process::self_pid()
        ));
    }
}
