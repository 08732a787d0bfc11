//! The host's TCP listeners, from `/proc/net/tcp` and `/proc/net/tcp6` of this
//! process's network namespace (the host's, for the wrapper and `doctor`): a host port
//! a process listens on is not one to hand out for NAT — DNAT in prerouting would take
//! its outside traffic away from it.

use std::collections::BTreeSet;

/// Ports in state LISTEN (`st` 0A) of one `/proc/net/tcp{,6}` text, any address.
pub fn parse(text: &str) -> BTreeSet<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(3) != Some(&"0A") {
                return None;
            }
            // local_address is HEXIP:HEXPORT.
            cols.get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
        })
        .collect()
}

/// Every TCP port something listens on here, IPv4 and IPv6. A file that cannot be
/// read adds nothing (no IPv6 in the kernel, say).
pub fn host_tcp_listeners() -> BTreeSet<u16> {
    listen_ports(["/proc/net/tcp", "/proc/net/tcp6"])
}

/// The LISTEN ports of both files; a file that cannot be read adds nothing.
fn listen_ports(files: [&str; 2]) -> BTreeSet<u16> {
    files
        .iter()
        .filter_map(|f| read_proc(f).ok())
        .flat_map(|t| parse(&t))
        .collect()
}

/// A `/proc/net/tcp{,6}` file in large reads: each read(2) of it walks the kernel's
/// socket hashes again, and `read_to_string` on a file of unknown size starts with
/// 32-byte reads (measured: 13 ms for both files that way, 8 ms in 1 MiB reads).
fn read_proc(path: &str) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether a TCP socket of this network namespace listens on `port` (any address,
/// either family): a bind probe, no listing. `/proc/net/tcp` walks the kernel's whole
/// established-connections hash on every read — sized by RAM, not by connections: ~4
/// ms a file on a 23 GiB host with three sockets — while one bind costs microseconds.
/// The probe is a dual-stack `[::]:port` socket with SO_REUSEADDR (IPv4 `0.0.0.0` when
/// the kernel has no IPv6), bound and closed without `listen`, so it never accepts
/// anything. With SO_REUSEADDR it conflicts with a listener on any address of the
/// port and with a socket bound there without it; not with TIME_WAIT leftovers.
pub fn tcp_port_taken(port: u16) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, setsockopt, socket,
        sockopt,
    };
    let probe = |family: AddressFamily| -> Option<nix::Result<()>> {
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).ok()?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).ok()?;
        Some(match family {
            AddressFamily::Inet6 => {
                setsockopt(&fd, sockopt::Ipv6V6Only, &false).ok()?;
                let a = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
                bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn6::from(a))
            }
            _ => {
                let a = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
                bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(a))
            }
        })
    };
    let r = probe(AddressFamily::Inet6).or_else(|| probe(AddressFamily::Inet));
    matches!(r, Some(Err(nix::errno::Errno::EADDRINUSE)))
}

/// Every TCP port something listens on in the network namespace at `path` (a bind
/// mount or `/proc/<pid>/ns/net`), read on a thread that entered it
/// (`/proc/thread-self/net` is the thread's namespace's).
pub fn tcp_listeners_in(path: &std::path::Path) -> std::io::Result<BTreeSet<u16>> {
    let ns = std::fs::File::open(path)?;
    super::netns::run_in(&ns, || {
        listen_ports(["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_entries_only_of_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000:EE49 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
           1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
           2: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 3 1 0 100 0 0 10 0\n";
        assert_eq!(parse(v4), BTreeSet::from([0xEE49, 0x35]));
        let v6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000000000000:EE4A 00000000000000000000000000000000:0000 0A\n";
        assert_eq!(parse(v6), BTreeSet::from([0xEE4A]));
        assert!(parse("").is_empty());
        assert!(parse("header\ngarbage line\n0: zz:zz 0 0A\n").is_empty());
    }

    #[test]
    fn the_bind_probe_sees_listeners_of_either_family_on_any_address() {
        for addr in ["127.0.0.1:0", "0.0.0.0:0", "[::1]:0", "[::]:0"] {
            let Ok(l) = std::net::TcpListener::bind(addr) else {
                eprintln!("skipped {addr}: cannot bind it here");
                continue;
            };
            let p = l.local_addr().unwrap().port();
            assert!(tcp_port_taken(p), "{addr} port {p}");
            drop(l);
            assert!(!tcp_port_taken(p), "{addr} port {p} after close");
        }
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        assert!(!tcp_port_taken(p), "a UDP socket is not a TCP listener");
    }

    #[test]
    fn a_real_listener_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(host_tcp_listeners().contains(&p));
    }
}
