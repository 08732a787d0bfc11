//! Garden-style invocation: the wrapper driven directly as runc is driven by Garden's
//! runtime plugin — `run --detach --bundle B --pid-file P ID` on a bundle made with
//! `runc spec`, then `exec`, `events --stats`, `kill`, `delete` — behaves like the
//! containerd path. No containerd: a private runc `--root` (namespace `default` for
//! us), the container on a veth in its own network namespace, real runc and Envoy.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// A container started as Garden starts one. Fields drop in declaration order: the
/// container first, then the sandbox (config, CA, state), then the network namespace.
struct Garden {
    c: DirectRun,
    sb: Sandbox,
    net: Netns,
    /// `envoy-sidecar inspect` right after `run --detach`.
    st: Value,
    pid: u32,
    started: Instant,
}

fn start(name: &str, id: &str) -> Garden {
    let sb = Sandbox::new(name, "", "");
    let net = sb.slot.netns(0);
    let c = DirectRun::new(name, id, &sb.config);
    // The bundle, as Garden's plugin gets it: `runc spec`, then edited.
    let spec_path = c.runc_spec_bundle(&net.path, |spec| {
        spec["process"]["args"] = json!(httpd());
        spec["annotations"] = json!({ PORTS: "8080" });
        spec["linux"]["resources"]["memory"] = json!({"limit": 128 * MIB});
    });

    // run --detach: returns once the container runs, with the pid file written.
    let started = Instant::now();
    let (status, said) = c.run_detached();
    assert!(status.success(), "run --detach: {status}\n{said}");
    eprintln!("run --detach took {:?}", started.elapsed());
    let pid = c.pid();
    assert_eq!(c.status().as_deref(), Some("running"));

    // State, in namespace `default`, remembering runc's --root for gc.
    let st = c.inspect().expect("state recorded in namespace default");
    assert_eq!(st["namespace"], "default", "{st}");
    assert_eq!(st["runc_root"], c.root.display().to_string(), "{st}");
    assert_eq!(st["ports"][0]["internal"], 8080, "{st}");
    assert!(
        sb.state_dir
            .join("default")
            .join(id)
            .join("state.json")
            .is_file(),
        "state under <state_dir>/default/{id}"
    );
    // The spec runc ran carries our hooks (Garden's bundle had none).
    let patched: Value = serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    // (No createRuntime of ours: unproxied mappings on, no ingress filter.)
    assert!(
        patched["hooks"]["createRuntime"].is_null(),
        "{}",
        patched["hooks"]
    );
    for stage in ["poststart", "poststop"] {
        let hooks = patched["hooks"][stage].as_array().unwrap();
        assert_eq!(hooks.len(), 1, "{stage}: {hooks:?}");
        assert_eq!(hooks[0]["path"], cli_bin().display().to_string());
    }
    assert_eq!(st["init_pid"], pid, "poststart recorded the init pid: {st}");

    Garden {
        c,
        sb,
        net,
        st,
        pid,
        started,
    }
}

