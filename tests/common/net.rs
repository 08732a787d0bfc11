//! Networks for containers reached from outside, all from the test's [`Slot`]: a
//! network namespace on a veth ([`Netns`]), a CNI bridge ([`CniNet`]) and a "router"
//! in its own namespace ([`Router`]). Each holds its slot, and removes what it made on
//! drop; each first removes what a crashed holder of the slot left under its names.

use std::path::Path;
use std::process::{Command, Output};

use super::slots::Slot;
use super::util::{sh, text};

/// A network namespace with a veth to the host: the container's network for tests
/// that reach it from outside (one /30 of the slot's, see `slots.rs`).
pub struct Netns {
    pub name: String,
    pub path: String,
    pub host_ip: String,
    pub ip: String,
    k: u32,
    _slot: Slot,
}

impl Netns {
    /// IPv6 on the link too (the slot's [`Slot::link6`], no duplicate address
    /// detection); returns `(host end, namespace)`. No IPv6 default route: a router
    /// reaches the host's address alone, as with IPv4.
    pub fn enable_ipv6(&self) -> (String, String) {
        let (host6, ip6) = self._slot.link6(self.k);
        let (_, host_if, _, _) = self._slot.link(self.k);
        sh(&format!(
            "ip addr add {host6}/64 dev {host_if} nodad && \
             ip -n {n} addr add {ip6}/64 dev eth0 nodad",
            n = self.name
        ));
        (host6, ip6)
    }

