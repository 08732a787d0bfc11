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
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| parse(&t))
        .collect()
}

/// Every TCP port something listens on in the network namespace at `path` (a bind
/// mount or `/proc/<pid>/ns/net`), read on a thread that entered it
/// (`/proc/thread-self/net` is the thread's namespace's).
pub fn tcp_listeners_in(path: &std::path::Path) -> std::io::Result<BTreeSet<u16>> {
    let ns = std::fs::File::open(path)?;
    super::netns::run_in(&ns, || {
        ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| parse(&t))
            .collect()
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
    fn a_real_listener_is_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(host_tcp_listeners().contains(&p));
    }
}
