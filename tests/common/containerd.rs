//! The private containerd that `tests/env/containerd.sh` runs, and whether the
//! real-runtime tests can run at all.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Once;

use super::util::repo;

pub const NAMESPACE: &str = "envoy-sidecar-test";
pub const IMAGE: &str = "localhost/envoy-sidecar/busybox:latest";
const DEFAULT_ADDRESS: &str = "/run/envoy-sidecar-test/containerd.sock";

/// The real runc of the engine stack under test (tests/env/stack.sh sets `ES_RUNC`;
/// else the host's).
pub fn real_runc() -> std::path::PathBuf {
    std::env::var_os("ES_RUNC")
        .map(Into::into)
        .unwrap_or_else(|| "/usr/sbin/runc".into())
}

/// The engine stack under test (tests/env/stack.sh), `bookworm` by default.
pub fn stack() -> String {
    std::env::var("ES_STACK").unwrap_or_else(|_| "bookworm".into())
}

pub fn address() -> String {
    std::env::var("CONTAINERD_ADDRESS").unwrap_or_else(|_| DEFAULT_ADDRESS.into())
}

/// `false` (with the reason printed) unless root. Under CI the tests must run, so there
/// a missing prerequisite fails instead.
fn root_or_skip(test: &str, needs: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: CI must run as root");
        }
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP {test}: needs root ({needs})");
        return false;
    }
    true
}

/// `false` (with the reason printed) where the real-runtime tests cannot run: not root.
/// Starts the private containerd if it is not running.
pub fn can_run(test: &str) -> bool {
    if !root_or_skip(test, "containerd, runc, cgroups") {
        return false;
    }
    static UP: Once = Once::new();
    UP.call_once(|| {
        if !Path::new(&address()).exists() {
            let st = Command::new(repo().join("tests/env/containerd.sh"))
                .arg("up")
                .status()
                .expect("run tests/env/containerd.sh up");
            assert!(st.success(), "tests/env/containerd.sh up failed");
        }
    });
    true
}

/// Like `can_run`, for tests that need root but not containerd: never starts it.
pub fn can_run_without_containerd(test: &str) -> bool {
    root_or_skip(test, "runc, cgroups, network namespaces")
}

/// `ctr` against the private containerd, namespace [`NAMESPACE`].
pub fn ctr(args: &[&str]) -> Output {
    Command::new("ctr")
        .args(["--address", &address(), "-n", NAMESPACE])
        .args(args)
        .output()
        .expect("run ctr")
}

/// `ctr --address A -n NS ARGS`, killed after `secs`.
pub fn ctr_at(address: &str, namespace: &str, secs: u32, args: &[&str]) -> Output {
    Command::new("timeout")
        .args([
            &secs.to_string(),
            "ctr",
            "--address",
            address,
            "-n",
            namespace,
        ])
        .args(args)
        .output()
        .expect("run ctr")
}

/// `run [--rm|-d] --runc-binary RUNTIME [--annotation K=V]... OPTS IMAGE ID CMD...`:
/// the arguments of `ctr run`.
/// `ES_SYSTEMD_CGROUP=1` (the cgroup v2 guest's second pass, tests/env/vm-suite.sh):
/// every `ctr run` of [`run_args`] uses runc's systemd cgroup driver, the container's
/// cgroup a scope `system.slice/es-<id>.scope`.
pub fn systemd_cgroup() -> bool {
    std::env::var("ES_SYSTEMD_CGROUP").is_ok_and(|v| v == "1")
}

pub fn run_args(
    mode: &str,
    runtime: &Path,
    id: &str,
    annotations: &[(&str, &str)],
    opts: &[String],
    cmd: &[String],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        mode.into(),
        "--runc-binary".into(),
        runtime.display().to_string(),
    ];
    for (k, v) in annotations {
        a.push("--annotation".into());
        a.push(format!("{k}={v}"));
    }
    a.extend(opts.iter().cloned());
    if systemd_cgroup() && !opts.iter().any(|o| o == "--runc-systemd-cgroup") {
        a.extend([
            "--runc-systemd-cgroup".into(),
            "--cgroup".into(),
            format!("system.slice:es:{id}"),
        ]);
    }
    a.push(IMAGE.into());
    a.push(id.into());
    a.extend(cmd.iter().cloned());
    a
}

/// `(&str)` views of owned arguments.
pub fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// Owned copies of `&str` arguments.
pub fn owned(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
