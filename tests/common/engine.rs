//! What each engine does to a container's network, in its own order (tests/network.rs):
//! `ctr run --cni`'s CNI configuration ([`CtrCni`]), Garden's networker configuring a
//! namespace after `run --detach` ([`BareNetns`]), and what the tests read back — TLS
//! from the router with the served certificate, `status`, `serve-metrics`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;

use super::containerd::{NAMESPACE, address};
use super::net::Router;
use super::slots::Slot;
use super::util::{ChildGuard, cli, sh, text};
use super::wait::poll;

/// ctr's go-cni takes plugins from here (go-cni `DefaultCNIDir`)...
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// ... and the first file, sorted, of this directory as the network (`DefaultNetDir`,
/// `WithDefaultConf`: at most `DefaultMaxConfNum` = 1 network).
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Debian's CNI plugins.
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
/// libcni's result cache: `<network>-<container id>-<ifname>` per attachment.
pub const CNI_CACHE: &str = "/var/lib/cni/results";
/// Our network for ctr: named to sort before every other file there (podman's
/// `87-podman-bridge.conflist`).
pub const CTR_CONFLIST: &str = "00-envoy-sidecar-test.conflist";
/// Held while a test's conflist is installed: the first file of the directory is the
/// network of every `ctr run --cni` on the host, so one test at a time.
pub const CTR_CNI_LOCK: &str = "/tmp/envoy-sidecar-test-ctr-cni.lock";
/// What the holder created (one path a line), so that the next holder removes exactly
/// that after a crash.
const CTR_CNI_MADE: &str = "/run/envoy-sidecar-test/ctr-cni-made";
/// host-local's leases of our ctr networks (`<dir>/<network>/<ip>` = container id).
const CTR_CNI_DATA: &str = "/run/envoy-sidecar-test/cni-ctr";

/// The first plugin of our network's chain: it holds ctr's CNI ADD for
/// [`CNI_DELAY`] before the bridge plugin configures the address, so the address
/// comes well after `runc create` (and the supervisor's start) every time, as with a
/// slow CNI plugin — not only when ctr happens to be slower than the supervisor.
pub const DELAY_PLUGIN: &str = "es-test-cni-delay";
pub const CNI_DELAY: Duration = Duration::from_secs(1);

/// What [`CtrCni`] made, to be removed exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Made {
    /// A file or symlink.
    File(PathBuf),
    /// A directory, removed if empty.
    Dir(PathBuf),
    /// A directory with everything in it (the plugin directory it filled itself).
    Tree(PathBuf),
}

impl Made {
    fn line(&self) -> String {
        match self {
            Made::File(p) => format!("file {}\n", p.display()),
            Made::Dir(p) => format!("dir {}\n", p.display()),
            Made::Tree(p) => format!("tree {}\n", p.display()),
        }
    }

    fn parse(l: &str) -> Option<Made> {
        let (kind, p) = l.split_once(' ')?;
        let p = PathBuf::from(p);
        match kind {
            "file" => Some(Made::File(p)),
            "dir" => Some(Made::Dir(p)),
            "tree" => Some(Made::Tree(p)),
            _ => None,
        }
    }

    fn remove(&self) {
        let _ = match self {
            Made::File(p) => std::fs::remove_file(p),
            Made::Dir(p) => std::fs::remove_dir(p),
            Made::Tree(p) => std::fs::remove_dir_all(p),
        };
    }
}

/// The CNI configuration `ctr run --cni` (containerd 1.6, go-cni 1.1) picks up: the
/// slot's bridge and /28 as the first conflist in [`CNI_CONF_DIR`], behind
/// [`DELAY_PLUGIN`]; the plugins in [`CNI_BIN_DIR`] (when there is none: a directory
/// of symlinks to Debian's, plus ours). ctr attaches the task's netns
/// (`/proc/<pid>/ns/net`) as container id `<namespace>-<id>` between `runc create`
/// and `runc start`; with `-d` it never detaches it: [`CtrCni::del`] is what ctr does
/// for a foreground run (CNI DEL with no netns). On drop everything this made is
/// removed: leases left (DEL), libcni's cached results, the conflist, the plugins,
/// the bridge.
pub struct CtrCni {
    pub network: String,
    pub bridge: String,
    pub subnet: String,
    conf: PathBuf,
    made: Vec<Made>,
    _slot: Slot,
    /// Last: released after everything is removed.
    _lock: Flock<File>,
}

