//! Host port NAT with real traffic: containers on a CNI bridge (the slot's), a
//! "router" in its own network namespace that reaches them only through the host's
//! address and the ports in CF_INSTANCE_PORTS.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::time::Duration;

use common::footprint::gc;
use common::*;
use serde_json::Value;

/// Retry (Envoy and NAT come up after `ctr run -d` returns).
fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until(what, Duration::from_secs(20), f)
}

/// The slot's CNI bridge, a router on its first link and a sandbox advertising the
/// router's view of the host.
fn setup(name: &str, proxy_extra: &str) -> (CniNet, Router, Sandbox) {
    let slot = slots::next();
    let net = slot.cni();
    let router = slot.router(0);
    let sb = Sandbox::in_slot(
        &slot,
        name,
        proxy_extra,
        &format!("[host]\naddress = {:?}\n", router.host_ip()),
        POOL,
    );
    (net, router, sb)
}

#[test]
fn router_reaches_apps_through_host_ports_until_removal() {
    if !can_run("router_reaches_apps_through_host_ports_until_removal") {
        return;
    }
    let (net, router, sb) = setup("nat3", "");
    let ca = sb.dir.join("ca/ca.crt");
    let (opt, ip) = net.attach("es-nat3");
    let c = sb.start_cmd("es-nat3", &[(PORTS, "8080,9999,2222")], &[&opt], &httpd3());
    let st = sb.inspect("es-nat3").unwrap();
    // The network was configured before create: the poststart hook mapped it before
    // `ctr run -d` returned (no waiting for the supervisor).
    let map = nft_map();
    for i in 0..3 {
        for key in ["external_tls_proxy", "external"] {
            let p = port_of(&st, i, key);
            assert!(
                map.contains(&format!("tcp . {p} : {ip}")),
                "{key} {p} not mapped when `ctr run -d` returned: {map}"
            );
        }
    }
    let mut used = Vec::new();
    for i in 0..3 {
        let tls = port_of(&st, i, "external_tls_proxy");
        let out = eventually("TLS through the host port", || {
            let o = router.https(&ca, "es-nat3", tls);
            o.contains(HELLO).then_some(o)
        });
        assert!(out.contains(HELLO));
        let ext = port_of(&st, i, "external");
        let plain = router
            .tcp(
                &format!("{}:{ext}", router.host_ip()),
                "GET / HTTP/1.0\\r\\n\\r\\n",
            )
            .unwrap_or_default();
        assert!(
            plain.contains(HELLO),
            "plain TCP to external {ext} must reach the app: {plain}"
        );
        used.extend([tls, ext]);
    }
    // Connections made on the host itself, to the host's address, are mapped too.
    let ext0 = port_of(&st, 0, "external");
    let local = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 busybox nc -w 3 {} {ext0}",
            router.host_ip()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&local.stdout).contains(HELLO),
        "from the host: {}",
        text(&local)
    );
    // The router has no route to the container itself: only NAT leads in.
    assert!(
        router
            .tcp(&format!("{ip}:8080"), "GET / HTTP/1.0\\r\\n\\r\\n")
            .is_err()
    );
    let map = nft_map();
    for p in &used {
        assert!(
            map.contains(&format!("tcp . {p} : {ip}")),
            "{p} not in {map}"
        );
    }

    let tracked = || {
        let o = std::process::Command::new("conntrack")
            .args(["-L", "--reply-src", &ip])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    assert!(tracked() > 0, "the connections above are tracked");
    c.remove();
    assert_eq!(
        tracked(),
        0,
        "conntrack entries to the removed container's IP must go"
    );
    let map = nft_map();
    for p in &used {
        assert!(
            !map.contains(&format!("tcp . {p} :")),
            "{p} still mapped after removal: {map}"
        );
        assert!(
            router
                .tcp(&format!("{}:{p}", router.host_ip()), "x")
                .is_err(),
            "{p} still forwards"
        );
    }
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());

    // The next container gets the same host ports back, and they work for it.
    let (opt, _) = net.attach("es-nat3b");
    let _c2 = sb.start_cmd("es-nat3b", &[(PORTS, "8080,9999,2222")], &[&opt], &httpd3());
    let st2 = sb.inspect("es-nat3b").unwrap();
    let tls = port_of(&st2, 0, "external_tls_proxy");
    assert!(
        used.contains(&tls),
        "host ports are reused: {tls} not in {used:?}"
    );
    eventually("TLS for the next container", || {
        router
            .https(&ca, "es-nat3b", tls)
            .contains(HELLO)
            .then_some(())
    });
}

