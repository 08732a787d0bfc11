//! Memory metrics through containerd's task metrics API, for real containers that
//! allocate a known amount, and the Prometheus exporter scraped during churn.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn metrics(sb: &Sandbox, ids: &[&str]) -> Vec<Value> {
    let o = cli(&sb.config)
        .args([
            "metrics",
            "--json",
            "--namespace",
            NAMESPACE,
            "--address",
            &address(),
        ])
        .args(ids)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice::<Vec<Value>>(&o.stdout).unwrap()
}

fn ready(sb: &Sandbox, id: &str) {
    wait_until(
        &format!("{id}: Envoy ready"),
        Duration::from_secs(20),
        || {
            sb.try_record(NAMESPACE, id)
                .is_some_and(|v| v["ready_at"].is_string())
        },
    );
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn rescaled_and_exact_figures_for_a_known_allocation() {
    if !can_run("rescaled_and_exact_figures_for_a_known_allocation") {
        return;
    }
    let sb = Sandbox::new("metrics", "", "");
    let net = sb.slot.netns(0);
    // 40 MiB in tmpfs (/dev/shm): anonymous memory, charged to the container.
    let cmd = "head -c 41943040 /dev/zero > /dev/shm/fill && exec httpd -f -p 8080 -h /www";
    let c = sb.start_cmd(
        "es-met",
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), "--memory-limit", &(128 * MIB).to_string()],
        &["/bin/sh", "-c", cmd],
    );
    ready(&sb, "es-met");
    // The 40 MiB are written once the shell has become httpd.
    let init = c.pid();
    wait_until(
        "the fill written (init exec'd httpd)",
        Duration::from_secs(20),
        || {
            let comm = std::fs::read_to_string(format!("/proc/{init}/comm")).unwrap_or_default();
            if comm.trim() == "httpd" {
                Ok(())
            } else {
                Err(comm)
            }
        },
    );
    let r = &metrics(&sb, &["es-met"])[0];
    let raw = u(r, "raw_working_set_bytes");
    // cgroup v2: Envoy's child has no memory controller, so there is no figure of its
    // own (doctor says so) and `exact` falls back to linear, below.
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let envoy = if v2 {
        assert!(r["envoy_bytes"].is_null(), "{r}");
        0
    } else {
        u(r, "envoy_bytes")
    };
    assert_eq!(u(r, "memory_bytes_quota"), 128 * MIB);
    assert_eq!(
        u(r, "raw_limit_bytes"),
        160 * MIB,
        "128 MiB requested + 32 MiB proxy"
    );
    assert!(
        raw >= 40 * MIB + envoy,
        "raw {raw} must hold the 40 MiB and Envoy's {envoy}"
    );
    assert!(
        v2 || (envoy > 4 * MIB && envoy < 64 * MIB),
        "Envoy's own cgroup: {envoy}"
    );
    // Linear, as the reference: raw x 128 / 160.
    assert_eq!(r["method"], "linear");
    assert_eq!(u(r, "memory_bytes"), raw * 128 / 160);
    // Cross-check containerd's figure against the cgroup itself (read a moment later).
    let cg = std::fs::read_to_string(if v2 {
        memory_cgroup_dir(c.pid()).join("memory.current")
    } else {
        memory_cgroup_dir(c.pid()).join("memory.usage_in_bytes")
    })
    .unwrap();
    let cg: u64 = cg.trim().parse().unwrap();
    assert!(
        cg.abs_diff(u(r, "raw_usage_bytes")) < 8 * MIB,
        "cgroup {cg} vs containerd {r}"
    );

    // Exact: the app's own figure is the container minus Envoy: ~40 MiB plus the shell
    // and httpd, whereas linear rescaling mixes Envoy into it.
    let cfg = std::fs::read_to_string(&sb.config).unwrap();
    std::fs::write(&sb.config, format!("{cfg}\n[metrics]\nmode = \"exact\"\n")).unwrap();
    let r = &metrics(&sb, &["es-met"])[0];
    if v2 {
        assert_eq!(r["method"], "linear", "v2: exact falls back to linear: {r}");
        let o = cli(&sb.config).arg("doctor").output().unwrap();
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(
            said.contains("falls back to linear (v1 only)"),
            "doctor must say so: {said}"
        );
        drop(c);
        return;
    }
    assert_eq!(r["method"], "exact");
    let app = u(r, "memory_bytes");
    assert!(
        (40 * MIB..48 * MIB).contains(&app),
        "exact app usage {app}: {r}"
    );
    drop(c);
}