impl CtrCni {
    pub fn install(slot: &Slot) -> CtrCni {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(CTR_CNI_LOCK)
            .unwrap_or_else(|e| panic!("{CTR_CNI_LOCK}: {e}"));
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {CTR_CNI_LOCK}: {e}"));
        // A crashed holder's files (we hold the lock: no one else's).
        for m in made_list().iter().rev() {
            m.remove();
        }
        let _ = std::fs::remove_file(CTR_CNI_MADE);
        let (bridge, network, subnet) = slot.bridge();
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        let _ = std::fs::remove_dir_all(Path::new(CTR_CNI_DATA).join(&network));
        let mut cni = CtrCni {
            network,
            bridge,
            subnet,
            conf: Path::new(CNI_CONF_DIR).join(CTR_CONFLIST),
            made: Vec::new(),
            _slot: slot.clone(),
            _lock: lock,
        };
        cni.install_plugins();
        std::fs::create_dir_all(CNI_CONF_DIR).unwrap();
        let conf = cni.conf.clone();
        cni.note_made(Made::File(conf.clone()));
        let list = format!(
            r#"{{"cniVersion":"1.0.0","name":"{}","plugins":[{{"type":"{DELAY_PLUGIN}"}},{}]}}"#,
            cni.network,
            cni.plugin_conf_body()
        );
        std::fs::write(&conf, list).unwrap();
        // go-cni: ConfFiles(dir, [.conf .conflist .json]), sort.Strings, the first.
        let mut files: Vec<String> = std::fs::read_dir(CNI_CONF_DIR)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().display().to_string())
            .filter(|p| {
                [".conf", ".conflist", ".json"]
                    .iter()
                    .any(|x| p.ends_with(x))
            })
            .collect();
        files.sort();
        assert_eq!(
            files.first().map(String::as_str),
            Some(conf.to_str().unwrap()),
            "ctr --cni would not pick our network (first of {files:?})"
        );
        cni
    }

    /// Debian's plugins and ours where go-cni looks: a directory of our own when there
    /// is none, else our plugin added to the one there is.
    fn install_plugins(&mut self) {
        let bin = Path::new(CNI_BIN_DIR);
        let dir = if std::fs::symlink_metadata(bin).is_err() {
            let parent = bin.parent().unwrap();
            if !parent.exists() {
                self.note_made(Made::Dir(parent.to_path_buf()));
                std::fs::create_dir(parent).unwrap();
            }
            self.note_made(Made::Tree(bin.to_path_buf()));
            std::fs::create_dir(bin).unwrap();
            for e in std::fs::read_dir(CNI_PLUGINS).unwrap().flatten() {
                std::os::unix::fs::symlink(e.path(), bin.join(e.file_name())).unwrap();
            }
            bin.to_path_buf()
        } else {
            let dir = std::fs::canonicalize(bin).unwrap();
            self.note_made(Made::File(dir.join(DELAY_PLUGIN)));
            dir
        };
        let secs = CNI_DELAY.as_secs_f64();
        super::util::write_script(
            &dir.join(DELAY_PLUGIN),
            &format!(
                "#!/bin/sh\n# envoy-sidecar tests (tests/common/engine.rs): holds CNI ADD {secs} s.\n\
                 case \"$CNI_COMMAND\" in\n\
                 ADD) cat >/dev/null; sleep {secs}; printf '{{\"cniVersion\":\"1.0.0\"}}' ;;\n\
                 VERSION) printf '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}}' ;;\n\
                 esac\nexit 0\n"
            ),
        );
        for p in ["bridge", "host-local", DELAY_PLUGIN] {
            assert!(dir.join(p).exists(), "{} has no {p} plugin", dir.display());
        }
    }

    /// Record `m` as ours before making it (a crash in between leaves nothing
    /// unlisted).
    fn note_made(&mut self, m: Made) {
        self.made.push(m);
        let list: String = self.made.iter().map(Made::line).collect();
        std::fs::write(CTR_CNI_MADE, list).unwrap();
    }

    /// The bridge plugin's configuration (without the list's name and version).
    fn plugin_conf_body(&self) -> String {
        format!(
            r#"{{"type":"bridge","bridge":"{}","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","subnet":"{}","dataDir":"{CTR_CNI_DATA}","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            self.bridge, self.subnet
        )
    }

    /// The CNI container id ctr uses for container `id` (`fullID`: namespace-id).
    pub fn cni_id(id: &str) -> String {
        format!("{NAMESPACE}-{id}")
    }

    /// host-local's leases of this network: `(ip, CNI container id)`.
    pub fn leases(&self) -> Vec<(String, String)> {
        let dir = Path::new(CTR_CNI_DATA).join(&self.network);
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.parse::<std::net::Ipv4Addr>().ok()?;
                let owner = std::fs::read_to_string(e.path()).ok()?;
                Some((name, owner.lines().next()?.trim().to_string()))
            })
            .collect()
    }

    /// The address host-local leased to ctr's container `id`.
    pub fn lease_of(&self, id: &str) -> Option<String> {
        let cid = CtrCni::cni_id(id);
        self.leases()
            .into_iter()
            .find_map(|(ip, owner)| (owner == cid).then_some(ip))
    }

    /// libcni's cached results for ctr's container `id`.
    pub fn cache_files(&self, id: &str) -> Vec<PathBuf> {
        self.cache_files_with(&format!("{}-{}-", self.network, CtrCni::cni_id(id)))
    }

    fn cache_files_with(&self, prefix: &str) -> Vec<PathBuf> {
        std::fs::read_dir(CNI_CACHE)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect()
    }

    /// CNI DEL for ctr's container `id` as ctr's foreground run does it
    /// (`network.Remove(ctx, fullID, "")`: no netns, the task is gone), and libcni's
    /// cached result with it. (Our delay plugin has nothing to delete.)
    pub fn del(&self, id: &str) -> Output {
        let out = self.plugin("DEL", &CtrCni::cni_id(id));
        for f in self.cache_files(id) {
            let _ = std::fs::remove_file(f);
        }
        out
    }

    fn plugin(&self, cmd: &str, cid: &str) -> Output {
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"{}",{}"#,
            self.network,
            &self.plugin_conf_body()[1..]
        );
        let mut c = Command::new(Path::new(CNI_PLUGINS).join("bridge"))
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", "")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PLUGINS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    }
}