#[test]
fn unproxied_mappings_disabled_only_tls_gets_in() {
    if !can_run("unproxied_mappings_disabled_only_tls_gets_in") {
        return;
    }
    let (net, router, sb) = setup("natoff", "enable_unproxied_port_mappings = false");
    let ca = sb.dir.join("ca/ca.crt");
    let (opt, ip) = net.attach("es-natoff");
    let _c = sb.start_cmd("es-natoff", &[(PORTS, "8080")], &[&opt], &httpd3());
    let st = sb.inspect("es-natoff").unwrap();
    assert!(st["ports"][0].get("external").is_none());
    let tls = port_of(&st, 0, "external_tls_proxy");
    eventually("TLS still works", || {
        router
            .https(&ca, "es-natoff", tls)
            .contains(HELLO)
            .then_some(())
    });
    // The app port is reachable by no host address and no host port but the TLS one.
    let map = nft_map();
    let ours: Vec<&str> = map.lines().filter(|l| l.contains(&ip)).collect();
    assert!(
        !map.contains(&format!("{ip} . 8080")),
        "app port mapped: {map}"
    );
    for addr in [format!("{}:8080", router.host_ip()), format!("{ip}:8080")] {
        assert!(
            router.tcp(&addr, "GET / HTTP/1.0\\r\\n\\r\\n").is_err(),
            "{addr} reached the app"
        );
    }
    let plain = router
        .tcp(
            &format!("{}:{tls}", router.host_ip()),
            "GET / HTTP/1.0\\r\\n\\r\\n",
        )
        .unwrap_or_default();
    assert!(
        !plain.contains(HELLO),
        "plain HTTP through the TLS port reached the app: {plain} ({ours:?})"
    );
}

#[test]
fn two_containers_get_distinct_host_ports() {
    if !can_run("two_containers_get_distinct_host_ports") {
        return;
    }
    let (net, router, sb) = setup("nat2", "");
    let mut cs = Vec::new();
    for id in ["es-nat2a", "es-nat2b"] {
        let (opt, _) = net.attach(id);
        let cmd = format!("exec nc -ll -p 8080 -e echo i-am-{id}");
        cs.push(sb.start_cmd(id, &[(PORTS, "8080")], &[&opt], &["/bin/sh", "-c", &cmd]));
    }
    let a = sb.inspect("es-nat2a").unwrap();
    let b = sb.inspect("es-nat2b").unwrap();
    let (ea, eb) = (port_of(&a, 0, "external"), port_of(&b, 0, "external"));
    assert_ne!(ea, eb);
    assert_ne!(
        port_of(&a, 0, "external_tls_proxy"),
        port_of(&b, 0, "external_tls_proxy")
    );
    for (p, id) in [(ea, "es-nat2a"), (eb, "es-nat2b")] {
        let got = eventually("each host port reaches its own app", || {
            router
                .tcp(&format!("{}:{p}", router.host_ip()), "hi\\n")
                .ok()
        });
        assert!(got.contains(&format!("i-am-{id}")), "{p}: {got}");
    }
}

