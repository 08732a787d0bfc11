//! Create-time behaviour through the real stack: ctr -> containerd -> runc shim ->
//! envoy-sidecar-runc -> runc, checked from inside the container and from the host.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use serde_json::Value;

fn cf_instance_ports(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", text(out));
    let env = env_map(&String::from_utf8_lossy(&out.stdout));
    let v = env
        .get("CF_INSTANCE_PORTS")
        .unwrap_or_else(|| panic!("no CF_INSTANCE_PORTS: {}", text(out)));
    serde_json::from_str(v).unwrap()
}

#[test]
fn one_port_env_and_cleanup() {
    if !can_run("one_port_env_and_cleanup") {
        return;
    }
    let slot = slots::next();
    let host = slot.unrouted_address();
    let sb = Sandbox::in_slot(
        &slot,
        "one",
        "",
        &format!("[host]\naddress = {host:?}\n"),
        POOL,
    );
    let out = sb.run_rm("es-one", &[(PORTS, "8080")], &[], "env");
    let ports = cf_instance_ports(&out);
    let env = env_map(&String::from_utf8_lossy(&out.stdout));
    let p = &ports[0];
    assert_eq!(ports.as_array().unwrap().len(), 1);
    assert_eq!(p["internal"], 8080);
    assert_eq!(p["internal_tls_proxy"], 61001);
    let (ext, tls) = (
        p["external"].as_u64().unwrap(),
        p["external_tls_proxy"].as_u64().unwrap(),
    );
    let pool = sb.pool();
    assert!(
        // From the sandbox's own host port pool (see tests/common), distinct.
        u16::try_from(ext).is_ok_and(|e| pool.contains(&e))
            && u16::try_from(tls).is_ok_and(|t| pool.contains(&t))
            && ext != tls,
        "{p} not in {pool:?}"
    );
    assert_eq!(env["CF_INSTANCE_PORT"], ext.to_string());
    assert_eq!(env["CF_INSTANCE_ADDR"], format!("{host}:{ext}"));
    assert_eq!(env["CF_INSTANCE_IP"], host);
    assert_eq!(
        env["CF_INSTANCE_CERT"],
        "/etc/cf-instance-credentials/instance.crt"
    );
    assert_eq!(
        env["CF_INSTANCE_KEY"],
        "/etc/cf-instance-credentials/instance.key"
    );
    // The image's own environment is still there.
    assert!(env["PATH"].contains("/bin"), "{env:?}");
    assert!(
        sb.leftovers().is_empty(),
        "state left after ctr run --rm: {:?}",
        sb.leftovers()
    );
}

#[test]
fn three_ports_follow_the_reference_algorithm() {
    if !can_run("three_ports_follow_the_reference_algorithm") {
        return;
    }
    let sb = Sandbox::new("three", "", "");
    // 61002 is an app port: the proxy ports must skip it.
    let out = sb.run_rm("es-three", &[(PORTS, "8080,61002,2222,8080")], &[], "env");
    let ports = cf_instance_ports(&out);
    let got: Vec<(u64, u64)> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["internal"].as_u64().unwrap(),
                p["internal_tls_proxy"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [(8080, 61001), (61002, 61003), (2222, 61004)]);
    let mut host: Vec<u64> = ports
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            [
                p["external"].as_u64().unwrap(),
                p["external_tls_proxy"].as_u64().unwrap(),
            ]
        })
        .collect();
    host.sort();
    host.dedup();
    assert_eq!(host.len(), 6, "host ports must be distinct: {ports}");
}

#[test]
fn unproxied_mappings_disabled() {
    if !can_run("unproxied_mappings_disabled") {
        return;
    }
    let sb = Sandbox::new("unproxied", "enable_unproxied_port_mappings = false", "");
    let out = sb.run_rm("es-unproxied", &[(PORTS, "8080,9999")], &[], "env");
    let ports = cf_instance_ports(&out);
    for p in ports.as_array().unwrap() {
        assert!(p.get("external").is_none(), "external must be absent: {p}");
        assert!(p["external_tls_proxy"].as_u64().is_some());
    }
    let env = env_map(&String::from_utf8_lossy(&out.stdout));
    assert!(
        !env.contains_key("CF_INSTANCE_ADDR") && !env.contains_key("CF_INSTANCE_PORT"),
        "{env:?}"
    );
}

