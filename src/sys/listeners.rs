//! The TCP listeners of a network namespace (the host's, for the wrapper and `doctor`;
//! a joined one, for a container sharing it): a host port a process listens on is not
//! one to hand out for NAT — DNAT in prerouting would take its outside traffic away
//! from it. From the kernel's sock_diag, with `/proc/net/tcp{,6}` as the fallback.

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

/// Every TCP port something listens on here, IPv4 and IPv6: the kernel's own list of
/// listeners (sock_diag), or `/proc/net/tcp{,6}` where sock_diag is not available.
pub fn host_tcp_listeners() -> BTreeSet<u16> {
    listening_ports(["/proc/net/tcp", "/proc/net/tcp6"])
}

/// sock_diag's listeners, else the LISTEN ports of both files (a file that cannot be
/// read adds nothing: no IPv6 in the kernel, say).
fn listening_ports(files: [&str; 2]) -> BTreeSet<u16> {
    match sock_diag::listeners() {
        Ok(ports) => ports,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag unavailable; listing /proc/net/tcp");
            files
                .iter()
                .filter_map(|f| read_proc(f).ok())
                .flat_map(|t| parse(&t))
                .collect()
        }
    }
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

/// Every TCP port something listens on in the network namespace at `path` (a bind
/// mount or `/proc/<pid>/ns/net`), listed on a thread that entered it (a netlink
/// socket and `/proc/thread-self/net` both belong to the thread's namespace).
pub fn tcp_listeners_in(path: &std::path::Path) -> std::io::Result<BTreeSet<u16>> {
    let ns = std::fs::File::open(path)?;
    super::netns::run_in(&ns, || {
        listening_ports(["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"])
    })
}

