//! A stand-in for nerdctl v2.3.5 (not installable here: no Debian package, no Go
//! module access), faithful where the product can tell the difference:
//!
//! - the spec nerdctl has containerd write (`oci/fixtures/nerdctl-config.json`, with
//!   what v2.3.5 adds: global flags before `internal` in the hook args, the hook env's
//!   second `PATH=` entry with `/usr/sbin:/sbin` appended, `nerdctl/domainname`, the
//!   `net.ipv4.ip_unprivileged_port_start=0` sysctl, `nerdctl/state-dir` pointing at a
//!   real data store with `network-config.json`, `resolv.conf`, `hosts`, `hostname`);
//! - its OCI hook (`nerdctl internal oci-hook createRuntime|postStop`), a shell script
//!   that does what nerdctl's CNI bridge + portmap set-up does: a veth from a bridge
//!   into `/proc/<pid>/ns/net` with an address and a default route, and portmap-style
//!   DNAT for `-p` (`-p tcp --dport H -j DNAT --to-destination IP:C` in a chain of its
//!   own, jumped to from PREROUTING and OUTPUT for local destinations); postStop tears
//!   both down. It reads `-p` from `nerdctl/ports` (nerdctl <= 2.1.2) or else from
//!   `network-config.json` (>= 2.1.3), as nerdctl does;
//! - the runtime driven as containerd's runc shim drives it: `--root
//!   <dir>/runc/default --log <bundle>/log.json --log-format json`, `create`, `start`,
//!   numeric `kill <id> <signal>`, `delete`.
//!
//! Everything it makes is named after the test's slot (bridge `es-s<i>br`, veths
//! `es-s<i>c<8 id chars>`, chains `ES-S<i>-<8 id chars>`) and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::common::*;

/// nerdctl's global flags as `GlobalFlags` (cmd/nerdctl/helpers/cobra.go) passes the
/// ones set on the command line: before `internal oci-hook <event>`.
pub const GLOBAL_FLAGS: [&str; 2] = ["--namespace=default", "--data-root=/var/lib/nerdctl"];

/// How the container's `-p` reaches the product.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PortsVia {
    /// `network-config.json` in the state dir, no label (nerdctl >= 2.1.3).
    File,
    /// The `nerdctl/ports` label (nerdctl <= 2.1.2); no file.
    Label,
}

/// One nerdctl "installation": its data root, its OCI hook and the bridge network.
pub struct Nerdctl {
    pub dir: TempDir,
    pub hook: PathBuf,
    /// One line per hook call: `<event> <args...>`.
    pub log: PathBuf,
    pub bridge: String,
    /// The bridge's address (the containers' gateway).
    pub gateway: String,
    slot_name: String,
    subnet_base: u32,
    bridge6: String,
}

impl Nerdctl {
    pub fn new(slot: &Slot) -> Nerdctl {
        let dir = TempDir::new("es-nerdctl-data");
        let (bridge, _, subnet) = slot.bridge();
        let base: u32 = subnet
            .trim_start_matches("203.0.113.")
            .trim_end_matches("/28")
            .parse()
            .unwrap();
        let slot_name = slot.name();
        let n = Nerdctl {
            hook: dir.join("nerdctl"),
            log: dir.join("hooks.log"),
            gateway: format!("203.0.113.{}", base + 1),
            bridge,
            dir,
            slot_name,
            subnet_base: base,
            bridge6: slot.bridge6(),
        };
        n.scrub();
        write_script(&n.hook, &n.script());
        n
    }

    /// The `k`-th container address on the bridge (k >= 1; the gateway is 1).
    pub fn address(&self, k: u32) -> String {
        assert!((1..13).contains(&k));
        format!("203.0.113.{}", self.subnet_base + 1 + k)
    }

    /// The bridge's IPv6 address (the slot's bridge /64, `::1`).
    pub fn gateway6(&self) -> String {
        self.bridge6.replace("::/64", "::1")
    }

    /// The `k`-th container's IPv6 address on the bridge.
    pub fn address6(&self, k: u32) -> String {
        self.bridge6.replace("::/64", &format!("::{:x}", 0x10 + k))
    }

    /// Give the container IPv6 too (before `create`), as a dual-stack CNI network does.
    pub fn dual_stack(&self, c: &NerdctlContainer, k: u32) -> String {
        let ip6 = self.address6(k);
        std::fs::write(c.state_dir.join("standin-ip6"), &ip6).unwrap();
        ip6
    }

