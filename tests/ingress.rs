//! "Only authenticated TLS reaches the app": with unproxied port mappings off, the
//! app's declared ports answer nobody but Envoy — not another container on the same
//! bridge, not a client routed to the container subnet through the host, not the host
//! itself — while the TLS proxy port and the ports the container did not declare stay
//! reachable. With unproxied mappings on, nothing is filtered. Real containers on a
//! dual-stack CNI bridge, real TCP from other network namespaces, over IPv4 and IPv6.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const GET: &str = "GET / HTTP/1.0\\r\\n\\r\\n";

/// The app on 8080, 9999 (declared) and 2222 (not declared).
const DECLARED: &str = "8080,9999";

/// `printf GET | nc` from inside the network namespace `ns` (None: the host); `ip`
/// IPv4 or IPv6.
fn plain_from(ns: Option<&str>, ip: &str, port: u16) -> String {
    let cmd = format!("printf '{GET}' | timeout 5 busybox nc -w 3 {ip} {port}");
    let o = match ns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &cmd])
            .output(),
        None => Command::new("sh").args(["-c", &cmd]).output(),
    }
    .unwrap();
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Fields drop in order: the container (through the sandbox's runtime) first.
struct Scene {
    _c: Container,
    sb: Sandbox,
    router: Router,
    _net: CniNet,
    ip: String,
    ip6: String,
    /// The host's IPv6 address on the router's link.
    host6: String,
    /// A second container namespace on the same bridge.
    peer: String,
    proxy_port: u16,
}

fn scene(name: &str, proxy_extra: &str) -> Scene {
    let slot = slots::next();
    let net = slot.cni_dual();
    let router = slot.router(0);
    let host6 = router.enable_ipv6();
    let sb = Sandbox::in_slot(
        &slot,
        name,
        proxy_extra,
        &format!("[host]\naddress = {:?}\n", router.host_ip()),
        POOL,
    );
    let id = format!("es-{name}");
    let (opt, ip, ip6) = net.attach_dual(&id);
    let ip6 = ip6.unwrap();
    let (_, _peer_ip) = net.attach("peer");
    let peer = format!("{}-peer", slot.name());
    // A client elsewhere with a route to the container subnets through the host.
    let (_, _, subnet) = slot.bridge();
    let out = router.run(&format!(
        "ip route add {subnet} via {} && ip -6 route add {} via {host6}",
        router.host_ip(),
        slot.bridge6()
    ));
    assert!(out.status.success(), "route: {}", text(&out));
    let c = sb.start_cmd(&id, &[(PORTS, DECLARED)], &[&opt], &httpd3());
    let st = sb.inspect(&id).unwrap();
    let proxy_port = port_of(&st, 0, "internal_tls_proxy");
    Scene {
        _net: net,
        router,
        sb,
        _c: c,
        ip,
        ip6,
        host6,
        peer,
        proxy_port,
    }
}

/// Everyone who may try: the peer container, the routed client and the host, each over
/// IPv4 and IPv6.
const EVERYONE: [&str; 6] = [
    "peer container/IPv4",
    "routed client/IPv4",
    "host/IPv4",
    "peer container/IPv6",
    "routed client/IPv6",
    "host/IPv6",
];

impl Scene {
    /// Plain HTTP to the container's `port` on each of its addresses from the peer
    /// container, the routed client and the host: which of them got the app's page.
    fn answered(&self, port: u16) -> Vec<String> {
        let mut who = Vec::new();
        for (ip, family) in [(&self.ip, "IPv4"), (&self.ip6, "IPv6")] {
            if plain_from(Some(&self.peer), ip, port).contains(HELLO) {
                who.push(format!("peer container/{family}"));
            }
            let routed = self
                .router
                .tcp(&format!("{}:{port}", bracketed(ip)), GET)
                .unwrap_or_default();
            if routed.contains(HELLO) {
                who.push(format!("routed client/{family}"));
            }
            if plain_from(None, ip, port).contains(HELLO) {
                who.push(format!("host/{family}"));
            }
        }
        who
    }

    /// TLS from the routed client, straight to the container's proxy port, on both of
    /// its addresses.
    fn wait_tls(&self, id: &str) {
        let ca = self.sb.ca();
        for ip in [&self.ip, &self.ip6] {
            wait_until(
                &format!("TLS to the proxy port on {ip}"),
                Duration::from_secs(20),
                || {
                    self.router
                        .https_via(&ca, id, self.proxy_port, ip)
                        .contains(HELLO)
                        .then_some(())
                },
            );
        }
    }

    /// A TCP connection to the proxy port is accepted (by Envoy) from the routed
    /// client, on both addresses.
    fn proxy_port_open(&self) -> bool {
        [&self.ip, &self.ip6].iter().all(|ip| {
            self.router
                .run(&format!(
                    "timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{}'",
                    self.proxy_port
                ))
                .status
                .success()
        })
    }
}

#[test]
fn unproxied_off_only_envoy_reaches_the_app_ports() {
    if !can_run("unproxied_off_only_envoy_reaches_the_app_ports") {
        return;
    }
    let s = scene("ingress-off", "enable_unproxied_port_mappings = false");
    s.wait_tls("es-ingress-off");
    // The network was there before create (as CRI and nerdctl set it up): host NAT
    // for both families is in place when `create` returns, and TLS goes through it
    // over IPv6 too.
    let st = s.sb.inspect("es-ingress-off").unwrap();
    let host_tls = port_of(&st, 0, "external_tls_proxy");
    let v6 = common::footprint::nat_in_pool_of("ip6", &s.sb.pool());
    assert!(
        v6.contains(&(host_tls, format!("{} . {}", s.ip6, s.proxy_port))),
        "IPv6 NAT of the TLS port: {v6:?}"
    );
    let tls6 = s
        .router
        .https_via(&s.sb.ca(), "es-ingress-off", host_tls, &s.host6);
    assert!(
        tls6.contains(HELLO),
        "TLS via the host's IPv6 address: {tls6}"
    );
    for port in [8080, 9999] {
        assert_eq!(
            s.answered(port),
            Vec::<String>::new(),
            "declared app port {port} must answer only Envoy"
        );
    }
    // A port the container did not declare is not the product's to close.
    assert_eq!(s.answered(2222), EVERYONE, "undeclared port 2222");
    assert!(s.proxy_port_open());
}

#[test]
fn unproxied_off_with_mutual_tls_only_envoy_reaches_the_app_ports() {
    if !can_run("unproxied_off_with_mutual_tls_only_envoy_reaches_the_app_ports") {
        return;
    }
    let trusted = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/envoy/router-ca.pem");
    let s = scene(
        "ingress-mtls",
        &format!(
            "enable_unproxied_port_mappings = false\n{}",
            mtls_proxy_config(&trusted)
        ),
    );
    wait_until("Envoy listening", Duration::from_secs(20), || {
        s.proxy_port_open().then_some(())
    });
    // Without a client certificate from the trusted CA, TLS gets nowhere either.
    for ip in [&s.ip, &s.ip6] {
        let tls = s
            .router
            .https_via(&s.sb.ca(), "es-ingress-mtls", s.proxy_port, ip);
        assert!(
            !tls.contains(HELLO),
            "TLS without a client certificate to {ip}: {tls}"
        );
    }
    for port in [8080, 9999] {
        assert_eq!(s.answered(port), Vec::<String>::new(), "app port {port}");
    }
    assert_eq!(s.answered(2222), EVERYONE, "undeclared port 2222");
}

#[test]
fn unproxied_on_leaves_the_app_ports_open() {
    if !can_run("unproxied_on_leaves_the_app_ports_open") {
        return;
    }
    let s = scene("ingress-on", "");
    s.wait_tls("es-ingress-on");
    assert_eq!(
        s.answered(8080),
        EVERYONE,
        "with unproxied mappings on, direct access is the operator's choice"
    );
}

/// `nft ...` in the network namespace of `pid`, as root in the container with
/// `CAP_NET_ADMIN` would run it (it shares that netns).
fn nft_in(pid: i64, args: &str) -> std::process::Output {
    Command::new("sh")
        .args(["-c", &format!("nsenter -t {pid} -n nft {args}")])
        .output()
        .unwrap()
}

#[test]
fn an_ingress_filter_removed_or_loosened_inside_the_container_is_put_back() {
    if !can_run("an_ingress_filter_removed_or_loosened_inside_the_container_is_put_back") {
        return;
    }
    let id = "es-ingress-tamper";
    let s = scene("ingress-tamper", "enable_unproxied_port_mappings = false");
    s.wait_tls(id);
    let pid = s.sb.inspect(id).unwrap()["init_pid"].as_i64().unwrap();
    let table = "table inet envoy_sidecar_ingress";
    let intact = || {
        let o = nft_in(pid, &format!("list {table}"));
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        (o.status.success() && t.contains("reject with tcp reset"))
            .then_some(())
            .ok_or(t)
    };
    intact().unwrap();
    for (how, cmd, word) in [
        ("removed", format!("delete {table}"), "removed"),
        (
            "loosened",
            "flush chain inet envoy_sidecar_ingress input".to_string(),
            "changed",
        ),
    ] {
        let t0 = std::time::Instant::now();
        let o = nft_in(pid, &cmd);
        assert!(o.status.success(), "{how}: {}", text(&o));
        wait_until(
            &format!("the filter {how}, then put back"),
            Duration::from_secs(2),
            intact,
        );
        eprintln!("filter {how}: back after {:?}", t0.elapsed());
        for port in [8080, 9999] {
            assert_eq!(
                s.answered(port),
                Vec::<String>::new(),
                "{how}: app port {port}"
            );
        }
        let log = s.sb.supervisor_log(id);
        assert!(
            log.contains(&format!(
                "ingress filter {word} inside the container: restored"
            )),
            "{log}"
        );
    }
    let row = status_row(&s.sb.config, NAMESPACE, id).unwrap();
    assert_eq!(row["ingress_repairs"], 2, "{row}");
    assert_eq!(row["status"], "ready", "{row}");
    s.wait_tls(id);
}
