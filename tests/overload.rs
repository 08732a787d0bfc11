//! Envoy's overload manager against the real thing: containerd + runc + Envoy in the
//! container's network namespace and in its child memory cgroup, a TLS flood from the
//! host (`scripts/tls-load.py`).
//!
//! Two limits make Envoy refuse rather than die, both derived from the additional
//! allocation: the connection cap (`max_connections`, 386 TLS connections for 32 MiB)
//! and the heap budget (`fixed_heap` monitor, 16.4 MiB of allocated heap, refusal at
//! 90 %). Before either, the defaults (32 MiB, a fixed 4096 cap, the app asking 64
//! MiB) let Envoy take connections until its cgroup hit the container's limit:
//! OOM-killed at ~2,750 held TLS connections.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const FLOOD: usize = 4000;

/// `serve-metrics`' text for the sandbox (what `GET /metrics` answers).
fn metrics_text(sb: &Sandbox) -> String {
    let store = envoy_sidecar::state::store::Store::new(&sb.state_dir);
    envoy_sidecar::metrics::exporter::render(
        &store,
        Path::new(&address()),
        envoy_sidecar::metrics::Mode::Linear,
    )
}

/// A new TLS connection must be served this soon after a flood is released: the heap
/// monitor's figure has to come down with the connections (no lockout).
const RECOVERY: Duration = Duration::from_secs(15);
/// How long the flood is held once open, with `liveness_interval = "1s"`: three failed
/// liveness checks in a row (1 s + 2 × 2 s) would have the supervisor restart Envoy,
/// dropping every held connection, if it took a refused handshake for a dead Envoy.
const HOLD: Duration = Duration::from_secs(8);