    fn chain_prefix(&self) -> String {
        self.slot_name.to_uppercase()
    }

    /// What a crashed holder of the slot left: its chains and its bridge.
    fn scrub(&self) {
        let p = self.chain_prefix();
        sh(&format!(
            "for x in iptables ip6tables; do \
             for t in PREROUTING OUTPUT; do \
               $x -t nat -S $t 2>/dev/null | grep -- '-j {p}-' | sed 's/^-A/-D/' | \
                 while read -r r; do eval $x -t nat $r; done; \
             done; \
             $x -t nat -S 2>/dev/null | grep '^-N {p}-' | cut -d' ' -f2 | \
               while read -r c; do $x -t nat -F $c; $x -t nat -X $c; done; \
             done; \
             ip link del {b} 2>/dev/null; true",
            b = self.bridge
        ));
    }

    fn script(&self) -> String {
        format!(
            r#"#!/bin/sh
# Stand-in for `nerdctl [global flags] internal oci-hook <event>` (tests/nerdctl/standin.rs).
for a in "$@"; do ev="$a"; done
echo "$ev $0 $*" >> {log}
st=$(cat)
pid=$(printf '%s' "$st" | jq -r '.pid // empty')
id=$(printf '%s' "$st" | jq -r .id)
dir=$(printf '%s' "$st" | jq -r '.annotations["nerdctl/state-dir"]')
nets=$(printf '%s' "$st" | jq -r '.annotations["nerdctl/networks"] // "[\"bridge\"]"')
label=$(printf '%s' "$st" | jq -c '.annotations["nerdctl/ports"] // empty')
short=$(printf '%s' "$id" | cut -c1-8)
hostif={slot}c$short
chain={chain}-$short
teardown() {{
    [ -e "$dir/standin-net" ] || return 0
    for x in iptables ip6tables; do
        for t in PREROUTING OUTPUT; do
            $x -t nat -D $t -m addrtype --dst-type LOCAL -j $chain 2>/dev/null
        done
        $x -t nat -F $chain 2>/dev/null; $x -t nat -X $chain 2>/dev/null
    done
    ip link del $hostif 2>/dev/null
    rm -f "$dir/standin-net"
}}
case "$ev" in
createRuntime)
    if [ -e "$dir/standin-fail" ]; then echo "nerdctl: failed to set up CNI (stand-in told to)" >&2; exit 1; fi
    case "$nets" in *'"bridge"'*) ;; *) exit 0 ;; esac
    set -e
    ip=$(cat "$dir/standin-ip")
    if ! ip link show {br} >/dev/null 2>&1; then
        ip link add {br} type bridge && ip addr add {gw}/28 dev {br} && ip link set {br} up
    fi
    ip link add $hostif type veth peer name t$short
    ip link set t$short netns $pid
    ip link set $hostif master {br} up
    nsenter --net=/proc/$pid/ns/net sh -c "ip link set t$short name eth0 && ip addr add $ip/28 dev eth0 && ip link set eth0 up && ip link set lo up && ip route add default via {gw}"
    echo "$hostif $chain" > "$dir/standin-net"
    ip6=""
    if [ -e "$dir/standin-ip6" ]; then
        # The bridge plugin's IPv6: forwarding on, an address on the bridge (no DAD).
        ip6=$(cat "$dir/standin-ip6")
        sysctl -qw net.ipv6.conf.all.forwarding=1
        ip -6 addr show dev {br} | grep -q '{gw6}/' || ip -6 addr add {gw6}/64 dev {br} nodad
        nsenter --net=/proc/$pid/ns/net sh -c "ip -6 addr add $ip6/64 dev eth0 nodad && ip -6 route add default via {gw6}"
        ip6tables -t nat -N $chain
    fi
    iptables -t nat -N $chain
    if [ -n "$label" ]; then maps=$(printf '%s' "$label" | jq -c 'fromjson'); else maps=$(jq -c '.portMappings // []' "$dir/network-config.json"); fi
    printf '%s' "$maps" | jq -r '.[] | select((.Protocol // "tcp") | ascii_downcase == "tcp") | "\(.HostPort) \(.ContainerPort) \(.HostIP // "")"' |
    while read -r h c hip; do
        d=""; if [ -n "$hip" ] && [ "$hip" != 0.0.0.0 ]; then d="-d $hip"; fi
        iptables -t nat -A $chain -p tcp $d -m tcp --dport $h -j DNAT --to-destination $ip:$c
        if [ -n "$ip6" ]; then
            ip6tables -t nat -A $chain -p tcp -m tcp --dport $h -j DNAT --to-destination "[$ip6]:$c"
        fi
    done
    for t in PREROUTING OUTPUT; do
        iptables -t nat -A $t -m addrtype --dst-type LOCAL -j $chain
        if [ -n "$ip6" ]; then ip6tables -t nat -A $t -m addrtype --dst-type LOCAL -j $chain; fi
    done
    ;;