#[test]
fn memory_limit_raised_and_credentials_mounted() {
    if !can_run("memory_limit_raised_and_credentials_mounted") {
        return;
    }
    let sb = Sandbox::new("memory", "additional_memory_allocation_mb = 16", "");
    let limit = (64 * MIB).to_string();
    let c = sb.start("es-mem", &[(PORTS, "8080")], &["--memory-limit", &limit]);
    // Seen from the host, in the container's own memory cgroup.
    assert_eq!(memory_limit_of(c.pid()), (80 * MIB).to_string());
    let st = sb.inspect("es-mem").expect("inspect es-mem");
    assert_eq!(st["memory"]["requested_bytes"], 64 * MIB);
    assert_eq!(st["memory"]["limit_bytes"], 80 * MIB);

    // Credentials directory: mounted read-only at the documented path.
    let out = c.exec(
        "mnt",
        "grep ' /etc/cf-instance-credentials ' /proc/mounts; touch /etc/cf-instance-credentials/x",
    );
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.contains(" ro,") || t.contains(" ro "),
        "not read-only: {}",
        text(&out)
    );
    assert!(
        !out.status.success(),
        "writing into the credentials mount must fail"
    );
    let creds = st["credentials_dir"].as_str().unwrap();
    assert!(std::path::Path::new(creds).is_dir(), "{creds}");

    // Processes started later (as an operator's ssh would) see the same variables.
    let out = c.exec("envx", "env");
    let env = env_map(&String::from_utf8_lossy(&out.stdout));
    let ports: Value = serde_json::from_str(&env["CF_INSTANCE_PORTS"]).unwrap();
    assert_eq!(ports[0]["internal"], 8080, "{}", text(&out));
    assert_eq!(
        ports[0]["external_tls_proxy"],
        st["ports"][0]["external_tls_proxy"]
    );

    c.remove();
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
    assert!(!std::path::Path::new(creds).exists());
}

#[test]
fn opt_out_and_no_ports_are_untouched() {
    if !can_run("opt_out_and_no_ports_are_untouched") {
        return;
    }
    let sb = Sandbox::new("optout", "", "");
    let c = sb.start(
        "es-optout",
        &[(PORTS, "8080"), ("envoy-sidecar/enabled", "false")],
        &["--memory-limit", &(64 * MIB).to_string()],
    );
    assert_eq!(
        memory_limit_of(c.pid()),
        (64 * MIB).to_string(),
        "limit must stay as requested"
    );
    let out = c.exec("env", "env");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("CF_INSTANCE"),
        "{}",
        text(&out)
    );
    assert!(sb.inspect("es-optout").is_none());
    drop(c);
    let out = sb.run_rm("es-noports", &[], &[], "env");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("CF_INSTANCE"),
        "{}",
        text(&out)
    );
    assert!(!sb.state_dir.join(NAMESPACE).exists() || sb.leftovers().is_empty());
}