/// Envoy's stats whose names match `regex`, read over the loopback admin listener
/// from inside the container.
fn stats(c: &Container, admin: u64, regex: &str) -> HashMap<String, String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let id = format!("stats-{}", N.fetch_add(1, Ordering::Relaxed));
    let o = c.exec(
        &id,
        &format!("wget -qO- 'http://127.0.0.1:{admin}/stats?filter={regex}'"),
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// What one flood saw.
struct Flood {
    cap: u64,
    opened: u64,
    failed: u64,
    /// Envoy's stats while the flood was held, and once a new connection was served
    /// after it.
    held: HashMap<String, String>,
    after: HashMap<String, String>,
    peak_mib: f64,
}

/// The container (default 32 MiB additional allocation, app limit 64 MiB) with
/// `extra` in `[proxy]`, a flood of [`FLOOD`] TLS connections from the host held open,
/// then released. Asserts what holds for every flood: Envoy is never OOM-killed (same
/// pid, no restart, `oom_kill` 0 in its cgroup, in `status` and in the metrics), the
/// connections it did not take were refused (none left hanging), every connection it
/// took still answers a request at the end, and a new connection is served within
/// [`RECOVERY`] once they have closed.
fn flood(name: &str, extra: &str, mtls: bool) -> Flood {
    let t0 = Instant::now();
    // The loopback admin listener: the test reads Envoy's stats from inside the container.
    let mut extra = format!("{extra}admin_listener = \"loopback\"\nliveness_interval = \"1s\"\n");
    // Mutual TLS: a router CA Envoy trusts, and a client certificate from it.
    let tmp = TempDir::new(&format!("es-{name}-client"));
    let client = mtls.then(|| {
        let ca = Ca::new(tmp.path(), "router-ca");
        extra += &format!("{}\n", mtls_proxy_config(&ca.crt));
        sign_leaf(
            tmp.path(),
            &ca,
            "router",
            None,
            "subjectAltName=DNS:gorouter.service.cf.internal\nextendedKeyUsage=clientAuth\n",
        )
    });
    let client = client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let get = |sb: &Sandbox, addr: &str, id: &str| {
        Get::new(&sb.ca())
            .sni(id)
            .client(client)
            .wait_for(addr, HELLO);
    };
    let sb = Sandbox::new(name, &extra, "");
    let cfg = envoy_sidecar::config::Config::load(Some(&sb.config)).unwrap();
    let cap = u64::from(cfg.max_connections());
    let net = sb.slot.netns(0);
    let id = &format!("es-{name}");
    let lim = (64 * MIB).to_string();
    let c = sb.start_cmd(
        id,
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), "--memory-limit", &lim],
        &httpd(),
    );
    let st = sb.inspect(id).unwrap();
    let port = port_of(&st, 0, "internal_tls_proxy");
    let addr = format!("{}:{port}", net.ip);
    get(&sb, &addr, id);
    let envoy = pid_of(&sb.record(id), "envoy").expect("envoy pid");
    let cg = memory_cgroup_dir(u32::try_from(envoy).unwrap());
    assert!(cg.ends_with("envoy-sidecar"), "{}", cg.display());
    let v1 = cg.join("memory.oom_control").exists();
    let oom = || {
        if v1 {
            read_u64(&cg.join("memory.oom_control"), Some("oom_kill"))
        } else {
            read_u64(&cg.join("memory.events"), Some("oom_kill"))
        }
    };
    let bootstrap: Value = serde_json::from_slice(
        &std::fs::read(sb.container_dir(NAMESPACE, id).join("envoy/bootstrap.json")).unwrap(),
    )
    .unwrap();
    let monitors = &bootstrap["overload_manager"]["resource_monitors"];
    assert_eq!(
        monitors[0]["typed_config"]["max_active_downstream_connections"],
        cap
    );
    assert_eq!(
        monitors[1]["typed_config"]["max_heap_size_bytes"],
        cfg.heap_budget_bytes()
    );
    let admin = st["admin_port"].as_u64().unwrap();
    let wanted = format!(
        "^(listener.0.0.0.0_{port}.downstream_(cx_active|cx_overload_reject|global_cx_overflow)\
         |overload.envoy.(resource_monitors.fixed_heap.pressure\
         |overload_actions.reject_incoming_connections.active))$"
    );

    let ready = sb.dir.join("flood.ready");
    let mut extra = vec![
        "--parallel",
        "64",
        "--open-timeout",
        "40",
        "--hold-max",
        "40",
        "--keep-partial",
        "--finish",
    ];
    let (cert, key);
    if let Some((c, k)) = client {
        (cert, key) = (c.display().to_string(), k.display().to_string());
        extra.extend(["--cert", &cert, "--key", &key]);
    }
    let mut hold = TlsHold::start(&net.ip, port, &sb.ca(), id, FLOOD, &ready, &extra);
    let opened = hold.wait_opened("the flood opened", Duration::from_secs(45));
    let load = &mut hold.load;
    let (n_open, n_failed) = (
        opened["opened"].as_u64().unwrap(),
        opened["failed"].as_u64().unwrap(),
    );
    // Held: Envoy's own count, its memory, the kernel's verdict.
    let held = stats(&c, admin, &wanted);
    let rec = sb.record(id);
    assert_eq!(
        pid_of(&rec, "envoy"),
        Some(envoy),
        "Envoy was replaced: {rec}"
    );
    assert_eq!(rec["envoy_restarts"], 0, "{rec}");
    assert_eq!(oom(), 0, "Envoy's cgroup saw an OOM kill");
    let peak = if v1 {
        read_u64(&cg.join("memory.max_usage_in_bytes"), None)
    } else {
        read_u64(&cg.join("memory.peak"), None)
    };
    let row = status_row(&sb.config, NAMESPACE, id).expect("a status row");
    assert_eq!(row["envoy_oom_kills"], 0, "{row}");
    assert_eq!(row["restarts"], 0, "{row}");
    let m = metrics_text(&sb);
    assert!(
        m.contains(&format!(
            "envoy_sidecar_envoy_oom_kills{{namespace=\"{NAMESPACE}\",id=\"{id}\"}} 0"
        )),
        "{m}"
    );
    // Every connection was either taken or refused.
    assert_eq!(n_open + n_failed, FLOOD as u64, "{opened}");
    assert_eq!(
        held[&format!("listener.0.0.0.0_{port}.downstream_cx_active")],
        n_open.to_string(),
        "{held:?}"
    );

    // Held past three liveness checks: still the same Envoy, and the checks saw it
    // refusing on purpose.
    std::thread::sleep(HOLD);
    let rec = sb.record(id);
    assert_eq!(
        pid_of(&rec, "envoy"),
        Some(envoy),
        "Envoy was replaced while refusing a flood: {}",
        sb.supervisor_log(id)
    );
    let log = sb.supervisor_log(id);
    assert!(
        log.contains("refusing at its connection cap or heap budget"),
        "{log}"
    );

    // Release: every held connection completes its request first.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(load.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = std::mem::replace(&mut load.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["dropped"], 0, "held connections were closed: {done}");
    assert_eq!(
        done["answered"], n_open,
        "held connections stopped working: {done}"
    );

    // Accepting resumes once they are gone, soon, and by the same Envoy (a refusing
    // Envoy fails the supervisor's liveness checks, and three in a row, ~14 s, get it
    // restarted: that is no recovery).
    let took = Instant::now();
    get(&sb, &addr, id);
    let resumed = took.elapsed();
    let rec = sb.record(id);
    assert!(
        resumed <= RECOVERY && pid_of(&rec, "envoy") == Some(envoy),
        "a new connection was served {resumed:?} after the release, Envoy pid {envoy} \
         then {:?} ({} restarts); supervisor log:\n{}",
        pid_of(&rec, "envoy"),
        rec["envoy_restarts"],
        sb.supervisor_log(id)
    );
    let after = stats(&c, admin, &wanted);
    assert_eq!(oom(), 0);
    let peak_mib = peak as f64 / MIB as f64;
    eprintln!(
        "{name}: flood {FLOOD}: opened {n_open} (cap {cap}, heap budget {:.1} MiB), refused \
         {n_failed}, opening took {} s; held: {held:?}; Envoy cgroup peak {peak_mib:.1} MiB \
         (allocation 32 MiB, container limit 64+32 MiB); all {n_open} answered at release; \
         served again {resumed:?} after, then {after:?}; oom_kill 0; test {:?}",
        cfg.heap_budget_bytes() as f64 / MIB as f64,
        opened["open_s"],
        t0.elapsed()
    );
    Flood {
        cap,
        opened: n_open,
        failed: n_failed,
        held,
        after,
        peak_mib,
    }
}

