//! Harness for tests against a real containerd + runc: the private containerd that
//! `tests/env/containerd.sh` runs, a per-test sandbox (config, CA, state directory,
//! wrapper script) and container handles that clean up after themselves.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

pub const NAMESPACE: &str = "envoy-sidecar-test";
pub const IMAGE: &str = "localhost/envoy-sidecar/busybox:latest";
const DEFAULT_ADDRESS: &str = "/run/envoy-sidecar-test/containerd.sock";

pub fn wrapper_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_envoy-sidecar-runc"))
}

pub fn cli_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_envoy-sidecar"))
}

pub fn address() -> String {
    std::env::var("CONTAINERD_ADDRESS").unwrap_or_else(|_| DEFAULT_ADDRESS.into())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `false` (with the reason printed) where the real-runtime tests cannot run: not root.
/// Under CI they must run, so there a missing prerequisite fails instead.
pub fn can_run(test: &str) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: CI must run as root");
        }
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test}: needs root (containerd, runc, cgroups)"
        );
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

pub fn ctr(args: &[&str]) -> Output {
    Command::new("ctr")
        .args(["--address", &address(), "-n", NAMESPACE])
        .args(args)
        .output()
        .expect("run ctr")
}

pub fn text(o: &Output) -> String {
    format!(
        "status={:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A test's private world: its own state directory, CA, config and wrapper script, so
/// tests run in parallel without sharing port pools or memory accounting.
pub struct Sandbox {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    /// `--runc-binary` for ctr: a script that runs the wrapper with this config.
    pub runtime: PathBuf,
}

impl Sandbox {
    /// `extra` is appended to a config with the proxy enabled; it may not repeat the
    /// `[proxy]`, `[instance_identity]` or `[runtime]` tables' keys set here.
    pub fn new(name: &str, proxy_extra: &str, extra: &str) -> Sandbox {
        let dir = std::env::temp_dir().join(format!("es-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca");
        let out = Command::new(cli_bin())
            .args(["generate-ca", "--out"])
            .arg(&ca)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let state_dir = dir.join("state");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nenabled = true\nenvoy_path = \"/usr/local/bin/envoy\"\n{proxy_extra}\n\
                 [instance_identity]\nca_cert = {:?}\nca_key = {:?}\n\
                 [runtime]\nstate_dir = {:?}\n{extra}\n",
                ca.join("ca.crt"),
                ca.join("ca.key"),
                state_dir
            ),
        )
        .unwrap();
        let runtime = dir.join("runc-wrapper");
        write_script(
            &runtime,
            &format!(
                "#!/bin/sh\nENVOY_SIDECAR_CONFIG={} exec {} \"$@\"\n",
                config.display(),
                wrapper_bin().display()
            ),
        );
        Sandbox {
            dir,
            config,
            state_dir,
            runtime,
        }
    }

    pub fn run_args<'a>(&'a self, id: &'a str, annotations: &[(&str, &str)]) -> Vec<String> {
        let mut a = vec![
            "run".to_string(),
            "--runc-binary".into(),
            self.runtime.display().to_string(),
        ];
        for (k, v) in annotations {
            a.push("--annotation".into());
            a.push(format!("{k}={v}"));
        }
        a.push(IMAGE.into());
        a.push(id.into());
        a
    }

    /// `ctr run --rm` in the foreground; returns its output. `opts` go before the image
    /// (e.g. `--memory-limit`).
    pub fn run_rm(
        &self,
        id: &str,
        annotations: &[(&str, &str)],
        opts: &[&str],
        cmd: &str,
    ) -> Output {
        let mut a = self.run_args(id, annotations);
        let tail = a.split_off(a.len() - 2);
        a.insert(1, "--rm".into());
        a.extend(opts.iter().map(|s| s.to_string()));
        a.extend(tail);
        a.extend(["/bin/sh".into(), "-c".into(), cmd.into()]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = ctr(&refs);
        // A failed create can leave the container record behind.
        ctr(&["containers", "rm", id]);
        out
    }

    /// `ctr run -d ... sleep`: a running container removed when the handle drops.
    pub fn start(&self, id: &str, annotations: &[(&str, &str)], opts: &[&str]) -> Container {
        self.start_cmd(id, annotations, opts, &["/bin/sleep", "3600"])
    }

    /// `ctr run -d ... <cmd>`: a running container removed when the handle drops.
    pub fn start_cmd(
        &self,
        id: &str,
        annotations: &[(&str, &str)],
        opts: &[&str],
        cmd: &[&str],
    ) -> Container {
        let mut a = self.run_args(id, annotations);
        let tail = a.split_off(a.len() - 2);
        a.insert(1, "-d".into());
        a.extend(opts.iter().map(|s| s.to_string()));
        a.extend(tail);
        a.extend(cmd.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = ctr(&refs);
        let c = Container { id: id.into() };
        assert!(out.status.success(), "ctr run -d {id}: {}", text(&out));
        c
    }

    pub fn inspect(&self, id: &str) -> Option<serde_json::Value> {
        let out = Command::new(cli_bin())
            .arg("--config")
            .arg(&self.config)
            .args(["inspect", id, "--namespace", NAMESPACE])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("inspect prints JSON"))
    }

    /// Container directories left in the state store (there should be none at rest).
    pub fn leftovers(&self) -> Vec<String> {
        let ns = self.state_dir.join(NAMESPACE);
        std::fs::read_dir(&ns)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub struct Container {
    pub id: String,
}

impl Container {
    pub fn pid(&self) -> u32 {
        let out = ctr(&["task", "ls"]);
        let t = String::from_utf8_lossy(&out.stdout);
        t.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&self.id.as_str())).then(|| f[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("task {} not in `ctr task ls`: {t}", self.id))
    }

    pub fn exec(&self, exec_id: &str, cmd: &str) -> Output {
        ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            &self.id,
            "/bin/sh",
            "-c",
            cmd,
        ])
    }

    /// Kill and remove now (also done on drop).
    pub fn remove(&self) {
        ctr(&["task", "kill", "-s", "SIGKILL", &self.id]);
        for _ in 0..50 {
            let out = ctr(&["task", "rm", &self.id]);
            if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not found") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        ctr(&["containers", "rm", &self.id]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Parse `KEY=VALUE` lines (from `env`).
pub fn env_map(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The memory cgroup limit of `pid`, read from the host (cgroup v1 or v2).
pub fn memory_limit_of(pid: u32) -> String {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cg.lines() {
        let parts: Vec<&str> = line.splitn(3, ':').collect();
        if parts[1].split(',').any(|c| c == "memory") {
            let p = format!("/sys/fs/cgroup/memory{}/memory.limit_in_bytes", parts[2]);
            return std::fs::read_to_string(&p).unwrap().trim().to_string();
        }
    }
    let line = cg
        .lines()
        .find(|l| l.starts_with("0::"))
        .expect("cgroup v2 line");
    let p = format!("/sys/fs/cgroup{}/memory.max", &line[3..]);
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

/// A network namespace with a veth to the host: the container's network for tests
/// that reach it from outside (documentation range 198.51.100.0/24, one /30 per test).
pub struct Netns {
    pub name: String,
    pub path: String,
    pub host_ip: String,
    pub ip: String,
}

impl Netns {
    /// `slot` (0..63) picks the /30: 198.51.100.(4*slot+1) host, (4*slot+2) container.
    pub fn new(slot: u8) -> Netns {
        assert!(slot < 64);
        let name = format!("es-t{slot}-{}", std::process::id() % 100000);
        let host_if = format!("esh{slot}p{}", std::process::id() % 10000);
        let host_ip = format!("198.51.100.{}", 4 * slot as u32 + 1);
        let ip = format!("198.51.100.{}", 4 * slot as u32 + 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let sh = |c: &str| {
            let o = Command::new("sh").arg("-c").arg(c).output().unwrap();
            assert!(o.status.success(), "{c}: {}", text(&o));
        };
        sh(&format!("ip netns add {name}"));
        sh(&format!(
            "ip link add {host_if} type veth peer name eth0 netns {name} && \
             ip addr add {host_ip}/30 dev {host_if} && ip link set {host_if} up && \
             ip -n {name} addr add {ip}/30 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set lo up && ip -n {name} route add default via {host_ip}"
        ));
        Netns {
            path: format!("/var/run/netns/{name}"),
            name,
            host_ip,
            ip,
        }
    }

    /// The ctr option that puts a container in this namespace.
    pub fn ctr_opt(&self) -> String {
        format!("--with-ns=network:{}", self.path)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