    /// The slot's `k`-th link: `host_ip` on the host end, `ip` on `eth0` inside, which
    /// routes everything via the host.
    pub fn new(slot: &Slot, k: u32) -> Netns {
        let (name, host_if, host_ip, ip) = slot.link(k);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
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
            k,
            _slot: slot.clone(),
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

impl Slot {
    /// This slot's `k`-th [`Netns`].
    pub fn netns(&self, k: u32) -> Netns {
        Netns::new(self, k)
    }

    /// A [`Router`] on this slot's `k`-th link.
    pub fn router(&self, k: u32) -> Router {
        Router::new(self, k)
    }

    /// This slot's [`CniNet`].
    pub fn cni(&self) -> CniNet {
        CniNet::new(self)
    }

    /// This slot's [`CniNet`], dual-stack: IPv4 and IPv6 on the bridge (the CNI bridge
    /// plugin turns IPv6 forwarding on for it, as for IPv4).
    pub fn cni_dual(&self) -> CniNet {
        let mut n = CniNet::new(self);
        n.subnet6 = Some(self.bridge6());
        n
    }
}

const CNI_DATA: &str = "/run/envoy-sidecar-test/cni";

/// A CNI bridge network (Debian's CNI plugins, run directly as ctr --cni would): the
/// slot's bridge and /28, containers in namespaces created here and joined with
/// `ctr run --with-ns`.
pub struct CniNet {
    bridge: String,
    network: String,
    subnet: String,
    /// The IPv6 subnet of a dual-stack network.
    subnet6: Option<String>,
    prefix: String,
    attached: std::sync::Mutex<Vec<(String, String)>>,
    _slot: Slot,
}

impl CniNet {
    pub fn new(slot: &Slot) -> CniNet {
        let (bridge, network, subnet) = slot.bridge();
        // What a crashed holder of the slot left: the bridge, its address leases.
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        let _ = std::fs::remove_dir_all(Path::new(CNI_DATA).join(&network));
        CniNet {
            bridge,
            network,
            subnet,
            subnet6: None,
            prefix: slot.name(),
            attached: Default::default(),
            _slot: slot.clone(),
        }
    }

    fn conf(&self) -> String {
        let ipam = match &self.subnet6 {
            None => format!(
                r#"{{"type":"host-local","subnet":"{}","dataDir":"{CNI_DATA}","routes":[{{"dst":"0.0.0.0/0"}}]}}"#,
                self.subnet
            ),
            Some(v6) => format!(
                r#"{{"type":"host-local","ranges":[[{{"subnet":"{}"}}],[{{"subnet":"{v6}"}}]],"dataDir":"{CNI_DATA}","routes":[{{"dst":"0.0.0.0/0"}},{{"dst":"::/0"}}]}}"#,
                self.subnet
            ),
        };
        format!(
            r#"{{"cniVersion":"1.0.0","name":"{}","type":"bridge","bridge":"{}","isGateway":true,"ipMasq":false,"ipam":{ipam}}}"#,
            self.network, self.bridge
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
        let (opt, ip, _) = self.attach_dual(id);
        (opt, ip)
    }

    /// [`CniNet::attach`], also returning the IPv6 address of a dual-stack network.
    pub fn attach_dual(&self, id: &str) -> (String, String, Option<String>) {
        let name = format!("{}-{id}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        // lo up, as CNI's loopback plugin (which ctr --cni also runs) would do.
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        let path = format!("/var/run/netns/{name}");
        let out = self.plugin("ADD", id, &path);
        assert!(out.status.success(), "CNI ADD: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ips: Vec<String> = v["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                a["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let ip = ips.iter().find(|a| !a.contains(':')).unwrap().clone();
        let ip6 = ips.iter().find(|a| a.contains(':')).cloned();
        assert_eq!(
            ip6.is_some(),
            self.subnet6.is_some(),
            "CNI ADD gave {ips:?}"
        );
        self.attached.lock().unwrap().push((id.to_string(), name));
        (format!("--with-ns=network:{path}"), ip, ip6)
    }
}

impl Drop for CniNet {
    fn drop(&mut self) {
        for (id, name) in self.attached.lock().unwrap().drain(..) {
            let _ = self.plugin("DEL", &id, &format!("/var/run/netns/{name}"));
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        // host-local keeps a directory per network (a lock, the last address).
        let _ = std::fs::remove_dir_all(Path::new(CNI_DATA).join(&self.network));
    }
}

/// "The router": a client in its own network namespace, connected to the host by a
/// veth pair (one of the slot's /30s), as a router on another host would be. It has
/// no route to the container networks: only the host's address and NAT lead in.
pub struct Router {
    pub ns: Netns,
}

impl Router {
    pub fn new(slot: &Slot, k: u32) -> Router {
        let ns = Netns::new(slot, k);
        sh(&format!("ip -n {} route del default", ns.name));
        Router { ns }
    }

    /// HTTPS GET / from the router to the host (HTTP/1.1 only: busybox httpd).
    pub fn https(&self, ca: &Path, name: &str, port: u16) -> String {
        self.https_via(ca, name, port, self.host_ip())
    }

    /// HTTPS GET / from the router to `host:port` as `name`.
    pub fn https_via(&self, ca: &Path, name: &str, port: u16, host: &str) -> String {
        let o = self.run(&format!(
            "curl -sS --http1.1 --max-time 5 --cacert {} --resolve {name}:{port}:{} https://{name}:{port}/",
            ca.display(),
            bracketed(host),
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

    /// IPv6 on the router's link; returns the host's IPv6 address as the router sees it.
    pub fn enable_ipv6(&self) -> String {
        self.ns.enable_ipv6().0
    }

    /// Run `cmd` inside the router's namespace.
    pub fn run(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "sh", "-c", cmd])
            .output()
            .unwrap()
    }

    /// TCP connect from the router; Ok(first line received) or Err(reason). `addr` is
    /// `host:port`, an IPv6 host in brackets.
    pub fn tcp(&self, addr: &str, send: &str) -> Result<String, String> {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let host = host.trim_start_matches('[').trim_end_matches(']');
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

/// An IPv6 address in brackets (for `host:port` and curl's `--resolve`); IPv4 as is.
pub fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The product's NAT map (`nft list map ip envoy_sidecar ports`).
pub fn nft_map() -> String {
    let o = Command::new("nft")
        .args(["list", "map", "ip", "envoy_sidecar", "ports"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).to_string()
}
