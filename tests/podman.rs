//! podman with only the hooks.d registration (no wrapper): a container started with the
//! port annotation gets its TLS proxy, identity and NAT through the createRuntime,
//! poststart and poststop hooks, and nothing of it survives `podman rm`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const ROOT: &str = "/var/lib/envoy-sidecar-test/podman/root";
const RUNROOT: &str = "/run/envoy-sidecar-test/podman";
const HELLO: &str = "hello from envoy-sidecar test app";

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
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hooks/oci-hooks.d");
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
    let net = Netns::new(7);
    let sb = Sandbox::new("podman", "", "");
    let hooks = hooks_dir(&sb);
    if !podman(&hooks, &["image", "exists", IMAGE]).status.success() {
        let tar = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/oci/busybox-oci.tar");
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
    let ca = sb.dir.join("ca/ca.crt");
    let start = Instant::now();
    let out = loop {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 openssl s_client -connect {}:{proxy} -CAfile {} -verify_return_error -ign_eof -showcerts 2>&1",
                net.ip,
                ca.display()
            ))
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        if t.contains(HELLO) {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never served: {t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains(&format!("CN = {id}")) || out.contains(&format!("CN={id}")),
        "{out}"
    );
    // The app sees no CF_INSTANCE_* without the wrapper (documented).
    let o = podman(&hooks, &["exec", &name, "/bin/sh", "-c", "env"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("CF_INSTANCE_PORTS"));

    let sup: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            sb.state_dir
                .join("default")
                .join(&id)
                .join("supervisor.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let pids: Vec<i64> = [&sup["supervisor"]["pid"], &sup["envoy"]["pid"]]
        .iter()
        .filter_map(|v| v.as_i64())
        .collect();
    drop(guard);
    std::thread::sleep(Duration::from_millis(300));
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .unwrap_or_default()
                    .contains(") Z"),
            "pid {p} survived podman rm"
        );
    }
    assert!(
        !sb.state_dir.join("default").join(&id).exists(),
        "state left after podman rm"
    );
}
