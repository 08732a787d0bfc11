//! Port selection: the proxy ports inside a container (the Diego rep's algorithm) and
//! host ports from the NAT pool. Pure functions; persistence and locking live in
//! `state`.

use std::ops::RangeInclusive;

use crate::error::{Error, Result};

/// The reference starts proxy ports here, above the usual ephemeral range.
pub const PROXY_PORT_START: u16 = 61001;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPorts {
    /// One per app port, same order.
    pub proxy: Vec<u16>,
    /// Envoy's admin listener (127.0.0.1 only).
    pub admin: u16,
}

/// From 61001 upward, one port per app port in declaration order, skipping any port the
/// app itself declared; then the admin port, the next free port after them.
pub fn select_proxy_ports(app_ports: &[u16]) -> Result<ProxyPorts> {
    select_proxy_ports_avoiding(app_ports, |_| false)
}

/// [`select_proxy_ports`], also skipping the ports `taken` says are in use in the
/// network namespace (another proxied container's there, a listener).
pub fn select_proxy_ports_avoiding(
    app_ports: &[u16],
    taken: impl Fn(u16) -> bool,
) -> Result<ProxyPorts> {
    let mut candidates =
        (PROXY_PORT_START..=u16::MAX).filter(|p| !app_ports.contains(p) && !taken(*p));
    let mut proxy = Vec::with_capacity(app_ports.len());
    for _ in app_ports {
        proxy.push(candidates.next().ok_or_else(|| exhausted(app_ports))?);
    }
    let admin = candidates.next().ok_or_else(|| exhausted(app_ports))?;
    Ok(ProxyPorts { proxy, admin })
}

fn exhausted(app_ports: &[u16]) -> Error {
    Error::Ports(format!(
        "no room for {} proxy ports and an admin port in {PROXY_PORT_START}-65535 besides the app's own ports",
        app_ports.len()
    ))
}

/// The `n` lowest free ports of `pool`. All or nothing: too few free is an error.
pub fn allocate_host_ports(
    n: usize,
    pool: RangeInclusive<u16>,
    taken: impl Fn(u16) -> bool,
) -> Result<Vec<u16>> {
    let (start, end) = (*pool.start(), *pool.end());
    let got: Vec<u16> = pool.filter(|p| !taken(*p)).take(n).collect();
    if got.len() < n {
        return Err(Error::Ports(format!(
            "host port pool {start}-{end} ([ports] pool_start/pool_end) is exhausted: \
             this container needs {n}, {} free (held by no container, no host process \
             listening); remove containers or widen the pool",
            got.len()
        )));
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_example() {
        let p = select_proxy_ports(&[8080, 9999, 2222]).unwrap();
        assert_eq!(p.proxy, vec![61001, 61002, 61003]);
        assert_eq!(p.admin, 61004);
    }

    #[test]
    fn skips_app_ports() {
        let p = select_proxy_ports(&[61001, 8080, 61003]).unwrap();
        assert_eq!(p.proxy, vec![61002, 61004, 61005]);
        assert_eq!(p.admin, 61006);
        let p = select_proxy_ports(&[61002]).unwrap();
        assert_eq!(p.proxy, vec![61001]);
        assert_eq!(p.admin, 61003);
    }

    #[test]
    fn never_collides() {
        let app: Vec<u16> = (61001..61040).step_by(2).collect();
        let p = select_proxy_ports(&app).unwrap();
        for x in p.proxy.iter().chain([&p.admin]) {
            assert!(!app.contains(x));
        }
    }

    #[test]
    fn runs_out_cleanly() {
        // 64 app ports occupying the top of the range leave too little room.
        let app: Vec<u16> = (65472..=65535).collect();
        assert_eq!(app.len(), 64);
        let p = select_proxy_ports(&app).unwrap();
        assert_eq!(p.admin, 61065);
        let app: Vec<u16> = (61001..=65535).take(64).collect();
        let p = select_proxy_ports(&app).unwrap();
        assert_eq!(p.proxy[0], 61065);
    }

    #[test]
    fn host_ports_lowest_free_all_or_nothing() {
        let used = |p: u16| [61001, 61003].contains(&p);
        assert_eq!(
            allocate_host_ports(3, 61001..=61010, used).unwrap(),
            vec![61002, 61004, 61005]
        );
        let e = allocate_host_ports(3, 61001..=61004, used)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exhausted") && e.contains("2 free"), "{e}");
        assert_eq!(
            allocate_host_ports(0, 61001..=61001, used).unwrap(),
            Vec::<u16>::new()
        );
    }
}