#[test]
fn unscaled_without_limit_and_absent_without_proxy() {
    if !can_run("unscaled_without_limit_and_absent_without_proxy") {
        return;
    }
    let sb = Sandbox::new("metrics-nolimit", "", "");
    let _a = sb.start("es-met-nolimit", &[(PORTS, "8080")], &[]);
    let _b = sb.start("es-met-noproxy", &[], &[]);
    let all = metrics(&sb, &[]);
    assert_eq!(all.len(), 1, "only proxied containers: {all:?}");
    let r = &all[0];
    assert_eq!(r["id"], "es-met-nolimit");
    assert_eq!(r["method"], "unscaled");
    assert_eq!(u(r, "memory_bytes_quota"), 0);
    assert_eq!(u(r, "memory_bytes"), u(r, "raw_working_set_bytes"));
    // Asking for a container that was not created through envoy-sidecar is an error.
    let o = cli(&sb.config)
        .args([
            "metrics",
            "es-met-noproxy",
            "--namespace",
            NAMESPACE,
            "--address",
            &address(),
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("not created through envoy-sidecar")
    );
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn exporter(sb: &Sandbox, address: &str) -> (ChildGuard, u16) {
    let port = sb.slot.tcp_port();
    let child = cli(&sb.config)
        .args([
            "serve-metrics",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--address",
            address,
        ])
        .spawn()
        .unwrap();
    let child = ChildGuard(child);
    wait_until("the exporter listening", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
    });
    (child, port)
}

#[test]
fn exporter_serves_through_churn_and_containerd_outage() {
    if !can_run("exporter_serves_through_churn_and_containerd_outage") {
        return;
    }
    let sb = Sandbox::new("exporter", "", "");
    let (_e, port) = exporter(&sb, &address());
    let lim = (64 * MIB).to_string();
    let mut seen = 0;
    for round in 0..6 {
        let id = format!("es-exp-{round}");
        let c = sb.start(&id, &[(PORTS, "8080")], &["--memory-limit", &lim]);
        let body = scrape(port);
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        let label = format!("namespace=\"{NAMESPACE}\",id=\"{id}\"");
        assert!(
            body.contains(&format!(
                "envoy_sidecar_memory_quota_bytes{{{label}}} {}",
                64 * MIB
            )),
            "{body}"
        );
        if body.contains(&format!("envoy_sidecar_memory_usage_bytes{{{label}}}")) {
            seen += 1;
        }
        assert!(
            body.contains(&format!(
                "envoy_sidecar_containerd_up{{namespace=\"{NAMESPACE}\"}} 1"
            )),
            "{body}"
        );
        // The container vanishes between scrapes, and during one.
        let t = std::thread::spawn(move || scrape(port));
        drop(c);
        assert!(t.join().unwrap().starts_with("HTTP/1.1 200"));
        let after = scrape(port);
        assert!(
            !after.contains(&label),
            "removed container still reported: {after}"
        );
    }
    assert!(seen >= 5, "usage reported in only {seen} of 6 scrapes");

    // containerd unreachable: the endpoint keeps answering, saying so.
    let (_down, port2) = exporter(&sb, "/run/envoy-sidecar-test/no-such.sock");
    let _c = sb.start("es-exp-down", &[(PORTS, "8080")], &[]);
    let body = scrape(port2);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(&format!(
            "envoy_sidecar_containerd_up{{namespace=\"{NAMESPACE}\"}} 0"
        )),
        "{body}"
    );
    assert!(
        body.contains("id=\"es-exp-down\""),
        "state gauges still there: {body}"
    );
    let missing = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'GET /nope HTTP/1.0\\r\\n\\r\\n' | busybox nc 127.0.0.1 {port2}"
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stdout).starts_with("HTTP/1.1 404"));
}
