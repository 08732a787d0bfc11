//! The host-wide allocation index (`<state_dir>/.index.json`) under crashes and
//! concurrency, through the real wrapper binary in front of a recording stand-in for
//! runc (no containerd needed, no root needed): a create or delete SIGKILLed between
//! any two of its writes (`ENVOY_SIDECAR_FAULT_KILL`) never makes a later create reuse
//! a live container's port or uid, and leaks none; creates from separate processes at
//! once never share one.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{FakeStack, cli, text, wrapper_bin};
use serde_json::{Value, json};

const NS: &str = "ns1";
const POOL_START: u16 = 40000;
const UID_START: u32 = 2_100_000_000;
/// The fault points of the product (`sys::fault::POINTS`).
const POINTS: [&str; 3] = [
    "create:index-written",
    "create:state-written",
    "remove:index-written",
];

fn stack(name: &str) -> FakeStack {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let f = FakeStack::new(
        &format!("es-ix-{name}"),
        NS,
        &format!(
            "[ports]\npool_start = {POOL_START}\npool_end = {}\n",
            POOL_START + 199
        ),
        &json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "env": ["PATH=/bin"], "user": {"uid": uid, "gid": gid}},
            "annotations": {"envoy-sidecar/ports": "8080,9090"},
        }),
    );
    let toml = std::fs::read_to_string(&f.config).unwrap().replacen(
        "[proxy]\n",
        &format!("[proxy]\nenvoy_uid_pool_start = {UID_START}\nenvoy_uid_pool_size = 1000\n"),
        1,
    );
    std::fs::write(&f.config, toml).unwrap();
    f
}

/// A bundle of its own for `id` (concurrent creates must not share `config.json`).
fn bundle(f: &FakeStack, id: &str) -> PathBuf {
    let b = f.dir.join(format!("bundle-{id}"));
    std::fs::create_dir_all(&b).unwrap();
    std::fs::copy(f.bundle.join("config.json"), b.join("config.json")).unwrap();
    b
}

fn wrapper(f: &FakeStack, args: &[&str], fault: Option<&str>) -> Command {
    let mut c = Command::new(wrapper_bin());
    c.arg("--root")
        .arg(f.dir.join("runc-root/runc").join(NS))
        .args(args)
        .env("ENVOY_SIDECAR_CONFIG", &f.config);
    if let Some(p) = fault {
        c.env("ENVOY_SIDECAR_FAULT_KILL", p);
    }
    c
}

fn create(f: &FakeStack, id: &str, fault: Option<&str>) -> Output {
    let b = bundle(f, id).display().to_string();
    wrapper(f, &["create", "--bundle", &b, id], fault)
        .output()
        .unwrap()
}

fn delete(f: &FakeStack, id: &str, fault: Option<&str>) -> Output {
    wrapper(f, &["delete", id], fault).output().unwrap()
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: {}", text(o));
}

fn killed(o: &Output, what: &str) {
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGKILL),
        "{what}: {}",
        text(o)
    );
}

/// Every state file's host ports and Envoy uid, by id.
fn claims(f: &FakeStack) -> Vec<(String, Vec<u16>, u32)> {
    let dir = f.state.join(NS);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(bytes) = std::fs::read(e.path().join("state.json")) else {
            continue;
        };
        let s: Value = serde_json::from_slice(&bytes).unwrap();
        let mut ports = Vec::new();
        for p in s["ports"].as_array().unwrap() {
            ports.push(p["external_tls_proxy"].as_u64().unwrap() as u16);
            if let Some(x) = p["external"].as_u64() {
                ports.push(x as u16);
            }
        }
        out.push((
            s["id"].as_str().unwrap().to_string(),
            ports,
            s["envoy_uid"].as_u64().unwrap() as u32,
        ));
    }
    out.sort();
    out
}

fn assert_disjoint(c: &[(String, Vec<u16>, u32)]) {
    let mut ports = BTreeSet::new();
    let mut uids = BTreeSet::new();
    for (id, ps, uid) in c {
        for p in ps {
            assert!(
                ports.insert(*p),
                "host port {p} of {id} handed out twice: {c:?}"
            );
        }
        assert!(
            uids.insert(*uid),
            "Envoy uid {uid} of {id} handed out twice: {c:?}"
        );
    }
}

/// `gc --dry-run` (nothing old enough to remove) reports no disagreement between
/// the index and the state files.
fn assert_index_agrees(f: &FakeStack) {
    let o = cli(&f.config)
        .args(["gc", "--dry-run", "--grace", "3600"])
        .output()
        .unwrap();
    ok(&o, "gc --dry-run");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("allocation index"),
        "index disagrees: {}",
        text(&o)
    );
}

fn state_exists(f: &FakeStack, id: &str) -> bool {
    Path::new(&f.state.join(NS).join(id).join("state.json")).exists()
}