impl Drop for CtrCni {
    fn drop(&mut self) {
        for (_, cid) in self.leases() {
            let _ = self.plugin("DEL", &cid);
        }
        for f in self.cache_files_with(&format!("{}-", self.network)) {
            let _ = std::fs::remove_file(f);
        }
        for m in self.made.iter().rev() {
            m.remove();
        }
        let _ = std::fs::remove_file(CTR_CNI_MADE);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(Path::new(CTR_CNI_DATA).join(&self.network));
    }
}

fn made_list() -> Vec<Made> {
    std::fs::read_to_string(CTR_CNI_MADE)
        .unwrap_or_default()
        .lines()
        .filter_map(Made::parse)
        .collect()
}

/// A network namespace with only `lo` (up): a container's netns as Garden's networker
/// finds it after `run --detach` (the test then adds the veth and the address). Named
/// after the slot's `k`-th link; deleting it on drop destroys the veth with it.
pub struct BareNetns {
    pub name: String,
    pub path: String,
    pub host_if: String,
    _slot: Slot,
}

impl BareNetns {
    pub fn new(slot: &Slot, k: u32) -> BareNetns {
        let (name, host_if, _, _) = slot.link(k);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        BareNetns {
            path: format!("/var/run/netns/{name}"),
            name,
            host_if,
            _slot: slot.clone(),
        }
    }

    /// The networker's veth: `eth0` inside, the host end up; no address yet.
    pub fn add_veth(&self) {
        let (n, h) = (&self.name, &self.host_if);
        sh(&format!(
            "ip link add {h} type veth peer name eth0 netns {n} && ip link set {h} up && \
             ip -n {n} link set eth0 up"
        ));
    }

    /// `ip`/30 on `eth0` (after `host_ip`/30 on the host end), default route via the host.
    pub fn add_address(&self, host_ip: &str, ip: &str) {
        let (n, h) = (&self.name, &self.host_if);
        sh(&format!(
            "ip addr add {host_ip}/30 dev {h} && ip -n {n} addr add {ip}/30 dev eth0 && \
             ip -n {n} route replace default via {host_ip}"
        ));
    }

    /// `ip6`/64 on `eth0` (after `host_ip6`/64 on the host end, both without duplicate
    /// address detection), IPv6 default route via the host.
    pub fn add_address6(&self, host_ip6: &str, ip6: &str) {
        let (n, h) = (&self.name, &self.host_if);
        sh(&format!(
            "ip addr add {host_ip6}/64 dev {h} nodad && ip -n {n} addr add {ip6}/64 dev eth0 nodad && \
             ip -n {n} -6 route replace default via {host_ip6}"
        ));
    }

