//! Network namespaces: entering one, running a closure in another (the supervisor
//! lives in the container's netns but must change the host's NAT table), reading a
//! namespace's IPv4 address, and being woken when addresses change (rtnetlink).

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
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

/// The first non-loopback IPv4 address of the current network namespace.
pub fn first_ipv4() -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .find(|ip| !ip.is_loopback())
}

/// Whether two processes share a network namespace.
pub fn same(a: i32, b: i32) -> bool {
    let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    matches!((ns(a), ns(b)), (Some(x), Some(y)) if x == y)
}

/// An rtnetlink socket subscribed to address changes in the namespace it was opened
/// in: readable whenever an address is added or removed. What changed is read again
/// with `first_ipv4` (the events only wake the reader; a missed or coalesced event
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

    /// Read every pending notification; true if there was any. A receive-buffer
    /// overrun (ENOBUFS) means events were lost: also a change to look at.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut any = false;
        loop {
            match recv(
                self.fd.as_fd().as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return any,
                Ok(_) => any = true,
                Err(nix::errno::Errno::ENOBUFS) => any = true,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return any,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