#[test]
fn sigkill_between_any_two_writes_hands_nothing_out_twice_and_leaks_nothing() {
    for point in POINTS {
        let f = stack(&point.replace(':', "-"));
        ok(&create(&f, "a", None), "create a");
        if point.starts_with("create") {
            killed(&create(&f, "b", Some(point)), point);
        } else {
            killed(&delete(&f, "a", Some(point)), point);
            // Killed before its state went: a is still there and still holds its ports.
            assert!(state_exists(&f, "a"), "{point}");
        }
        ok(&create(&f, "c", None), "create c");
        let c = claims(&f);
        assert_disjoint(&c);
        assert!(c.iter().any(|(id, ..)| id == "c"), "{point}: {c:?}");
        assert_index_agrees(&f);

        // Remove whatever is left (b may have a state file: its create died after
        // writing it); then a new container gets the lowest ports and uid again.
        for id in ["a", "b", "c"] {
            ok(&delete(&f, id, None), &format!("delete {id}"));
        }
        assert_eq!(claims(&f), vec![], "{point}");
        ok(&create(&f, "d", None), "create d");
        let mut d = claims(&f);
        d[0].1.sort_unstable();
        // Two app ports, unproxied mappings on (the default): four host ports.
        assert_eq!(
            d,
            vec![(
                "d".to_string(),
                (POOL_START..POOL_START + 4).collect(),
                UID_START
            )],
            "{point}: something stayed taken"
        );
        assert_index_agrees(&f);
        ok(&delete(&f, "d", None), "delete d");
    }
}

#[test]
fn concurrent_creates_from_separate_processes_never_share_a_port_or_uid() {
    let f = stack("concurrent");
    let ids: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    let bundles: Vec<String> = ids
        .iter()
        .map(|id| bundle(&f, id).display().to_string())
        .collect();
    let children: Vec<_> = ids
        .iter()
        .zip(&bundles)
        .map(|(id, b)| {
            wrapper(&f, &["create", "--bundle", b, id], None)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (c, id) in children.into_iter().zip(&ids) {
        ok(&c.wait_with_output().unwrap(), &format!("create {id}"));
    }
    let c = claims(&f);
    assert_eq!(c.len(), ids.len(), "{c:?}");
    assert_disjoint(&c);
    assert_index_agrees(&f);
    for id in &ids {
        ok(&delete(&f, id, None), &format!("delete {id}"));
    }
    assert_eq!(claims(&f), vec![]);
    assert_index_agrees(&f);
}

#[test]
fn a_corrupt_or_missing_index_is_rebuilt_from_the_state_files() {
    let f = stack("corrupt");
    ok(&create(&f, "a", None), "create a");
    for damage in [&b"{not json"[..], b"", b"\x00\xff"] {
        std::fs::write(f.state.join(".index.json"), damage).unwrap();
        ok(&create(&f, "b", None), "create b");
        assert_disjoint(&claims(&f));
        assert_index_agrees(&f);
        ok(&delete(&f, "b", None), "delete b");
    }
    std::fs::remove_file(f.state.join(".index.json")).unwrap();
    ok(&create(&f, "b", None), "create b");
    assert_disjoint(&claims(&f));
    assert_index_agrees(&f);
}

#[test]
fn gc_sweeps_the_lease_of_a_create_that_died_and_stray_admin_dirs() {
    let f = stack("gc-leases");
    killed(
        &create(&f, "b", Some("create:index-written")),
        "create:index-written",
    );
    let leases = f.dir.join("uid-leases");
    let lease = leases.join(UID_START.to_string());
    assert!(lease.exists(), "the dead create's lease of {UID_START}");
    // A stop that did not finish left an admin socket directory behind.
    let stray = f.state.join(".admin").join((UID_START + 5).to_string());
    std::fs::create_dir_all(&stray).unwrap();
    let o = cli(&f.config)
        .args(["gc", "--grace", "0"])
        .output()
        .unwrap();
    ok(&o, "gc");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("removing the lease of Envoy uid {UID_START}")),
        "{}",
        text(&o)
    );
    assert!(out.contains(&stray.display().to_string()), "{}", text(&o));
    assert!(!lease.exists(), "lease left");
    assert!(!stray.exists(), "admin dir left");
    // A live container's lease and admin directory are not touched.
    ok(&create(&f, "c", None), "create c");
    let live = leases.join(UID_START.to_string());
    assert!(live.exists());
    let o = cli(&f.config)
        .args(["gc", "--grace", "0", "--dry-run"])
        .output()
        .unwrap();
    ok(&o, "gc --dry-run");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("lease"),
        "{}",
        text(&o)
    );
    ok(&delete(&f, "c", None), "delete c");
    assert!(!live.exists(), "delete releases its lease");
}