    /// Take `ip` off `eth0` (its routes go with it), and `host_ip` off the host end.
    pub fn del_address(&self, host_ip: &str, ip: &str) {
        let (n, h) = (&self.name, &self.host_if);
        sh(&format!(
            "ip -n {n} addr del {ip}/30 dev eth0 && ip addr del {host_ip}/30 dev {h}"
        ));
    }
}

impl Drop for BareNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// One HTTPS GET / with `openssl s_client` from the router to `host:port`, verifying
/// against `ca` with SNI `sni`, printing the server's chain: stdout and stderr.
pub fn router_s_client(router: &Router, ca: &Path, sni: &str, host: &str, port: u16) -> String {
    let o = router.run(&format!(
        "printf 'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' | timeout 5 openssl s_client \
         -connect {}:{port} -servername {sni} -CAfile {} -verify_return_error -ign_eof \
         -showcerts",
        super::net::bracketed(host),
        ca.display()
    ));
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The handshake verified against the CA and the app answered.
pub fn served_verified(s_client_out: &str, want: &str) -> bool {
    s_client_out.contains("Verify return code: 0 (ok)") && s_client_out.contains(want)
}

/// `openssl x509 -noout -text -serial` of the first certificate in `s_client_out`
/// (the leaf), if there is one.
pub fn first_cert_text(s_client_out: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let begin = s_client_out.find("-----BEGIN CERTIFICATE-----")?;
    let end = s_client_out[begin..].find(END)? + begin + END.len();
    let mut c = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(&s_client_out.as_bytes()[begin..end])
        .unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout).ok()
}

/// The `serial=` line of a certificate's text.
pub fn serial_of(cert_text: &str) -> Option<String> {
    cert_text
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .map(str::to_string)
}

/// The IP addresses among a certificate's subject alternative names.
pub fn ip_sans(cert_text: &str) -> Vec<String> {
    cert_text
        .split([',', '\n'])
        .filter_map(|s| s.trim().strip_prefix("IP Address:"))
        .map(str::to_string)
        .collect()
}

/// `envoy-sidecar --config C status --namespace NS --json`: the rows.
pub fn status_rows(config: &Path, namespace: &str) -> Vec<Value> {
    let o = cli(config)
        .args(["status", "--namespace", namespace, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "status --json: {}", text(&o));
    match serde_json::from_slice(&o.stdout) {
        Ok(Value::Array(rows)) => rows,
        _ => panic!("status --json is not a JSON array: {}", text(&o)),
    }
}

/// The status row of `namespace/id`, if `status` lists it.
pub fn status_row(config: &Path, namespace: &str, id: &str) -> Option<Value> {
    status_rows(config, namespace)
        .into_iter()
        .find(|r| r["id"] == id)
}

/// The line of `namespace/id` in `status`'s table (None: not listed).
pub fn status_line(config: &Path, namespace: &str, id: &str) -> Option<String> {
    let o = cli(config)
        .args(["status", "--namespace", namespace])
        .output()
        .unwrap();
    assert!(o.status.success(), "status: {}", text(&o));
    let want = format!("{namespace}/{id} ");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.starts_with(&want))
        .map(str::to_string)
}

/// `envoy-sidecar serve-metrics` on 127.0.0.1:`port` against the private containerd,
/// killed on drop.
pub struct MetricsServer {
    _child: ChildGuard,
    pub addr: String,
}

impl MetricsServer {
    /// Started and answering (waits up to 10 s).
    pub fn start(config: &Path, port: u16) -> MetricsServer {
        let addr = format!("127.0.0.1:{port}");
        let child = cli(config)
            .args(["serve-metrics", "--listen", &addr, "--address", &address()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let m = MetricsServer {
            _child: ChildGuard(child),
            addr,
        };
        poll(Duration::from_secs(10), Duration::from_millis(50), || {
            m.scrape()
        })
        .unwrap_or_else(|e| panic!("serve-metrics on {}: {e}", m.addr));
        m
    }

    /// `GET /metrics`: the body.
    pub fn scrape(&self) -> Result<String, String> {
        let mut s = std::net::TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        match resp.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                Ok(body.to_string())
            }
            _ => Err(format!("not a 200 answer: {resp}")),
        }
    }
}

/// The value of the sample `name{labels}` in Prometheus text (labels as printed).
pub fn sample(metrics: &str, name: &str, labels: &str) -> Option<String> {
    let key = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().to_string())
}
