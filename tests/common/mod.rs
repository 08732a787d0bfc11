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

static POOL_SLOT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A test's private world: its own state directory, CA, config and wrapper script, so
/// tests run in parallel without sharing port pools or memory accounting.
pub struct Sandbox {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    /// `--runc-binary` for ctr: a script that runs the wrapper with this config.
    pub runtime: PathBuf,
    /// Set to run the next containers with another runtime (e.g. plain runc).
    pub runtime_override: std::sync::Mutex<Option<PathBuf>>,
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
                 [runtime]\nstate_dir = {:?}\n{extra}\n{}",
                ca.join("ca.crt"),
                ca.join("ca.key"),
                state_dir,
                if extra.contains("[ports]") {
                    String::new()
                } else {
                    // The NAT table is host-wide: parallel sandboxes need disjoint pools.
                    let slot = POOL_SLOT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u32;
                    format!(
                        "[ports]\npool_start = {}\npool_end = {}\n",
                        40000 + 32 * slot,
                        40000 + 32 * slot + 31
                    )
                }
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
            runtime_override: Default::default(),
        }
    }

    pub fn run_args<'a>(&'a self, id: &'a str, annotations: &[(&str, &str)]) -> Vec<String> {
        let mut a = vec![
            "run".to_string(),
            "--runc-binary".into(),
            self.runtime_override
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| self.runtime.clone())
                .display()
                .to_string(),
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
        // The command's output goes to files in a bind-mounted host directory: ctr's
        // own copy of a short-lived task's output is sometimes empty under load.
        let outdir = self.dir.join(format!("out-{id}"));
        let _ = std::fs::remove_dir_all(&outdir);
        std::fs::create_dir_all(&outdir).unwrap();
        let mount = format!(
            "--mount=type=bind,src={},dst=/.es-out,options=rbind:rw",
            outdir.display()
        );
        let wrapped = format!(
            "( {cmd} ) >/.es-out/out 2>/.es-out/err; rc=$?; echo $rc >/.es-out/rc; exit $rc"
        );
        let mut a = self.run_args(id, annotations);
        let tail = a.split_off(a.len() - 2);
        a.insert(1, "--rm".into());
        a.extend(opts.iter().map(|s| s.to_string()));
        a.push(mount);
        a.extend(tail);
        a.extend(["/bin/sh".into(), "-c".into(), wrapped]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut out = ctr(&refs);
        // A failed create can leave the container record behind.
        ctr(&["containers", "rm", id]);
        if outdir.join("rc").exists() {
            // The task ran: its own output (ctr's report of a failed create stays).
            out.stdout = std::fs::read(outdir.join("out")).unwrap_or_default();
            out.stderr = std::fs::read(outdir.join("err")).unwrap_or_default();
        }
        let _ = std::fs::remove_dir_all(&outdir);
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
        self.inspect_ns(id, NAMESPACE)
    }

    pub fn inspect_ns(&self, id: &str, namespace: &str) -> Option<serde_json::Value> {
        let out = Command::new(cli_bin())
            .arg("--config")
            .arg(&self.config)
            .args(["inspect", id, "--namespace", namespace])
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

    /// `ctr task exec`; the command's output is captured through files in the
    /// container (read from the host via /proc/<pid>/root), because ctr's own output
    /// copy of a short-lived exec is sometimes empty under load.
    pub fn exec(&self, exec_id: &str, cmd: &str) -> Output {
        let base = format!("/tmp/.es-exec-{exec_id}");
        let wrapped = format!("( {cmd} ) >{base}.out 2>{base}.err; echo $? >{base}.rc");
        let out = ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            &self.id,
            "/bin/sh",
            "-c",
            &wrapped,
        ]);
        let root = format!("/proc/{}/root", self.pid());
        let read = |ext: &str| std::fs::read(format!("{root}{base}.{ext}")).unwrap_or_default();
        let rc = String::from_utf8_lossy(&read("rc")).trim().parse::<i32>();
        let Ok(rc) = rc else {
            return out; // the exec itself failed: ctr's own report says why
        };
        use std::os::unix::process::ExitStatusExt;
        Output {
            status: std::process::ExitStatus::from_raw(rc << 8),
            stdout: read("out"),
            stderr: read("err"),
        }
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