fn stat(s: &HashMap<String, String>, suffix: &str) -> u64 {
    s.iter()
        .find(|(k, _)| k.ends_with(suffix))
        .unwrap_or_else(|| panic!("no {suffix} in {s:?}"))
        .1
        .parse()
        .unwrap()
}

/// With the default additional allocation (32 MiB) and so the derived default cap
/// (386 TLS connections): the connection cap is what refuses a flood of idle
/// connections (at once, past the cap), the heap budget is not reached, and Envoy's
/// cgroup stays inside the allocation.
#[test]
fn tls_flood_is_refused_past_the_allocation_not_oom_killed() {
    if !can_run("tls_flood_is_refused_past_the_allocation_not_oom_killed") {
        return;
    }
    let f = flood("overload", "", false);
    assert_eq!(f.cap, 386);
    assert!(
        f.opened <= f.cap && f.opened + 5 >= f.cap,
        "{} opened, cap {}",
        f.opened,
        f.cap
    );
    // The flood's refusals, and the liveness checks' (two handshakes per check).
    let refused = stat(&f.held, ".downstream_global_cx_overflow");
    assert!((f.failed..f.failed + 20).contains(&refused), "{refused}");
    assert_eq!(stat(&f.held, ".downstream_cx_overload_reject"), 0);
    assert!(stat(&f.held, "fixed_heap.pressure") < 90, "{:?}", f.held);
    assert!(
        f.peak_mib < 32.0,
        "Envoy's cgroup went past the 32 MiB allocation: {:.1} MiB",
        f.peak_mib
    );
}

/// An explicit `max_connections = 4096` with the default 32 MiB allocation (which
/// holds ~386; `check-config` warns): the heap budget is what trips. Before it, Envoy
/// took connections until the container's limit and was OOM-killed at ~2,750; now it
/// refuses past the budget (reject at accept), stays inside its allocation, the ones
/// it took keep working, and once they close it accepts again — the heap monitor
/// counts allocated bytes, which come down with the connections (counting tcmalloc's
/// resident heap, as Envoy does by default, it stays above the threshold after the
/// flood and every new connection is refused).
#[test]
fn heap_budget_refuses_past_the_allocation_with_a_large_cap() {
    if !can_run("heap_budget_refuses_past_the_allocation_with_a_large_cap") {
        return;
    }
    let f = flood("overload-heap", "max_connections = 4096\n", false);
    assert_eq!(f.cap, 4096);
    // The budget holds at least what the default cap would take (386), and far fewer
    // than 4096: 483 by the model at 100 %, refusal from 90 % (measured 448 standalone).
    assert!(
        (386..700).contains(&f.opened),
        "{} opened with the heap budget",
        f.opened
    );
    // The flood's refusals, and the liveness checks' (two handshakes per check).
    refused_by_the_heap_budget_then_recovered(&f);
}

/// The same with mutual TLS (client certificates verified; the allocation holds ~316,
/// the heap budget is 17.8 MiB: a connection costs more heap).
#[test]
fn heap_budget_refuses_past_the_allocation_with_mutual_tls() {
    if !can_run("heap_budget_refuses_past_the_allocation_with_mutual_tls") {
        return;
    }
    let f = flood("overload-mtls", "max_connections = 4096\n", true);
    assert_eq!(f.cap, 4096);
    // 336 by the model at 90 %; measured 360–385 standalone.
    assert!(
        (316..600).contains(&f.opened),
        "{} opened with the heap budget",
        f.opened
    );
    refused_by_the_heap_budget_then_recovered(&f);
}

/// The flood's refusals were the heap budget's (and the liveness checks', two
/// handshakes per check), never the cap's; Envoy stayed inside its allocation; and
/// once the flood closed the pressure came down and the refusal was lifted.
fn refused_by_the_heap_budget_then_recovered(f: &Flood) {
    let refused = stat(&f.held, ".downstream_cx_overload_reject");
    assert!((f.failed..f.failed + 20).contains(&refused), "{refused}");
    assert_eq!(stat(&f.held, ".downstream_global_cx_overflow"), 0);
    assert!(stat(&f.held, "fixed_heap.pressure") >= 90, "{:?}", f.held);
    assert_eq!(stat(&f.held, "reject_incoming_connections.active"), 1);
    assert!(
        f.peak_mib < 32.0,
        "Envoy's cgroup went past the 32 MiB allocation: {:.1} MiB",
        f.peak_mib
    );
    assert!(stat(&f.after, "fixed_heap.pressure") < 60, "{:?}", f.after);
    assert_eq!(stat(&f.after, "reject_incoming_connections.active"), 0);
}
