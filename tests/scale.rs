//! Scale and churn through the real stack (containerd + runc + Envoy + nftables):
//! 50 proxied containers at once on CNI bridges, and hundreds of short lifecycles,
//! with the product's host footprint measured before and after.
//!
//! `ES_SCALE_N` (default 50, at most 52), `ES_SCALE_PAR` (containers created/removed
//! at once, default all), `ES_CHURN` (lifecycles, default 300).
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::footprint::*;
use common::*;

/// The two tests measure the host: never at the same time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Run `f(i)` for `i in 0..n` on `workers` threads.
fn parallel(n: usize, workers: usize, f: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    f(i);
                }
            });
        }
    });
}

/// What the product holds on the host for one sandbox.
#[derive(Debug, Clone, PartialEq)]
struct Footprint {
    state_files: usize,
    processes: usize,
    nat_in_pool: usize,
    shims: usize,
}

fn footprint(sb: &Sandbox, pool: &RangeInclusive<u16>, id_prefix: &str) -> Footprint {
    Footprint {
        state_files: count_entries(&sb.state_dir),
        processes: our_processes(sb).len(),
        nat_in_pool: nat_in_pool(pool).len(),
        shims: shims(NAMESPACE, id_prefix),
    }
}

#[test]
fn fifty_containers_in_parallel_then_nothing_left() {
    if !can_run("fifty_containers_in_parallel_then_nothing_left") {
        return;
    }
    let _serial = serial();
    let n = env_usize("ES_SCALE_N", 50).min(52);
    let par = env_usize("ES_SCALE_PAR", n);
    let sb = Sandbox::with_pool("scale", "", "", 400);
    let pool = sb.pool();
    let _scrub = Scrub::new(&sb);
    let ca = sb.ca();
    // Four /28 bridges (13 container addresses each): 52 distinct IPs. A slot has one:
    // the sandbox's and three more.
    let more: Vec<Slot> = (0..3).map(|_| slots::next()).collect();
    let nets: Vec<CniNet> = std::iter::once(&sb.slot)
        .chain(&more)
        .map(Slot::cni)
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("es-scale-{i:02}")).collect();

    let t = Instant::now();
    let attached: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| nets[i % 4].attach(id))
        .collect();
    let ips: BTreeSet<&str> = attached.iter().map(|(_, ip)| ip.as_str()).collect();
    assert_eq!(ips.len(), n, "container IPs must be distinct: {attached:?}");
    eprintln!(
        "{n} network namespaces on 4 CNI bridges in {:?}",
        t.elapsed()
    );

    let mem0 = mem_available_kib();
    // Create and start, `par` at a time (default: all at once).
    let tasks: Mutex<Vec<Task>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let t = Instant::now();
    parallel(n, par, |i| {
        let (task, out) = Task::run(
            &address(),
            NAMESPACE,
            &sb.runtime,
            &ids[i],
            &[(PORTS, "8080,9999,2222")],
            &[&attached[i].0],
            &httpd3(),
        );
        if !out.status.success() {
            failures
                .lock()
                .unwrap()
                .push(format!("{}: {}", ids[i], text(&out)));
        }
        tasks.lock().unwrap().push(task);
    });
    let created = t.elapsed();
    let mut tasks = tasks.into_inner().unwrap();
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "ctr run -d failed: {failures:#?}");
    eprintln!(
        "{n} containers created and started ({par} at a time) in {created:?} ({:?} per container)",
        created / u32::try_from(n).unwrap()
    );

    // Distinct host ports across all containers; per container three proxy ports.
    let mut host_ports = Vec::new();
    for id in &ids {
        let st = sb
            .inspect(id)
            .unwrap_or_else(|| panic!("no state for {id}"));
        let ports = st["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 3, "{id}: {st}");
        let proxies: BTreeSet<u64> = ports
            .iter()
            .map(|p| p["internal_tls_proxy"].as_u64().unwrap())
            .collect();
        assert_eq!(
            proxies,
            BTreeSet::from([61001, 61002, 61003]),
            "{id}: proxy ports"
        );
        for p in ports {
            for k in ["external", "external_tls_proxy"] {
                let hp = u16::try_from(p[k].as_u64().unwrap()).unwrap();
                assert!(pool.contains(&hp), "{id}: {k} {hp} outside the pool");
                host_ports.push(hp);
            }
        }
    }
    let distinct: BTreeSet<u16> = host_ports.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        6 * n,
        "host ports shared between containers"
    );
    eprintln!(
        "{} distinct host ports {}..={}",
        distinct.len(),
        distinct.first().unwrap(),
        distinct.last().unwrap()
    );

    // Every proxy answers TLS (chain verified against the sandbox CA) with the app.
    let t = Instant::now();
    let served: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());
    let unserved: Mutex<Vec<String>> = Mutex::new(Vec::new());
    parallel(n, 4, |i| {
        let addr = format!("{}:61001", attached[i].1);
        let left = (t + Duration::from_secs(180)).saturating_duration_since(Instant::now());
        let got = poll(left, Duration::from_millis(250), || {
            let out = openssl_get(&addr, &ca, &ids[i]);
            if out.contains(HELLO) && out.contains("Verify return code: 0 (ok)") {
                Ok(())
            } else {
                Err(out)
            }
        });
        match got {
            Ok(()) => served.lock().unwrap().push((ids[i].clone(), t.elapsed())),
            Err(out) => unserved
                .lock()
                .unwrap()
                .push(format!("{} ({addr}): {out}", ids[i])),
        }
    });
    let unserved = unserved.into_inner().unwrap();
    assert!(unserved.is_empty(), "proxies not serving: {unserved:#?}");
    let served = served.into_inner().unwrap();
    let last = served.iter().map(|(_, d)| *d).max().unwrap();
    let restarts: u64 = ids
        .iter()
        .map(|id| sb.record(id)["envoy_restarts"].as_u64().unwrap_or(0))
        .sum();
    let envoys = our_processes(&sb)
        .iter()
        .filter(|(_, c)| c.contains("bootstrap.json"))
        .count();
    eprintln!(
        "all {n} proxies served TLS on <ip>:61001, the last {last:?} after the TLS checks began; \
         {envoys} Envoy processes, {restarts} Envoy restarts in total; host memory in use +{} MiB",
        kib_delta_mib(mem0, mem_available_kib())
    );
    assert_eq!(envoys, n, "one Envoy per container");

    // Remove, `par` at a time.
    let t = Instant::now();
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let queue = Mutex::new(std::mem::take(&mut tasks));
    parallel(n, par, |_| {
        let task = queue.lock().unwrap().pop();
        if let Some(task) = task {
            match task.remove() {
                // Removed: no need for the drop to try again.
                Ok(()) => std::mem::forget(task),
                // Dropped: the handle's clean-up tries once more.
                Err(e) => errors.lock().unwrap().push(e),
            }
        }
    });
    let errors = errors.into_inner().unwrap();
    assert!(errors.is_empty(), "removal failed: {errors:#?}");
    eprintln!(
        "{n} containers removed ({par} at a time) in {:?}",
        t.elapsed()
    );

    // Nothing of ours is left: NAT, state, processes, cgroups, shims.
    let nat = nat_in_pool(&pool);
    assert!(nat.is_empty(), "NAT elements left in the pool: {nat:?}");
    assert!(
        sb.leftovers().is_empty(),
        "state left: {:?}",
        sb.leftovers()
    );
    let procs = settled(|| our_processes(&sb));
    assert!(procs.is_empty(), "processes left: {procs:#?}");
    let cgs = cgroup_leftovers(NAMESPACE, &ids);
    assert!(cgs.is_empty(), "cgroups left: {cgs:?}");
    let sh = settled(|| processes_mentioning(&format!("-namespace {NAMESPACE} -id es-scale-")));
    assert!(sh.is_empty(), "containerd shims left: {sh:#?}");
    let out = gc(&sb.config, &["--grace", "0"]);
    assert!(
        !out.contains("es-scale-")
            && !pool
                .clone()
                .any(|p| out.contains(&format!("NAT mapping host port {p} "))),
        "gc found something of ours after removal: {out}"
    );
}