fn sh(c: &str) {
    let o = Command::new("sh").arg("-c").arg(c).output().unwrap();
    assert!(o.status.success(), "{c}: {}", text(&o));
}

/// A CNI bridge network (Debian's CNI plugins, run directly as ctr --cni would):
/// bridge `es-br<slot>`, subnet 203.0.113.<16*slot>/28, containers in namespaces
/// created here and joined with `ctr run --with-ns`.
pub struct CniNet {
    slot: u8,
    attached: std::sync::Mutex<Vec<(String, String)>>,
}

impl CniNet {
    pub fn new(slot: u8) -> CniNet {
        assert!(slot < 16);
        CniNet {
            slot,
            attached: Default::default(),
        }
    }

    fn conf(&self) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"es-test-{s}","type":"bridge","bridge":"es-br{s}","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","subnet":"203.0.113.{net}/28","dataDir":"/run/envoy-sidecar-test/cni","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            s = self.slot,
            net = 16 * self.slot as u32
        )
    }

    fn plugin(&self, cmd: &str, id: &str, netns: &str) -> Output {
        let mut c = Command::new("/usr/lib/cni/bridge")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(self.conf().as_bytes())
            .unwrap();
        c.wait_with_output().unwrap()
    }

    /// A new namespace on the bridge; returns (ctr option, container IP).
    pub fn attach(&self, id: &str) -> (String, String) {
        let name = format!("es-c-{id}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        // lo up, as CNI's loopback plugin (which ctr --cni also runs) would do.
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        let path = format!("/var/run/netns/{name}");
        let out = self.plugin("ADD", id, &path);
        assert!(out.status.success(), "CNI ADD: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ip = v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        self.attached.lock().unwrap().push((id.to_string(), name));
        (format!("--with-ns=network:{path}"), ip)
    }
}

impl Drop for CniNet {
    fn drop(&mut self) {
        for (id, name) in self.attached.lock().unwrap().drain(..) {
            let _ = self.plugin("DEL", &id, &format!("/var/run/netns/{name}"));
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("es-br{}", self.slot)])
            .output();
    }
}

/// "The router": a client in its own network namespace, connected to the host by a
/// veth pair (198.51.100.<4*slot>/30), as a router on another host would be. It has
/// no route to the container networks: only the host's address and NAT lead in.
pub struct Router {
    pub ns: Netns,
}

impl Router {
    pub fn new(slot: u8) -> Router {
        let ns = Netns::new(slot);
        sh(&format!("ip -n {} route del default", ns.name));
        Router { ns }
    }

    /// HTTPS GET / from the router to the host (HTTP/1.1 only: busybox httpd).
    pub fn https(&self, ca: &Path, name: &str, port: u16) -> String {
        let o = self.run(&format!(
            "curl -sS --http1.1 --max-time 5 --cacert {} --resolve {name}:{port}:{host} https://{name}:{port}/",
            ca.display(),
            host = self.host_ip()
        ));
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// The host's address as the router sees it.
    pub fn host_ip(&self) -> &str {
        &self.ns.host_ip
    }

    /// Run `cmd` inside the router's namespace.
    pub fn run(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "sh", "-c", cmd])
            .output()
            .unwrap()
    }

    /// TCP connect from the router; Ok(first line received) or Err(reason).
    pub fn tcp(&self, addr: &str, send: &str) -> Result<String, String> {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let o = self.run(&format!(
            "printf '{send}' | timeout 5 busybox nc -w 3 {host} {port}"
        ));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if out.is_empty() {
            Err(text(&o))
        } else {
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------------------------
// Driving the wrapper directly as runc, without containerd (tests/garden.rs,
// tests/nerdctl.rs): a plain runc bundle with a busybox rootfs, a private `--root`.

/// Like `can_run`, for tests that need root but not containerd: never starts it.
pub fn can_run_without_containerd(test: &str) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: CI must run as root");
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test}: needs root (runc, cgroups, network namespaces)"
        );
        return false;
    }
    true
}

/// Fill `dir` with the busybox root filesystem of the test image (`oci/rootfs.sh`).
pub fn busybox_rootfs(dir: &Path) {
    let out = Command::new(repo().join("oci/rootfs.sh"))
        .arg(dir)
        .output()
        .expect("run oci/rootfs.sh");
    assert!(out.status.success(), "oci/rootfs.sh: {}", text(&out));
}

