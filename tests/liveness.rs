//! Liveness while running: the supervisor re-checks a running Envoy with a real TLS
//! handshake on every listener (`[proxy] liveness_interval`, default 30 s) and, after
//! three failures in a row, reports the container `degraded` and restarts Envoy. A
//! drained or stopped Envoy is back within 30 s. Real containers, real Envoy.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The checks at 10 s, not the default 30 s (75–125 % of it): the mechanism is the
/// same and the bound below stays 30 s.
const LIVENESS_10S: &str = "liveness_interval = \"10s\"\n";

/// Within 30 s of the fault: which statuses were seen (in order, without repeats),
/// and the status row once it is `ready` again with an Envoy other than `old_pid`.
fn restored(sb: &Sandbox, id: &str, old_pid: i64) -> (Vec<String>, Value) {
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let row = status_row(&sb.config, NAMESPACE, id).expect("a status row");
        let status = row["status"].as_str().unwrap_or_default().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        let pid = sb.record(id)["envoy"]["pid"].as_i64().unwrap_or(0);
        if status == "ready" && pid != 0 && pid != old_pid {
            eprintln!("restored after {:?}; statuses {seen:?}", start.elapsed());
            return (seen, row);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not restored within 30 s; statuses {seen:?}; last row {row}\n{}",
            sb.supervisor_log(id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The app served through the proxy and the supervisor past its readiness probe: the
/// checks under test are those of a running Envoy. (The test's own first response can
/// come before the supervisor's probe succeeds; a fault injected in between is the
/// readiness timeout's to handle, not liveness's.)
fn start_ready(sb: &Sandbox, id: &str, net: &Netns) -> (Container, Value, String) {
    let started = sb.start_served(id, net);
    wait_until("status ready", Duration::from_secs(20), || {
        status_row(&sb.config, NAMESPACE, id).is_some_and(|r| r["status"] == "ready")
    });
    started
}

fn envoy_pid(sb: &Sandbox, id: &str) -> i64 {
    sb.record(id)["envoy"]["pid"]
        .as_i64()
        .expect("an Envoy pid")
}

#[test]
fn a_stopped_envoy_is_restarted_and_reported_degraded_meanwhile() {
    if !can_run("a_stopped_envoy_is_restarted_and_reported_degraded_meanwhile") {
        return;
    }
    let sb = Sandbox::new("live-stop", LIVENESS_10S, "");
    let net = sb.slot.netns(0);
    let id = "es-live-stop";
    let (_c, _st, addr) = start_ready(&sb, id, &net);
    let pid = envoy_pid(&sb, id);
    // SIGSTOP: the kernel still accepts connections into the listen backlog, so
    // only a handshake tells that nobody is there.
    assert!(unsafe_free_kill(pid, "STOP"));
    let (seen, row) = restored(&sb, id, pid);
    assert!(
        seen.iter().any(|s| s == "degraded"),
        "the unresponsive Envoy must show as degraded before it is back: {seen:?}"
    );
    assert!(row["restarts"].as_u64().unwrap_or(0) >= 1, "{row}");
    assert!(openssl_wait_for(&addr, &sb.ca(), id, HELLO).contains(HELLO));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the stopped Envoy must be gone"
    );
    let log = sb.supervisor_log(id);
    assert!(log.contains("unresponsive"), "{log}");
}

#[test]
fn listeners_drained_by_the_app_are_restored() {
    if !can_run("listeners_drained_by_the_app_are_restored") {
        return;
    }
    // The reference's loopback admin listener: reachable by the app.
    let sb = Sandbox::new(
        "live-drain",
        &format!("admin_listener = \"loopback\"\n{LIVENESS_10S}"),
        "",
    );
    let net = sb.slot.netns(0);
    let id = "es-live-drain";
    let (c, st, addr) = start_ready(&sb, id, &net);
    let pid = envoy_pid(&sb, id);
    let admin = st["admin_port"].as_u64().unwrap();
    // Any process in the app container can reach the loopback admin listener.
    let out = c.exec(
        "drain",
        &format!("wget -q -O- --post-data= http://127.0.0.1:{admin}/drain_listeners"),
    );
    assert!(out.status.success(), "drain from the app: {}", text(&out));
    // The route really went down (the control: without liveness it stays down).
    wait_until(
        "TLS refused after the drain",
        Duration::from_secs(10),
        || !openssl_get(&addr, &sb.ca(), id).contains(HELLO),
    );
    let (_, row) = restored(&sb, id, pid);
    assert!(row["restarts"].as_u64().unwrap_or(0) >= 1, "{row}");
    assert!(openssl_wait_for(&addr, &sb.ca(), id, HELLO).contains(HELLO));
}

/// `kill -SIG pid` through the shell (no unsafe in tests).
fn unsafe_free_kill(pid: i64, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}