/// The listeners of this thread's network namespace from NETLINK_SOCK_DIAG
/// (linux/inet_diag.h), asked for state LISTEN only. Why not `/proc/net/tcp`: every
/// read of it walks the whole established-connections hash, which the kernel sizes by
/// RAM, not by connections (~4 ms a file on a 23 GiB host with three sockets); a dump
/// restricted to LISTEN walks only the listening hash (`inet_diag_dump_icsk` skips the
/// established one when no other state is asked for). Listening only, as the `/proc`
/// listing was: a socket merely bound (or an outgoing connection's local port, which
/// the ephemeral range shares with any port pool) is not a listener DNAT would shadow.
mod sock_diag {
    use std::collections::BTreeSet;
    use std::io;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
        setsockopt, socket, sockopt,
    };
    use nix::sys::time::{TimeVal, TimeValLike};

    use crate::sys::nfnetlink::{
        NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, error_code, messages,
    };

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const IPPROTO_TCP: u8 = 6;
    const TCP_LISTEN: u8 = 10;
    /// nlmsghdr (16) + inet_diag_req_v2 (family, protocol, ext, pad, states: 8; then
    /// the 48-byte inet_diag_sockid, zero: any address and port).
    const REQUEST_LEN: u32 = 16 + 8 + 48;
    // linux/socket.h
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;

    /// One dump request for `family`'s TCP sockets in state LISTEN.
    pub fn request(family: u8, seq: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(REQUEST_LEN as usize);
        m.extend_from_slice(&REQUEST_LEN.to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        m.resize(REQUEST_LEN as usize, 0);
        m
    }

    /// What one reply datagram says: the listening ports it carries, and whether the
    /// dump is over. An error reply is the kernel's errno.
    pub fn parse(datagram: &[u8], seq: u32, ports: &mut BTreeSet<u16>) -> io::Result<bool> {
        for m in messages(datagram)? {
            if m.seq != seq {
                continue;
            }
            match m.ty {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => match error_code(m.payload) {
                    Some(0) => {}
                    Some(e) => return Err(io::Error::from_raw_os_error(e)),
                    None => return Err(io::Error::from_raw_os_error(libc::EPROTO)),
                },
                // inet_diag_msg: family, state, timer, retrans, then the sockid whose
                // source port (network order) comes first.
                SOCK_DIAG_BY_FAMILY => {
                    if let (Some(&TCP_LISTEN), Some(p)) = (m.payload.get(1), m.payload.get(4..6)) {
                        ports.insert(u16::from_be_bytes([p[0], p[1]]));
                    }
                }
                _ => {}
            }
        }
        Ok(false)
    }

    /// The LISTEN ports of both families. IPv6 refused (a kernel without it) adds
    /// nothing; any other failure is returned for the caller's fallback.
    pub fn listeners() -> io::Result<BTreeSet<u16>> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::seconds(5))?;
        let mut ports = BTreeSet::new();
        let mut buf = vec![0u8; 64 * 1024];
        for (seq, family) in [(1u32, AF_INET), (2, AF_INET6)] {
            let req = request(family, seq);
            sendto(
                fd.as_raw_fd(),
                &req,
                &NetlinkAddr::new(0, 0),
                MsgFlags::empty(),
            )?;
            loop {
                let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                match parse(&buf[..n], seq, &mut ports) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) if family == AF_INET6 => {
                        tracing::debug!(error = %e, "no IPv6 sock_diag");
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(ports)
    }
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
    fn sock_diag_sees_listeners_of_either_family_on_any_address_and_nothing_else() {
        let listeners = || sock_diag::listeners().expect("sock_diag dump");
        for addr in ["127.0.0.1:0", "0.0.0.0:0", "[::1]:0", "[::]:0"] {
            let Ok(l) = std::net::TcpListener::bind(addr) else {
                eprintln!("skipped {addr}: cannot bind it here");
                continue;
            };
            let p = l.local_addr().unwrap().port();
            assert!(listeners().contains(&p), "{addr} port {p}");
            // An accepted connection and the client's end are not listeners: the
            // client's local port (ephemeral) must not show.
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (_a, _) = l.accept().unwrap();
            let client_port = c.local_addr().unwrap().port();
            assert!(!listeners().contains(&client_port), "{addr}: client port");
            drop(l);
            assert!(!listeners().contains(&p), "{addr} port {p} after close");
        }
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        assert!(
            !listeners().contains(&p),
            "a UDP socket is not a TCP listener"
        );
    }

    #[test]
    fn sock_diag_request_and_replies() {
        let r = sock_diag::request(10, 7);
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(&r[16..18], &[10, 6]);
        assert_eq!(u32::from_ne_bytes(r[20..24].try_into().unwrap()), 1 << 10);
        assert!(r[24..].iter().all(|b| *b == 0));

        let msg = |ty: u16, seq: u32, payload: &[u8]| {
            let mut m = Vec::new();
            m.extend_from_slice(&(16 + u32::try_from(payload.len()).unwrap()).to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&2u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(payload);
            m
        };
        let diag = |state: u8, port: u16| {
            let mut p = vec![2, state, 0, 0];
            p.extend_from_slice(&port.to_be_bytes());
            p.resize(72, 0);
            p
        };
        let mut ports = BTreeSet::new();
        let mut d = msg(20, 7, &diag(10, 8080));
        d.extend(msg(20, 7, &diag(1, 9090))); // established: not a listener
        d.extend(msg(20, 6, &diag(10, 7070))); // another request's
        assert!(!sock_diag::parse(&d, 7, &mut ports).unwrap());
        assert_eq!(ports, BTreeSet::from([8080]));
        assert!(sock_diag::parse(&msg(3, 7, &0i32.to_ne_bytes()), 7, &mut ports).unwrap());
        let e = sock_diag::parse(&msg(2, 7, &(-libc::ENOENT).to_ne_bytes()), 7, &mut ports)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(sock_diag::parse(&[1, 2, 3], 7, &mut ports).is_ok_and(|done| !done));
    }

    #[test]
    fn a_real_listener_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(host_tcp_listeners().contains(&p));
    }
}
