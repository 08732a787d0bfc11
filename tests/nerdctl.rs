//! nerdctl conventions. nerdctl is not installable here, so these run against
//! `oci/fixtures/nerdctl-config.json`, a spec shaped like the one nerdctl has
//! containerd write (its `nerdctl/*` annotations, including `nerdctl/ports`, and its
//! `createRuntime`/`poststop` hooks; see `oci/fixtures/README.md`): our hooks go after
//! nerdctl's createRuntime hook and before its poststop hook, container ports come
//! from `nerdctl/ports` when `envoy-sidecar/ports` is absent, and nerdctl's hooks and
//! annotations are left exactly as they were.
//!
//! Without root: the wrapper's `create` against a recording stand-in for runc, then
//! the patched `config.json` read back. As root: one real `runc run --detach` of the
//! fixture with nerdctl's hooks replaced by a stand-in at the same positions.

mod common;
#[path = "nerdctl/standin.rs"]
mod standin;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const ID: &str = "3f1c5b2a9d8e7f60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";

fn fixture() -> Value {
    let p = repo().join("oci/fixtures/nerdctl-config.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn is_ours(cli: &std::path::Path, hook: &Value, stage: &str) -> bool {
    let args: Vec<&str> = hook["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    hook["path"] == cli.display().to_string()
        && args.ends_with(&["hook", stage, "--namespace", "default"])
}

fn env_of(spec: &Value) -> Vec<String> {
    spec["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn env_var(spec: &Value, name: &str) -> Option<String> {
    env_of(spec)
        .iter()
        .find_map(|e| e.strip_prefix(&format!("{name}=")).map(str::to_string))
}

fn nerdctl_annotations(spec: &Value) -> Vec<(String, Value)> {
    spec["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("nerdctl/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The fixture in a temporary bundle in front of a recording stand-in for runc
/// ([`FakeStack`]), with containerd's runc root for nerdctl's namespace `default`
/// (`.../runc/default`).
struct Fake {
    stack: FakeStack,
    /// The fixture as written into the bundle.
    original: Value,
}

impl std::ops::Deref for Fake {
    type Target = FakeStack;
    fn deref(&self) -> &FakeStack {
        &self.stack
    }
}

impl Fake {
    fn new(name: &str, tweak: impl FnOnce(&mut Value)) -> Fake {
        let mut original = fixture();
        // The credentials directory is chowned to process.user: be that user.
        original["process"]["user"]["uid"] = json!(nix::unistd::getuid().as_raw());
        original["process"]["user"]["gid"] = json!(nix::unistd::getgid().as_raw());
        tweak(&mut original);
        let stack = FakeStack::new(
            &format!("es-nerdctl-{name}"),
            "default",
            "memory_capacity_mb = 4096\n",
            &original,
        );
        Fake { stack, original }
    }

    fn create(&self) {
        let pid = self.dir.join("init.pid").display().to_string();
        let out = self.stack.create(&["--pid-file", &pid], ID);
        assert!(out.status.success(), "create: {}", text(&out));
    }

    fn state(&self) -> Option<Value> {
        self.state_of(ID)
    }
}

#[test]
fn our_hooks_wrap_nerdctls_which_stay_untouched() {
    // nerdctl's path (containerd's shim: `create`): nerdctl's hooks exactly as they
    // were and none of ours. The wrapper does poststart's work once runc returned (so
    // after nerdctl's createRuntime hook gave the container its address), and
    // poststop's in its `delete`, before runc's (so before nerdctl's CNI tear-down).
    let created = Fake::new("hooks-create", |_| {});
    created.create();
    assert_eq!(created.spec()["hooks"], created.original["hooks"]);
    assert!(created.state().is_some_and(|s| s["started_at"].is_string()));

    // `runc run` (the app starts before runc returns): runc runs ours, placed around
    // nerdctl's.
    let f = Fake::new("hooks", |_| {});
    let b = f.bundle.display().to_string();
    let out = f.wrapper(&["run", "--detach", "--bundle", &b, ID]);
    assert!(out.status.success(), "run: {}", text(&out));
    let spec = f.spec();
    let orig = &f.original;

    // createRuntime: nerdctl's (CNI set-up, which gives the container its IP) alone —
    // ours is registered only with an ingress filter to install (unproxied off).
    let cr = spec["hooks"]["createRuntime"].as_array().unwrap();
    assert_eq!(cr.len(), 1, "{cr:#?}");
    assert_eq!(
        cr[0], orig["hooks"]["createRuntime"][0],
        "nerdctl's createRuntime hook changed or moved"
    );

    // poststop: ours (stop Envoy, release) before nerdctl's (CNI tear-down).
    let ps = spec["hooks"]["poststop"].as_array().unwrap();
    assert_eq!(ps.len(), 2, "{ps:#?}");
    assert!(is_ours(&f.cli, &ps[0], "poststop"), "{:#?}", ps[0]);
    assert_eq!(
        ps[1], orig["hooks"]["poststop"][0],
        "nerdctl's poststop hook changed or moved"
    );
    assert_eq!(
        ps[1]["args"][3], "postStop",
        "nerdctl's own event name for the poststop stage"
    );

    // poststart: nerdctl registers none; ours is the only one.
    let st = spec["hooks"]["poststart"].as_array().unwrap();
    assert_eq!(st.len(), 1);
    assert!(is_ours(&f.cli, &st[0], "poststart"), "{:#?}", st[0]);
    assert_eq!(
        spec["hooks"].as_object().unwrap().len(),
        3,
        "no other stage added: {:#?}",
        spec["hooks"]
    );

    // Every nerdctl/* annotation unchanged, none added or dropped, same order.
    assert_eq!(nerdctl_annotations(&spec), nerdctl_annotations(orig));
    let ours: Vec<&String> = spec["annotations"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.starts_with("nerdctl/"))
        .collect();
    assert!(
        ours.iter().all(|k| k.starts_with("envoy-sidecar/")),
        "{ours:?}"
    );

    // nerdctl's environment and mounts are kept, in order; ours come after them.
    let env = env_of(&spec);
    let orig_env = env_of(orig);
    assert_eq!(&env[..orig_env.len()], &orig_env[..]);
    assert!(
        env[orig_env.len()..]
            .iter()
            .all(|e| e.starts_with("CF_INSTANCE_")),
        "{env:?}"
    );
    let mounts = spec["mounts"].as_array().unwrap();
    let orig_mounts = orig["mounts"].as_array().unwrap();
    assert_eq!(&mounts[..orig_mounts.len()], &orig_mounts[..]);
    assert_eq!(mounts.len(), orig_mounts.len() + 1);
    assert_eq!(
        mounts.last().unwrap()["destination"],
        "/etc/cf-instance-credentials"
    );

    // Nothing else of the spec moved.
    let strip = |v: &Value| {
        let mut v = v.clone();
        for p in ["hooks", "annotations", "mounts"] {
            v.as_object_mut().unwrap().remove(p);
        }
        v["process"].as_object_mut().unwrap().remove("env");
        v["linux"]["resources"]
            .as_object_mut()
            .unwrap()
            .remove("memory");
        v
    };
    assert_eq!(strip(&spec), strip(orig));

    // runc got the argv the wrapper was given.
    let calls = f.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].contains(&format!("run --detach --bundle {}", f.bundle.display())));
}

#[test]
fn ports_come_from_nerdctl_ports_when_ours_are_absent() {
    let f = Fake::new("ports", |_| {});
    f.create();
    let spec = f.spec();
    // -p 8080:80 (tcp) and -p 5353:53/udp: only the TCP container port is proxied.
    let ports: Value = serde_json::from_str(&env_var(&spec, "CF_INSTANCE_PORTS").unwrap()).unwrap();
    let ports = ports.as_array().unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["internal"], 80);
    assert_eq!(ports[0]["internal_tls_proxy"], 61001);
    let state = f.state().expect("state recorded under namespace default");
    assert_eq!(state["ports"][0]["internal"], 80);
    assert_eq!(state["namespace"], "default");
    // nerdctl's -m 256m (swap defaulted to twice that) raised by the allocation.
    let mem = &spec["linux"]["resources"]["memory"];
    assert_eq!(mem["limit"], 288 * MIB, "{mem}");
    assert_eq!(mem["swap"], 544 * MIB, "{mem}");
    assert_eq!(
        spec["annotations"]["envoy-sidecar/requested-memory-limit"],
        (256 * MIB).to_string()
    );
    assert_eq!(
        spec["annotations"]["envoy-sidecar/requested-memory-swap"],
        (512 * MIB).to_string()
    );
    assert_eq!(
        spec["annotations"]["nerdctl/ports"],
        f.original["annotations"]["nerdctl/ports"]
    );
}

/// nerdctl >= 2.1.3 (PR #4290) writes no `nerdctl/ports` label: its `-p` mappings are
/// in `<nerdctl/state-dir>/network-config.json`, written before the task is created
/// (nerdctl v2.3 `pkg/netutil/networkstore`, `pkg/cmd/container/create.go`). A spec as
/// that nerdctl writes it, with the file on disk.
fn fake_with_network_config(name: &str, file: &str) -> (Fake, TempDir, std::path::PathBuf) {
    let data = TempDir::new(&format!("es-nerdctl-data-{name}"));
    let state_dir = data.path().join("containers/default").join(ID);
    std::fs::create_dir_all(&state_dir).unwrap();
    let conf = state_dir.join("network-config.json");
    std::fs::write(&conf, file).unwrap();
    let sd = state_dir.display().to_string();
    let f = Fake::new(name, move |s| {
        let a = s["annotations"].as_object_mut().unwrap();
        a.remove("nerdctl/ports");
        a.insert("nerdctl/state-dir".into(), json!(sd));
    });
    (f, data, conf)
}

#[test]
fn ports_come_from_network_config_json_when_nerdctl_writes_no_label() {
    let (f, _data, _) = fake_with_network_config(
        "netconf",
        r#"{"portMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":""},{"HostPort":5353,"ContainerPort":53,"Protocol":"udp","HostIP":""}]}"#,
    );
    f.create();
    let ports: Value =
        serde_json::from_str(&env_var(&f.spec(), "CF_INSTANCE_PORTS").unwrap()).unwrap();
    let ports = ports.as_array().unwrap();
    assert_eq!(ports.len(), 1, "only the TCP mapping: {ports:?}");
    assert_eq!(ports[0]["internal"], 80);
    assert_eq!(ports[0]["internal_tls_proxy"], 61001);
    assert_eq!(
        f.state().expect("state recorded")["ports"][0]["internal"],
        80
    );
}

#[test]
fn a_malformed_network_config_json_fails_create_naming_the_file_and_holds_nothing() {
    let (f, _data, conf) = fake_with_network_config("badconf", r#"{"portMappings":"#);
    let before = std::fs::read(f.bundle.join("config.json")).unwrap();
    let pid = f.dir.join("init.pid").display().to_string();
    let out = f.stack.create(&["--pid-file", &pid], ID);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let log = std::fs::read_to_string(&f.runc_log).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let msg = last["msg"].as_str().unwrap();
    assert!(
        msg.contains(&conf.display().to_string())
            && msg.contains("not JSON")
            && msg.contains("valid:"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(f.bundle.join("config.json")).unwrap(),
        before,
        "spec untouched"
    );
    assert!(f.state().is_none(), "state recorded");
}

#[test]
fn envoy_sidecar_ports_win_over_nerdctl_ports() {
    let f = Fake::new("ours", |s| {
        s["annotations"]["envoy-sidecar/ports"] = json!("9000,80");
    });
    f.create();
    let ports: Value =
        serde_json::from_str(&env_var(&f.spec(), "CF_INSTANCE_PORTS").unwrap()).unwrap();
    let internal: Vec<u64> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["internal"].as_u64().unwrap())
        .collect();
    assert_eq!(internal, [9000, 80]);
}

#[test]
fn no_tcp_port_or_opt_out_leaves_the_spec_byte_for_byte() {
    let udp_only = r#"[{"HostPort":5353,"ContainerPort":53,"Protocol":"udp","HostIP":"0.0.0.0"}]"#;
    for (name, k, v) in [
        ("udp", "nerdctl/ports", udp_only),
        ("optout", "envoy-sidecar/enabled", "false"),
    ] {
        let f = Fake::new(name, |s| s["annotations"][k] = json!(v));
        let before = std::fs::read(f.bundle.join("config.json")).unwrap();
        f.create();
        assert_eq!(
            std::fs::read(f.bundle.join("config.json")).unwrap(),
            before,
            "{name}: spec touched"
        );
        assert!(f.state().is_none(), "{name}: state recorded");
    }
}

#[test]
fn a_second_create_on_the_bundle_does_not_stack() {
    let f = Fake::new("twice", |_| {});
    f.create();
    let first = f.spec();
    // containerd deletes the container (runc no longer knows it), then nerdctl
    // starts it again from the same bundle.
    let out = f.wrapper(&["delete", ID]);
    assert!(out.status.success(), "delete: {}", text(&out));
    assert!(f.state().is_none(), "delete released the state");
    f.runc.fail("state", 1);
    f.create();
    let second = f.spec();
    assert_eq!(second["hooks"], first["hooks"]);
    assert_eq!(
        second["hooks"]["createRuntime"].as_array().unwrap().len(),
        1
    );
    assert_eq!(second["hooks"], f.original["hooks"], "nerdctl's alone");
    assert_eq!(second["process"]["env"], first["process"]["env"]);
    assert_eq!(second["mounts"], first["mounts"]);
    assert_eq!(second["linux"], first["linux"], "memory raised only once");
    assert_eq!(second["annotations"], first["annotations"]);
    assert!(f.state().is_some());
}

/// As root: the fixture run by real runc through the wrapper, nerdctl's hooks replaced
/// by a stand-in at the same positions. Ours does not log, so the stand-in records
/// what our state looked like when it ran: at nerdctl's createRuntime our state
/// exists but has no init pid yet (our poststart hook, which records it, has not
/// run); at nerdctl's poststop our state is gone (our poststop hook, which releases
/// it, already ran — the wrapper itself releases only after runc's delete returned).
#[test]
fn nerdctl_hooks_run_around_ours_under_real_runc() {
    if !can_run_without_containerd("nerdctl_hooks_run_around_ours_under_real_runc") {
        return;
    }
    let sb = Sandbox::new("nerdctl", "", "");
    let net = sb.slot.netns(0);
    let id = "es-nerdctl-1";
    let c = DirectRun::new("nerdctl", id, &sb.config);
    busybox_rootfs(&c.bundle.join("rootfs"));

    let state = sb.state_dir.join("default").join(id).join("state.json");
    let standin = c.dir.join("nerdctl");
    let log = c.dir.join("nerdctl-hooks.log");
    write_script(
        &standin,
        &format!(
            "#!/bin/sh\n# Stand-in for `nerdctl internal oci-hook <event>`.\nevent=\"$3\"\n\
             cat > {dir}/oci-state-$event.json\n\
             if [ -f {state} ]; then cp {state} {dir}/ours-at-$event.json; \
             else echo absent > {dir}/ours-at-$event.json; fi\n\
             echo \"nerdctl-$event $1 $2 SUDO_USER=$SUDO_USER\" >> {log}\n",
            dir = c.dir.display(),
            state = state.display(),
            log = log.display()
        ),
    );

    let mut spec = fixture();
    for stage in ["createRuntime", "poststop"] {
        let h = &mut spec["hooks"][stage][0];
        h["path"] = json!(standin.display().to_string());
        h["args"][0] = json!(standin.display().to_string());
    }
    spec["process"]["args"] = json!(["/bin/httpd", "-f", "-p", "80", "-h", "/www"]);
    // What this host cannot provide: AppArmor, nerdctl's data store, its cgroup parent.
    spec["process"]
        .as_object_mut()
        .unwrap()
        .remove("apparmorProfile");
    spec["mounts"].as_array_mut().unwrap().retain(|m| {
        !m["source"]
            .as_str()
            .unwrap()
            .starts_with("/var/lib/nerdctl/")
    });
    spec["linux"].as_object_mut().unwrap().remove("cgroupsPath");
    // nerdctl passes on its own RLIMIT_NOFILE; ours may be lower (raising needs
    // CAP_SYS_RESOURCE in the initial user namespace).
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let rlim_max = lim.maximum.unwrap_or(u64::MAX);
    spec["process"]["rlimits"] =
        json!([{"type": "RLIMIT_NOFILE", "hard": rlim_max, "soft": rlim_max}]);
    // The network nerdctl's CNI hook would have set up: a veth we made.
    for n in spec["linux"]["namespaces"].as_array_mut().unwrap() {
        if n["type"] == "network" {
            *n = json!({"type": "network", "path": net.path});
        }
    }
    std::fs::write(
        c.bundle.join("config.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    let as_written = spec.clone();

    let (status, said) = c.run_detached();
    assert!(status.success(), "run --detach: {status}\n{said}");
    let pid = c.pid();

    // The hooks as runc ran them.
    let patched: Value =
        serde_json::from_slice(&std::fs::read(c.bundle.join("config.json")).unwrap()).unwrap();
    let cr = patched["hooks"]["createRuntime"].as_array().unwrap();
    assert_eq!(cr[0], as_written["hooks"]["createRuntime"][0]);
    // Unproxied mappings on (the default): no ingress filter, no createRuntime of ours.
    assert_eq!(cr.len(), 1, "{cr:#?}");

    // nerdctl's createRuntime ran, with its own argv and environment.
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        ["nerdctl-createRuntime internal oci-hook SUDO_USER=ubuntu"]
    );
    let oci: Value =
        serde_json::from_slice(&std::fs::read(c.dir.join("oci-state-createRuntime.json")).unwrap())
            .unwrap();
    assert_eq!(oci["pid"], pid, "{oci}");
    assert_eq!(oci["annotations"]["nerdctl/name"], "web", "{oci}");
    let at_cr: Value =
        serde_json::from_slice(&std::fs::read(c.dir.join("ours-at-createRuntime.json")).unwrap())
            .expect("our state existed when nerdctl's createRuntime ran");
    assert_eq!(at_cr["id"], id);
    assert!(
        at_cr.get("init_pid").is_none(),
        "our state recorded an init pid before nerdctl's createRuntime: {at_cr}"
    );
    let st = c.inspect().expect("state");
    assert_eq!(
        st["init_pid"], pid,
        "our poststart records the init pid: {st}"
    );

    // The container port came from nerdctl/ports; the proxy serves the app on it.
    assert_eq!(st["ports"][0]["internal"], 80, "{st}");
    assert_eq!(st["ports"].as_array().unwrap().len(), 1, "{st}");
    let addr = format!("{}:{}", net.ip, st["ports"][0]["internal_tls_proxy"]);
    let out = openssl_wait_for(&addr, &sb.ca(), id, HELLO);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert_eq!(memory_limit_of(pid), (288 * MIB).to_string());

    // Stop and delete: our poststop released the state before nerdctl's ran.
    let out = c.wrapper(&["kill", id, "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out));
    wait_until("stopped", Duration::from_secs(10), || {
        c.status().as_deref() == Some("stopped")
    });
    assert!(c.inspect().is_some(), "state kept until delete");
    let out = c.wrapper(&["delete", id]);
    assert!(out.status.success(), "delete: {}", text(&out));
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        [
            "nerdctl-createRuntime internal oci-hook SUDO_USER=ubuntu",
            "nerdctl-postStop internal oci-hook SUDO_USER=ubuntu"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(c.dir.join("ours-at-postStop.json"))
            .unwrap()
            .trim(),
        "absent",
        "our poststop hook must run (and release) before nerdctl's"
    );
    assert!(c.inspect().is_none());
    assert_eq!(c.status(), None);
}

/// A FIFO where nerdctl's `network-config.json` belongs would block a plain read for
/// ever: create refuses it at once, naming the file.
#[test]
fn a_fifo_as_network_config_json_fails_create_at_once() {
    let (f, _data, conf) = fake_with_network_config("fifo", "{}");
    std::fs::remove_file(&conf).unwrap();
    nix::unistd::mkfifo(&conf, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let pid = f.dir.join("init.pid").display().to_string();
    let out = f.stack.create(&["--pid-file", &pid], ID);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let log = std::fs::read_to_string(&f.runc_log).unwrap();
    let msg = log.lines().last().unwrap();
    assert!(
        msg.contains(&conf.display().to_string()) && msg.contains("not a regular file"),
        "{msg}"
    );
    assert!(f.state().is_none(), "state recorded");
}

// ---- Host ports nerdctl's -p publishes (issue 21, part 3) ---------------------------

const ID2: &str = "4a2d6c3b0e9f8a71b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829";

/// A [`Fake`] whose host port pool is `pool` (the slot's, so a host DNAT rule a test
/// adds there touches nothing else).
fn fake_in_pool(name: &str, pool: &std::ops::RangeInclusive<u16>) -> Fake {
    let f = Fake::new(name, |_| {});
    let mut conf = std::fs::read_to_string(&f.config).unwrap();
    conf.push_str(&pool_toml(pool));
    std::fs::write(&f.config, conf).unwrap();
    f
}

fn label(host_port: u16) -> String {
    format!(r#"[{{"HostPort":{host_port},"ContainerPort":80,"Protocol":"tcp","HostIP":""}}]"#)
}

fn host_ports_of(st: &Value) -> Vec<u16> {
    st["ports"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| [&p["external"], &p["external_tls_proxy"]])
        .filter_map(|v| v.as_u64().and_then(|v| u16::try_from(v).ok()))
        .collect()
}

/// The product's port first: a later container whose `-p` names it is refused at
/// create, naming the port, and holds nothing. And a container's own `-p` host port in
/// the pool is never handed to it (its portmap rule comes only later, with nerdctl's
/// createRuntime hook).
#[test]
fn a_p_host_port_the_product_holds_is_refused_and_its_own_is_skipped() {
    let slot = slots::next();
    let pool = slot.pool(16);
    let f = fake_in_pool("p-held", &pool);
    f.set_spec_annotation("nerdctl/ports", &label(*pool.start()));
    f.create();
    let first = f.state().expect("first recorded");
    let held = host_ports_of(&first);
    assert_eq!(held.len(), 2, "external and TLS: {first}");
    assert!(
        !held.contains(pool.start()),
        "its own -p host port {} handed out: {held:?}",
        pool.start()
    );

    for p in [held[0], held[1]] {
        f.set_spec_annotation("nerdctl/ports", &label(p));
        let pid = f.dir.join("init2.pid").display().to_string();
        let out = f.stack.create(&["--pid-file", &pid], ID2);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let log = std::fs::read_to_string(&f.runc_log).unwrap();
        let msg = log.lines().last().unwrap();
        assert!(
            msg.contains(&format!("host port {p} of this container's -p (nerdctl)"))
                && msg.contains("already mapped by envoy-sidecar")
                && msg.contains("valid:"),
            "{msg}"
        );
        assert!(f.state_of(ID2).is_none(), "refused create recorded");
        assert!(
            !f.calls().iter().any(|c| c.contains(ID2)),
            "runc was called for the refused create: {:?}",
            f.calls()
        );
    }
    assert_eq!(
        f.state().unwrap()["ports"],
        first["ports"],
        "first untouched"
    );
}

/// nerdctl's `-p` first: a DNAT rule already on the host (CNI portmap's, in iptables
/// as iptables-nft writes it, or native nftables) for a port of the pool: the product
/// hands out the ports around it.
#[test]
fn host_ports_other_dnat_rules_forward_are_never_handed_out() {
    if !can_run_without_containerd("host_ports_other_dnat_rules_forward_are_never_handed_out") {
        return;
    }
    let slot = slots::next();
    let pool = slot.pool(16);
    let p0 = *pool.start();
    let unrouted = slots::UNROUTED;
    let chain = format!("ES-{}-DN", slot.name().to_uppercase());
    let table = format!("es_{}_dnat", slot.name().replace('-', "_"));
    let cleanup = format!(
        "iptables -t nat -F {chain} 2>/dev/null; iptables -t nat -X {chain} 2>/dev/null; \
         nft delete table ip {table} 2>/dev/null; true"
    );
    sh(&cleanup);
    struct Undo(String);
    impl Drop for Undo {
        fn drop(&mut self) {
            let _ = std::process::Command::new("sh")
                .args(["-c", &self.0])
                .status();
        }
    }
    let _undo = Undo(cleanup);
    // portmap's per-container chain: `-p tcp --dport H -j DNAT` (iptables-nft).
    sh(&format!(
        "iptables -t nat -N {chain} && \
         iptables -t nat -A {chain} -p tcp -m tcp --dport {p0} -j DNAT --to-destination {unrouted}:80"
    ));
    // portmap's nftables backend, or an operator's rule: a set and a range.
    sh(&format!(
        "nft add table ip {table} && \
         nft add chain ip {table} pre '{{ type nat hook prerouting priority -100; }}' && \
         nft add rule ip {table} pre tcp dport '{{ {a}, {b} }}' dnat to {unrouted}:80 && \
         nft add rule ip {table} pre tcp dport {c}-{d} dnat to {unrouted}:80",
        a = p0 + 2,
        b = p0 + 3,
        c = p0 + 5,
        d = p0 + 6,
    ));
    let f = fake_in_pool("p-dnat", &pool);
    f.set_spec_annotation("nerdctl/ports", &label(p0 + 1));
    f.set_spec_annotation("envoy-sidecar/ports", "80,81,82");
    f.create();
    let st = f.state().expect("recorded");
    let mut got = host_ports_of(&st);
    got.sort_unstable();
    // p0 (iptables), p0+1 (its own -p), p0+2/3 (set), p0+5/6 (range) are skipped.
    assert_eq!(
        got,
        [p0 + 4, p0 + 7, p0 + 8, p0 + 9, p0 + 10, p0 + 11],
        "{st}"
    );
}

// ---- The nerdctl stand-in with its real network (issue 21, parts 2 and 4) ----------

use standin::{Nerdctl, NerdctlContainer, PortsVia};

/// A nerdctl-style 64-hex id whose first 8 digits (the stand-in's interface and chain
/// names) are unique to the slot and `k`.
fn nid(slot: &Slot, k: u32) -> String {
    format!("{:02x}{:06x}{}", slot.index(), k, &ID[8..])
}

/// The status row of `id` once `pred` holds for it (namespace `default`).
fn row_when(sb: &Sandbox, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, Duration::from_secs(30), || {
        let r = status_row(&sb.config, "default", id);
        match r {
            Some(r) if pred(&r) => Ok(r),
            other => Err(format!("{other:?}")),
        }
    })
}

fn ready(sb: &Sandbox, id: &str) -> Value {
    row_when(sb, id, "ready", |r| r["status"] == "ready")
}

/// A plain client on the stand-in's bridge ("another container"), `k`-th address.
struct Peer {
    ns: String,
}

impl Peer {
    fn new(slot: &Slot, n: &Nerdctl, k: u32) -> Peer {
        let ns = format!("{}px", slot.name());
        let host_if = format!("{}pv", slot.name());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_if])
            .output();
        sh(&format!(
            "ip netns add {ns} && ip link add {host_if} type veth peer name eth0 netns {ns} && \
             ip link set {host_if} master {br} up && ip -n {ns} addr add {ip}/28 dev eth0 && \
             ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
            br = n.bridge,
            ip = n.address(k)
        ));
        Peer { ns }
    }

    /// `Ok(reply)` or `Err(why)`, as [`Router::tcp`].
    fn tcp(&self, host: &str, port: u16) -> Result<String, String> {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c"])
            .arg(format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 busybox nc -w 3 {host} {port}"
            ))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if out.is_empty() {
            Err(text(&o))
        } else {
            Ok(out)
        }
    }

    fn https(&self, ca: &std::path::Path, name: &str, host: &str, port: u16) -> String {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c"])
            .arg(format!(
                "curl -sS --http1.1 --max-time 5 --cacert {} --resolve {name}:{port}:{host} https://{name}:{port}/",
                ca.display()
            ))
            .output()
            .unwrap();
        text(&o)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

/// Nothing of the product's or the stand-in's is left for `c`.
fn nothing_left(sb: &Sandbox, n: &Nerdctl, c: &NerdctlContainer) {
    assert!(c.inspect().is_none(), "state left");
    assert!(
        sb.state_entries("default").is_empty(),
        "{:?}",
        sb.state_entries("default")
    );
    let nat = settled(|| common::footprint::nat_in_pool(&sb.pool()));
    assert!(nat.is_empty(), "NAT left: {nat:?}");
    let procs = settled(|| common::footprint::our_processes(sb));
    assert!(procs.is_empty(), "processes left: {procs:?}");
    assert!(
        n.dnat_rules().is_empty(),
        "portmap rules left: {:?}",
        n.dnat_rules()
    );
    assert!(n.veths().is_empty(), "veths left: {:?}", n.veths());
}

/// With unproxied mappings off, nerdctl's own `-p` (portmap DNAT to the app port)
/// reaches the app from nowhere — not from a routed client through the host, not from
/// another container on the bridge — while TLS through Envoy does. Ports come from
/// `network-config.json` (nerdctl >= 2.1.3: no label), and the hooks run in nerdctl
/// v2.3.5's order with its arguments.
#[test]
fn nerdctl_p_reaches_the_app_only_through_tls_when_unproxied_mappings_are_off() {
    if !can_run_without_containerd(
        "nerdctl_p_reaches_the_app_only_through_tls_when_unproxied_mappings_are_off",
    ) {
        return;
    }
    let sb = Sandbox::new("nerd-tls", "enable_unproxied_port_mappings = false", "");
    let n = Nerdctl::new(&sb.slot);
    let router = sb.slot.router(0);
    let p = sb.slot.tcp_port();
    let id = nid(&sb.slot, 1);
    let c = n.container(&sb, &id, 1, &[(p, 80)], PortsVia::File, "bridge");
    let ip6 = n.dual_stack(&c, 1);
    let host6 = router.enable_ipv6();
    c.create_and_start();
    let row = row_when(&sb, &id, "ready over both families", |r| {
        r["status"] == "ready" && r["container_ipv6"] == ip6.as_str()
    });
    let ip = n.address(1);
    assert_eq!(row["container_ip"], ip.as_str(), "{row}");
    assert_eq!(row["nat_applied"], true, "{row}");
    let st = c.inspect().expect("recorded");
    assert_eq!(
        st["ports"][0]["internal"], 80,
        "from network-config.json: {st}"
    );
    assert!(st["ports"][0]["external"].is_null(), "{st}");

    // nerdctl's hooks ran with its arguments.
    let calls = n.calls();
    assert_eq!(
        calls,
        [format!(
            "createRuntime {} --namespace=default --data-root=/var/lib/nerdctl internal oci-hook createRuntime",
            n.hook.display()
        )],
    );
    let spec: Value =
        serde_json::from_slice(&std::fs::read(c.run.bundle.join("config.json")).unwrap()).unwrap();
    let cr = spec["hooks"]["createRuntime"].as_array().unwrap();
    assert_eq!(
        cr[0], c.spec["hooks"]["createRuntime"][0],
        "nerdctl's first, untouched"
    );
    // None of ours: the wrapper installed the ingress filter once runc's create
    // returned, before `start` lets the app run (the checks below prove it holds).
    assert_eq!(cr.len(), 1, "nerdctl's alone: {cr:#?}");
    assert_eq!(
        spec["linux"]["sysctl"]["net.ipv4.ip_unprivileged_port_start"],
        "0"
    );

    // The portmap rule is there, for the app port.
    let rules = n.dnat_rules();
    assert!(
        rules
            .iter()
            .any(|r| r.contains(&format!("--dport {p}")) && r.contains(&format!("{ip}:80"))),
        "{rules:?}"
    );
    // TLS through the product's host port, from the router: served.
    let tls = port_of(&st, 0, "external_tls_proxy");
    let got = router.https(&sb.ca(), &id, tls);
    assert!(got.contains(HELLO), "TLS via the host: {got}");
    // nerdctl's -p from the router: DNATed to the app port (the rule's counter says
    // so: not the host's own reset) and reset there.
    let hits = n.dnat_hits("iptables", p);
    let plain = router.tcp(
        &format!("{}:{p}", router.host_ip()),
        "GET / HTTP/1.0\\r\\n\\r\\n",
    );
    let why = plain.expect_err("-p reached the app in cleartext");
    assert!(
        why.contains("refused"),
        "reset by the ingress filter, not lost: {why}"
    );
    assert!(
        n.dnat_hits("iptables", p) > hits,
        "portmap's DNAT was not taken"
    );
    // The same over IPv6: portmap's ip6tables DNAT reset, the product's TLS served.
    let rules = n.dnat_rules();
    assert!(
        rules.iter().any(|r| r.contains(&format!("[{ip6}]:80"))),
        "{rules:?}"
    );
    let hits6 = n.dnat_hits("ip6tables", p);
    let plain6 = router.tcp(&format!("[{host6}]:{p}"), "GET / HTTP/1.0\\r\\n\\r\\n");
    let why = plain6.expect_err("-p reached the app in cleartext over IPv6");
    assert!(why.contains("refused"), "IPv6: {why}");
    assert!(
        n.dnat_hits("ip6tables", p) > hits6,
        "portmap's IPv6 DNAT was not taken"
    );
    let got = router.https_via(&sb.ca(), &id, tls, &host6);
    assert!(got.contains(HELLO), "TLS via the host over IPv6: {got}");
    // Another container on the bridge: the app port reset, TLS served.
    let peer = Peer::new(&sb.slot, &n, 10);
    let direct = peer.tcp(&ip, 80);
    assert!(
        direct.as_ref().is_err_and(|e| e.contains("refused")),
        "app port from the bridge: {direct:?}"
    );
    let got = peer.https(&sb.ca(), &id, &ip, port_of(&st, 0, "internal_tls_proxy"));
    assert!(got.contains(HELLO), "TLS from the bridge: {got}");

    // nerdctl rm -f: SIGKILL, then delete; our poststop before nerdctl's.
    c.rm_f();
    assert_eq!(n.calls().len(), 2, "{:?}", n.calls());
    assert!(n.calls()[1].starts_with("postStop "), "{:?}", n.calls());
    nothing_left(&sb, &n, &c);
}

/// `nerdctl stop` (the image's stop signal as a number, then SIGKILL; the task is not
/// deleted), `nerdctl start` (the old task deleted, a new one created from the same
/// spec), and `nerdctl rm -f`; unproxied mappings on, ports from the legacy label.
#[test]
fn nerdctl_stop_start_and_rm_f_bring_the_sidecar_back_and_leave_nothing() {
    if !can_run_without_containerd(
        "nerdctl_stop_start_and_rm_f_bring_the_sidecar_back_and_leave_nothing",
    ) {
        return;
    }
    let sb = Sandbox::new("nerd-life", "", "");
    let n = Nerdctl::new(&sb.slot);
    let router = sb.slot.router(0);
    let p = sb.slot.tcp_port();
    let id = nid(&sb.slot, 2);
    let c = n.container(&sb, &id, 2, &[(p, 80)], PortsVia::Label, "bridge");
    c.create_and_start();
    ready(&sb, &id);
    let st = c.inspect().unwrap();
    let tls = port_of(&st, 0, "external_tls_proxy");
    assert!(router.https(&sb.ca(), &id, tls).contains(HELLO));
    // Unproxied mappings on: nerdctl's -p serves the app in cleartext, as asked.
    let plain = router.tcp(
        &format!("{}:{p}", router.host_ip()),
        "GET / HTTP/1.0\\r\\n\\r\\n",
    );
    assert!(plain.as_ref().is_ok_and(|r| r.contains(HELLO)), "{plain:?}");

    // stop: SIGQUIT (nginx's STOPSIGNAL, 3), which busybox httpd as pid 1 ignores, then
    // SIGKILL after the timeout.
    let pid = c.pid();
    c.kill(3);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.status().as_deref(), Some("running"));
    c.kill(9);
    c.wait_stopped();
    assert!(!alive(pid));
    // The task is not deleted: our record stays, the proxy is no longer served.
    let row = row_when(&sb, &id, "stopping", |r| r["status"] == "stopping");
    assert!(c.inspect().is_some(), "record kept until delete: {row}");
    let envoy = st["ports"].clone();
    wait_until("Envoy gone after stop", Duration::from_secs(15), || {
        let procs = common::footprint::our_processes(&sb);
        let envoys: Vec<_> = procs.iter().filter(|(_, c)| c.contains("envoy ")).collect();
        envoys.is_empty().then_some(()).ok_or(format!("{envoys:?}"))
    });

    // start: the old task deleted (both poststop hooks), a new task from the same spec.
    c.delete(false);
    assert!(c.inspect().is_none(), "released by the delete");
    assert!(
        n.dnat_rules().is_empty(),
        "nerdctl's postStop tore its network down"
    );
    c.create_and_start();
    let row = ready(&sb, &id);
    assert_eq!(row["container_ip"], n.address(2).as_str(), "{row}");
    let st2 = c.inspect().unwrap();
    let tls2 = port_of(&st2, 0, "external_tls_proxy");
    assert!(
        router.https(&sb.ca(), &id, tls2).contains(HELLO),
        "served again"
    );
    assert_eq!(sb.state_entries("default").len(), 1, "one record");
    assert_eq!(n.veths().len(), 1, "{:?}", n.veths());
    assert_eq!(
        common::footprint::nat_in_pool(&sb.pool()).len(),
        2,
        "TLS and plain mapping of the new task only (was {envoy})"
    );

    // rm -f.
    c.rm_f();
    nothing_left(&sb, &n, &c);
    let events: Vec<String> = n
        .calls()
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        events,
        ["createRuntime", "postStop", "createRuntime", "postStop"]
    );
}

/// `nerdctl kill` tears the CNI network down before it signals: the container's
/// address goes while the task runs, and the product withdraws its NAT at once (the
/// address may be handed to the next container).
#[test]
fn nerdctl_kill_network_first_then_signal_withdraws_nat_and_leaves_nothing() {
    if !can_run_without_containerd(
        "nerdctl_kill_network_first_then_signal_withdraws_nat_and_leaves_nothing",
    ) {
        return;
    }
    let sb = Sandbox::new("nerd-kill", "", "");
    let n = Nerdctl::new(&sb.slot);
    let id = nid(&sb.slot, 3);
    let c = n.container(
        &sb,
        &id,
        3,
        &[(sb.slot.tcp_port(), 80)],
        PortsVia::File,
        "bridge",
    );
    c.create_and_start();
    ready(&sb, &id);
    assert_eq!(common::footprint::nat_in_pool(&sb.pool()).len(), 2);
    c.tear_down_network(&n.hook);
    wait_until("NAT withdrawn", Duration::from_secs(5), || {
        let nat = common::footprint::nat_in_pool(&sb.pool());
        nat.is_empty().then_some(()).ok_or(format!("{nat:?}"))
    });
    let row = status_row(&sb.config, "default", &id).unwrap();
    assert_eq!(row["nat_applied"], false, "{row}");
    c.rm_f();
    nothing_left(&sb, &n, &c);
}

/// nerdctl's createRuntime hook fails (CNI could not set the network up): runc fails
/// the create and the shim deletes what is left; nothing of ours remains.
#[test]
fn a_failing_nerdctl_create_runtime_hook_leaves_nothing_of_ours() {
    if !can_run_without_containerd("a_failing_nerdctl_create_runtime_hook_leaves_nothing_of_ours") {
        return;
    }
    let sb = Sandbox::new("nerd-fail", "enable_unproxied_port_mappings = false", "");
    let n = Nerdctl::new(&sb.slot);
    let id = nid(&sb.slot, 4);
    let c = n.container(
        &sb,
        &id,
        4,
        &[(sb.slot.tcp_port(), 80)],
        PortsVia::File,
        "bridge",
    );
    std::fs::write(c.state_dir.join("standin-fail"), "").unwrap();
    let out = c.create();
    assert!(!out.status.success(), "create succeeded: {}", text(&out));
    assert!(
        text(&out).contains("failed to set up CNI"),
        "nerdctl's error reaches the user: {}",
        text(&out)
    );
    // The shim deletes a task whose create failed.
    let _ = c.shim(&["delete", "--force", c.id()]);
    assert_eq!(c.status(), None);
    nothing_left(&sb, &n, &c);
}

/// HTTPS GET / inside the network namespace of `pid`, to `127.0.0.1:port` as `name`.
fn https_in(pid: u32, ca: &std::path::Path, name: &str, port: u16) -> String {
    let o = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["curl", "-sS", "--http1.1", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}/"))
        .output()
        .unwrap();
    text(&o)
}

/// `nerdctl run --network container:<A>`: B joins A's namespace with a proxy of its own
/// — its own Envoy on proxy and admin ports A does not use (not 61001 again), its own
/// ingress filter table beside A's (neither replaces the other: no repair war) — and
/// both apps are reached only through TLS; B going leaves A serving.
#[test]
fn nerdctl_network_container_gives_the_joiner_its_own_envoy_on_ports_of_its_own() {
    if !can_run_without_containerd(
        "nerdctl_network_container_gives_the_joiner_its_own_envoy_on_ports_of_its_own",
    ) {
        return;
    }
    let sb = Sandbox::new("nerd-join", "enable_unproxied_port_mappings = false", "");
    let n = Nerdctl::new(&sb.slot);
    let (ida, idb) = (nid(&sb.slot, 5), nid(&sb.slot, 6));
    let a = n.container(
        &sb,
        &ida,
        5,
        &[(sb.slot.tcp_port(), 80)],
        PortsVia::File,
        "bridge",
    );
    a.create_and_start();
    ready(&sb, &ida);
    let st_a = a.inspect().unwrap();
    assert!(
        st_a.get("ingress_table").is_none(),
        "the first keeps the usual table: {st_a}"
    );

    // nerdctl refuses -p with a container network: B names its port itself.
    let mut b = n.container(
        &sb,
        &idb,
        6,
        &[],
        PortsVia::File,
        &format!("container:{}", a.pid()),
    );
    b.spec["annotations"]["envoy-sidecar/ports"] = json!("8081");
    b.spec["process"]["args"] = json!(["/bin/httpd", "-f", "-p", "8081", "-h", "/www"]);
    b.create_and_start();
    let row_b = ready(&sb, &idb);
    let st_b = b.inspect().unwrap();
    let (pa, pb) = (
        port_of(&st_a, 0, "internal_tls_proxy"),
        port_of(&st_b, 0, "internal_tls_proxy"),
    );
    let (admin_a, admin_b) = (
        st_a["admin_port"].as_u64().unwrap(),
        st_b["admin_port"].as_u64().unwrap(),
    );
    assert_eq!((pa, admin_a), (61001, 61002), "{st_a}");
    assert_eq!((pb, admin_b), (61003, 61004), "B skips A's ports: {st_b}");
    let table_b = st_b["ingress_table"]
        .as_str()
        .expect("B's own table")
        .to_string();
    assert_eq!(row_b["container_ip"], n.address(5).as_str(), "{row_b}");

    let ip = n.address(5);
    let peer = Peer::new(&sb.slot, &n, 10);
    for (id, port) in [(&ida, pa), (&idb, pb)] {
        let got = peer.https(&sb.ca(), id, &ip, port);
        assert!(got.contains(HELLO), "TLS to {id} on {port}: {got}");
    }
    for app in [80, 8081] {
        let got = peer.tcp(&ip, app);
        assert!(
            got.as_ref().is_err_and(|e| e.contains("refused")),
            "app port {app}: {got:?}"
        );
    }
    let tables = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", a.pid()))
        .args(["nft", "list", "tables"])
        .output()
        .unwrap();
    let tables = text(&tables);
    assert!(
        tables.contains("table inet envoy_sidecar_ingress\n")
            && tables.contains(&format!("table inet {table_b}")),
        "{tables}"
    );
    // No guard repaired the other's table: each watches its own.
    std::thread::sleep(Duration::from_secs(1));
    for id in [&ida, &idb] {
        let r = status_row(&sb.config, "default", id).unwrap();
        assert_eq!(r["ingress_repairs"], 0, "{r}");
        assert_eq!(r["status"], "ready", "{r}");
    }

    // B goes (rm -f): A still serves and is still filtered.
    b.rm_f();
    assert!(b.inspect().is_none());
    assert!(peer.https(&sb.ca(), &ida, &ip, pa).contains(HELLO));
    assert!(peer.tcp(&ip, 80).is_err_and(|e| e.contains("refused")));
    a.rm_f();
    nothing_left(&sb, &n, &a);
}

/// `--network host`: no namespace of its own, so two proxied containers share the
/// host's: the second's Envoy takes proxy ports the first's (and every host
/// listener) leave free; both serve TLS on the host. `--network none`: only
/// loopback; the status says it waits for a network, and Envoy serves inside.
#[test]
fn nerdctl_network_host_twice_and_none() {
    if !can_run_without_containerd("nerdctl_network_host_twice_and_none") {
        return;
    }
    let sb = Sandbox::new("nerd-host", "", "");
    let n = Nerdctl::new(&sb.slot);
    let mut hosts = Vec::new();
    for k in [7, 8] {
        let app = sb.slot.tcp_port();
        let mut c = n.container(&sb, &nid(&sb.slot, k), k, &[], PortsVia::File, "host");
        c.spec["annotations"]["envoy-sidecar/ports"] = json!(app.to_string());
        c.spec["process"]["args"] =
            json!(["/bin/httpd", "-f", "-p", app.to_string(), "-h", "/www"]);
        c.create_and_start();
        let row = ready(&sb, c.id());
        assert_eq!(row["network"], "host", "{row}");
        hosts.push(c);
    }
    let p: Vec<u16> = hosts
        .iter()
        .map(|c| port_of(&c.inspect().unwrap(), 0, "internal_tls_proxy"))
        .collect();
    assert_ne!(p[0], p[1], "one host, two Envoys: {p:?}");
    for (c, port) in hosts.iter().zip(&p) {
        let got = https_in(std::process::id(), &sb.ca(), c.id(), *port);
        assert!(got.contains(HELLO), "{}: {got}", c.id());
    }

    let none = n.container(
        &sb,
        &nid(&sb.slot, 9),
        9,
        &[(sb.slot.tcp_port(), 80)],
        PortsVia::File,
        "none",
    );
    none.create_and_start();
    let row = row_when(&sb, none.id(), "waiting-for-network", |r| {
        r["status"] == "waiting-for-network"
    });
    assert!(row["container_ip"].is_null(), "{row}");
    let st = none.inspect().unwrap();
    let port = port_of(&st, 0, "internal_tls_proxy");
    wait_until(
        "Envoy serving inside, over lo",
        Duration::from_secs(10),
        || {
            let got = https_in(none.pid(), &sb.ca(), none.id(), port);
            if got.contains(HELLO) {
                Ok(())
            } else {
                Err(got)
            }
        },
    );
    assert!(n.veths().is_empty(), "{:?}", n.veths());

    for c in hosts.iter().chain([&none]) {
        c.rm_f();
    }
    nothing_left(&sb, &n, &none);
}

/// `nerdctl run -p ADDR:H:C`: the product's host ports for that app port (TLS and,
/// with unproxied mappings on, plain) are published on that host address only; a
/// loopback address cannot be DNATed to a container, so such a port is published
/// nowhere — and `status` says where each port is.
#[test]
fn nerdctl_p_with_a_host_address_publishes_the_tls_port_there_only() {
    if !can_run_without_containerd(
        "nerdctl_p_with_a_host_address_publishes_the_tls_port_there_only",
    ) {
        return;
    }
    let sb = Sandbox::new("nerd-hostip", "", "");
    let n = Nerdctl::new(&sb.slot);
    let (r0, r1) = (sb.slot.router(0), sb.slot.router(1));
    let id = nid(&sb.slot, 11);
    let c = n.container(
        &sb,
        &id,
        11,
        &[(sb.slot.tcp_port(), 80)],
        PortsVia::File,
        "bridge",
    );
    c.bind_host_ip(r0.host_ip());
    c.create_and_start();
    let row = ready(&sb, &id);
    assert_eq!(row["ports"][0]["host_ips"], json!([r0.host_ip()]), "{row}");
    let line = status_line(&sb.config, "default", &id).unwrap();
    assert!(line.contains(&format!("@{}", r0.host_ip())), "{line}");
    let st = c.inspect().unwrap();
    let (tls, plain) = (
        port_of(&st, 0, "external_tls_proxy"),
        port_of(&st, 0, "external"),
    );
    let nat = common::footprint::nat_in_pool(&sb.pool());
    assert_eq!(nat.len(), 2, "{nat:?}");
    assert!(
        nat.iter()
            .all(|(_, to)| to.ends_with(&format!("@{}", r0.host_ip()))),
        "{nat:?}"
    );
    assert!(
        r0.https(&sb.ca(), &id, tls).contains(HELLO),
        "on the bound address"
    );
    let other = r1.https(&sb.ca(), &id, tls);
    assert!(
        !other.contains(HELLO),
        "TLS on another host address: {other}"
    );
    let plain0 = r0.tcp(
        &format!("{}:{plain}", r0.host_ip()),
        "GET / HTTP/1.0\\r\\n\\r\\n",
    );
    assert!(plain0.is_ok_and(|r| r.contains(HELLO)));
    let plain1 = r1.tcp(
        &format!("{}:{plain}", r1.host_ip()),
        "GET / HTTP/1.0\\r\\n\\r\\n",
    );
    assert!(
        plain1.is_err(),
        "cleartext on another host address: {plain1:?}"
    );

    // -p 127.0.0.1:H:80: published nowhere, and said so.
    let id2 = nid(&sb.slot, 12);
    let c2 = n.container(
        &sb,
        &id2,
        12,
        &[(sb.slot.tcp_port(), 80)],
        PortsVia::File,
        "bridge",
    );
    c2.bind_host_ip("127.0.0.1");
    c2.create_and_start();
    let row2 = ready(&sb, &id2);
    assert_eq!(row2["ports"][0]["host_ips"], json!(["127.0.0.1"]), "{row2}");
    let st2 = c2.inspect().unwrap();
    let tls2 = port_of(&st2, 0, "external_tls_proxy");
    let nat = common::footprint::nat_in_pool(&sb.pool());
    assert!(
        !nat.iter().any(|(p, _)| *p == tls2),
        "a loopback-bound port has no NAT: {nat:?}"
    );
    assert!(!r0.https(&sb.ca(), &id2, tls2).contains(HELLO));

    for c in [&c, &c2] {
        c.rm_f();
    }
    nothing_left(&sb, &n, &c2);
}
