//! What differs between engine stacks (tests/env/stack.sh: bookworm's containerd 1.6
//! and runc 1.1, trixie's 1.7 and 1.1, sid's 2.1 and 1.3 with crun), run on whichever
//! stack the environment names (`ES_STACK`, `ES_RUNC`; the host's by default):
//! - both poststart orders under `ctr run -d --cni` (the network arrives between
//!   create and start): runc's (poststart at the end of `create`), a stand-in that
//!   runs poststart inside `start` as crun and runc's main do
//!   (tests/env/poststart-at-start.py), and crun itself where it can run — the
//!   wrapper's `create` starts the sidecar itself, so both end the same;
//! - the runc commands whose behaviour changed in runc 1.2/1.3, through the wrapper
//!   and through the same stack's plain runc side by side: `features`, `kill --all` on
//!   a stopped container, `delete` of a stopped proxied container, and a poststop hook
//!   of ours that fails, which must not fail `delete`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::footprint::{nat_in_pool, our_processes};
use common::*;
use serde_json::{Value, json};

/// Link 2 of the slot: the router's.
const ROUTER_LINK: u32 = 2;

/// The stand-in runc that runs poststart hooks inside `start`, in front of the stack's
/// runc; it logs each deferred hook run to `log`.
fn poststart_at_start(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("runc-poststart-at-start");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nES_REAL_RUNC={:?} ES_POSTSTART_LOG={:?} exec python3 {:?} \"$@\"\n",
            real_runc(),
            log,
            repo().join("tests/env/poststart-at-start.py")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// crun of this stack, if it can run containers on this host. crun refuses hybrid
/// cgroup hosts whose v2 hierarchy has controllers ("cgroups in hybrid mode not
/// supported, drop all controllers from cgroupv2"): v1 controllers beside a v2
/// hierarchy at /sys/fs/cgroup/unified holding some (here: hugetlb).
fn crun() -> Result<PathBuf, String> {
    let bin = std::env::var_os("ES_STACK_BIN")
        .map(|d| PathBuf::from(d).join("crun"))
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("stack {} has no crun (sid has)", stack()))?;
    let v2_controllers =
        std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").unwrap_or_default();
    let hybrid = Path::new("/sys/fs/cgroup/memory").is_dir() && !v2_controllers.trim().is_empty();
    if hybrid {
        return Err(format!(
            "{} cannot run here: this host's cgroups are hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified with {:?}) and crun says \"cgroups in hybrid mode not supported, drop all controllers from cgroupv2\"",
            bin.display(),
            v2_controllers.trim()
        ));
    }
    Ok(bin)
}

