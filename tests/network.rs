//! Each engine's real order of operations for the container's network, against real
//! containerd, runc, Envoy, CNI and nftables, with traffic from a "router" namespace
//! that reaches the container only through the host's address and NAT.
//!
//! runc 1.1 runs poststart hooks (which start the supervisor) at the end of `runc
//! create`, so under `ctr run --cni` and Garden the container's netns has no address
//! yet when the supervisor starts: it must follow the network. Here:
//! - `ctr run -d --cni` (go-cni's defaults: the first conflist of /etc/cni/net.d,
//!   plugins in /opt/cni/bin; set up by `CtrCni`), then ctr's clean-up plus the CNI DEL
//!   that `ctr run -d` never does;
//! - Garden: `run --detach` through the wrapper into a netns with only `lo`, then the
//!   veth and address added, as Garden's networker does; then an address change;
//! - no network ever (`ctr run` without `--cni`): waiting, then degraded;
//! - the front door: an Envoy binary or state directory Envoy's uid cannot reach;
//! - operator CA and trusted client CA files replaced while containers run.
//!
//! The pre-configured-netns order (`--with-ns`) is covered by tests/nat.rs,
//! tests/sidecar.rs and tests/garden.rs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::footprint::{Task, nat_in_pool, our_processes};
use common::*;
use serde_json::{Value, json};

/// Link 0: the container's (Garden) / first address; link 1: the address it changes
/// to; link 2: the router's.
const ROUTER_LINK: u32 = 2;

/// A sandbox in `slot` whose advertised host address is the router's view of the host.
fn sandbox_for_router(slot: &Slot, router: &Router, name: &str, proxy_extra: &str) -> Sandbox {
    Sandbox::in_slot(
        slot,
        name,
        proxy_extra,
        &format!("[host]\naddress = {:?}\n", router.host_ip()),
        POOL,
    )
}

/// Through the router: TLS to the host's `port` verified against `ca`, the app's
/// answer, and the served leaf's text.
fn tls_via_router(router: &Router, ca: &Path, sni: &str, port: u16) -> Result<String, String> {
    let out = router_s_client(router, ca, sni, router.host_ip(), port);
    if !served_verified(&out, HELLO) {
        return Err(out);
    }
    first_cert_text(&out).ok_or(out)
}

/// Plain HTTP through the router to the host's `port`.
fn plain_via_router(router: &Router, port: u16) -> Result<String, String> {
    router.tcp(
        &format!("{}:{port}", router.host_ip()),
        "GET / HTTP/1.0\\r\\n\\r\\n",
    )
}

/// NAT elements of the sandbox's pool as `(host port, "ip . port")`, sorted.
fn pool_nat(sb: &Sandbox) -> Vec<(u16, String)> {
    let mut v = nat_in_pool(&sb.pool());
    v.sort();
    v
}

/// The mappings a container with one app port must have to `ip`.
fn want_nat(st: &Value, ip: &str) -> Vec<(u16, String)> {
    let mut v = vec![
        (
            port_of(st, 0, "external"),
            format!("{ip} . {}", port_of(st, 0, "internal")),
        ),
        (
            port_of(st, 0, "external_tls_proxy"),
            format!("{ip} . {}", port_of(st, 0, "internal_tls_proxy")),
        ),
    ];
    v.sort();
    v
}

fn row_str<'a>(row: &'a Value, key: &str) -> &'a str {
    row[key].as_str().unwrap_or_default()
}

// ---- 1. ctr run -d --cni -----------------------------------------------------------