/// `num_cgroups` of the memory controller (/proc/cgroups).
fn memory_cgroups() -> u64 {
    std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"memory")).then(|| f.get(2)?.parse().ok())?
        })
        .unwrap_or(0)
}

#[test]
fn churn_leaves_a_flat_footprint() {
    if !can_run("churn_leaves_a_flat_footprint") {
        return;
    }
    let _serial = serial();
    let lifecycles = env_usize("ES_CHURN", 300);
    let workers = 4;
    let sb = Sandbox::with_pool("churn", "", "", 64);
    let pool = sb.pool();
    let _scrub = Scrub::new(&sb);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let lifecycle = |i: usize| {
        let id = format!("es-churn-{i}");
        let out = sb.run_rm_plain(&id, &[(PORTS, "8080")], &["/bin/true"]);
        if !out.status.success() {
            failures
                .lock()
                .unwrap()
                .push(format!("{id}: {}", text(&out)));
            ctr(&["task", "rm", "-f", &id]);
            ctr(&["containers", "rm", &id]);
        }
    };
    let settle = || {
        // Lifecycles end when ctr returns; shims and supervisors exit just after. (No
        // failure here: the footprint comparison below says what stayed.)
        let _ = poll(Duration::from_secs(30), Duration::from_millis(200), || {
            our_processes(&sb).len() + shims(NAMESPACE, "es-churn-") == 0
        });
        // Then until the footprint holds still between two looks.
        let mut last = None;
        let _ = poll(Duration::from_secs(10), Duration::from_millis(500), || {
            let now = footprint(&sb, &pool, "es-churn-");
            let still = last.as_ref() == Some(&now);
            last = Some(now);
            still
        });
    };

    // Warm-up (containerd's and the page cache's one-time growth), then measure. One
    // lifecycle shows the wrapper really decides for these containers (the proxy is on).
    let out = sb.run_rm(
        "es-churn-probe",
        &[(PORTS, "8080")],
        &[],
        "echo $CF_INSTANCE_PORTS",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("external_tls_proxy"),
        "{}",
        text(&out)
    );
    parallel(workers, workers, |i| lifecycle(100_000 + i));
    settle();
    let before = footprint(&sb, &pool, "es-churn-");
    let mem_before = mem_available_kib();
    let ns_shims_before = shims(NAMESPACE, "");
    let memcgs_before = memory_cgroups();

    let t = Instant::now();
    parallel(lifecycles, workers, lifecycle);
    let took = t.elapsed();
    settle();
    let after = footprint(&sb, &pool, "es-churn-");
    // Other users of the host come and go: take the best of a few readings.
    let tolerance_mib = i64::try_from(env_usize("ES_CHURN_MEM_TOLERANCE_MB", 64)).unwrap();
    let mut mem_after = mem_available_kib();
    for _ in 0..5 {
        if kib_delta_mib(mem_before, mem_after) <= tolerance_mib {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
        mem_after = mem_after.max(mem_available_kib());
    }
    let ns_shims_after = shims(NAMESPACE, "");
    let memcgs_after = memory_cgroups();
    let failures = failures.into_inner().unwrap();

    let delta_mib = kib_delta_mib(mem_before, mem_after);
    eprintln!(
        "churn: {lifecycles} lifecycles ({workers} at a time) in {took:?}, {:.1}/s; \
         {} failed\n  before: {before:?}, MemAvailable {} MiB, shims in namespace {ns_shims_before}\n  \
         after:  {after:?}, MemAvailable {} MiB, shims in namespace {ns_shims_after}\n  \
         host memory used delta: {delta_mib} MiB; memory cgroups on the host (all users, \
         including dying ones): {memcgs_before} -> {memcgs_after}",
        lifecycles as f64 / took.as_secs_f64(),
        failures.len(),
        mem_before / 1024,
        mem_after / 1024,
    );
    assert!(failures.is_empty(), "lifecycles failed: {failures:#?}");
    assert_eq!(after, before, "the product's footprint grew");
    assert!(
        sb.leftovers().is_empty(),
        "state left: {:?}",
        sb.leftovers()
    );
    assert!(
        delta_mib <= tolerance_mib,
        "host memory in use grew by {delta_mib} MiB over {lifecycles} lifecycles (tolerance {tolerance_mib} MiB)"
    );
}

/// `(before - after) / 1024`: KiB readings to a signed MiB difference.
fn kib_delta_mib(before: u64, after: u64) -> i64 {
    let signed = |v: u64| i64::try_from(v).unwrap();
    (signed(before) - signed(after)) / 1024
}