/// `ctr run -d --cni` of an httpd with one proxied port through the wrapper in front of
/// `runc`: ready with NAT to the leased address, TLS from the router through the host
/// port with the IP SAN, then removal leaves nothing. Returns the supervisor's log.
fn ctr_cni_lifecycle(name: &str, runc: Option<&Path>, id: &str) -> String {
    let slot = slots::next();
    let cni = CtrCni::install(&slot);
    let router = slot.router(ROUTER_LINK);
    let sb = Sandbox::in_slot(
        &slot,
        name,
        "",
        &format!("[host]\naddress = {:?}\n", router.host_ip()),
        POOL,
    );
    if let Some(r) = runc {
        sb.add_config_line("[runtime]", &format!("runc = {r:?}"));
    }
    let c = sb.start_cmd(id, &[(PORTS, "8080")], &["--cni"], &httpd());
    let ip = cni
        .lease_of(id)
        .unwrap_or_else(|| panic!("no lease for {id}: {:?}", cni.leases()));
    let st = sb.inspect(id).unwrap();
    let tls = port_of(&st, 0, "external_tls_proxy");
    wait_until(
        "status ready with NAT to the leased address",
        Duration::from_secs(20),
        || {
            let row = status_row(&sb.config, NAMESPACE, id).ok_or("no row")?;
            if row["status"] == "ready" && row["nat_applied"] == true && row["container_ip"] == ip {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        },
    );
    let cert = wait_until("TLS through the host port", Duration::from_secs(20), || {
        let out = router_s_client(&router, &sb.ca(), id, router.host_ip(), tls);
        if served_verified(&out, HELLO) {
            first_cert_text(&out).ok_or(out)
        } else {
            Err(out)
        }
    });
    assert!(ip_sans(&cert).contains(&ip), "IP SAN {ip}: {cert}");
    let log = sb.supervisor_log(id);
    c.remove();
    let out = cni.del(id);
    assert!(out.status.success(), "CNI DEL: {}", text(&out));
    assert_eq!(nat_in_pool(&sb.pool()), [], "NAT of the pool after removal");
    assert!(
        !sb.container_dir(NAMESPACE, id).exists(),
        "state of {id} left"
    );
    assert_eq!(sb.leftovers(), Vec::<String>::new());
    let procs = settled(|| our_processes(&sb));
    assert!(procs.is_empty(), "processes left: {procs:?}");
    log
}

/// runc 1.1-1.3 run poststart at the end of `create`: the supervisor starts before ctr
/// configures CNI, waits, then follows the address.
#[test]
fn poststart_at_create_under_ctr_cni() {
    let test = "poststart_at_create_under_ctr_cni";
    if !can_run(test) {
        return;
    }
    let log = ctr_cni_lifecycle("order-create", None, "es-order-create");
    let waited = log.find("status: waiting-for-network");
    let followed = log.find("container addresses none -> ");
    assert!(
        waited.is_some() && followed.is_some() && waited < followed,
        "{}: supervisor started before the network, then followed it:\n{log}",
        stack()
    );
}

/// crun and runc's main run poststart inside `start`, after the user process began.
/// That order changes nothing for a container the wrapper creates: it registers no
/// poststart of ours (it starts the sidecar itself once runc's create returned), so
/// the supervisor starts before ctr configures CNI, as under runc's order, and follows
/// the address; everything holds the same.
#[test]
fn poststart_at_start_under_ctr_cni() {
    let test = "poststart_at_start_under_ctr_cni";
    if !can_run(test) {
        return;
    }
    let tmp = TempDir::new("es-order-start");
    let hooks_log = tmp.path().join("deferred.log");
    let runc = poststart_at_start(tmp.path(), &hooks_log);
    let id = "es-order-start";
    let log = ctr_cni_lifecycle("order-start", Some(&runc), id);
    let deferred = std::fs::read_to_string(&hooks_log).unwrap_or_default();
    // The stand-in was in the path (it logs every start) and had nothing to defer.
    let started = deferred
        .lines()
        .find(|l| l.starts_with(&format!("poststart after start: {id} ")));
    assert!(
        started.is_some_and(|l| l.ends_with("(0 hook(s))")),
        "the stand-in started {id} with no poststart of ours to run: {deferred:?}"
    );
    let waited = log.find("status: waiting-for-network");
    let followed = log.find("container addresses none -> ");
    assert!(
        waited.is_some() && followed.is_some() && waited < followed,
        "{}: supervisor started at create, before the network, then followed it:\n{log}",
        stack()
    );
}

/// crun itself, where it can run (cgroup v2 hosts; not this project's hybrid ones).
#[test]
fn crun_under_ctr_cni() {
    let test = "crun_under_ctr_cni";
    if !can_run(test) {
        return;
    }
    match crun() {
        Ok(bin) => {
            ctr_cni_lifecycle("crun", Some(&bin), "es-crun");
        }
        // The one skip the README names: crun cannot run on hybrid cgroup hosts.
        Err(why) => eprintln!("SKIP {test}: {why}"),
    }
}

/// A proxied container driven directly (Garden's way) in its own netns, with the
/// proxy configuration of `sb`.
fn direct(sb: &Sandbox, name: &str, id: &str, net: &Netns, args: Value) -> DirectRun {
    let c = DirectRun::new(name, id, &sb.config);
    c.runc_spec_bundle(&net.path, |spec| {
        spec["process"]["args"] = args;
        spec["annotations"] = json!({ PORTS: "8080" });
    });
    c
}

/// `features` through the wrapper is the stack's runc's, byte for byte (containerd
/// 2.x's CRI reads it at start-up); `kill --all` on a stopped container and `delete`
/// of a stopped proxied container exit as plain runc does, and leave nothing.
#[test]
fn features_kill_all_and_delete_match_the_stacks_runc() {
    let test = "features_kill_all_and_delete_match_the_stacks_runc";
    if !can_run_without_containerd(test) {
        return;
    }
    let sb = Sandbox::new("runc-parity", "", "");
    let wrapped = Command::new(wrapper_bin())
        .arg("features")
        .env("ENVOY_SIDECAR_CONFIG", &sb.config)
        .output()
        .unwrap();
    let plain = Command::new(real_runc()).arg("features").output().unwrap();
    assert!(plain.status.success(), "{}", text(&plain));
    assert_eq!(wrapped.status.code(), plain.status.code());
    assert_eq!(wrapped.stdout, plain.stdout, "features");
    let v: Value = serde_json::from_slice(&wrapped.stdout).expect("features is JSON");
    assert!(v["ociVersionMax"].is_string(), "{v}");

    // A proxied container whose init exits at once: stopped, state still ours.
    let net = sb.slot.netns(0);
    let id = "es-parity-1";
    let c = direct(&sb, "parity", id, &net, json!(["true"]));
    let (status, said) = c.run_detached();
    assert!(status.success(), "run --detach: {said}");
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        c.status().as_deref() == Some("stopped")
    })
    .expect("init exited");
    // The twin without the wrapper, to compare exit codes with.
    let twin = DirectRun::new("parity-twin", "es-parity-2", &sb.config);
    twin.runc_spec_bundle(&net.path, |spec| spec["process"]["args"] = json!(["true"]));
    let bundle = twin.bundle.display().to_string();
    let out = twin.runc(&["run", "--detach", "--bundle", &bundle, "es-parity-2"]);
    assert!(out.status.success(), "plain run: {}", text(&out));
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        twin.status().as_deref() == Some("stopped")
    })
    .expect("twin's init exited");

    let ours = c.wrapper(&["kill", "--all", id, "KILL"]);
    let theirs = twin.runc(&["kill", "--all", "es-parity-2", "KILL"]);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "kill --all on a stopped container ({}): ours {} / runc {}",
        stack(),
        text(&ours),
        text(&theirs)
    );
    let ours = c.wrapper(&["delete", id]);
    let theirs = twin.runc(&["delete", "es-parity-2"]);
    assert!(theirs.status.success(), "plain delete: {}", text(&theirs));
    assert!(
        ours.status.success(),
        "delete through the wrapper: {}",
        text(&ours)
    );
    assert!(c.inspect().is_none(), "state released");
    assert_eq!(nat_in_pool(&sb.pool()), [], "no NAT left");
    let procs = settled(|| our_processes(&sb));
    assert!(procs.is_empty(), "processes left: {procs:?}");
}

