//! podman with only the hooks.d registration (no wrapper): a container started with the
//! port annotation gets its TLS proxy, identity and NAT through the createRuntime,
//! poststart and poststop hooks, and nothing of it survives `podman rm`.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const ROOT: &str = "/var/lib/envoy-sidecar-test/podman/root";
const RUNROOT: &str = "/run/envoy-sidecar-test/podman";

fn podman(hooks: &Path, args: &[&str]) -> Output {
    Command::new("podman")
        .args([
            "--root",
            ROOT,
            "--runroot",
            RUNROOT,
            "--runtime",
            "/usr/sbin/runc",
        ])
        .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
        .arg("--hooks-dir")
        .arg(hooks)
        .args(args)
        .output()
        .expect("podman (Debian package podman) must be installed")
}

/// The shipped hooks.d files, pointed at this build and the sandbox's config.
fn hooks_dir(sb: &Sandbox) -> PathBuf {
    let dir = sb.dir.join("hooks.d");
    std::fs::create_dir_all(&dir).unwrap();
    let repo = repo().join("hooks/oci-hooks.d");
    for stage in ["createRuntime", "poststart", "poststop"] {
        let name = format!("envoy-sidecar-{stage}.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo.join(&name)).unwrap()).unwrap();
        v["hook"]["path"] = cli_bin().display().to_string().into();
        v["hook"]["args"] = serde_json::json!([
            "envoy-sidecar",
            "--config",
            sb.config.display().to_string(),
            "hook",
            stage
        ]);
        std::fs::write(dir.join(&name), v.to_string()).unwrap();
    }
    dir
}

#[test]
fn hooks_only_registration_gives_a_tls_proxy() {
    if !can_run("hooks_only_registration_gives_a_tls_proxy") {
        return;
    }
    let sb = Sandbox::new("podman", "", "");
    let net = sb.slot.netns(0);
    let hooks = hooks_dir(&sb);
    if !podman(&hooks, &["image", "exists", IMAGE]).status.success() {
        let tar = repo().join("target/oci/busybox-oci.tar");
        let o = podman(&hooks, &["load", "-i", tar.to_str().unwrap()]);
        assert!(o.status.success(), "podman load: {}", text(&o));
    }
    let name = format!("es-podman-{}", std::process::id());
    let _ = podman(&hooks, &["rm", "-f", &name]);
    let netopt = format!("ns:{}", net.path);
    let o = podman(
        &hooks,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--annotation",
            "envoy-sidecar/ports=8080",
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
            "--network",
            &netopt,
            IMAGE,
            "/bin/httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ],
    );
    struct Rm<'a>(&'a Path, String);
    impl Drop for Rm<'_> {
        fn drop(&mut self) {
            let _ = podman(self.0, &["rm", "-f", "-t", "0", &self.1]);
        }
    }
    let guard = Rm(&hooks, name.clone());
    assert!(o.status.success(), "podman run: {}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();

    // Recorded under namespace "default" by the createRuntime hook, spec untouched.
    let state_file = sb.state_dir.join("default").join(&id).join("state.json");
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&state_file).unwrap_or_else(|e| panic!("{}: {e}", state_file.display())),
    )
    .unwrap();
    assert_eq!(st["ports"][0]["internal"], 8080);
    assert_eq!(
        st["memory"]["additional_bytes"], 0,
        "hooks cannot raise the limit"
    );
    let proxy = st["ports"][0]["internal_tls_proxy"].as_u64().unwrap();

    // TLS through the proxy from outside the container, with the instance identity.
    let ca = sb.ca();
    let out = Get::new(&ca)
        .showcerts()
        .wait_for(&format!("{}:{proxy}", net.ip), HELLO);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains(&format!("CN = {id}")) || out.contains(&format!("CN={id}")),
        "{out}"
    );
    // The app sees no CF_INSTANCE_* without the wrapper (documented).
    let o = podman(&hooks, &["exec", &name, "/bin/sh", "-c", "env"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("CF_INSTANCE_PORTS"));

    let sup = sb.record_ns("default", &id);
    let pids: Vec<i64> = [&sup["supervisor"]["pid"], &sup["envoy"]["pid"]]
        .iter()
        .filter_map(|v| v.as_i64())
        .collect();
    drop(guard);
    for p in pids {
        wait_until(
            &format!("pid {p} gone after podman rm"),
            Duration::from_secs(10),
            || !alive(p),
        );
    }
    assert!(
        !sb.state_dir.join("default").join(&id).exists(),
        "state left after podman rm"
    );
}