#[test]
fn bad_annotation_fails_create_visibly() {
    if !can_run("bad_annotation_fails_create_visibly") {
        return;
    }
    let sb = Sandbox::new("badann", "", "");
    let out = sb.run_rm("es-bad", &[(PORTS, "8080,http")], &[], "true");
    assert!(!out.status.success(), "create must fail: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("envoy-sidecar/ports") && err.contains("valid:"),
        "the ctr user must see which annotation is wrong: {err}"
    );
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn overcommit_and_exhausted_pool_hold_nothing() {
    if !can_run("overcommit_and_exhausted_pool_hold_nothing") {
        return;
    }
    // Four host ports.
    let sb = Sandbox::with_pool("capacity", "", "[host]\nmemory_capacity_mb = 100\n", 4);
    let a = sb.start(
        "es-cap-a",
        &[(PORTS, "8080")],
        &["--memory-limit", &(40 * MIB).to_string()],
    );
    // 40+32 MiB held; another 40+32 would exceed 100 MiB.
    let out = sb.run_rm(
        "es-cap-b",
        &[(PORTS, "8080")],
        &["--memory-limit", &(40 * MIB).to_string()],
        "true",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("memory_capacity_mb = 100"),
        "{}",
        text(&out)
    );
    // 2 of 4 pool ports held; a 2-port container needs 4.
    let out = sb.run_rm("es-cap-c", &[(PORTS, "8080,9090")], &[], "true");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exhausted"),
        "{}",
        text(&out)
    );
    assert_eq!(sb.leftovers(), ["es-cap-a"]);
    // Once a is gone, both fit.
    a.remove();
    let out = sb.run_rm("es-cap-c", &[(PORTS, "8080,9090")], &[], "true");
    assert!(out.status.success(), "{}", text(&out));
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn concurrent_creates_get_distinct_ports() {
    if !can_run("concurrent_creates_get_distinct_ports") {
        return;
    }
    let sb = Sandbox::new("concurrent", "", "");
    let ids: Vec<String> = (0..6).map(|i| format!("es-conc-{i}")).collect();
    let containers: Vec<Container> = std::thread::scope(|s| {
        let hs: Vec<_> = ids
            .iter()
            .map(|id| s.spawn(|| sb.start(id, &[(PORTS, "8080,9999")], &[])))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = Vec::new();
    for c in &containers {
        let st = sb.inspect(&c.id).expect("state");
        for p in st["ports"].as_array().unwrap() {
            all.push(p["external"].as_u64().unwrap());
            all.push(p["external_tls_proxy"].as_u64().unwrap());
        }
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "host ports shared between containers");
    assert_eq!(n, 6 * 4);
    drop(containers);
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn proxy_disabled_is_plain_runc() {
    if !can_run("proxy_disabled_is_plain_runc") {
        return;
    }
    let sb = Sandbox::new("disabled", "", "");
    std::fs::write(
        &sb.config,
        format!("[runtime]\nstate_dir = {:?}\n", sb.state_dir),
    )
    .unwrap();
    let cmd = "env | sort | grep -v HOSTNAME; grep -c cf-instance /proc/mounts";
    let lim = (64 * MIB).to_string();
    let ours = sb.run_rm(
        "es-pass-a",
        &[(PORTS, "8080")],
        &["--memory-limit", &lim],
        cmd,
    );
    // The same through plain runc (same output capture, same annotation).
    *sb.runtime_override.lock().unwrap() = Some(real_runc());
    let plain = sb.run_rm(
        "es-pass-b",
        &[(PORTS, "8080")],
        &["--memory-limit", &lim],
        cmd,
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&plain.stdout),
        "{}\n{}",
        text(&ours),
        text(&plain)
    );
    assert_eq!(ours.status.code(), plain.status.code());
    assert!(
        !sb.state_dir.exists(),
        "disabled proxy must not create state"
    );
}

#[test]
fn user_env_conflict_fails_create() {
    if !can_run("user_env_conflict_fails_create") {
        return;
    }
    let sb = Sandbox::new("envclash", "", "");
    let out = sb.run_rm(
        "es-envclash",
        &[(PORTS, "8080")],
        &["--env", "CF_INSTANCE_PORTS=[]"],
        "true",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("CF_INSTANCE_PORTS"),
        "{}",
        text(&out)
    );
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn failed_runc_create_releases_everything() {
    if !can_run("failed_runc_create_releases_everything") {
        return;
    }
    // The real runc fails after the wrapper decided and recorded everything.
    let sb = Sandbox::new("runcfail", "", "");
    let failing = FakeRunc::passthrough(&sb.dir, &real_runc().display().to_string());
    failing.fail("create", 1);
    sb.add_config_line("[runtime]", &format!("runc = {:?}", failing.path));
    let out = sb.run_rm("es-runcfail", &[(PORTS, "8080")], &[], "true");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        sb.leftovers().is_empty(),
        "state held after a failed create: {:?}",
        sb.leftovers()
    );
}

/// A `state_dir` whose parents do not exist: the first proxied create makes them
/// traversable (0711), so the container gets its proxy at once; and `status` runs
/// whatever is wrong with the configuration, listing every container it can read.
#[test]
fn a_state_dir_with_missing_parents_works_at_once_and_status_always_runs() {
    use std::os::unix::fs::PermissionsExt;
    if !can_run("a_state_dir_with_missing_parents_works_at_once_and_status_always_runs") {
        return;
    }
    let sb = Sandbox::new("parents", "", "");
    let deep = sb.dir.join("not/yet/state");
    sb.set_config_line("state_dir", &format!("state_dir = {deep:?}"));
    let net = sb.slot.netns(0);
    let id = "es-parents";
    let (c, _st, addr) = sb.start_served(id, &net);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&sb.dir.join("not")), 0o711);
    assert_eq!(mode(&sb.dir.join("not/yet")), 0o711);
    let row = wait_until("status ready", std::time::Duration::from_secs(20), || {
        let r = status_row(&sb.config, NAMESPACE, id).ok_or("no row")?;
        if r["status"] == "ready" {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    });
    assert!(row["last_error"].is_null(), "{row}");
    openssl_wait_for(&addr, &sb.ca(), id, HELLO);

    // A configuration that fails validation, then one that is not TOML: status still
    // lists the container (from the state_dir line), says what is wrong, exits 0.
    let good = std::fs::read_to_string(&sb.config).unwrap();
    for (what, text_of) in [
        (
            "invalid",
            good.replace(
                "[proxy]\n",
                "[proxy]\nadditional_memory_allocation_mb = -3\n",
            ),
        ),
        ("not TOML", format!("{good}\nthis is = = not toml\n")),
    ] {
        assert_ne!(text_of, good, "{what}");
        std::fs::write(&sb.config, &text_of).unwrap();
        let o = cli(&sb.config).arg("status").output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{what}: {}", text(&o));
        assert!(
            out.contains("config error") && out.contains(id),
            "{what}: {out}"
        );
        let o = cli(&sb.config).args(["status", "--json"]).output().unwrap();
        assert!(o.status.success(), "{what}: {}", text(&o));
        let rows: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{what}: {e}: {}", text(&o)));
        assert_eq!(rows[0]["id"], id, "{what}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("config error"),
            "{what}"
        );
    }
    std::fs::write(&sb.config, good).unwrap();
    drop(c);
}
