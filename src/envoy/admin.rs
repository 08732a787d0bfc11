//! Envoy's admin API: on a unix socket under the state directory (the default,
//! reachable from any netns), or on the container's 127.0.0.1 (the caller must be in
//! the container's netns). A minimal HTTP/1.1 client: the product needs a few POSTs and
//! GETs, not an HTTP stack.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where admin listens (`ContainerState::admin_socket` / `admin_port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `127.0.0.1:<port>` of the caller's netns.
    Loopback(u16),
    Unix(PathBuf),
}

impl Endpoint {
    /// Where a container's Envoy serves admin, as its state records it.
    pub fn of(state: &crate::state::store::ContainerState) -> Endpoint {
        match &state.admin_socket {
            Some(p) => Endpoint::Unix(p.clone()),
            None => Endpoint::Loopback(state.admin_port),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Loopback(p) => write!(f, "admin 127.0.0.1:{p}"),
            Endpoint::Unix(p) => write!(f, "admin socket {}", p.display()),
        }
    }
}

/// `method path` against admin; returns (status, body).
pub fn request(
    at: &Endpoint,
    method: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    match at {
        Endpoint::Loopback(port) => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            let s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            exchange(s, method, path)
        }
        Endpoint::Unix(p) => {
            // A unix connect does not wait for a peer: no connect timeout needed.
            let s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            exchange(s, method, path)
        }
    }
}

fn exchange(mut s: impl Read + Write, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {:.80}", text)))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// An HTTP/1.1 chunked body (Envoy streams `/stats` that way), decoded.
fn dechunk(mut rest: &str) -> std::io::Result<String> {
    let bad = |what: &str| std::io::Error::other(format!("malformed chunked body: {what}"));
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| bad("no chunk size"))?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| bad("chunk size not hex"))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..n)
            .ok_or_else(|| bad("chunk shorter than its size"))?;
        out.push_str(chunk);
        rest = after[n..]
            .strip_prefix("\r\n")
            .ok_or_else(|| bad("no CRLF after a chunk"))?;
    }
}

/// Stop accepting new connections on every listener now (a router gets a clean,
/// retriable refusal); connections already open keep going until the app exits.
pub fn drain_listeners(at: &Endpoint, timeout: Duration) -> std::io::Result<()> {
    let (status, body) = request(at, "POST", "/drain_listeners", timeout)?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "drain_listeners answered {status}: {body:.200}"
        )));
    }
    Ok(())
}

/// The gauges of open downstream connections, one per TLS listener (all bind
/// `0.0.0.0:<proxy port>`, so Envoy names their stats `listener.0.0.0.0_<port>.`):
/// neither the per-worker copies nor admin's own listener (`listener.admin.`, which
/// counts this very request). Covered by the read-only `/stats?` allow-list entry.
pub const ACTIVE_DOWNSTREAM: &str =
    "/stats?filter=^listener\\.0\\.0\\.0\\.0_[0-9]*\\.downstream_cx_active$";

/// Open downstream connections over all TLS listeners. A drained listener whose last
/// connection closed is gone from the stats: no line counts as zero.
pub fn active_downstream(at: &Endpoint, timeout: Duration) -> std::io::Result<u64> {
    stats_sum(at, ACTIVE_DOWNSTREAM, timeout)
}

/// The sum of the stats `query` selects.
fn stats_sum(at: &Endpoint, query: &str, timeout: Duration) -> std::io::Result<u64> {
    let (status, body) = request(at, "GET", query, timeout)?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "{query} answered {status}: {body:.200}"
        )));
    }
    sum_gauges(&body)
}

/// The counters of connections Envoy accepted and closed at once because it is at a
/// limit: its connection cap (`downstream_global_cx_overflow`) or an overload action
/// such as the heap budget's `reject_incoming_connections`
/// (`downstream_cx_overload_reject`), over every listener (the per-address part of
/// the name is left open).
pub const REFUSED_AT_LIMIT: &str =
    "/stats?filter=^listener\\..*\\.downstream_(global_cx_overflow|cx_overload_reject)$";

/// Connections refused at a limit so far ([`REFUSED_AT_LIMIT`]). Only a working
/// worker thread refuses (it accepts, counts and closes): an increase means Envoy is
/// alive and refusing on purpose.
pub fn refused_at_limit(at: &Endpoint, timeout: Duration) -> std::io::Result<u64> {
    stats_sum(at, REFUSED_AT_LIMIT, timeout)
}

/// The sum of `name: value` lines (Envoy's text stats format).
fn sum_gauges(body: &str) -> std::io::Result<u64> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.rsplit_once(": ")
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .ok_or_else(|| std::io::Error::other(format!("not a gauge line: {l:.120}")))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_listener_gauges() {
        let body = "listener.0.0.0.0_61001.downstream_cx_active: 3\n\
                    listener.0.0.0.0_61002.downstream_cx_active: 2\n";
        assert_eq!(sum_gauges(body).unwrap(), 5);
        assert_eq!(sum_gauges("").unwrap(), 0);
        assert!(sum_gauges("<html>").is_err());
    }

    #[test]
    fn decodes_chunked_bodies() {
        // As Envoy 1.40 answers /stats.
        let body = "2f\r\nlistener.0.0.0.0_19101.downstream_cx_active: 0\n\r\n0\r\n\r\n";
        assert_eq!(
            dechunk(body).unwrap(),
            "listener.0.0.0.0_19101.downstream_cx_active: 0\n"
        );
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("zz\r\nabc").is_err());
        assert!(dechunk("9\r\nabc\r\n0\r\n").is_err());
    }
}