postStop)
    teardown
    ;;
esac
"#,
            log = self.log.display(),
            slot = self.slot_name,
            chain = self.chain_prefix(),
            br = self.bridge,
            gw = self.gateway,
            gw6 = self.gateway6(),
        )
    }

    /// The hook calls so far, one `<event> <args...>` per line.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The DNAT rules of this stand-in's chains (`iptables -S` lines).
    pub fn dnat_rules(&self) -> Vec<String> {
        let p = format!("-A {}-", self.chain_prefix());
        ["iptables", "ip6tables"]
            .iter()
            .flat_map(|x| {
                let o = Command::new(x).args(["-t", "nat", "-S"]).output().unwrap();
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with(&p))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Packets the stand-in's `iptables` (or `ip6tables`) DNAT rules for host port
    /// `port` have matched: proof that a connection went through portmap's DNAT (the
    /// first packet of each connection; later ones follow conntrack).
    pub fn dnat_hits(&self, tool: &str, port: u16) -> u64 {
        let o = Command::new(tool)
            .args(["-t", "nat", "-S", "-v"])
            .output()
            .unwrap();
        let p = format!("-A {}-", self.chain_prefix());
        let dport = format!("--dport {port} ");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with(&p) && l.contains(&dport) && l.contains("-j DNAT"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "-c")?;
                w.get(i + 1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// This stand-in's veths on the host.
    pub fn veths(&self) -> Vec<String> {
        let o = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let p = format!("{}c", self.slot_name);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with(&p))
            .collect()
    }

    /// A container as `nerdctl run -d --runtime <wrapper> [-p host:container ...]
    /// --network <network>` would create it, with the `k`-th bridge address (its
    /// `spec` may be edited before `create`).
    pub fn container(
        &self,
        sb: &Sandbox,
        id: &str,
        k: u32,
        published: &[(u16, u16)],
        via: PortsVia,
        network: &str,
    ) -> NerdctlContainer {
        assert_eq!(id.len(), 64, "nerdctl ids are 64 hex digits");
        let run = DirectRun::new("nerdctl", id, &sb.config);
        let mut run = run;
        // containerd's runc root for namespace `default`: the wrapper files it there.
        run.root = run.dir.join("runc/default");
        run.log = run.bundle.join("log.json");
        busybox_rootfs(&run.bundle.join("rootfs"));

        let data = self.dir.join("1935db59");
        let state_dir = data.join("containers/default").join(id);
        let hosts_dir = data.join("etchosts/default").join(id);
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::create_dir_all(&hosts_dir).unwrap();
        std::fs::write(state_dir.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        std::fs::write(state_dir.join("hostname"), format!("{}\n", &id[..12])).unwrap();
        std::fs::write(hosts_dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(state_dir.join("standin-ip"), self.address(k)).unwrap();
        let mappings: Vec<Value> = published
            .iter()
            .map(|(h, c)| json!({"HostPort": h, "ContainerPort": c, "Protocol": "tcp", "HostIP": ""}))
            .collect();
        if via == PortsVia::File {
            // nerdctl v2.3 `networkstore`: `{}` without -p.
            let body = if mappings.is_empty() {
                json!({})
            } else {
                json!({ "portMappings": mappings })
            };
            std::fs::write(state_dir.join("network-config.json"), body.to_string()).unwrap();
        }

        let fixture: Value = serde_json::from_slice(
            &std::fs::read(repo().join("oci/fixtures/nerdctl-config.json")).unwrap(),
        )
        .unwrap();
        let mut spec = fixture;
        let hook = self.hook.display().to_string();
        for (stage, event) in [("createRuntime", "createRuntime"), ("poststop", "postStop")] {
            let h = &mut spec["hooks"][stage][0];
            let mut args = vec![hook.clone()];
            args.extend(GLOBAL_FLAGS.iter().map(|s| s.to_string()));
            args.extend(["internal", "oci-hook", event].map(String::from));
            h["path"] = json!(hook);
            h["args"] = json!(args);
            // os.Environ(), then PATH again with the sbin directories (create.go).
            let env = h["env"].as_array_mut().unwrap();
            env.push(json!(
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/snap/bin:/usr/sbin:/sbin"
            ));
        }
        let a = spec["annotations"].as_object_mut().unwrap();
        a.insert(
            "nerdctl/state-dir".into(),
            json!(state_dir.display().to_string()),
        );
        a.insert("nerdctl/domainname".into(), json!(""));
        a.insert("nerdctl/name".into(), json!(format!("web-{}", &id[..6])));
        a.insert("nerdctl/hostname".into(), json!(&id[..12]));
        a.insert(
            "nerdctl/networks".into(),
            json!(json!([network]).to_string()),
        );
        match via {
            PortsVia::Label => {
                a.insert(
                    "nerdctl/ports".into(),
                    json!(Value::Array(mappings).to_string()),
                );
            }
            PortsVia::File => {
                a.remove("nerdctl/ports");
            }
        }
        // nerdctl's data store, here.
        let old_root = "/var/lib/nerdctl/1935db59/";
        let old_id = "3f1c5b2a9d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
        for m in spec["mounts"].as_array_mut().unwrap() {
            if let Some(src) = m["source"].as_str()
                && let Some(rest) = src.strip_prefix(old_root)
            {
                m["source"] = json!(data.join(rest.replace(old_id, id)).display().to_string());
            }
        }
        spec["hostname"] = json!(&id[..12]);
        let linux = spec["linux"].as_object_mut().unwrap();
        // create.go: withDefaultUnprivilegedPortSysctl, unless the network is the host's.
        if network != "host" {
            linux.insert(
                "sysctl".into(),
                json!({"net.ipv4.ip_unprivileged_port_start": "0"}),
            );
        }
        // With systemd as cgroup manager (cgroup v2 hosts) nerdctl's path is a scope,
        // and the shim passes --systemd-cgroup; else under this suite's cgroup parent
        // (tests/env/containerd.sh removes it).
        let cgroups_path = if systemd_cgroup() {
            format!("system.slice:nerdctl:{id}")
        } else {
            format!("/{NAMESPACE}/{id}")
        };
        linux.insert("cgroupsPath".into(), json!(cgroups_path));
        spec["process"]["args"] = json!(["/bin/httpd", "-f", "-p", "80", "-h", "/www"]);
        spec["process"]["env"]
            .as_array_mut()
            .unwrap()
            .retain(|e| !e.as_str().unwrap().starts_with("HOSTNAME="));
        spec["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!(format!("HOSTNAME={}", &id[..12])));
        // What this host cannot provide: AppArmor.
        spec["process"]
            .as_object_mut()
            .unwrap()
            .remove("apparmorProfile");
        // nerdctl passes on its own RLIMIT_NOFILE; ours may be lower.
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let max = lim.maximum.unwrap_or(u64::MAX);
        spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": max, "soft": max}]);
        match network {
            // nerdctl drops the network namespace: the host's.
            "host" => spec["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .retain(|n| n["type"] != "network"),
            n if n.starts_with("container:") => {
                let path = format!("/proc/{}/ns/net", &n["container:".len()..]);
                for ns in spec["linux"]["namespaces"].as_array_mut().unwrap() {
                    if ns["type"] == "network" {
                        *ns = json!({"type": "network", "path": path});
                    }
                }
            }
            // bridge, none: a namespace of runc's making.
            _ => {}
        }
        NerdctlContainer {
            run,
            state_dir,
            spec,
        }
    }
}

impl Drop for Nerdctl {
    fn drop(&mut self) {
        self.scrub();
    }
}

/// One container of [`Nerdctl`], driven as containerd's shim drives runc.
pub struct NerdctlContainer {
    pub run: DirectRun,
    /// nerdctl's per-container directory (`nerdctl/state-dir`).
    pub state_dir: PathBuf,
    /// The spec as containerd writes it into the bundle for each new task.
    pub spec: Value,
}

impl NerdctlContainer {
    pub fn id(&self) -> &str {
        &self.run.id
    }

    /// The runtime as the shim runs it: global flags, then `args`; the container's
    /// stdio goes to files (the shim's FIFOs would be read; pipes here never reach EOF).
    pub fn shim(&self, args: &[&str]) -> Output {
        let out = self.run.dir.join("shim.out");
        let err = self.run.dir.join("shim.err");
        let status = Command::new(wrapper_bin())
            .args([
                "--root",
                &self.run.root.display().to_string(),
                "--log",
                &self.run.log.display().to_string(),
                "--log-format",
                "json",
            ])
            .args(systemd_cgroup().then_some("--systemd-cgroup"))
            .args(args)
            .env("ENVOY_SIDECAR_CONFIG", &self.run.config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        Output {
            status,
            stdout: std::fs::read(&out).unwrap_or_default(),
            stderr: [
                std::fs::read(&err).unwrap_or_default(),
                b"\nrunc log:\n".to_vec(),
                std::fs::read(&self.run.log).unwrap_or_default(),
            ]
            .concat(),
        }
    }

    /// A new task: containerd writes the spec into the bundle, then `create`.
    pub fn create(&self) -> Output {
        std::fs::write(
            self.run.bundle.join("config.json"),
            serde_json::to_vec(&self.spec).unwrap(),
        )
        .unwrap();
        let bundle = self.run.bundle.display().to_string();
        let pid = self.run.pid_file.display().to_string();
        let _ = std::fs::remove_file(&self.run.pid_file);
        self.shim(&["create", "--bundle", &bundle, "--pid-file", &pid, self.id()])
    }

    /// `create` then `start`, both asserted.
    pub fn create_and_start(&self) {
        let out = self.create();
        assert!(out.status.success(), "create: {}", text(&out));
        let out = self.shim(&["start", self.id()]);
        assert!(out.status.success(), "start: {}", text(&out));
    }

    /// `-p ADDR:H:C` for every mapping of `network-config.json` (before `create`).
    pub fn bind_host_ip(&self, addr: &str) {
        let f = self.state_dir.join("network-config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        for m in v["portMappings"].as_array_mut().unwrap() {
            m["HostIP"] = json!(addr);
        }
        std::fs::write(&f, v.to_string()).unwrap();
    }

    /// `kill <id> <signal>` as the shim sends it (a number).
    pub fn kill(&self, signal: u32) {
        let out = self.shim(&["kill", self.id(), &signal.to_string()]);
        assert!(out.status.success(), "kill {signal}: {}", text(&out));
    }

    pub fn delete(&self, force: bool) {
        let out = if force {
            self.shim(&["delete", "--force", self.id()])
        } else {
            self.shim(&["delete", self.id()])
        };
        assert!(out.status.success(), "delete: {}", text(&out));
    }

    /// `nerdctl rm -f`: SIGKILL, wait for the exit, delete the task.
    pub fn rm_f(&self) {
        self.kill(9);
        self.wait_stopped();
        self.delete(false);
    }

    pub fn status(&self) -> Option<String> {
        self.run.status()
    }

    pub fn pid(&self) -> u32 {
        self.run.pid()
    }

    /// Our record of it (`inspect`), namespace `default`.
    pub fn inspect(&self) -> Option<Value> {
        self.run.inspect()
    }

    /// What `nerdctl kill` does before it signals: the CNI network torn down (the
    /// stand-in's postStop, with the OCI state on stdin).
    pub fn tear_down_network(&self, hook: &Path) {
        let st = json!({
            "ociVersion": "1.0.2", "id": self.id(), "status": "running",
            "pid": self.pid(), "bundle": self.run.bundle,
            "annotations": self.spec["annotations"],
        });
        let mut child = Command::new(hook)
            .args(GLOBAL_FLAGS)
            .args(["internal", "oci-hook", "postStop"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(st.to_string().as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "network teardown");
    }

    pub fn wait_stopped(&self) {
        wait_until("stopped", std::time::Duration::from_secs(15), || {
            let s = self.status();
            (s.as_deref() == Some("stopped"))
                .then_some(())
                .ok_or(format!("{s:?}"))
        });
    }
}
