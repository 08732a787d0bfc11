//! Faults injected into the real stack (containerd + runc + Envoy + nftables), each
//! followed by checks that the other containers still work and that
//! `envoy-sidecar gc --grace 0` leaves a clean host: no state, NAT elements,
//! processes, cgroups or shims of the containers that are gone.
//!
//! (An exhausted host port pool is covered by tests/create.rs
//! `overcommit_and_exhausted_pool_hold_nothing`.)
//!
//! Networks and host port pools: each sandbox's slot (tests/common/slots.rs).
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::footprint::*;
use common::*;
use serde_json::Value;

/// A sandbox in `slot` with a host port pool of `pool` ports, and that pool.
fn sandbox(slot: &Slot, name: &str, pool: u16) -> (Sandbox, RangeInclusive<u16>) {
    let sb = Sandbox::in_slot(slot, name, "", "", pool);
    let pool = sb.pool();
    (sb, pool)
}

/// `ctr run -d` in the shared containerd; fails the test (after cleaning up) unless it
/// started.
fn start(sb: &Sandbox, id: &str, opts: &[&str], cmd: &[&str]) -> Task {
    let (t, out) = Task::run(
        &address(),
        NAMESPACE,
        &sb.runtime,
        id,
        &[(PORTS, "8080")],
        opts,
        cmd,
    );
    assert!(out.status.success(), "ctr run -d {id}: {}", text(&out));
    t
}

fn tls_addr(ip: &str) -> String {
    format!("{ip}:61001")
}

/// TLS through the container's proxy (chain verified), the app's page back.
fn served(ip: &str, ca: &Path, id: &str) -> bool {
    openssl_get(&tls_addr(ip), ca, id).contains(HELLO)
}

fn wait_served(ip: &str, ca: &Path, id: &str) {
    openssl_wait_for(&tls_addr(ip), ca, id, HELLO);
}

/// The waits the supervisor logged on lines containing `marker`: the word after the
/// last " in " ("...; restart #3 in 2s" -> "2s").
fn logged_waits(log: &str, marker: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            let j = l.rfind(" in ")?;
            Some(l[j + 4..].split_whitespace().next()?.to_string())
        })
        .collect()
}

fn mentions(cmdline: &str, id: &str) -> bool {
    cmdline.contains(&format!("/{id}/")) || cmdline.contains(&format!("supervise {id} "))
}