/// `GET /` over TLS (openssl s_client, HTTP/1.0, no ALPN) to `addr`, verifying the
/// chain against `ca` and sending `server_name`; returns stdout and stderr.
pub fn openssl_get(addr: &str, ca: &Path, server_name: &str) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", addr])
        .args([
            "-servername",
            server_name,
            "-verify_return_error",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
    let o = child.wait_with_output().unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Retry `openssl_get` until the response contains `want` (Envoy starts after
/// `run --detach` returned); panics with the last output after 20 s.
pub fn openssl_wait_for(addr: &str, ca: &Path, server_name: &str, want: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let out = openssl_get(addr, ca, server_name);
        if out.contains(want) {
            return out;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{want:?} never served on {addr}:\n{out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// One container driven through the wrapper the way Garden's runtime plugin drives
/// runc: `--root <private dir> --log <file> --log-format json <command>`, with
/// `ENVOY_SIDECAR_CONFIG` set. The private root's parent is not named `runc`, so the
/// wrapper files everything under namespace `default`. On drop the container is
/// killed and force-deleted through the wrapper (releasing its sidecar), then with
/// runc itself, and the directory (root, bundle, logs) is removed.
pub struct DirectRun {
    pub id: String,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

impl DirectRun {
    /// Creates `<tmp>/es-direct-<name>-<pid>/{bundle,root}`; the bundle is empty.
    pub fn new(name: &str, id: &str, config: &Path) -> DirectRun {
        let dir = std::env::temp_dir().join(format!("es-direct-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bundle")).unwrap();
        DirectRun {
            id: id.into(),
            config: config.to_path_buf(),
            root: dir.join("root"),
            bundle: dir.join("bundle"),
            log: dir.join("runc-log.json"),
            pid_file: dir.join("init.pid"),
            dir,
        }
    }

    fn global(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "--log".into(),
            self.log.display().to_string(),
            "--log-format".into(),
            "json".into(),
        ]
    }

    /// The wrapper with the global flags, then `args`; stdin /dev/null, output captured.
    pub fn wrapper(&self, args: &[&str]) -> Output {
        Command::new(wrapper_bin())
            .args(self.global())
            .args(args)
            .env("ENVOY_SIDECAR_CONFIG", &self.config)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    /// The real runc with the same `--root` (and no wrapper in between).
    pub fn runc(&self, args: &[&str]) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    /// `run --detach --bundle B --pid-file P ID` through the wrapper. Without a
    /// terminal the container inherits runc's stdio, so it gets /dev/null and two
    /// files (Garden uses pipes it keeps reading): pipes would never reach EOF here.
    /// Returns the exit status and what runc (and the wrapper) wrote.
    pub fn run_detached(&self) -> (std::process::ExitStatus, String) {
        let out = self.dir.join("stdout");
        let err = self.dir.join("stderr");
        let bundle = self.bundle.display().to_string();
        let pid_file = self.pid_file.display().to_string();
        let status = Command::new(wrapper_bin())
            .args(self.global())
            .args([
                "run",
                "--detach",
                "--bundle",
                &bundle,
                "--pid-file",
                &pid_file,
            ])
            .arg(&self.id)
            .env("ENVOY_SIDECAR_CONFIG", &self.config)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        let said = format!(
            "stdout:\n{}\nstderr:\n{}\nrunc log:\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        (status, said)
    }

    /// The container's status as runc reports it (`None`: runc does not know it).
    pub fn status(&self) -> Option<String> {
        let out = self.runc(&["state", &self.id]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["status"].as_str().map(str::to_string)
    }

    /// The container's init pid from the pid file.
    pub fn pid(&self) -> u32 {
        std::fs::read_to_string(&self.pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", self.pid_file.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// Namespace `default` state of this container, as `envoy-sidecar inspect` shows it.
    pub fn inspect(&self) -> Option<serde_json::Value> {
        let out = Command::new(cli_bin())
            .arg("--config")
            .arg(&self.config)
            .args(["inspect", &self.id, "--namespace", "default"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("inspect prints JSON"))
    }
}

impl Drop for DirectRun {
    fn drop(&mut self) {
        if self.status().is_some() {
            self.wrapper(&["kill", &self.id, "KILL"]);
            for _ in 0..50 {
                if self.status().as_deref() != Some("running") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        // Also when runc no longer knows it: the wrapper then releases our state.
        self.wrapper(&["delete", "--force", &self.id]);
        if self.status().is_some() {
            self.runc(&["delete", "--force", &self.id]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------
// Footprint and clean-up helpers for the scale and fault suites (tests/scale.rs,
// tests/faults.rs): what the product holds on the host for one sandbox, and guards
// that take it all back whatever happens.

pub mod footprint {
    use std::ops::RangeInclusive;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::{Duration, Instant};

    use super::{IMAGE, Sandbox, cli_bin, text};

    /// `(host port, "container ip . container port")` of every element of the NAT map
    /// whose host port lies in `pool`.
    pub fn nat_in_pool(pool: &RangeInclusive<u16>) -> Vec<(u16, String)> {
        let o = Command::new("nft")
            .args(["list", "map", "ip", "envoy_sidecar", "ports"])
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&o.stdout);
        t.split([',', '{', '}', '\n'])
            .filter_map(|e| {
                // "tcp . 50000 : 203.0.113.82 . 61001"
                let f: Vec<&str> = e.split_whitespace().collect();
                if f.len() != 7 || f[1] != "." || f[3] != ":" {
                    return None;
                }
                let port: u16 = f[2].parse().ok()?;
                pool.contains(&port)
                    .then(|| (port, format!("{} . {}", f[4], f[6])))
            })
            .collect()
    }

    /// Delete NAT elements in `pool` (clean-up after a failed test only).
    pub fn nat_flush_pool(pool: &RangeInclusive<u16>) {
        for (port, to) in nat_in_pool(pool) {
            let _ = Command::new("nft")
                .arg(format!(
                    "delete element ip envoy_sidecar ports {{ tcp . {port} : {to} }}"
                ))
                .output();
        }
    }

    /// `(pid, command line)` of every process whose command line contains `needle`
    /// (this test process excepted).
    pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) {
                out.push((pid, cmd.trim_end().to_string()));
            }
        }
        out
    }

    /// Processes of this sandbox: supervisors (`--config <dir>/config.toml`), Envoys
    /// (`-c <dir>/state/...`), wrappers and hooks.
    pub fn our_processes(sb: &Sandbox) -> Vec<(i32, String)> {
        processes_mentioning(&format!("{}/", sb.dir.display()))
    }

    /// Files and directories under `dir`, recursively (0 if it does not exist).
    pub fn count_entries(dir: &Path) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += count_entries(&e.path());
            }
        }
        n
    }

    /// Container directories under `<state_dir>/<namespace>`.
    pub fn state_entries(sb: &Sandbox, namespace: &str) -> Vec<String> {
        std::fs::read_dir(sb.state_dir.join(namespace))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Cgroup directories `/sys/fs/cgroup/<hierarchy>/<namespace>/<id>` left for `ids`.
    pub fn cgroup_leftovers(namespace: &str, ids: &[String]) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for id in ids {
                let d = h.path().join(namespace).join(id);
                if d.is_dir() {
                    out.push(d);
                }
            }
        }
        out
    }

    /// Running `containerd-shim-runc-v2` processes of `namespace` whose container id
    /// starts with `id_prefix` (`""`: the whole namespace).
    pub fn shims(namespace: &str, id_prefix: &str) -> usize {
        processes_mentioning(&format!("-namespace {namespace} -id {id_prefix}"))
            .iter()
            .filter(|(_, c)| c.contains("containerd-shim"))
            .count()
    }

    /// `MemAvailable` from /proc/meminfo, in KiB.
    pub fn mem_available_kib() -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("MemAvailable in /proc/meminfo")
    }

    /// Alive and not a zombie.
    pub fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(false)
    }

    /// User + system CPU time of `pid` so far.
    pub fn cpu_time(pid: i32) -> Duration {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
            return Duration::ZERO;
        };
        // Fields after the command: state is field 3, utime 14, stime 15.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz.max(1))
    }

    /// `envoy-sidecar --config C gc ARGS`; panics unless it succeeds; returns stdout.
    pub fn gc(config: &Path, args: &[&str]) -> String {
        let o = Command::new(cli_bin())
            .arg("--config")
            .arg(config)
            .arg("gc")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "gc {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Poll `f` every 100 ms until it returns `Some`, at most `limit`.
    pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll `f` (every 200 ms, at most 10 s: asynchronous exits of shims and
    /// supervisors) until it returns nothing; returns what is still there.
    pub fn settled<T>(f: impl Fn() -> Vec<T>) -> Vec<T> {
        let start = Instant::now();
        loop {
            let v = f();
            if v.is_empty() || start.elapsed() > Duration::from_secs(10) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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

    /// A containerd task (and container) in any containerd/namespace, removed on drop
    /// with bounded waits: SIGKILL, `task rm` until it is stopped (60 s, then -f),
    /// `containers rm`.
    pub struct Task {
        pub id: String,
        pub address: String,
        pub namespace: String,
    }

    impl Task {
        /// `ctr run -d --runc-binary RUNTIME [--annotation K=V]... OPTS IMAGE ID CMD...`.
        /// The handle is returned whether or not the run succeeded (it cleans up).
        pub fn run(
            address: &str,
            namespace: &str,
            runtime: &Path,
            id: &str,
            annotations: &[(&str, &str)],
            opts: &[&str],
            cmd: &[&str],
        ) -> (Task, Output) {
            let t = Task {
                id: id.into(),
                address: address.into(),
                namespace: namespace.into(),
            };
            let mut a: Vec<String> = vec![
                "run".into(),
                "-d".into(),
                "--runc-binary".into(),
                runtime.display().to_string(),
            ];
            for (k, v) in annotations {
                a.push("--annotation".into());
                a.push(format!("{k}={v}"));
            }
            a.extend(opts.iter().map(|s| s.to_string()));
            a.push(IMAGE.into());
            a.push(id.into());
            a.extend(cmd.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = ctr_at(address, namespace, 120, &refs);
            (t, out)
        }

        pub fn ctr(&self, args: &[&str]) -> Output {
            ctr_at(&self.address, &self.namespace, 60, args)
        }

        /// The task's pid and status from `ctr task ls` (None: no task).
        pub fn status(&self) -> Option<(u32, String)> {
            let out = self.ctr(&["task", "ls"]);
            String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[0] == self.id).then(|| (f[1].parse().unwrap_or(0), f[2].into()))
            })
        }

        pub fn remove(&self) -> Result<(), String> {
            let gone = |o: &Output| {
                o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not found")
            };
            self.ctr(&["task", "kill", "-s", "SIGKILL", &self.id]);
            let start = Instant::now();
            loop {
                let o = self.ctr(&["task", "rm", &self.id]);
                if gone(&o) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    let f = self.ctr(&["task", "rm", "-f", &self.id]);
                    if !gone(&f) {
                        return Err(format!("task rm {}: {}", self.id, text(&f)));
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let start = Instant::now();
            loop {
                let o = self.ctr(&["containers", "rm", &self.id]);
                if gone(&o) {
                    return Ok(());
                }
                if start.elapsed() > Duration::from_secs(30) {
                    return Err(format!("containers rm {}: {}", self.id, text(&o)));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    impl Drop for Task {
        fn drop(&mut self) {
            if let Err(e) = self.remove() {
                eprintln!("clean-up: {e}");
            }
        }
    }

    /// Last line of defence for one sandbox, dropped after its containers and before
    /// the sandbox: kills what is left of its processes, runs `gc --grace 0`, and
    /// deletes NAT elements left in its pool.
    pub struct Scrub {
        pub config: PathBuf,
        pub dir: PathBuf,
        pub pool: RangeInclusive<u16>,
    }

    impl Scrub {
        pub fn new(sb: &Sandbox, pool: RangeInclusive<u16>) -> Scrub {
            Scrub {
                config: sb.config.clone(),
                dir: sb.dir.clone(),
                pool,
            }
        }
    }

    impl Drop for Scrub {
        fn drop(&mut self) {
            let _ = Command::new(cli_bin())
                .arg("--config")
                .arg(&self.config)
                .args(["gc", "--grace", "0"])
                .output();
            for (pid, cmd) in processes_mentioning(&format!("{}/", self.dir.display())) {
                if !cmd.starts_with("ctr ") {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            nat_flush_pool(&self.pool);
        }
    }
}
