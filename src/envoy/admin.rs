//! Envoy's admin API, spoken from inside the container's network namespace (admin
//! listens on the container's 127.0.0.1 only). A minimal HTTP/1.1 client: the product
//! needs two POSTs and a GET, not an HTTP stack.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// `method path` against 127.0.0.1:`port` in the current netns; returns (status, body).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
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
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Stop accepting new connections on every listener now (a router gets a clean,
/// retriable refusal); connections already open keep going until the app exits.
pub fn drain_listeners(port: u16, timeout: Duration) -> std::io::Result<()> {
    let (status, body) = request(port, "POST", "/drain_listeners", timeout)?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "drain_listeners answered {status}: {body:.200}"
        )));
    }
    Ok(())
}