/// Of this sandbox only `live` remain in namespace `ns`: their state, NAT elements on
/// their host ports and their processes; nothing of `gone` (state, NAT, processes,
/// cgroups, shims).
fn assert_only(sb: &Sandbox, ns: &str, pool: &RangeInclusive<u16>, live: &[&str], gone: &[&str]) {
    let mut state = sb.state_entries(ns);
    state.sort();
    let mut want: Vec<String> = live.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(state, want, "containers with state");
    let allowed: BTreeSet<u16> = live
        .iter()
        .flat_map(|id| {
            let st = sb
                .inspect_ns(id, ns)
                .unwrap_or_else(|| panic!("{id}: no state"));
            st["ports"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|p| [p["external"].as_u64(), p["external_tls_proxy"].as_u64()])
                .flatten()
                .map(|p| u16::try_from(p).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let nat = nat_in_pool(pool);
    assert!(
        nat.iter().all(|(p, _)| allowed.contains(p)),
        "NAT elements in the pool not owned by {live:?}: {nat:?}"
    );
    let strays = settled(|| {
        our_processes(sb)
            .into_iter()
            .filter(|(_, c)| !live.iter().any(|id| mentions(c, id)))
            .collect()
    });
    assert!(strays.is_empty(), "processes left: {strays:#?}");
    let gone_ids: Vec<String> = gone.iter().map(|s| s.to_string()).collect();
    let cgs = cgroup_leftovers(ns, &gone_ids);
    assert!(cgs.is_empty(), "cgroups left: {cgs:?}");
    let sh = settled(|| {
        gone.iter()
            .flat_map(|id| processes_mentioning(&format!("-namespace {ns} -id {id} ")))
            .collect()
    });
    assert!(sh.is_empty(), "shims left: {sh:#?}");
}

/// `gc --grace 0` must find nothing of `ids` (nor any NAT element in the pool).
fn assert_gc_finds_nothing(sb: &Sandbox, pool: &RangeInclusive<u16>, ids: &[&str]) -> String {
    let out = gc(&sb.config, &["--grace", "0"]);
    for id in ids {
        assert!(!out.contains(id), "gc found something of {id}: {out}");
    }
    for p in pool.clone() {
        assert!(
            !out.contains(&format!("host port {p} ")),
            "gc found a stray NAT element: {out}"
        );
    }
    out
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill {pid}: {e}"));
}

fn wait_dead(pid: i32, limit: Duration) {
    wait_until(&format!("pid {pid} gone"), limit, || {
        (!alive(pid)).then_some(())
    });
}

/// Two containers of one sandbox, each serving in a network namespace of its own: a
/// victim for the fault and a survivor that must not notice. (Fields drop in order:
/// containers, networks, scrub, sandbox.)
struct Pair {
    victim: Task,
    _survivor: Task,
    na: Netns,
    nb: Netns,
    _scrub: Scrub,
    ca: PathBuf,
    pool: RangeInclusive<u16>,
    sb: Sandbox,
}

fn pair(name: &str, a: &str, b: &str) -> Pair {
    let (sb, pool) = sandbox(&slots::next(), name, POOL);
    let scrub = Scrub::new(&sb);
    let ca = sb.ca();
    let (na, nb) = (sb.slot.netns(0), sb.slot.netns(1));
    let victim = start(&sb, a, &[&na.ctr_opt()], &httpd());
    let survivor = start(&sb, b, &[&nb.ctr_opt()], &httpd());
    wait_served(&na.ip, &ca, a);
    wait_served(&nb.ip, &ca, b);
    Pair {
        victim,
        _survivor: survivor,
        na,
        nb,
        _scrub: scrub,
        ca,
        pool,
        sb,
    }
}

#[test]
fn supervisor_sigkill_envoy_keeps_serving_until_removal() {
    if !can_run("supervisor_sigkill_envoy_keeps_serving_until_removal") {
        return;
    }
    let (a, b) = ("es-flt-sup-a", "es-flt-sup-b");
    let p = pair("flt-sup", a, b);
    let (sb, pool, ca, na, nb) = (&p.sb, &p.pool, &p.ca, &p.na, &p.nb);
    let rec = sb.record(a);
    let (sup, envoy) = (
        pid_of(&rec, "supervisor").unwrap(),
        pid_of(&rec, "envoy").unwrap(),
    );
    let b_envoy = pid_of(&sb.record(b), "envoy").unwrap();

    sigkill(sup);
    wait_dead(sup, Duration::from_secs(5));
    // By design Envoy is not tied to its supervisor's life: it keeps serving.
    for _ in 0..5 {
        assert!(alive(envoy), "Envoy {envoy} died with its supervisor");
        assert!(
            served(&na.ip, ca, a),
            "Envoy stopped serving without its supervisor"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(served(&nb.ip, ca, b), "the survivor is affected");
    // gc restores supervision: a new supervisor takes over (replacing the orphaned
    // Envoy with one it supervises) and the container serves again; b is untouched.
    let out = gc(&sb.config, &["--grace", "0"]);
    assert!(
        out.contains(&format!("restarting the supervisor of {NAMESPACE}/{a}")),
        "{out}"
    );
    assert!(!out.contains(b), "{out}");
    let (sup2, envoy2) = wait_until("a new supervisor", Duration::from_secs(15), || {
        let rec = sb.record(a);
        if let (Some(s2), Some(e2)) = (pid_of(&rec, "supervisor"), pid_of(&rec, "envoy"))
            && s2 != sup
            && e2 != envoy
            && rec["ready_at"].is_string()
        {
            return Ok((s2, e2));
        }
        Err(rec)
    });
    wait_dead(envoy, Duration::from_secs(5));
    assert!(
        alive(sup2),
        "new supervisor {sup2} not alive: {}",
        sb.supervisor_log(a)
    );
    assert!(
        alive(envoy2),
        "new envoy {envoy2} not alive: {}",
        sb.supervisor_log(a)
    );
    assert!(
        served(&na.ip, ca, a),
        "not served: {}",
        sb.supervisor_log(a)
    );
    let again = gc(&sb.config, &["--grace", "0"]);
    assert!(
        !again.contains(a),
        "a second gc finds nothing to restart: {again}"
    );
    eprintln!(
        "supervisor {sup} SIGKILLed: Envoy {envoy} kept serving; gc restarted supervision ({sup2}, Envoy {envoy2})"
    );
    let envoy = envoy2;

    // Removal finds the orphaned Envoy by its recorded pid / cgroup and kills it.
    p.victim.remove().unwrap();
    wait_dead(envoy, Duration::from_secs(5));
    assert_only(sb, NAMESPACE, pool, &[b], &[a]);
    assert_gc_finds_nothing(sb, pool, &[a, b]);

    // The survivor never noticed.
    assert!(served(&nb.ip, ca, b));
    let rec_b = sb.record(b);
    assert_eq!(pid_of(&rec_b, "envoy"), Some(b_envoy));
    assert_eq!(rec_b["envoy_restarts"], 0);
}

#[test]
fn envoy_sigkill_restarts_with_growing_backoff() {
    if !can_run("envoy_sigkill_restarts_with_growing_backoff") {
        return;
    }
    let (a, b) = ("es-flt-envoy-a", "es-flt-envoy-b");
    let p = pair("flt-envoy", a, b);
    let (sb, pool, ca, na, nb) = (&p.sb, &p.pool, &p.ca, &p.na, &p.nb);
    let sup = pid_of(&sb.record(a), "supervisor").unwrap();
    let b_envoy = pid_of(&sb.record(b), "envoy").unwrap();
    let cpu0 = cpu_time(sup);

    let kills = 5;
    let mut back_after = Vec::new();
    for k in 1..=kills {
        let envoy = pid_of(&sb.record(a), "envoy").expect("Envoy running");
        sigkill(envoy);
        let t = Instant::now();
        let new = wait_until("Envoy restarted", Duration::from_secs(60), || {
            pid_of(&sb.record(a), "envoy").filter(|p| *p != envoy)
        });
        back_after.push(t.elapsed());
        wait_served(&na.ip, ca, a);
        let rec = sb.record(a);
        assert_eq!(rec["envoy_restarts"], k, "{rec}");
        assert!(alive(new));
        assert_eq!(pid_of(&rec, "supervisor"), Some(sup));
    }
    let cpu = cpu_time(sup) - cpu0;
    let waits = logged_waits(&sb.supervisor_log(a), "restart #");
    eprintln!(
        "Envoy SIGKILLed {kills} times: back after {back_after:?}; supervisor logged waits \
         {waits:?}; supervisor CPU during the test {cpu:?}"
    );
    assert_eq!(waits, ["500ms", "1s", "2s", "4s", "8s"], "backoff doubling");
    for (i, d) in back_after.iter().enumerate() {
        let expected = Duration::from_millis(500 << i);
        assert!(
            *d >= expected && *d < expected + Duration::from_secs(5),
            "restart {} after {d:?}, backoff {expected:?}",
            i + 1
        );
    }
    assert!(
        back_after[kills - 1] > back_after[0] * 4,
        "time to restart must grow: {back_after:?}"
    );
    assert!(
        cpu < Duration::from_secs(2),
        "supervisor used {cpu:?} of CPU over {kills} restarts: a tight loop?"
    );

    // The survivor is untouched; gc has nothing to do.
    assert!(served(&nb.ip, ca, b));
    let rec_b = sb.record(b);
    assert_eq!(pid_of(&rec_b, "envoy"), Some(b_envoy));
    assert_eq!(rec_b["envoy_restarts"], 0);
    assert_gc_finds_nothing(sb, pool, &[a, b]);
    assert_only(sb, NAMESPACE, pool, &[a, b], &[]);
}

#[test]
fn wrapper_sigkill_mid_create_then_gc_cleans() {
    if !can_run("wrapper_sigkill_mid_create_then_gc_cleans") {
        return;
    }
    // Four host ports: the survivor holds two, a half-made create two.
    let (sb, pool) = sandbox(&slots::next(), "flt-create", 4);
    let _scrub = Scrub::new(&sb);
    let ca = sb.ca();
    let ns = sb.slot.netns(0);
    let (s, half, half2, next) = (
        "es-flt-create-s",
        "es-flt-half",
        "es-flt-half2",
        "es-flt-create-n",
    );
    let _survivor = start(&sb, s, &[&ns.ctr_opt()], &httpd());
    wait_served(&ns.ip, &ca, s);

    // 1. Through containerd: a second wrapper script for the same configuration that
    //    pauses mid-create (and logs how the shim calls it).
    let slow = sb.dir.join("runc-wrapper-slow");
    let calls = sb.dir.join("slow-calls.log");
    write_wrapper_script(
        &slow,
        &sb.config,
        &[("ENVOY_SIDECAR_FAULT_DELAY_CREATE_MS", "30000")],
        Some(&calls),
    );
    let half_task = Task::adopt(half);
    let run = run_args(
        "-d",
        &slow,
        half,
        &[(PORTS, "8080")],
        &[],
        &owned(&["/bin/sleep", "3600"]),
    );
    let child = Command::new("timeout")
        .args(["120", "ctr", "--address", &address(), "-n", NAMESPACE])
        .args(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let state_file = sb.state_dir.join(NAMESPACE).join(half).join("state.json");
    let wrapper = wait_until("the wrapper inside create", Duration::from_secs(30), || {
        if !state_file.exists() {
            return None;
        }
        processes_mentioning(half)
            .into_iter()
            .find(|(_, c)| c.contains("envoy-sidecar-runc") && c.contains(" create "))
    });
    sigkill(wrapper.0);
    let status = wait_until("ctr to give up", Duration::from_secs(90), || {
        child.0.try_wait().unwrap()
    });
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let called = std::fs::read_to_string(&calls).unwrap_or_default();
    eprintln!(
        "SIGKILLed wrapper {} in create; ctr run -d: {status}, it said: {}\n\
         the shim then ran the runtime as: {:?}",
        wrapper.0,
        err.trim(),
        called
            .lines()
            .map(|l| l.rsplit("--log-format json ").next().unwrap_or(l))
            .collect::<Vec<_>>()
    );
    assert!(
        !status.success(),
        "ctr run succeeded although its runtime was killed"
    );
    half_task.remove().unwrap();
    // containerd cleans up a failed create with the runtime's `delete` (the shim's
    // cleanup), which is the wrapper: it already released the half-made state.
    assert!(
        called
            .lines()
            .any(|l| l.contains(" delete ") && l.ends_with(half)),
        "no delete after the failed create: {called}"
    );
    wait_until("state released", Duration::from_secs(10), || {
        (!state_file.exists()).then_some(())
    });
    assert_only(&sb, NAMESPACE, &pool, &[s], &[half]);
    assert!(processes_mentioning(half).is_empty());
    assert_gc_finds_nothing(&sb, &pool, &[s, half]);

    // 2. Without a cleanup `delete` (an engine driving runc directly that died with
    //    the wrapper, or a crash): the half-made state stays until gc.
    let bundle = sb.dir.join("bundle-half2");
    std::fs::create_dir_all(&bundle).unwrap();
    let o = Command::new(real_runc())
        .arg("spec")
        .arg("--bundle")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "runc spec: {}", text(&o));
    let spec_path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    spec["annotations"] = serde_json::json!({ PORTS: "8080" });
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let direct = Command::new(wrapper_bin())
        .arg("--root")
        .arg(sb.dir.join("runc-root"))
        .args(["create", "--bundle"])
        .arg(&bundle)
        .arg(half2)
        .env("ENVOY_SIDECAR_CONFIG", &sb.config)
        .env("ENVOY_SIDECAR_FAULT_DELAY_CREATE_MS", "30000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut direct = ChildGuard(direct);
    let state2 = sb.state_dir.join("default").join(half2).join("state.json");
    wait_until(
        "the direct create recorded",
        Duration::from_secs(30),
        || state2.exists().then_some(()),
    );
    direct.0.kill().unwrap();
    direct.0.wait().unwrap();
    assert!(state2.exists(), "the half-made state stays");
    // Its claims hold until gc: by design (create cannot tell a dead create from one
    // whose runc create has not happened yet), a new create finds the pool full.
    let out = sb.run_rm(next, &[(PORTS, "8080")], &[], "true");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("exhausted"),
        "{}",
        text(&out)
    );
    let out = gc(&sb.config, &["--grace", "0"]);
    eprintln!(
        "direct create killed: state kept, pool full; gc: {}",
        out.trim()
    );
    assert!(out.contains(&format!("default/{half2} is gone")), "{out}");
    assert!(!out.contains(s), "gc touched the survivor: {out}");
    assert!(sb.state_entries("default").is_empty());
    assert_only(&sb, NAMESPACE, &pool, &[s], &[half, next]);
    assert!(processes_mentioning(half2).is_empty());
    assert_gc_finds_nothing(&sb, &pool, &[s, half2]);

    // A new create works again, and the survivor still serves.
    let n = start(&sb, next, &[], &["/bin/sleep", "60"]);
    assert!(sb.inspect(next).is_some());
    n.remove().unwrap();
    assert!(served(&ns.ip, &ca, s));
    assert_only(&sb, NAMESPACE, &pool, &[s], &[half, half2, next]);
}

#[test]
fn envoy_binary_missing_supervisor_retries_and_records_the_path() {
    if !can_run("envoy_binary_missing_supervisor_retries_and_records_the_path") {
        return;
    }
    let (sb, pool) = sandbox(&slots::next(), "flt-noenvoy", POOL);
    let _scrub = Scrub::new(&sb);
    sb.set_config_line("envoy_path", "envoy_path = \"/nonexistent/envoy\"");
    let id = "es-flt-noenvoy";
    // Policy: create does not check the binary (it may be installed later) ...
    let c = start(&sb, id, &[], &["/bin/sleep", "3600"]);
    // ... the supervisor records why Envoy is not running and keeps trying, backing off.
    // (The record may not be written yet: not yet, then.)
    let rec = wait_until("last_error", Duration::from_secs(20), || {
        let r = sb.try_record(NAMESPACE, id)?;
        r["last_error"].as_str().is_some().then_some(r)
    });
    let err = rec["last_error"].as_str().unwrap().to_string();
    assert!(err.contains("/nonexistent/envoy"), "{rec}");
    let waits = wait_until("three retries", Duration::from_secs(20), || {
        let w = logged_waits(&sb.supervisor_log(id), "retrying in");
        (w.len() >= 3).then_some(w)
    });
    let sup = pid_of(&rec, "supervisor").unwrap();
    let rec = sb.record(id);
    eprintln!(
        "Envoy missing: create succeeded; last_error {err:?}; retry waits {waits:?}; \
         supervisor CPU {:?}",
        cpu_time(sup)
    );
    assert_eq!(&waits[..3], ["500ms", "1s", "2s"]);
    assert!(pid_of(&rec, "envoy").is_none(), "{rec}");
    assert!(alive(sup));
    assert!(cpu_time(sup) < Duration::from_secs(2));

    // Removal leaves nothing.
    c.remove().unwrap();
    wait_dead(sup, Duration::from_secs(5));
    assert_only(&sb, NAMESPACE, &pool, &[], &[id]);
    assert_gc_finds_nothing(&sb, &pool, &[id]);

    // And once the binary appears, the retrying supervisor starts it and serves.
    let late = sb.dir.join("late/envoy");
    sb.set_config_line(
        "envoy_path",
        &format!("envoy_path = {:?}", late.display().to_string()),
    );
    let net = sb.slot.netns(0);
    let id2 = "es-flt-lateenvoy";
    let c2 = start(&sb, id2, &[&net.ctr_opt()], &httpd());
    wait_until(
        "last_error naming the late path",
        Duration::from_secs(20),
        || {
            sb.try_record(NAMESPACE, id2)?["last_error"]
                .as_str()
                .filter(|e| e.contains(&late.display().to_string()))
                .map(|_| ())
        },
    );
    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/usr/local/bin/envoy", &late).unwrap();
    let t = Instant::now();
    let ca = sb.ca();
    wait_until(
        "served once the binary exists",
        Duration::from_secs(40),
        || served(&net.ip, &ca, id2).then_some(()),
    );
    eprintln!(
        "binary installed later: served {:?} after it appeared",
        t.elapsed()
    );
    c2.remove().unwrap();
    assert_only(&sb, NAMESPACE, &pool, &[], &[id, id2]);
    assert_gc_finds_nothing(&sb, &pool, &[id, id2]);
}

/// A tmpfs mounted for a test's state directory; unmounted and removed on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn new(name: &str, size: &str) -> Tmpfs {
        let path = PathBuf::from(format!(
            "/run/envoy-sidecar-test/{name}-{}",
            std::process::id()
        ));
        let _ = Command::new("umount").arg(&path).output();
        std::fs::create_dir_all(&path).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0711"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", text(&o));
        Tmpfs { path }
    }

    /// Cover the path with a read-only bind mount of itself: from now on every open
    /// through the path is read-only. (Remounting the tmpfs itself read-only is refused
    /// while a running sidecar holds its logs open for writing.)
    fn bind_read_only(&self) {
        for args in [&["--bind"][..], &["-o", "remount,bind,ro"][..]] {
            let o = Command::new("mount")
                .args(args)
                .arg(&self.path)
                .arg(&self.path)
                .output()
                .unwrap();
            assert!(o.status.success(), "mount {args:?}: {}", text(&o));
        }
    }

    /// Remove the read-only cover again.
    fn unbind(&self) {
        let o = Command::new("umount").arg(&self.path).output().unwrap();
        assert!(o.status.success(), "umount: {}", text(&o));
    }

    fn mounted(&self) -> bool {
        let p = self.path.display().to_string();
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // The read-only cover (if any), then the tmpfs; lazily if still busy.
        for _ in 0..3 {
            if !self.mounted() {
                break;
            }
            let o = Command::new("umount").arg(&self.path).output();
            if !o.is_ok_and(|o| o.status.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.path).output();
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A sandbox whose state directory is the tmpfs (its config and `state_dir` updated).
fn sandbox_on(tmpfs: &Tmpfs, name: &str) -> (Sandbox, RangeInclusive<u16>) {
    let (mut sb, pool) = sandbox(&slots::next(), name, POOL);
    sb.set_config_line(
        "state_dir",
        &format!("state_dir = {:?}", tmpfs.path.display().to_string()),
    );
    sb.state_dir = tmpfs.path.clone();
    (sb, pool)
}

/// `ctr run --rm` of a proxied container that must fail; returns ctr's stderr after
/// checking that containerd kept no container.
fn failing_create(sb: &Sandbox, id: &str) -> String {
    let _cleanup = Task::adopt(id);
    let out = sb.run_rm_plain(id, &[(PORTS, "8080")], &["/bin/true"]);
    assert!(!out.status.success(), "create succeeded: {}", text(&out));
    let ls = ctr(&["containers", "ls", "-q"]);
    assert!(
        !String::from_utf8_lossy(&ls.stdout).lines().any(|l| l == id),
        "containerd kept the container"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn read_only_state_dir_fails_create_clearly_and_holds_nothing() {
    if !can_run("read_only_state_dir_fails_create_clearly_and_holds_nothing") {
        return;
    }
    let tmpfs = Tmpfs::new("es-flt-ro", "4m");
    let (sb, pool) = sandbox_on(&tmpfs, "flt-ro");
    let _scrub = Scrub::new(&sb);
    let ca = sb.ca();
    let net = sb.slot.netns(0);
    let (s, new) = ("es-flt-ro-s", "es-flt-ro-new");
    let survivor = start(&sb, s, &[&net.ctr_opt()], &httpd());
    wait_served(&net.ip, &ca, s);

    tmpfs.bind_read_only();
    let err = failing_create(&sb, new);
    eprintln!("read-only state dir: ctr said: {}", err.trim());
    assert!(
        err.contains(&tmpfs.path.display().to_string()) && err.contains("Read-only file system"),
        "the ctr user must see the path and the reason: {err}"
    );
    assert_only(&sb, NAMESPACE, &pool, &[s], &[new]);
    assert!(served(&net.ip, &ca, s), "the survivor must keep serving");

    // Removing a container while the state directory is read-only: the sidecar,
    // NAT and cgroups go, only the state itself cannot be removed ...
    let rec = sb.record(s);
    let (sup, envoy) = (
        pid_of(&rec, "supervisor").unwrap(),
        pid_of(&rec, "envoy").unwrap(),
    );
    survivor.remove().unwrap();
    wait_dead(sup, Duration::from_secs(5));
    wait_dead(envoy, Duration::from_secs(5));
    assert_eq!(sb.state_entries(NAMESPACE), [s], "the state cannot go yet");
    let nat = nat_in_pool(&pool);
    assert!(nat.is_empty(), "NAT left: {nat:?}");
    let procs = settled(|| our_processes(&sb));
    assert!(procs.is_empty(), "processes left: {procs:#?}");
    assert!(cgroup_leftovers(NAMESPACE, &[s.to_string()]).is_empty());
    // ... and once it is writable again, gc takes the rest.
    tmpfs.unbind();
    let out = gc(&sb.config, &["--grace", "0"]);
    eprintln!("removed while read-only, then gc: {}", out.trim());
    assert!(out.contains(&format!("{s} is gone")), "{out}");
    assert_only(&sb, NAMESPACE, &pool, &[], &[s, new]);
    assert_gc_finds_nothing(&sb, &pool, &[s, new]);
}

#[test]
fn full_state_dir_fails_create_clearly_without_partial_state() {
    if !can_run("full_state_dir_fails_create_clearly_without_partial_state") {
        return;
    }
    let tmpfs = Tmpfs::new("es-flt-full", "1m");
    let (sb, pool) = sandbox_on(&tmpfs, "flt-full");
    let _scrub = Scrub::new(&sb);
    let ca = sb.ca();
    let net = sb.slot.netns(0);
    let (s, new) = ("es-flt-full-s", "es-flt-full-new");
    let survivor = start(&sb, s, &[&net.ctr_opt()], &httpd());
    wait_served(&net.ip, &ca, s);

    // Fill the file system.
    let fill = tmpfs.path.join("fill");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        let chunk = vec![0u8; 4096];
        let e = loop {
            if let Err(e) = f.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    }
    let files_before = count_entries(&tmpfs.path);
    let err = failing_create(&sb, new);
    eprintln!("full state dir: ctr said: {}", err.trim());
    assert!(
        err.contains(&tmpfs.path.display().to_string()) && err.contains("No space left on device"),
        "the ctr user must see the path and the reason: {err}"
    );
    assert_eq!(
        count_entries(&tmpfs.path),
        files_before,
        "a failed create left files"
    );
    assert_only(&sb, NAMESPACE, &pool, &[s], &[new]);
    assert!(served(&net.ip, &ca, s), "the survivor must keep serving");

    std::fs::remove_file(&fill).unwrap();
    survivor.remove().unwrap();
    assert_only(&sb, NAMESPACE, &pool, &[], &[s, new]);
    assert_gc_finds_nothing(&sb, &pool, &[s, new]);
}

/// Sets the flag on drop (a prober thread stops even when the test fails).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One TLS probe: when (since the start), which container, served or not.
type Probe = (Duration, &'static str, bool);

/// A second private containerd (`ES_CONTAINERD_INSTANCE=<name> tests/env/containerd.sh`),
/// stopped and removed with its directories on drop.
struct Instance {
    name: String,
}

impl Instance {
    fn up(name: String) -> Instance {
        let i = Instance { name };
        i.teardown(); // leftovers of an aborted run
        let o = i.script("up");
        assert!(o.status.success(), "{}", text(&o));
        i
    }

    fn script(&self, cmd: &str) -> std::process::Output {
        Command::new(repo().join("tests/env/containerd.sh"))
            .arg(cmd)
            .env("ES_CONTAINERD_INSTANCE", &self.name)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/envoy-sidecar-test-{}", self.name))
    }

    fn root_dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/lib/envoy-sidecar-test-{}", self.name))
    }

    fn address(&self) -> String {
        self.run_dir().join("containerd.sock").display().to_string()
    }

    fn namespace(&self) -> String {
        format!("envoy-sidecar-test-{}", self.name)
    }

    fn pid(&self) -> i32 {
        std::fs::read_to_string(self.run_dir().join("containerd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn teardown(&self) {
        let _ = self.script("down");
        // Nothing may stay mounted below the directories before they are removed.
        let dirs = [self.run_dir(), self.root_dir()];
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).output();
        }
        for d in dirs {
            let _ = Command::new("rm")
                .args(["-rf", "--one-file-system"])
                .arg(&d)
                .output();
        }
        let _ = std::fs::remove_dir(format!("/run/containerd/runc/{}", self.namespace()));
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[test]
fn containerd_restart_keeps_sidecars_serving() {
    if !can_run("containerd_restart_keeps_sidecars_serving") {
        return;
    }
    let slot = slots::next();
    let inst = Instance::up(format!("restart{}", slot.index()));
    let (addr, ns) = (inst.address(), inst.namespace());
    let (sb, pool) = sandbox(&slot, "flt-restart", POOL);
    let _scrub = Scrub::new(&sb);
    let ca = sb.ca();
    let nets = [sb.slot.netns(0), sb.slot.netns(1)];
    let ids = ["es-rst-a", "es-rst-b"];
    let mut tasks = Vec::new();
    for (id, net) in ids.iter().zip(&nets) {
        let (t, out) = Task::run(
            &addr,
            &ns,
            &sb.runtime,
            id,
            &[(PORTS, "8080")],
            &[&net.ctr_opt()],
            &httpd(),
        );
        tasks.push(t);
        assert!(out.status.success(), "ctr run -d {id}: {}", text(&out));
    }
    for (id, net) in ids.iter().zip(&nets) {
        wait_served(&net.ip, &ca, id);
    }
    let envoys: Vec<Option<i32>> = ids
        .iter()
        .map(|id| pid_of(&sb.record_ns(&ns, id), "envoy"))
        .collect();

    // Probe both sidecars continuously while containerd dies and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let t0 = Instant::now();
    let prober = {
        let (stop, probes, ca) = (stop.clone(), probes.clone(), ca.clone());
        let targets: Vec<(&'static str, String)> = ids
            .iter()
            .zip(&nets)
            .map(|(id, n)| (*id, n.ip.clone()))
            .collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(120) {
                for (id, ip) in &targets {
                    let ok = served(ip, &ca, id);
                    probes.lock().unwrap().push((t0.elapsed(), id, ok));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let pid = inst.pid();
    sigkill(pid);
    wait_dead(pid, Duration::from_secs(10));
    let killed = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let o = inst.script("up");
    assert!(o.status.success(), "restart: {}", text(&o));
    let back = t0.elapsed();
    for t in &tasks {
        wait_until(
            "task RUNNING after the restart",
            Duration::from_secs(30),
            || t.status().filter(|(_, s)| s == "RUNNING").map(|_| ()),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    prober.join().unwrap();
    let probes = probes.lock().unwrap().clone();
    let during = probes
        .iter()
        .filter(|(t, _, _)| *t >= killed && *t <= back)
        .count();
    let failed: Vec<_> = probes.iter().filter(|(_, _, ok)| !ok).collect();
    eprintln!(
        "containerd {pid} SIGKILLed at {killed:?}, restarted by {back:?}: {} TLS probes, \
         {during} while containerd was down or starting, {} failed",
        probes.len(),
        failed.len()
    );
    assert!(
        during >= 4,
        "too few probes while containerd was down: {during}"
    );
    assert!(failed.is_empty(), "sidecars stopped serving: {failed:?}");
    for (id, e) in ids.iter().zip(&envoys) {
        let rec = sb.record_ns(&ns, id);
        assert_eq!(&pid_of(&rec, "envoy"), e, "{id}: Envoy was restarted");
        assert_eq!(rec["envoy_restarts"], 0);
        assert!(alive(pid_of(&rec, "supervisor").unwrap()));
    }

    // Delete through the restarted containerd: nothing of the containers is left.
    for t in tasks.drain(..) {
        t.remove().unwrap();
    }
    assert_only(&sb, &ns, &pool, &[], &ids);
    let strays = our_processes(&sb);
    assert!(strays.is_empty(), "{strays:?}");
    assert_gc_finds_nothing(&sb, &pool, &ids);
}

/// A crash-looping Envoy (here a stand-in that writes 256 KiB of long lines, as a
/// chatty failing start would, and exits): its output and the supervisor's log stay
/// within `[log] max_file_kb` per file with one rotated copy each, however many
/// restarts; `envoy-sidecar logs` shows them, the rotated copy first.
#[test]
fn a_crash_looping_envoy_leaves_logs_within_their_cap() {
    if !can_run("a_crash_looping_envoy_leaves_logs_within_their_cap") {
        return;
    }
    let slot = slots::next();
    let sb = Sandbox::in_slot(
        &slot,
        "flt-logcap",
        "sandbox = false",
        "[log]\nmax_file_kb = 4\n",
        POOL,
    );
    let pool = sb.pool();
    let _scrub = Scrub::new(&sb);
    // Where the Envoy uid may execute it (not under the sandbox's private directory).
    let bin = TempDir::under(Path::new("/tmp"), "es-fake-envoy");
    std::fs::set_permissions(
        bin.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fake = bin.join("envoy");
    write_script(
        &fake,
        "#!/bin/sh\n\
         i=0; while [ $i -lt 256 ]; do \
           printf '[critical] main: cannot bind 0.0.0.0:61001 (attempt %s): Address already in use %01000d\\n' $i 0 >&2; \
           i=$((i+1)); done\nexit 1\n",
    );
    sb.set_config_line(
        "envoy_path",
        &format!("envoy_path = {:?}", fake.display().to_string()),
    );
    let id = "es-flt-logcap";
    let c = start(&sb, id, &[], &["/bin/sleep", "3600"]);
    // Each start writes 256 KiB (64 times the cap) and logs its exit: wait for five.
    // Each restart adds a few hundred bytes to the supervisor's log (and its exit
    // message quotes Envoy's last lines): wait until that one has rotated too.
    let rotated = sb.container_dir(NAMESPACE, id).join("supervisor.log.1");
    let waits = wait_until(
        "five restarts and a rotated supervisor log",
        Duration::from_secs(60),
        || {
            let r = status_row(&sb.config, NAMESPACE, id).ok_or("no row".to_string())?;
            let n = r["restarts"].as_u64().unwrap_or(0);
            let rot = std::fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
            if n >= 5 && rot > 0 {
                Ok(n)
            } else {
                Err(format!("{n} restarts, .1 {rot} bytes: {r}"))
            }
        },
    );
    let dir = sb.container_dir(NAMESPACE, id);
    let cap = 4 * 1024;
    let mut sizes = Vec::new();
    for f in [
        "envoy.log",
        "envoy.log.1",
        "supervisor.log",
        "supervisor.log.1",
    ] {
        let len = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        sizes.push((f, len));
        assert!(len <= cap, "{f}: {len} bytes over the {cap}-byte cap");
    }
    eprintln!("after {waits} restarts: {sizes:?}");
    assert!(
        sizes[1].1 > 0 && sizes[3].1 > 0,
        "both logs rotated (each restart writes more than the cap): {sizes:?}"
    );
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total <= 4 * cap, "{total} bytes of logs");

    let o = cli(&sb.config)
        .args(["logs", id, "--namespace", NAMESPACE, "--envoy"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("cannot bind 0.0.0.0:61001"), "{shown:.300}");
    assert!(o.stdout.len() as u64 <= 2 * cap);
    let o = cli(&sb.config)
        .args(["logs", id, "-n", NAMESPACE])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("restart #"),
        "{}",
        text(&o)
    );

    c.remove().unwrap();
    assert_only(&sb, NAMESPACE, &pool, &[], &[id]);
}

/// 100,000 failed TLS handshakes (plain text to the TLS port, from the host through
/// the container's address): Envoy (at `--log-level warn`) and the supervisor log
/// nothing per connection, and the container's log files stay within the cap; the
/// sidecar still serves.
#[test]
fn a_flood_of_failed_handshakes_leaves_logs_within_their_cap() {
    if !can_run("a_flood_of_failed_handshakes_leaves_logs_within_their_cap") {
        return;
    }
    let slot = slots::next();
    let sb = Sandbox::in_slot(&slot, "flt-logflood", "", "[log]\nmax_file_kb = 4\n", POOL);
    let _scrub = Scrub::new(&sb);
    let net = slot.netns(0);
    let id = "es-flt-logflood";
    let (c, _st, addr) = sb.start_served(id, &net);
    let dir = sb.container_dir(NAMESPACE, id);
    let logs = |dir: &Path| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".log"))
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = logs(&dir);
    let started = Instant::now();
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (addr, failed) = (addr.clone(), failed.clone());
            std::thread::spawn(move || {
                use std::io::Write as _;
                for _ in 0..25_000 {
                    match std::net::TcpStream::connect(&addr) {
                        Ok(mut s) => {
                            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let _ = s.read(&mut [0u8; 512]);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = logs(&dir);
    eprintln!(
        "100000 failed handshakes in {:?} ({} connects refused): logs {before:?} -> {after:?}",
        started.elapsed(),
        failed.load(Ordering::Relaxed)
    );
    for (f, len) in &after {
        assert!(*len <= 4096, "{f}: {len} bytes over the cap");
    }
    // Still serving, the same Envoy.
    let out = openssl_wait_for(&addr, &sb.ca(), id, HELLO);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    c.remove();
}