#[test]
fn gc_cleans_a_crash_and_spares_the_living() {
    if !can_run("gc_cleans_a_crash_and_spares_the_living") {
        return;
    }
    let (net, router, sb) = setup("gc", "");
    let ca = sb.dir.join("ca/ca.crt");
    let (opt_a, _) = net.attach("es-gc-a");
    let _a = sb.start_cmd("es-gc-a", &[(PORTS, "8080")], &[&opt_a], &httpd3());
    let (opt_b, ip_b) = net.attach("es-gc-b");
    let b = sb.start_cmd("es-gc-b", &[(PORTS, "8080")], &[&opt_b], &httpd3());
    let st_a = sb.inspect("es-gc-a").unwrap();
    let tls_a = port_of(&st_a, 0, "external_tls_proxy");
    eventually("a served", || {
        router
            .https(&ca, "es-gc-a", tls_a)
            .contains(HELLO)
            .then_some(())
    });
    let b_dir = sb.state_dir.join(NAMESPACE).join("es-gc-b");
    eventually("b's NAT recorded", || {
        b_dir.join("nat.json").exists().then_some(())
    });

    // The crash: b's container disappears, but its state, NAT elements and an Envoy-
    // like process survive (as after a killed hook plus a killed supervisor).
    let saved = sb.dir.join("saved-b");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&b_dir)
        .arg(&saved)
        .status()
        .unwrap();
    assert!(cp.success());
    b.remove();
    assert!(!b_dir.exists());
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&saved)
        .arg(&b_dir)
        .status()
        .unwrap();
    assert!(cp.success());
    let nat: Value =
        serde_json::from_slice(&std::fs::read(b_dir.join("nat.json")).unwrap()).unwrap();
    let elems: Vec<String> = nat["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "tcp . {} : {} . {}",
                m["host_port"],
                m["container_ip"].as_str().unwrap(),
                m["container_port"]
            )
        })
        .collect();
    let add = format!(
        "add element ip envoy_sidecar ports {{ {} }}",
        elems.join(", ")
    );
    assert!(
        std::process::Command::new("nft")
            .arg(&add)
            .status()
            .unwrap()
            .success()
    );
    let fake = sb.dir.join("fake-envoy");
    // Not `exec`: the process must keep the Envoy-like argv gc recognises.
    write_script(
        &fake,
        "#!/bin/sh\ntrap 'kill $!; exit 143' TERM\nsleep 300 &\nwait\n",
    );
    let bootstrap = b_dir.join("envoy/bootstrap.json");
    let mut orphan = ChildGuard(
        std::process::Command::new(&fake)
            .arg("-c")
            .arg(&bootstrap)
            .spawn()
            .unwrap(),
    );
    let shell = orphan.0.id();
    wait_until(
        "the orphan running (its sleep started)",
        Duration::from_secs(10),
        || !children(shell).is_empty(),
    );

    // --dry-run says what it would do and does nothing.
    let out = gc(&sb.config, &["--dry-run", "--grace", "0"]);
    assert!(
        out.contains("es-gc-b is gone") && out.contains("[dry-run]"),
        "{out}"
    );
    assert!(
        !out.contains("es-gc-a"),
        "a live container must not be touched: {out}"
    );
    assert!(b_dir.exists() && nft_map().contains(&format!("{ip_b} .")));
    assert!(orphan.0.try_wait().unwrap().is_none());

    let out = gc(&sb.config, &["--grace", "0"]);
    assert!(out.contains("es-gc-b is gone"), "{out}");
    assert!(!b_dir.exists(), "b's state must go");
    assert!(
        !nft_map().contains(&format!("{ip_b} .")),
        "b's NAT must go: {}",
        nft_map()
    );
    let status = orphan.0.wait().unwrap();
    assert!(!status.success(), "the orphan must be killed");
    // a is untouched and still served.
    assert_eq!(sb.leftovers(), ["es-gc-a"]);
    assert!(nft_map().contains(&format!("tcp . {tls_a} :")));
    assert!(router.https(&ca, "es-gc-a", tls_a).contains(HELLO));
    // A second run finds nothing.
    let again = gc(&sb.config, &["--grace", "0"]);
    assert!(
        !again.contains("es-gc-"),
        "a second gc must find nothing of ours: {again}"
    );
}
