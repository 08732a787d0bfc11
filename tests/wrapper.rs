//! The wrapper driven directly, as containerd's shim or Garden drive runc, with a
//! recording stand-in for runc: argv hand-over, the runc log contract, exec env and
//! release paths. No root needed.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::process::Command;

use common::{FakeStack, cli, cli_bin, slots, text, wrapper_bin};
use serde_json::{Value, json};

/// The wrapper for namespace `ns1` in front of a recording stand-in for runc
/// ([`FakeStack`]: argv logged a line per call, exit codes from `exit-<subcommand>`,
/// `features` printing a fixed JSON), the bundle a minimal spec with a port.
fn fake(name: &str) -> FakeStack {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    FakeStack::new(
        &format!("es-wr-{name}"),
        "ns1",
        "",
        &json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "env": ["PATH=/bin"], "user": {"uid": uid, "gid": gid}},
            "annotations": {"envoy-sidecar/ports": "8080"},
            "x-future": {"kept": true}
        }),
    )
}

/// A JSON array of strings.
fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// Whether the CLI stand-in gets a call ending in `want` within 5 s (the supervisor
/// is started detached: its first line may follow the wrapper's exit).
fn poll_cli_calls(f: &FakeStack, want: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if f.cli_calls().iter().any(|c| c.ends_with(want)) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn bundle_arg(f: &FakeStack) -> String {
    f.bundle.display().to_string()
}

#[test]
fn create_hands_runc_the_original_argv_and_patches_the_spec() {
    let f = fake("create");
    let b = bundle_arg(&f);
    let pid_file = f.dir.join("init.pid").display().to_string();
    let out = f.create(&["--pid-file", &pid_file], "c1");
    assert!(out.status.success(), "{}", text(&out));
    let calls = f.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].ends_with(&format!(
            "--log-format json create --bundle {b} --pid-file {pid_file} c1"
        )),
        "{calls:?}"
    );
    let spec = f.spec();
    assert_eq!(
        spec["x-future"],
        json!({"kept": true}),
        "unknown fields survive"
    );
    let env = strings(&spec["process"]["env"]);
    assert!(
        env.iter()
            .any(|e| e.starts_with("CF_INSTANCE_PORTS=[{\"internal_tls_proxy\":61001")),
        "{env:?}"
    );
    let ip = format!("CF_INSTANCE_IP={}", slots::UNROUTED);
    assert!(env.contains(&ip.as_str()), "{env:?}");
    // `create`: no hook of ours for runc to run. Once runc returned, the wrapper did
    // their work itself: the init pid from --pid-file recorded, the supervisor started.
    assert!(spec.get("hooks").is_none(), "{}", spec["hooks"]);
    let st = f
        .state_of("c1")
        .expect("state recorded under namespace ns1");
    let pid: i64 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(st["init_pid"], pid, "{st}");
    assert!(st["started_at"].is_string(), "{st}");
    let launched = poll_cli_calls(&f, "supervise c1 --namespace ns1");
    assert!(launched, "the supervisor was started: {:?}", f.cli_calls());

    // delete releases.
    let out = f.wrapper(&["delete", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(f.state_of("c1").is_none());
}

/// After runc's `create` the wrapper needs the init pid to start the sidecar: without
/// a --pid-file and with `runc state` failing, the create fails whole — the container
/// force-deleted in runc, no state, the reason in runc's --log for containerd.
#[test]
fn a_create_whose_init_pid_cannot_be_found_is_undone() {
    let f = fake("nopid");
    f.runc.fail("state", 1);
    let out = f.create(&[], "c1");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let calls = f.calls();
    assert!(
        calls.last().unwrap().ends_with(" delete --force c1"),
        "{calls:?}"
    );
    assert!(f.state_of("c1").is_none(), "no state left");
    let leases: Vec<_> = std::fs::read_dir(f.dir.join("uid-leases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(leases.is_empty(), "no uid lease left: {leases:?}");
    assert!(
        f.cli_calls().is_empty(),
        "no supervisor: {:?}",
        f.cli_calls()
    );
    let log = std::fs::read_to_string(&f.runc_log).unwrap();
    assert!(log.contains("init pid"), "{log}");
}

#[test]
fn bad_annotation_never_reaches_runc_and_is_logged_for_containerd() {
    let f = fake("badann");
    f.set_spec_annotation("envoy-sidecar/ports", "8080,99999");
    let before = std::fs::read(f.bundle.join("config.json")).unwrap();
    let out = f.create(&[], "c1");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        f.calls().is_empty(),
        "runc must not be called: {:?}",
        f.calls()
    );
    assert_eq!(
        std::fs::read(f.bundle.join("config.json")).unwrap(),
        before,
        "spec untouched"
    );
    let log = std::fs::read_to_string(&f.runc_log).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    let msg = last["msg"].as_str().unwrap();
    assert!(
        msg.contains("envoy-sidecar/ports") && msg.contains("99999") && msg.contains("valid:"),
        "{msg}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("envoy-sidecar/ports"));
    assert!(f.state_of("c1").is_none());
}

#[test]
fn failed_runc_create_releases_the_claim() {
    let f = fake("runcfail");
    f.runc.fail("create", 3);
    let out = f.create(&[], "c1");
    assert_eq!(
        out.status.code(),
        Some(3),
        "runc's exit code is passed on: {}",
        text(&out)
    );
    assert!(f.state_of("c1").is_none(), "claim must be released");
    assert!(!f.state.join("ns1/c1").exists());
}

#[test]
fn refused_delete_keeps_state() {
    let f = fake("refused");
    assert!(f.create(&[], "c1").status.success());
    // runc refuses (running, no --force) and still knows the container.
    f.runc.fail("delete", 1);
    let out = f.wrapper(&["delete", "c1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        f.state_of("c1").is_some(),
        "a refused delete must not release"
    );
    // Once runc no longer knows it, delete releases.
    f.runc.fail("state", 1);
    f.wrapper(&["delete", "c1"]);
    assert!(f.state_of("c1").is_none());
}

#[test]
fn exec_process_file_gets_the_variables() {
    let f = fake("exec");
    assert!(f.create(&[], "c1").status.success());
    let process = f.dir.join("process.json");
    std::fs::write(
        &process,
        json!({"args": ["sh"], "env": ["PATH=/bin", "CF_INSTANCE_IP=override"], "cwd": "/"})
            .to_string(),
    )
    .unwrap();
    let p = process.display().to_string();
    let out = f.wrapper(&["exec", "--process", &p, "--detach", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&std::fs::read(&process).unwrap()).unwrap();
    let env = strings(&v["env"]);
    assert!(
        env.iter().any(|e| e.starts_with("CF_INSTANCE_PORTS=")),
        "{env:?}"
    );
    assert!(
        env.contains(&"CF_INSTANCE_IP=override"),
        "explicit exec env wins: {env:?}"
    );
    assert_eq!(
        env.iter()
            .filter(|e| e.starts_with("CF_INSTANCE_IP="))
            .count(),
        1
    );
    assert_eq!(v["cwd"], "/");
}

#[test]
fn passthrough_commands_are_untouched() {
    let f = fake("pass");
    let out = f.wrapper(&["features"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"ociVersionMin\":\"1.0.0\"}\n"
    );
    f.wrapper(&["kill", "c1", "15"]);
    f.wrapper(&["state", "c1"]);
    let calls = f.calls();
    assert!(
        calls[0].ends_with("--log-format json features"),
        "{calls:?}"
    );
    assert!(
        calls[1].ends_with("--log-format json kill c1 15"),
        "{calls:?}"
    );
    assert!(
        calls[2].ends_with("--log-format json state c1"),
        "{calls:?}"
    );
}

#[test]
fn runc_pointing_at_the_wrapper_is_refused() {
    let f = fake("loop");
    let cfg = std::fs::read_to_string(&f.config).unwrap();
    let fake = f.runc.path.display().to_string();
    std::fs::write(
        &f.config,
        cfg.replace(&fake, &wrapper_bin().display().to_string()),
    )
    .unwrap();
    let out = f.create(&[], "c1");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runtime.runc") && err.contains("wrapper itself"),
        "{err}"
    );
    let check = cli(&f.config).arg("check-config").output().unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("runtime.runc"));
}

#[test]
fn hook_stages_through_the_cli() {
    let f = fake("hooks");
    assert!(f.create(&[], "c1").status.success());
    let hook = |stage: &str, stdin: &str| {
        use std::io::Write;
        let mut c = cli(&f.config)
            .args(["hook", stage, "--namespace", "ns1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let st = r#"{"ociVersion":"1.0.2","id":"c1","pid":777,"status":"creating","bundle":"/b"}"#;
    assert!(hook("createRuntime", st).status.success());
    assert_eq!(f.state_of("c1").unwrap()["init_pid"], 777);
    // Garbage on stdin fails createRuntime (aborting create) ...
    let out = hook("createRuntime", "garbage");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("OCI state"));
    // ... but never poststop, which must let runc's other hooks and delete proceed.
    assert!(hook("poststop", "garbage").status.success());
    assert!(hook("poststop", st).status.success());
    assert!(f.state_of("c1").is_none());
    assert!(hook("poststop", st).status.success(), "idempotent");
}

#[test]
fn recommend_memory_follows_the_measured_model() {
    let run = |args: &[&str]| {
        let o = Command::new(cli_bin()).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let (ok, out) = run(&["recommend-memory", "--connections", "1000"]);
    let mb = |o: &str| -> u64 {
        o.lines()
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        ok && out.starts_with("additional_memory_allocation_mb = "),
        "{out}"
    );
    let tls = mb(&out);
    let (_, m) = run(&["recommend-memory", "--connections", "1000", "--mtls"]);
    assert!(mb(&m) > tls, "mTLS costs more: {m} vs {out}");
    assert!(
        tls > 40,
        "must exceed the reference's 40 MB at 1000 connections: {out}"
    );
    let (ok, out) = run(&["recommend-memory", "--connections", "lots"]);
    assert!(
        !ok && out.contains("--connections") && out.contains("valid:"),
        "{out}"
    );
}

/// runc's stderr without the per-line timestamps of its logrus lines.
fn untimed(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .map(|l| match l.strip_prefix("time=\"") {
            Some(rest) => rest.split_once("\" ").map_or(rest, |(_, r)| r).to_string(),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An argv the wrapper cannot parse, for a command it has nothing to decide about,
/// goes to runc unchanged: the caller sees runc's usage text and exit code, byte for
/// byte, as if the wrapper were not there. A `create` it cannot parse is still refused
/// (it might be a proxied container).
#[test]
fn an_unknown_global_flag_to_state_gives_runcs_exit_code_and_usage_text() {
    let runc_bin = common::real_runc();
    let runc_path = runc_bin.to_str().unwrap();
    let f = fake("usage");
    let cfg = std::fs::read_to_string(&f.config).unwrap();
    let fake = f.runc.path.display().to_string();
    std::fs::write(&f.config, cfg.replace(&fake, runc_path)).unwrap();
    let root = f.dir.join("runc-root").display().to_string();
    let cases: &[&[&str]] = &[
        &["--bogus", "state", "c1"],
        &["--root", &root, "--debug=yes", "state", "c1"],
        &["--root", &root, "kill", "--frobnicate", "c1"],
        &["--root", &root, "delete", "--force=maybe", "c1"],
        &["--root", &root, "exec", "--frobnicate", "c1", "true"],
        &["--root", &root, "state", "a/b"],
        &["--root", &root, "delete", ".."],
        &["--root"],
    ];
    for argv in cases {
        let runc = Command::new(runc_path).args(*argv).output().unwrap();
        let ours = Command::new(wrapper_bin())
            .args(*argv)
            .env("ENVOY_SIDECAR_CONFIG", &f.config)
            .output()
            .unwrap();
        assert_ne!(runc.status.code(), Some(0), "{argv:?}: {}", text(&runc));
        assert_eq!(
            ours.status.code(),
            runc.status.code(),
            "{argv:?}: {}",
            text(&ours)
        );
        assert_eq!(ours.stdout, runc.stdout, "{argv:?}");
        assert_eq!(untimed(&ours.stderr), untimed(&runc.stderr), "{argv:?}");
    }
    // The control: a create of a container that asks for a proxy is refused with the
    // wrapper's reason.
    let b = bundle_arg(&f);
    let out = f.wrapper(&["--bogus", "create", "--bundle", &b, "c1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown global flag \"--bogus\""),
        "{}",
        text(&out)
    );
}

/// A flag of a runc newer than the wrapper knows: for a container that asks for a
/// proxy the create is refused, naming the flag and the runc versions known, with
/// nothing left behind; for one that asks for none the argv reaches runc unchanged,
/// exactly as with the proxy disabled. runc 1.2's `--pidfd-socket` is known.
#[test]
fn an_unknown_runc_flag_refuses_only_a_proxied_create() {
    let f = fake("newflag");
    let b = bundle_arg(&f);
    let out = f.wrapper(&["create", "--bundle", &b, "--future-flag", "x", "c1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"--future-flag\"") && err.contains("runc 1.1 to 1.3"),
        "{err}"
    );
    assert!(f.calls().is_empty(), "runc not called: {:?}", f.calls());
    assert!(f.state_of("c1").is_none(), "no state");
    // containerd shows the last error line of --log.
    let log = std::fs::read_to_string(&f.runc_log).unwrap();
    assert!(log.contains("--future-flag"), "{log}");

    // The same argv for a container without envoy-sidecar annotations: runc's.
    let mut spec = f.spec();
    spec["annotations"] = json!({"other/thing": "1"});
    std::fs::write(f.bundle.join("config.json"), spec.to_string()).unwrap();
    let out = f.wrapper(&["create", "--bundle", &b, "--future-flag", "x", "c2"]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = f.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].ends_with(&format!("create --bundle {b} --future-flag x c2")),
        "{calls:?}"
    );
    assert!(f.state_of("c2").is_none(), "nothing of ours");

    // runc 1.2's --pidfd-socket parses: the proxied create goes ahead.
    let mut spec = f.spec();
    spec["annotations"] = json!({"envoy-sidecar/ports": "8080"});
    std::fs::write(f.bundle.join("config.json"), spec.to_string()).unwrap();
    let out = f.create(&["--pidfd-socket", "/run/x.sock"], "c3");
    assert!(out.status.success(), "{}", text(&out));
    assert!(f.state_of("c3").is_some(), "proxied");
    let calls = f.calls();
    assert!(
        calls[calls.len() - 2].ends_with(&format!(
            "create --bundle {b} --pidfd-socket /run/x.sock c3"
        )),
        "{calls:?}"
    );
    // Without --pid-file the wrapper asks runc for the init pid.
    assert!(calls[calls.len() - 1].ends_with(" state c3"), "{calls:?}");
}

/// A bundle whose config.json runc refuses (empty, as runc's own timens.bats leaves
/// it; not JSON; missing) gets runc's own error and exit code, with the proxy enabled
/// and the argv understood: the wrapper decides nothing and says nothing.
#[test]
fn a_spec_runc_refuses_gets_runcs_own_error() {
    let runc = common::real_runc();
    let f = fake("badspec");
    let cfg = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(
        &f.config,
        cfg.replace(&f.runc.path.display().to_string(), runc.to_str().unwrap()),
    )
    .unwrap();
    let root = f.dir.join("runc-root/plain").display().to_string();
    let b = bundle_arg(&f);
    for (what, bytes) in [("empty", &b""[..]), ("not JSON", &b"{\"ociVers"[..])] {
        std::fs::write(f.bundle.join("config.json"), bytes).unwrap();
        let argv = ["--root", &root, "create", "--bundle", &b, "c1"];
        let plain = Command::new(&runc).args(argv).output().unwrap();
        let ours = Command::new(wrapper_bin())
            .args(argv)
            .env("ENVOY_SIDECAR_CONFIG", &f.config)
            .output()
            .unwrap();
        assert_ne!(plain.status.code(), Some(0), "{what}: {}", text(&plain));
        assert_eq!(
            ours.status.code(),
            plain.status.code(),
            "{what}: {}",
            text(&ours)
        );
        assert_eq!(ours.stdout, plain.stdout, "{what}");
        assert_eq!(untimed(&ours.stderr), untimed(&plain.stderr), "{what}");
        assert!(f.state_of("c1").is_none(), "{what}: no state");
    }
}

/// runc accepts ids with a comma; so does the wrapper, from create to delete.
#[test]
fn ids_with_a_comma_are_accepted_end_to_end() {
    let f = fake("comma");
    let id = "web,1";
    let out = f.create(&[], id);
    assert!(out.status.success(), "{}", text(&out));
    assert!(f.state_of(id).is_some(), "state recorded for {id}");
    let env = strings(&f.spec()["process"]["env"])
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    assert!(
        env.iter().any(|e| e.starts_with("CF_INSTANCE_PORTS=")),
        "{env:?}"
    );
    let process = f.dir.join("process.json");
    std::fs::write(
        &process,
        json!({"args": ["sh"], "env": [], "cwd": "/"}).to_string(),
    )
    .unwrap();
    let p = process.display().to_string();
    let out = f.wrapper(&["exec", "--process", &p, id]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&std::fs::read(&process).unwrap()).unwrap();
    assert!(
        strings(&v["env"])
            .iter()
            .any(|e| e.starts_with("CF_INSTANCE_PORTS=")),
        "{v}"
    );
    let out = f.wrapper(&["kill", id, "TERM"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = f.wrapper(&["delete", id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(f.state_of(id).is_none(), "released");
    let calls = f.calls();
    for want in [
        format!("create --bundle {} {id}", bundle_arg(&f)),
        format!("exec --process {p} {id}"),
        format!("kill {id} TERM"),
        format!("delete {id}"),
    ] {
        assert!(
            calls.iter().any(|c| c.ends_with(&want)),
            "{want}: {calls:?}"
        );
    }
}

/// containerd 2.x's NRI plugins and CDI devices may already have put hooks into the
/// spec (every stage, several each) before the runtime sees it: all of them stay, in
/// their order. Under `runc run` ours go after theirs (createRuntime, poststart) and
/// first in poststop (before a network teardown such as nerdctl's, so NAT goes while
/// the address is still the container's); a second run of the bundle does not stack
/// ours, and a `create` of it (whose hooks' work the wrapper does itself) removes them.
#[test]
fn hooks_nri_and_cdi_put_in_the_spec_are_kept_in_order() {
    let f = fake("nri-hooks");
    let theirs = |who: &str, stage: &str| json!({"path": format!("/usr/libexec/{who}"), "args": [who, stage], "env": ["A=1"], "timeout": 5});
    let stages = [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ];
    let mut spec = f.spec();
    // Unproxied mappings off: our createRuntime hook (the ingress filter) is there too.
    for st in stages {
        spec["hooks"][st] = json!([theirs("nri-plugin", st), theirs("cdi-hook", st)]);
    }
    std::fs::write(f.bundle.join("config.json"), spec.to_string()).unwrap();
    let cfg = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(
        &f.config,
        cfg.replace(
            "[proxy]\nenabled = true\n",
            "[proxy]\nenabled = true\nenable_unproxied_port_mappings = false\n",
        ),
    )
    .unwrap();
    let b = bundle_arg(&f);
    for round in 0..3 {
        // Each later round re-creates the same bundle (state released first); the
        // last one with `create`.
        if round > 0 {
            let out = f.wrapper(&["delete", "--force", "c1"]);
            assert!(out.status.success(), "{}", text(&out));
        }
        let out = if round < 2 {
            f.wrapper(&["run", "--detach", "--bundle", &b, "c1"])
        } else {
            f.create(&[], "c1")
        };
        assert!(out.status.success(), "round {round}: {}", text(&out));
        let hooks = &f.spec()["hooks"];
        let ours = f.cli.display().to_string();
        for st in stages {
            let list = hooks[st].as_array().unwrap();
            let paths: Vec<&str> = list.iter().map(|h| h["path"].as_str().unwrap()).collect();
            let want_theirs = [theirs("nri-plugin", st), theirs("cdi-hook", st)];
            let kept: Vec<&Value> = list.iter().filter(|h| h["path"] != ours).collect();
            assert_eq!(
                kept,
                want_theirs.iter().collect::<Vec<_>>(),
                "{st}: {paths:?}"
            );
            match st {
                _ if round == 2 => assert_eq!(paths.len(), 2, "{st}: none of ours: {paths:?}"),
                "createRuntime" | "poststart" => {
                    assert_eq!(paths.len(), 3, "{st}: {paths:?}");
                    assert_eq!(paths[2], ours, "{st}: ours last: {paths:?}")
                }
                "poststop" => {
                    assert_eq!(paths.len(), 3, "{st}: {paths:?}");
                    assert_eq!(paths[0], ours, "{st}: ours first: {paths:?}")
                }
                _ => assert_eq!(paths.len(), 2, "{st}: none of ours: {paths:?}"),
            }
        }
    }
}

/// The state of container `c1` (one app port, 8080) created with the host port pool
/// `start..=start + 3`.
fn created_with_pool_from(tag: &str, start: u16) -> Value {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let f = FakeStack::new(
        tag,
        "ns1",
        &format!("[ports]\npool_start = {start}\npool_end = {}\n", start + 3),
        &json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "env": ["PATH=/bin"], "user": {"uid": uid, "gid": gid}},
            "annotations": {"envoy-sidecar/ports": "8080"}
        }),
    );
    let out = f.create(&[], "c1");
    assert!(out.status.success(), "create: {}", text(&out));
    f.state_of("c1").expect("state")
}

/// A host port some host process listens on is never handed out: NAT would take that
/// process's outside traffic (nerdctl >= 2.1.6 binds its `-p` ports; any service may
/// sit in the pool). The pool here: the listener's port and the three above it.
#[test]
fn a_host_port_a_host_process_listens_on_is_skipped() {
    let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let busy = l.local_addr().unwrap().port();
    let st = created_with_pool_from("es-wr-listener", busy);
    let host = st["ports"][0]["external_tls_proxy"].as_u64().unwrap();
    assert_ne!(
        host,
        u64::from(busy),
        "the listener's port was handed out: {st}"
    );
    assert!(
        (u64::from(busy) + 1..=u64::from(busy) + 3).contains(&host),
        "{st}"
    );
    drop(l);
}

/// Only listeners count: a host port that is merely the local end of a connection (an
/// outgoing one's ephemeral port, which the ephemeral range shares with any pool) is
/// handed out as usual — DNAT of new inbound connections does not touch it. (CI once
/// skipped a pool's first port this way, nondeterministically, with a bind probe.)
#[test]
fn a_host_port_that_is_only_a_connections_local_end_is_handed_out() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A free port for the client's end, then a connection from exactly that port.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let at = |p| SockaddrIn::from(std::net::SocketAddrV4::new([127, 0, 0, 1].into(), p));
    bind(sock.as_raw_fd(), &at(port)).unwrap();
    connect(sock.as_raw_fd(), &at(l.local_addr().unwrap().port())).unwrap();
    let (_server_end, _) = l.accept().unwrap();
    let st = created_with_pool_from("es-wr-connend", port);
    let host: Vec<u64> = st["ports"][0]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("external"))
        .filter_map(|(_, v)| v.as_u64())
        .collect();
    assert!(
        host.contains(&u64::from(port)),
        "the pool's first port {port} (a connection's local end, no listener) was skipped: {st}"
    );
    drop(sock);
}

/// The one deliberate difference from plain runc: `--version` (and `-v`) prints
/// `envoy-sidecar-runc <version> (<commit>)` first, then the real runc's own output,
/// byte for byte, with its exit code — also with a configuration that does not load.
/// `--help` stays runc's alone.
#[test]
fn version_names_the_wrapper_then_gives_runcs_own() {
    let runc_bin = common::real_runc();
    let f = fake("version");
    let cfg = std::fs::read_to_string(&f.config).unwrap();
    let fake = f.runc.path.display().to_string();
    std::fs::write(&f.config, cfg.replace(&fake, runc_bin.to_str().unwrap())).unwrap();
    let runc = Command::new(&runc_bin).arg("--version").output().unwrap();
    assert!(runc.status.success(), "{}", text(&runc));
    let cli = Command::new(cli_bin()).arg("--version").output().unwrap();
    let cli_line = String::from_utf8_lossy(&cli.stdout).trim().to_string();
    let (name, version) = cli_line.split_once(' ').unwrap();
    assert_eq!(name, "envoy-sidecar", "{cli_line}");
    assert!(
        version.starts_with(env!("CARGO_PKG_VERSION")) && version.ends_with(')'),
        "{cli_line}"
    );
    for flag in ["--version", "-v"] {
        let ours = Command::new(wrapper_bin())
            .arg(flag)
            .env("ENVOY_SIDECAR_CONFIG", &f.config)
            .output()
            .unwrap();
        assert_eq!(ours.status.code(), Some(0), "{}", text(&ours));
        let want = [
            format!("envoy-sidecar-runc {version}\n").into_bytes(),
            runc.stdout.clone(),
        ]
        .concat();
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&want),
            "{flag}"
        );
    }
    // A configuration that does not even parse: still both, runc being the default.
    std::fs::write(&f.config, "not toml [").unwrap();
    let ours = Command::new(wrapper_bin())
        .arg("--version")
        .env("ENVOY_SIDECAR_CONFIG", &f.config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ours.stdout).starts_with("envoy-sidecar-runc "),
        "{}",
        text(&ours)
    );
    let help = Command::new(wrapper_bin())
        .arg("--help")
        .env("ENVOY_SIDECAR_CONFIG", &f.config)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("envoy-sidecar-runc 0"));
}

/// Every subcommand of the operator command answers `--help` and `-h` with exit 0;
/// `--version` names the commit; a typo gets a suggestion and exit 2.
#[test]
fn the_operator_command_has_help_version_and_suggestions() {
    let run = |args: &[&str]| Command::new(cli_bin()).args(args).output().unwrap();
    let top = run(&["--help"]);
    assert!(top.status.success());
    let top = String::from_utf8_lossy(&top.stdout).to_string();
    let subs: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| *s != "help")
        .collect();
    assert!(subs.len() >= 15, "{top}");
    for s in &subs {
        for h in ["--help", "-h"] {
            let o = run(&[s, h]);
            assert!(o.status.success(), "{s} {h}: {}", text(&o));
            assert!(
                String::from_utf8_lossy(&o.stdout).contains(&format!("Usage: envoy-sidecar {s}")),
                "{s} {h}: {}",
                text(&o)
            );
        }
    }
    let o = run(&["stauts"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("'status'"),
        "{}",
        text(&o)
    );
    let o = run(&["completions", "bash"]);
    assert!(
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains("complete -F _envoy__sidecar")
    );
}

/// `install` writes shell completions (bash, zsh, fish) and a man page per command
/// beside everything else, `uninstall` removes them with the rest; `doctor` shows
/// both binaries' versions.
#[test]
fn install_writes_completions_and_man_pages_and_doctor_shows_versions() {
    let tmp = common::TempDir::new("es-install-docs");
    let root = tmp.path().join("root");
    let run = |args: &[&str]| {
        Command::new(cli_bin())
            .args(args)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap()
    };
    let out = run(&["install", "--containerd", "/nonexistent/containerd"]);
    assert!(out.status.success(), "install: {}", text(&out));
    for f in [
        "usr/share/bash-completion/completions/envoy-sidecar",
        "usr/share/zsh/vendor-completions/_envoy-sidecar",
        "usr/share/fish/vendor_completions.d/envoy-sidecar.fish",
        "usr/share/man/man1/envoy-sidecar.1",
        "usr/share/man/man1/envoy-sidecar-status.1",
        "usr/share/man/man1/envoy-sidecar-doctor.1",
    ] {
        let body = std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(body.contains("envoy"), "{f}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(f),
            "{f} not reported"
        );
    }
    let man =
        std::fs::read_to_string(root.join("usr/share/man/man1/envoy-sidecar-status.1")).unwrap();
    assert!(man.contains(".TH") && man.contains("\\-\\-json"), "{man}");
    let out = run(&["uninstall"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    assert!(!root.join("usr/share/man/man1/envoy-sidecar.1").exists());
    assert!(
        !root
            .join("usr/share/bash-completion/completions/envoy-sidecar")
            .exists()
    );

    let doctor = Command::new(cli_bin())
        .args(["--config", "/nonexistent/envoy-sidecar.toml", "doctor"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&doctor.stdout)
        .lines()
        .find(|l| l.contains("versions"))
        .unwrap_or_else(|| panic!("no versions line: {}", text(&doctor)))
        .to_string();
    let v = envoy_sidecar::version();
    assert!(
        line.starts_with("ok")
            && line.contains(&format!("envoy-sidecar {v}"))
            && line.contains(&format!("envoy-sidecar-runc {v}")),
        "{line}"
    );
}