#[test]
fn garden_run_detach_exec_events_kill_delete() {
    if !can_run_without_containerd("garden_run_detach_exec_events_kill_delete") {
        return;
    }
    let id = "es-garden-1";
    let g = start("garden", id);
    let (c, sb, net, st, pid, started) = (&g.c, &g.sb, &g.net, &g.st, g.pid, g.started);
    let proxy = st["ports"][0]["internal_tls_proxy"].as_u64().unwrap();

    // The TLS proxy serves the app (HTTP/1.1 app; no ALPN asked for).
    let ca = sb.ca();
    let addr = format!("{}:{proxy}", net.ip);
    let served = openssl_wait_for(&addr, &ca, id, HELLO);
    assert!(served.contains("Verify return code: 0 (ok)"), "{served}");
    eprintln!("served through Envoy {:?} after run", started.elapsed());

    // exec with a process file that knows nothing of us: the wrapper adds our env.
    let process = c.dir.join("process.json");
    std::fs::write(
        &process,
        json!({
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", "echo $CF_INSTANCE_PORTS"],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/"
        })
        .to_string(),
    )
    .unwrap();
    let out = c.wrapper(&["exec", "--process", &process.display().to_string(), id]);
    assert!(out.status.success(), "exec: {}", text(&out));
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("CF_INSTANCE_PORTS is not JSON ({e}): {}", text(&out)));
    assert_eq!(seen, st["ports"], "exec sees the ports the state records");

    // events --stats: passed through to runc, memory stats included.
    let out = c.wrapper(&["events", "--stats", id]);
    assert!(out.status.success(), "events --stats: {}", text(&out));
    let ev: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("events --stats is not JSON ({e}): {}", text(&out)));
    assert_eq!(ev["type"], "stats", "{ev}");
    assert_eq!(ev["id"], id, "{ev}");
    let usage = &ev["data"]["memory"]["usage"];
    assert!(usage["usage"].as_u64().unwrap() > 0, "{ev}");

    // Memory: requested 128 MiB + the default 32 MiB allocation, in the cgroup.
    let want = 160 * MIB;
    assert_eq!(st["memory"]["requested_bytes"], 128 * MIB, "{st}");
    assert_eq!(st["memory"]["limit_bytes"], want, "{st}");
    assert_eq!(memory_limit_of(pid), want.to_string());
    assert_eq!(
        usage["limit"], want,
        "events --stats reports the raised limit: {ev}"
    );
    let cgroup = memory_cgroup_dir(pid);
    assert!(cgroup.is_dir(), "{}", cgroup.display());

    // Who runs now: supervisor and Envoy, and the NAT elements for the host ports.
    let record = sb.record_ns("default", id);
    let sup = record["supervisor"]["pid"]
        .as_i64()
        .expect("supervisor pid");
    let envoy = record["envoy"]["pid"].as_i64().expect("envoy pid");
    assert!(alive(sup) && alive(envoy), "{record}");
    let host_port = st["ports"][0]["external_tls_proxy"].as_u64().unwrap();
    let element = format!(". {host_port} :");
    assert!(
        nft_map().contains(&element),
        "host port {host_port} mapped: {}",
        nft_map()
    );

    // kill KILL, as Garden's plugin does, then delete.
    let out = c.wrapper(&["kill", id, "KILL"]);
    assert!(out.status.success(), "kill: {}", text(&out));
    wait_until("container stopped", Duration::from_secs(10), || {
        c.status().as_deref() == Some("stopped")
    });
    let out = c.wrapper(&["delete", id]);
    assert!(out.status.success(), "delete: {}", text(&out));

    assert_eq!(c.status(), None, "runc state {id} must fail after delete");
    assert!(c.runc(&["state", id]).status.code() != Some(0));
    assert!(c.inspect().is_none(), "state released");
    assert!(
        !sb.state_dir.join("default").join(id).exists(),
        "state directory removed"
    );
    wait_until("supervisor and Envoy gone", Duration::from_secs(10), || {
        !alive(sup) && !alive(envoy)
    });
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(
        !nft_map().contains(&element),
        "host port {host_port} still mapped: {}",
        nft_map()
    );
    let ps = Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| {
            l.contains(&sb.state_dir.display().to_string())
                || l.contains(&*sb.config.to_string_lossy())
        })
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// Garden's exec runner, dadoo (cloudfoundry/guardian `cmd/dadoo/main_linux.go`), does
/// not write the process spec to a file: guardian writes it to dadoo's stdin and dadoo
/// runs `runc --debug --log /proc/<pid>/fd/4 [--root R] exec -d -p /proc/<dadoo pid>/fd/0
/// --pid-file P ID`. The wrapper reads that pipe to add our variables and then writes
/// the result back "atomically" beside it — a temporary file in `/proc/<pid>/fd/` and a
/// rename — which cannot work: the exec fails, and the pipe has been drained so runc
/// could not have read the spec either. Ignored until the product handles a process
/// spec that is not a regular file (e.g. hand runc a patched copy instead).
#[test]
fn exec_with_the_process_spec_on_a_pipe_as_garden_dadoo_passes_it() {
    if !can_run_without_containerd("exec_with_the_process_spec_on_a_pipe_as_garden_dadoo_passes_it")
    {
        return;
    }
    let id = "es-garden-2";
    let g = start("garden-pipe", id);
    let spec = json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": ["/bin/sh", "-c", "echo $CF_INSTANCE_PORTS"],
        "env": ["PATH=/usr/bin:/bin"],
        "cwd": "/"
    })
    .to_string();
    // A pipe holding the spec, as dadoo's stdin does; we keep its read end open.
    let pipe = || {
        let mut feeder = Command::new("printf")
            .args(["%s", &spec])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(feeder.wait().unwrap().success());
        let pipe = feeder.stdout.take().unwrap();
        let path = format!("/proc/{}/fd/{}", std::process::id(), pipe.as_raw_fd());
        (pipe, path)
    };
    let pid_file = g.c.dir.join("exec.pid").display().to_string();
    // runc itself takes the spec from the pipe (and knows nothing of our variables).
    let (_keep, path) = pipe();
    let out =
        g.c.runc(&["exec", "-p", &path, "--pid-file", &pid_file, id]);
    assert!(out.status.success(), "runc exec -p {path}: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\n");
    // Through the wrapper, with Garden's argv.
    let (_keep, path) = pipe();
    let out =
        g.c.wrapper(&["--debug", "exec", "-p", &path, "--pid-file", &pid_file, id]);
    assert!(out.status.success(), "exec -p {path}: {}", text(&out));
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("CF_INSTANCE_PORTS is not JSON ({e}): {}", text(&out)));
    assert_eq!(seen, g.st["ports"]);
}