#[test]
fn ctr_run_cni_address_after_create_gets_nat_and_ip_san_and_leaves_nothing() {
    if !can_run("ctr_run_cni_address_after_create_gets_nat_and_ip_san_and_leaves_nothing") {
        return;
    }
    let slot = slots::next();
    let cni = CtrCni::install(&slot);
    let router = slot.router(ROUTER_LINK);
    let sb = sandbox_for_router(&slot, &router, "ctrcni", "");
    let id = "es-ctrcni";
    let c = sb.start_cmd(id, &[(PORTS, "8080")], &["--cni"], &httpd());

    // ctr ran the CNI ADD itself (before `task start`): host-local leased an address
    // to `<namespace>-<id>`, and libcni cached the result.
    let ip = cni
        .lease_of(id)
        .unwrap_or_else(|| panic!("no lease for {id}: {:?}", cni.leases()));
    assert!(
        !cni.cache_files(id).is_empty(),
        "libcni's cached result for {id}"
    );
    let st = sb.inspect(id).unwrap();
    let (tls, ext) = (
        port_of(&st, 0, "external_tls_proxy"),
        port_of(&st, 0, "external"),
    );

    let row = wait_until(
        "status ready with NAT to the leased address",
        Duration::from_secs(20),
        || {
            let row = status_row(&sb.config, NAMESPACE, id).ok_or("no row")?;
            if row_str(&row, "status") == "ready"
                && row["nat_applied"] == true
                && row_str(&row, "container_ip") == ip
            {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        },
    );
    assert_eq!(row["network"], "namespace", "{row}");
    assert_eq!(pool_nat(&sb), want_nat(&st, &ip), "{}", nft_map());
    // The order this is about: the supervisor (started at the end of `runc create`)
    // found no address, then followed the one CNI configured, and re-issued for it.
    let log = sb.supervisor_log(id);
    let waited = log.find("status: waiting-for-network");
    let followed = log.find(&format!("container addresses none -> {ip}"));
    assert!(
        waited.is_some() && followed.is_some() && waited < followed,
        "no address at the supervisor's start, then {ip}:\n{log}"
    );
    assert!(
        log[followed.unwrap()..].contains("issued certificate serial"),
        "re-issued after the address came:\n{log}"
    );

    // TLS from the router to the host's address reaches the app, with the IP SAN.
    let cert = wait_until("TLS through the host port", Duration::from_secs(20), || {
        tls_via_router(&router, &sb.ca(), id, tls)
    });
    assert!(ip_sans(&cert).contains(&ip), "IP SAN {ip}: {cert}");
    assert!(cert.contains(&format!("DNS:{id}")), "{cert}");
    let plain = plain_via_router(&router, ext).unwrap_or_else(|e| e);
    assert!(plain.contains(HELLO), "plain via host:{ext}: {plain}");

    // ctr's clean-up, then the CNI DEL (ctr -d never detaches the network).
    c.remove();
    let out = cni.del(id);
    assert!(out.status.success(), "CNI DEL: {}", text(&out));
    assert_eq!(pool_nat(&sb), [], "NAT of the pool after removal");
    assert!(
        !sb.container_dir(NAMESPACE, id).exists(),
        "state dir of {id} left"
    );
    assert_eq!(sb.leftovers(), Vec::<String>::new());
    assert_eq!(
        cni.lease_of(id),
        None,
        "IPAM lease left: {:?}",
        cni.leases()
    );
    assert_eq!(cni.cache_files(id), Vec::<PathBuf>::new());
    let procs = settled(|| our_processes(&sb));
    assert!(procs.is_empty(), "processes left: {procs:?}");
    assert!(
        plain_via_router(&router, ext).is_err(),
        "host:{ext} still forwards"
    );
}

// ---- 2, 3. Garden: run --detach, then the networker --------------------------------

/// A container started as Garden starts one, in a netns with only `lo`. Fields drop in
/// declaration order: the container first (the wrapper needs the sandbox's config),
/// then the sandbox, the netns, the router.
struct Garden {
    _c: DirectRun,
    sb: Sandbox,
    netns: BareNetns,
    router: Router,
    slot: Slot,
    st: Value,
    id: String,
}

impl Garden {
    /// `run --detach` through the wrapper, then waits until Envoy is ready on the
    /// container's loopback and the status says it waits for the network.
    fn start(name: &str, id: &str) -> Garden {
        let slot = slots::next();
        let router = slot.router(ROUTER_LINK);
        let sb = sandbox_for_router(&slot, &router, name, "");
        let netns = BareNetns::new(&slot, 0);
        let c = DirectRun::new(name, id, &sb.config);
        c.runc_spec_bundle(&netns.path, |spec| {
            spec["process"]["args"] = json!(httpd());
            spec["annotations"] = json!({ PORTS: "8080" });
        });
        let (status, said) = c.run_detached();
        assert!(status.success(), "run --detach: {status}\n{said}");
        let st = c.inspect().expect("state in namespace default");
        wait_until(
            "Envoy ready, waiting for the network",
            Duration::from_secs(20),
            || {
                let rec = sb.try_record("default", id).ok_or("no record")?;
                let waiting = rec["status"]["state"] == "waiting-for-network";
                if waiting && rec["ready_at"].is_string() {
                    Ok(())
                } else {
                    Err(rec.to_string())
                }
            },
        );
        let row = status_row(&sb.config, "default", id).expect("a status row");
        assert_eq!(row["status"], "waiting-for-network", "{row}");
        assert_eq!(row["nat_applied"], false, "{row}");
        assert!(row["container_ip"].is_null(), "{row}");
        assert_eq!(pool_nat(&sb), [], "no NAT without an address");
        Garden {
            _c: c,
            sb,
            netns,
            router,
            slot,
            st,
            id: id.into(),
        }
    }

    /// The slot's link `k` addresses: (host end, container).
    fn link(&self, k: u32) -> (String, String) {
        let (_, _, host_ip, ip) = self.slot.link(k);
        (host_ip, ip)
    }

    /// Waits (up to 5 s) for the status row to say `ready` and satisfy `also`.
    fn ready_row(&self, also: impl Fn(&Value) -> bool) -> Value {
        wait_until("status ready", Duration::from_secs(5), || {
            let row = status_row(&self.sb.config, "default", &self.id).ok_or("no row")?;
            if row["status"] == "ready" && also(&row) {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        })
    }

    fn tls_port(&self) -> u16 {
        port_of(&self.st, 0, "external_tls_proxy")
    }

    /// NAT to `ip` exactly and TLS through the host port: the served certificate's
    /// text.
    fn served_at(&self, ip: &str) -> Result<String, String> {
        let nat = pool_nat(&self.sb);
        if nat != want_nat(&self.st, ip) {
            return Err(format!("NAT {nat:?}"));
        }
        tls_via_router(&self.router, &self.sb.ca(), &self.id, self.tls_port())
    }

    /// Waits (up to `timeout`) for the first TLS success through the host port with NAT
    /// to `ip`; that very first certificate must already name `ip` (the supervisor
    /// re-issues before it maps NAT). Returns it.
    fn first_served_at(&self, ip: &str, timeout: Duration) -> String {
        let cert = wait_until(
            &format!("NAT to {ip} and TLS through the host port"),
            timeout,
            || self.served_at(ip),
        );
        assert_eq!(
            ip_sans(&cert),
            [ip],
            "the first certificate served through the new mapping: {cert}"
        );
        cert
    }
}

#[test]
fn garden_order_address_after_run_detach_is_followed_within_a_second() {
    if !can_run_without_containerd(
        "garden_order_address_after_run_detach_is_followed_within_a_second",
    ) {
        return;
    }
    let g = Garden::start("gnet", "es-gnet");
    let (host_ip, ip) = g.link(0);
    g.netns.add_veth();
    let t0 = Instant::now();
    g.netns.add_address(&host_ip, &ip);
    let cert = g.first_served_at(&ip, Duration::from_secs(1));
    eprintln!(
        "NAT + TLS via the host port with IP SAN {ip}: {:?} after the address",
        t0.elapsed()
    );
    assert!(cert.contains("DNS:es-gnet"), "{cert}");
    let row = g.ready_row(|_| true);
    assert_eq!(row["nat_applied"], true, "{row}");
    assert_eq!(row_str(&row, "container_ip"), ip, "{row}");
    let rec = g.sb.record_ns("default", &g.id);
    assert_eq!(rec["container_ip"], ip.as_str(), "{rec}");
    assert_eq!(rec["nat_applied"], true, "{rec}");
    let plain = plain_via_router(&g.router, port_of(&g.st, 0, "external")).unwrap_or_else(|e| e);
    assert!(plain.contains(HELLO), "plain via the host: {plain}");
}

#[test]
fn garden_order_address_change_moves_nat_and_the_ip_san() {
    if !can_run_without_containerd("garden_order_address_change_moves_nat_and_the_ip_san") {
        return;
    }
    let g = Garden::start("gmove", "es-gmove");
    let (host_a, ip_a) = g.link(0);
    let (host_b, ip_b) = g.link(1);
    g.netns.add_veth();
    g.netns.add_address(&host_a, &ip_a);
    let cert_a = g.first_served_at(&ip_a, Duration::from_secs(10));

    // The address goes: the mappings are withdrawn, the status waits again.
    g.netns.del_address(&host_a, &ip_a);
    // The record's address and NAT fields and its status are separate writes of the
    // supervisor: wait for all of them (the status follows within one wake).
    wait_until(
        "NAT withdrawn, waiting again",
        Duration::from_secs(5),
        || {
            let row = status_row(&g.sb.config, "default", &g.id).ok_or("no row")?;
            let nat = pool_nat(&g.sb);
            if nat.is_empty()
                && row["nat_applied"] == false
                && row["container_ip"].is_null()
                && row["status"] == "waiting-for-network"
            {
                Ok(row)
            } else {
                Err(format!("{nat:?} {row}"))
            }
        },
    );

    // Another one comes: NAT moves to it, a new certificate names it (and not the old).
    let t0 = Instant::now();
    g.netns.add_address(&host_b, &ip_b);
    let cert = g.first_served_at(&ip_b, Duration::from_secs(5));
    eprintln!(
        "moved to {ip_b}: NAT + TLS + IP SAN {:?} after the address",
        t0.elapsed()
    );
    assert!(!ip_sans(&cert).contains(&ip_a), "{cert}");
    assert_ne!(serial_of(&cert), serial_of(&cert_a), "a new certificate");
    let nat = pool_nat(&g.sb);
    assert!(
        nat.iter()
            .all(|(_, to)| !to.starts_with(&format!("{ip_a} "))),
        "old elements left: {nat:?}"
    );
    let row = g.ready_row(|row| row_str(row, "container_ip") == ip_b);
    assert_eq!(row["nat_applied"], true, "{row}");
}

#[test]
fn garden_order_dual_stack_gets_ipv6_nat_the_ipv6_san_and_tls_over_ipv6() {
    if !can_run_without_containerd(
        "garden_order_dual_stack_gets_ipv6_nat_the_ipv6_san_and_tls_over_ipv6",
    ) {
        return;
    }
    let g = Garden::start("g6", "es-g6");
    let host6 = g.router.enable_ipv6();
    let (host_ip, ip) = g.link(0);
    let (host_ip6, ip6) = g.slot.link6(0);
    g.netns.add_veth();
    g.netns.add_address(&host_ip, &ip);
    g.netns.add_address6(&host_ip6, &ip6);
    let t0 = Instant::now();
    let served6 = || -> Result<String, String> {
        let out = router_s_client(&g.router, &g.sb.ca(), &g.id, &host6, g.tls_port());
        if !served_verified(&out, HELLO) {
            return Err(out);
        }
        first_cert_text(&out).ok_or(out)
    };
    // The first certificate served over IPv6 through the host's IPv6 address already
    // names the IPv6 address (re-issued before the IPv6 NAT went in), and the IPv4 one.
    let cert = wait_until(
        "TLS over IPv6 through the host port",
        Duration::from_secs(10),
        served6,
    );
    eprintln!("IPv6 NAT + TLS {:?} after the addresses", t0.elapsed());
    let sans: Vec<std::net::IpAddr> = ip_sans(&cert).iter().map(|s| s.parse().unwrap()).collect();
    let (want4, want6): (std::net::IpAddr, std::net::IpAddr) =
        (ip.parse().unwrap(), ip6.parse().unwrap());
    assert!(
        sans.contains(&want6) && sans.contains(&want4),
        "IP SANs {sans:?}, want {ip} and {ip6}: {cert}"
    );
    let pool = g.sb.pool();
    assert_eq!(
        sorted(common::footprint::nat_in_pool_of("ip6", &pool)),
        want_nat(&g.st, &ip6),
        "IPv6 NAT"
    );
    assert_eq!(
        sorted(common::footprint::nat_in_pool_of("ip", &pool)),
        want_nat(&g.st, &ip),
        "IPv4 NAT beside it"
    );
    tls_via_router(&g.router, &g.sb.ca(), &g.id, g.tls_port()).expect("TLS over IPv4 too");
    let plain6 = g
        .router
        .tcp(
            &format!("[{host6}]:{}", port_of(&g.st, 0, "external")),
            "GET / HTTP/1.0\\r\\n\\r\\n",
        )
        .unwrap_or_else(|e| e);
    assert!(
        plain6.contains(HELLO),
        "unproxied mapping over IPv6: {plain6}"
    );
    let row = g.ready_row(|_| true);
    assert_eq!(row_str(&row, "container_ip"), ip, "{row}");
    assert_eq!(row_str(&row, "container_ipv6"), ip6, "{row}");
    assert_eq!(row["nat_applied"], true, "{row}");

    // The IPv6 address goes: its mappings go, IPv4's stay and keep serving.
    sh(&format!(
        "ip -n {} addr del {ip6}/64 dev eth0",
        g.netns.name
    ));
    wait_until("IPv6 NAT withdrawn", Duration::from_secs(5), || {
        let v6 = common::footprint::nat_in_pool_of("ip6", &pool);
        v6.is_empty().then_some(()).ok_or(format!("{v6:?}"))
    });
    assert_eq!(
        sorted(common::footprint::nat_in_pool_of("ip", &pool)),
        want_nat(&g.st, &ip)
    );
    tls_via_router(&g.router, &g.sb.ca(), &g.id, g.tls_port()).expect("IPv4 still served");
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

// ---- 4. No network ever -------------------------------------------------------------

#[test]
fn no_network_waits_then_degrades_visibly_and_the_container_keeps_running() {
    if !can_run("no_network_waits_then_degrades_visibly_and_the_container_keeps_running") {
        return;
    }
    // Long enough that `status` is polled while waiting even when `ctr run -d` itself
    // takes seconds (CI, 2 cores, four tests at once: with 3 s the first look once saw
    // "degraded" already).
    let sb = Sandbox::new("nonet", "network_wait = \"8s\"", "");
    let id = "es-nonet";
    let started = Instant::now();
    // ctr run without --cni (nor --with-ns): a netns of its own with only lo.
    let c = sb.start_cmd(id, &[(PORTS, "8080")], &[], &httpd());
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let row = wait_until("degraded", Duration::from_secs(25), || {
        let Some(row) = status_row(&sb.config, NAMESPACE, id) else {
            return Err("no row".to_string());
        };
        let s = row_str(&row, "status").to_string();
        if seen.last().map(|(l, _)| l) != Some(&s) {
            seen.push((s.clone(), started.elapsed()));
        }
        if s == "degraded" {
            Ok(row)
        } else {
            Err(row.to_string())
        }
    });
    let order: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    eprintln!("statuses seen: {seen:?}");
    let waiting = order.iter().position(|s| *s == "waiting-for-network");
    assert!(
        waiting.is_some_and(|w| w + 1 < order.len()),
        "waiting-for-network before degraded: {order:?}"
    );
    // Nothing said `degraded` while the hooks were still starting it.
    assert_eq!(
        order.iter().filter(|s| **s == "degraded").count(),
        1,
        "{seen:?}"
    );
    let degraded_at = seen.last().unwrap().1;
    assert!(
        degraded_at >= Duration::from_secs(8),
        "degraded {degraded_at:?} after the run: before network_wait (8 s)"
    );
    let reason = row_str(&row, "reason");
    assert!(
        reason.contains("no IPv4 or IPv6 address") && reason.contains("8s"),
        "{row}"
    );
    assert_eq!(row["nat_applied"], false, "{row}");
    assert!(row["container_ip"].is_null(), "{row}");
    // The supervisor logged each status once, in that order.
    let log = sb.supervisor_log(id);
    let w = log.find("status: waiting-for-network").expect(&log);
    let d = log.find("status: degraded (no network: no IPv4 or IPv6 address");
    assert!(d.is_some_and(|d| d > w), "{log}");

    // The table says so too.
    let line = status_line(&sb.config, NAMESPACE, id).expect("a table line");
    assert!(
        line.contains("degraded (no network: no IPv4 or IPv6 address"),
        "{line}"
    );

    // And the exporter.
    let m = MetricsServer::start(&sb.config, sb.slot.tcp_port());
    let body = m.scrape().unwrap();
    let labels = format!("namespace=\"{NAMESPACE}\",id=\"{id}\"");
    let get = |name: &str, labels: &str| {
        sample(&body, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}}: {body}"))
    };
    assert_eq!(get("envoy_sidecar_ready", &labels), "0");
    assert_eq!(get("envoy_sidecar_nat_applied", &labels), "0");
    assert_eq!(
        get(
            "envoy_sidecar_status",
            &format!("{labels},status=\"degraded\"")
        ),
        "1"
    );
    for other in ["waiting-for-network", "starting", "ready", "stopping"] {
        let l = format!("{labels},status=\"{other}\"");
        assert_eq!(get("envoy_sidecar_status", &l), "0", "{other}");
    }

    // The container keeps running, supervised.
    let tasks = ctr(&["task", "ls"]);
    let listed = String::from_utf8_lossy(&tasks.stdout);
    let line = listed.lines().find(|l| l.starts_with(&format!("{id} ")));
    let fields: Vec<&str> = line
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        fields,
        [id, &c.pid().to_string(), "RUNNING"],
        "the task keeps running: {listed}"
    );
    let sup = pid_of(&sb.record(id), "supervisor").expect("supervisor recorded");
    assert!(alive(sup), "the supervisor is running");
    assert_eq!(pool_nat(&sb), []);
}

// ---- 5. The front door --------------------------------------------------------------

/// `check-config`, `doctor` and `ctr run` all refuse the sandbox's configuration with a
/// message containing each of `needles`, and nothing is left behind.
fn refused_everywhere(sb: &Sandbox, state_dir: &Path, id: &str, needles: &[&str]) {
    let has_all = |s: &str| needles.iter().all(|n| s.contains(n));
    let o = cli(&sb.config).arg("check-config").output().unwrap();
    assert!(
        !o.status.success() && has_all(&out_err(&o)),
        "check-config: {}",
        text(&o)
    );
    let o = cli(&sb.config).arg("doctor").output().unwrap();
    assert!(
        !o.status.success() && has_all(&out_err(&o)),
        "doctor: {}",
        text(&o)
    );
    let (task, out) = Task::run(
        &address(),
        NAMESPACE,
        &sb.runtime,
        id,
        &[(PORTS, "8080")],
        &[],
        &httpd(),
    );
    assert!(
        !out.status.success() && has_all(&out_err(&out)),
        "ctr run must be refused with the reason: {}",
        text(&out)
    );
    task.remove().unwrap();
    let listed = ctr(&["containers", "ls", "-q"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l == id),
        "container record left"
    );
    assert!(
        !state_dir.join(NAMESPACE).join(id).exists(),
        "state of {id} left"
    );
    assert_eq!(pool_nat(sb), [], "NAT left");
    let procs = settled(|| our_processes(sb));
    assert!(procs.is_empty(), "processes left: {procs:?}");
}

/// A directory of mode 0700 under the sandbox.
fn private_dir(sb: &Sandbox, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = sb.dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

#[test]
fn front_door_refuses_an_envoy_binary_in_a_private_directory() {
    if !can_run("front_door_refuses_an_envoy_binary_in_a_private_directory") {
        return;
    }
    let sb = Sandbox::new("door-bin", "", "");
    let dir = private_dir(&sb, "private-bin");
    let envoy = dir.join("envoy");
    std::fs::copy("/usr/local/bin/envoy", &envoy).unwrap();
    sb.set_config_line("envoy_path", &format!("envoy_path = {envoy:?}"));
    let d = dir.display().to_string();
    refused_everywhere(
        &sb,
        &sb.state_dir,
        "es-door-bin",
        &[
            "proxy.envoy_path",
            &d,
            "not searchable by others",
            &format!("chmod o+x {d}"),
        ],
    );
}

#[test]
fn front_door_refuses_a_ca_key_readable_by_others() {
    if !can_run("front_door_refuses_a_ca_key_readable_by_others") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new("door-cakey", "", "");
    let key = sb.dir.join("ca/ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let k = key.display().to_string();
    refused_everywhere(
        &sb,
        &sb.state_dir,
        "es-door-cakey",
        &[
            "instance_identity.ca_key",
            &k,
            "0644",
            &format!("chmod 600 {k}"),
        ],
    );
}

#[test]
fn front_door_refuses_a_state_dir_under_a_private_parent() {
    if !can_run("front_door_refuses_a_state_dir_under_a_private_parent") {
        return;
    }
    let sb = Sandbox::new("door-state", "", "");
    let parent = private_dir(&sb, "private-state");
    let state = parent.join("state");
    sb.set_config_line("state_dir", &format!("state_dir = {state:?}"));
    let p = parent.display().to_string();
    refused_everywhere(
        &sb,
        &state,
        "es-door-state",
        &[
            "runtime.state_dir",
            &p,
            "not searchable by others",
            &format!("chmod o+x {p}"),
        ],
    );
    assert!(!state.exists(), "{} created", state.display());
}

// ---- 6. CA rotation ------------------------------------------------------------------

/// Put the files of `from` over `to` by rename (each complete at every moment).
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("replacing");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// The served leaf (verified against `ca`) and the app's answer, or the output.
fn served_cert(
    addr: &str,
    ca: &Path,
    sni: &str,
    client: Option<(&Path, &Path)>,
) -> Result<String, String> {
    let out = Get::new(ca).sni(sni).client(client).showcerts().fetch(addr);
    if !served_verified(&out, HELLO) {
        return Err(out);
    }
    first_cert_text(&out).ok_or(out)
}

#[test]
fn operator_ca_replaced_is_picked_up_and_rotate_reissues_at_once() {
    if !can_run("operator_ca_replaced_is_picked_up_and_rotate_reissues_at_once") {
        return;
    }
    let sb = Sandbox::new("carot", "", "");
    let net = sb.slot.netns(0);
    let id = "es-carot";
    let (_c, _st, addr) = sb.start_served(id, &net);
    let old_ca = sb.dir.join("old-ca.crt");
    std::fs::copy(sb.ca(), &old_ca).unwrap();
    let new_dir = sb.dir.join("ca-new");
    generate_ca(&new_dir);
    let new_ca = new_dir.join("ca.crt");
    served_cert(&addr, &old_ca, id, None).expect("verifies against the old CA");
    assert!(served_cert(&addr, &new_ca, id, None).is_err());

    // Replace the configured files (key first: the pair matches again with the cert).
    let t0 = Instant::now();
    replace_file(&new_dir.join("ca.key"), &sb.dir.join("ca/ca.key"));
    replace_file(&new_ca, &sb.ca());
    let cert = wait_until_every(
        "a handshake verifying against the new CA",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || served_cert(&addr, &new_ca, id, None),
    );
    eprintln!(
        "new CA served {:?} after the files were replaced",
        t0.elapsed()
    );
    let out = Get::new(&old_ca).sni(id).fetch(&addr);
    assert!(
        !out.contains(HELLO) && !out.contains("Verify return code: 0 (ok)"),
        "still verifies against the old CA: {out}"
    );

    // rotate --all: a new serial, at once.
    let serial = serial_of(&cert).expect("a serial");
    let t1 = Instant::now();
    let o = cli(&sb.config)
        .args(["rotate", "--all", "--namespace", NAMESPACE])
        .output()
        .unwrap();
    assert!(o.status.success(), "rotate --all: {}", text(&o));
    let rotated = wait_until("a new serial after rotate", Duration::from_secs(3), || {
        let c = served_cert(&addr, &new_ca, id, None)?;
        if serial_of(&c) != Some(serial.clone()) {
            Ok(c)
        } else {
            Err(c)
        }
    });
    let took = t1.elapsed();
    eprintln!("rotate --all: new serial served {took:?} after");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(
        sb.record(id)["cert_serial"]
            .as_str()
            .map(str::to_ascii_uppercase),
        serial_of(&rotated).map(|s| s.to_ascii_uppercase()),
        "the record names the served serial"
    );
}

#[test]
fn trusted_client_ca_replaced_refuses_old_clients_and_accepts_new_ones() {
    if !can_run("trusted_client_ca_replaced_refuses_old_clients_and_accepts_new_ones") {
        return;
    }
    let tmp = TempDir::new("es-mtlsrot");
    let dir = tmp.path();
    for ca in ["client-ca-old", "client-ca-new"] {
        generate_ca(&dir.join(ca));
    }
    let trusted = dir.join("trusted.crt");
    std::fs::copy(dir.join("client-ca-old/ca.crt"), &trusted).unwrap();
    let ext = "subjectAltName=DNS:gorouter.service.cf.internal\nextendedKeyUsage=clientAuth\n";
    let old = sign_leaf(
        dir,
        &Ca::at(&dir.join("client-ca-old"), "ca"),
        "old",
        None,
        ext,
    );
    let new = sign_leaf(
        dir,
        &Ca::at(&dir.join("client-ca-new"), "ca"),
        "new",
        None,
        ext,
    );
    let sb = Sandbox::new("mtlsrot", &mtls_proxy_config(&trusted), "");
    let net = sb.slot.netns(0);
    let id = "es-mtlsrot";
    let _c = sb.start_cmd(id, &[(PORTS, "8080")], &[&net.ctr_opt()], &httpd());
    let st = sb.inspect(id).unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let ca = sb.ca();
    let with = |c: &(PathBuf, PathBuf)| served_cert(&addr, &ca, id, Some((&c.0, &c.1)));
    wait_until(
        "served to the old CA's client",
        Duration::from_secs(20),
        || with(&old),
    );
    assert!(
        with(&new).is_err(),
        "a client of the untrusted new CA was served"
    );
    let envoy = pid_of(&sb.record(id), "envoy").unwrap();

    let t0 = Instant::now();
    replace_file(&dir.join("client-ca-new/ca.crt"), &trusted);
    wait_until_every(
        "the new CA's client accepted, the old one's refused",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || match (with(&new), with(&old)) {
            (Ok(_), Err(_)) => Ok(()),
            (n, o) => Err(format!("new: {n:?}\nold: {o:?}")),
        },
    );
    eprintln!(
        "trusted client CA followed {:?} after the file was replaced",
        t0.elapsed()
    );
    let again = pid_of(&sb.record(id), "envoy").unwrap();
    assert_eq!(
        again, envoy,
        "new trusted CAs reach Envoy by SDS: no restart (open connections stay)"
    );
    let row = wait_until("ready again", Duration::from_secs(5), || {
        let row = status_row(&sb.config, NAMESPACE, id).ok_or("no row")?;
        if row["status"] == "ready" {
            Ok(row)
        } else {
            Err(row.to_string())
        }
    });
    assert_eq!(row["restarts"], 0, "{row}");
    assert!(row["last_error"].is_null(), "{row}");
    let log = sb.supervisor_log(id);
    assert!(!log.contains("status: degraded"), "{log}");
}