/// From runc 1.2 a failing poststop hook makes `runc delete` exit 1. Ours never fails:
/// with its configuration broken (the hook cannot even load it) plain runc's delete of
/// a stopped proxied container still exits 0, and the state the hook could not release
/// is left to `gc`, which removes it. (runc shows a hook's stderr only when the hook
/// fails, so what ours says is not asserted here.)
#[test]
fn a_failing_poststop_of_ours_never_fails_delete() {
    let test = "a_failing_poststop_of_ours_never_fails_delete";
    if !can_run_without_containerd(test) {
        return;
    }
    let sb = Sandbox::new("poststop-fail", "", "");
    let net = sb.slot.netns(0);
    let id = "es-poststop-fail";
    let c = direct(&sb, "poststop-fail", id, &net, json!(["true"]));
    let (status, said) = c.run_detached();
    assert!(status.success(), "run --detach: {said}");
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        c.status().as_deref() == Some("stopped")
    })
    .expect("init exited");
    // The supervisor stops with the container's init; then the hook's config goes.
    settled(|| our_processes(&sb));
    let saved = std::fs::read(&sb.config).unwrap();
    std::fs::write(&sb.config, "[proxy\nbroken").unwrap();
    let out = c.runc(&["delete", id]);
    std::fs::write(&sb.config, saved).unwrap();
    assert!(
        out.status.success(),
        "runc {} delete with our poststop failing inside: {}",
        stack(),
        text(&out)
    );
    assert_eq!(c.status(), None, "runc deleted it");
    // What the hook could not release, gc does.
    assert!(c.inspect().is_some(), "state left for gc");
    let out = cli(&sb.config)
        .args(["gc", "--grace", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "gc: {}", text(&out));
    assert!(c.inspect().is_none(), "gc released it: {}", text(&out));
}

/// `doctor` proves the stack's containerd loads the handler `install --root` wrote (as
/// this stack's tests/env/containerd.sh registers it: imported on 2.x, its tables in
/// config.toml on 1.x), and fails the `registration` line, naming the drop-in and why,
/// when containerd does not: not imported, or (2.x) an old drop-in without a
/// `version` line whose tables containerd ignores.
#[test]
fn doctor_proves_containerd_loads_the_handler() {
    let test = "doctor_proves_containerd_loads_the_handler";
    if !can_run_without_containerd(test) {
        return;
    }
    let containerd = std::env::var("CONTAINERD_BIN").unwrap_or_else(|_| "containerd".into());
    let tmp = TempDir::new("es-doctor-reg");
    let root = tmp.path().join("root");
    let out = Command::new(cli_bin())
        .args(["install", "--root"])
        .arg(&root)
        .args(["--containerd", &containerd])
        .arg("--binary-name")
        .arg(wrapper_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "install: {}", text(&out));
    let drop_in = root.join("etc/containerd/conf.d/envoy-sidecar.toml");
    let text_of = std::fs::read_to_string(&drop_in).unwrap();
    let v3 = text_of.contains("version = 3");
    let conf = tmp.path().join("config.toml");
    let runc_table = |plugin: &str| {
        format!(
            "[plugins.\"{plugin}\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n"
        )
    };
    let doctor = |label: &str| -> String {
        let out = cli(Path::new("/nonexistent/envoy-sidecar.toml"))
            .arg("doctor")
            .args(["--containerd", &containerd])
            .arg("--containerd-config")
            .arg(&conf)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("registration"))
            .unwrap_or_else(|| panic!("{label}: no registration line: {}", text(&out)))
            .to_string()
    };
    // As registered for this stack.
    let registered = if v3 {
        format!(
            "version = 3\nimports = [{:?}]\n{}",
            drop_in,
            runc_table("io.containerd.cri.v1.runtime")
        )
    } else {
        format!(
            "version = 2\n{}\n{}",
            runc_table("io.containerd.grpc.v1.cri"),
            text_of.replace("version = 2\n", "")
        )
    };
    std::fs::write(&conf, registered).unwrap();
    let line = doctor("registered");
    assert!(
        line.starts_with("ok") && line.contains("runtime \"envoy-sidecar\""),
        "{}: {line}",
        stack()
    );
    // Not imported.
    std::fs::write(&conf, if v3 { "version = 3\n" } else { "version = 2\n" }).unwrap();
    let line = doctor("not imported");
    assert!(
        line.starts_with("FAIL")
            && line.contains("does not import")
            && line.contains(&drop_in.display().to_string()),
        "{}: {line}",
        stack()
    );
    if v3 {
        // What install wrote before: version-2 tables, no version line.
        std::fs::write(
            &drop_in,
            text_of
                .replace("version = 3\n", "")
                .replace("io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"),
        )
        .unwrap();
        std::fs::write(
            &conf,
            format!(
                "version = 3\nimports = [{:?}]\n{}",
                drop_in,
                runc_table("io.containerd.cri.v1.runtime")
            ),
        )
        .unwrap();
        let line = doctor("versionless v2 drop-in");
        assert!(
            line.starts_with("FAIL") && line.contains("ignored its tables"),
            "{}: {line}",
            stack()
        );
    }
}
