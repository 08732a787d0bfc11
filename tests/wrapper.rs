//! The wrapper driven directly, as containerd's shim or Garden drive runc, with a
//! recording stand-in for runc: argv hand-over, the runc log contract, exec env and
//! release paths. No root needed.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{cli_bin, text, wrapper_bin, write_script};
use serde_json::{Value, json};

struct Fake {
    dir: PathBuf,
    config: PathBuf,
    state: PathBuf,
    bundle: PathBuf,
    argv_log: PathBuf,
    runc_log: PathBuf,
}

impl Fake {
    /// A fake runc that records its argv (one line per call) and exits with the code in
    /// `<dir>/exit-<subcommand>` if present, else 0; `features` prints a fixed JSON.
    fn new(name: &str) -> Fake {
        let dir = std::env::temp_dir().join(format!("es-wr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bundle")).unwrap();
        let argv_log = dir.join("argv.log");
        let runc = dir.join("fake-runc");
        write_script(
            &runc,
            &format!(
                "#!/bin/sh\necho \"$*\" >> {log}\nfor a; do case \"$a\" in create|delete|exec|features|state|start|kill)\n  \
                 [ \"$a\" = features ] && echo '{{\"ociVersionMin\":\"1.0.0\"}}'\n  \
                 [ -f {dir}/exit-$a ] && exit $(cat {dir}/exit-$a)\n  exit 0;; esac; done\n",
                log = argv_log.display(),
                dir = dir.display()
            ),
        );
        let out = Command::new(cli_bin())
            .args(["generate-ca", "--out"])
            .arg(dir.join("ca"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let state = dir.join("state");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nenabled = true\n[instance_identity]\nca_cert = {:?}\nca_key = {:?}\n\
                 [runtime]\nrunc = {:?}\nstate_dir = {:?}\n[host]\naddress = \"198.51.100.7\"\n",
                dir.join("ca/ca.crt"),
                dir.join("ca/ca.key"),
                runc,
                state
            ),
        )
        .unwrap();
        let uid = unsafe { libc::getuid() };
        let gid = unsafe { libc::getgid() };
        std::fs::write(
            dir.join("bundle/config.json"),
            json!({
                "ociVersion": "1.0.2",
                "process": {"args": ["sh"], "env": ["PATH=/bin"], "user": {"uid": uid, "gid": gid}},
                "annotations": {"envoy-sidecar/ports": "8080"},
                "x-future": {"kept": true}
            })
            .to_string(),
        )
        .unwrap();
        Fake {
            runc_log: dir.join("log.json"),
            bundle: dir.join("bundle"),
            dir,
            config,
            state,
            argv_log,
        }
    }

    /// Run the wrapper as containerd's shim would for namespace `ns`.
    fn wrapper(&self, args: &[&str]) -> Output {
        let root = self.dir.join("runc-root/runc/ns1");
        let mut full: Vec<String> = vec![
            "--root".into(),
            root.display().to_string(),
            "--log".into(),
            self.runc_log.display().to_string(),
            "--log-format".into(),
            "json".into(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        Command::new(wrapper_bin())
            .args(&full)
            .env("ENVOY_SIDECAR_CONFIG", &self.config)
            .output()
            .unwrap()
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.argv_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn spec(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.bundle.join("config.json")).unwrap()).unwrap()
    }

    fn state_of(&self, id: &str) -> Option<Value> {
        std::fs::read(self.state.join("ns1").join(id).join("state.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    fn set_spec_annotation(&self, k: &str, v: &str) {
        let mut s = self.spec();
        s["annotations"][k] = json!(v);
        std::fs::write(self.bundle.join("config.json"), s.to_string()).unwrap();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bundle_arg(f: &Fake) -> String {
    f.bundle.display().to_string()
}

#[test]
fn create_hands_runc_the_original_argv_and_patches_the_spec() {
    let f = Fake::new("create");
    let b = bundle_arg(&f);
    let out = f.wrapper(&["create", "--bundle", &b, "--pid-file", "/tmp/p", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    let calls = f.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].ends_with(&format!(
            "--log-format json create --bundle {b} --pid-file /tmp/p c1"
        )),
        "{calls:?}"
    );
    let spec = f.spec();
    assert_eq!(
        spec["x-future"],
        json!({"kept": true}),
        "unknown fields survive"
    );
    let env: Vec<&str> = spec["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.iter()
            .any(|e| e.starts_with("CF_INSTANCE_PORTS=[{\"internal_tls_proxy\":61001")),
        "{env:?}"
    );
    assert!(env.contains(&"CF_INSTANCE_IP=198.51.100.7"), "{env:?}");
    for stage in ["createRuntime", "poststart", "poststop"] {
        let hooks = spec["hooks"][stage].as_array().unwrap();
        assert_eq!(hooks.len(), 1);
        let args: Vec<&str> = hooks[0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            &args[args.len() - 4..],
            ["hook", stage, "--namespace", "ns1"]
        );
        assert_eq!(hooks[0]["path"], cli_bin().display().to_string());
    }
    assert!(
        f.state_of("c1").is_some(),
        "state recorded under namespace ns1"
    );

    // delete releases.
    let out = f.wrapper(&["delete", "c1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(f.state_of("c1").is_none());
}

#[test]
fn bad_annotation_never_reaches_runc_and_is_logged_for_containerd() {
    let f = Fake::new("badann");
    f.set_spec_annotation("envoy-sidecar/ports", "8080,99999");
    let b = bundle_arg(&f);
    let before = std::fs::read(f.bundle.join("config.json")).unwrap();
    let out = f.wrapper(&["create", "--bundle", &b, "c1"]);
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
    let f = Fake::new("runcfail");
    std::fs::write(f.dir.join("exit-create"), "3").unwrap();
    let b = bundle_arg(&f);
    let out = f.wrapper(&["create", "--bundle", &b, "c1"]);
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
    let f = Fake::new("refused");
    let b = bundle_arg(&f);
    assert!(
        f.wrapper(&["create", "--bundle", &b, "c1"])
            .status
            .success()
    );
    // runc refuses (running, no --force) and still knows the container.
    std::fs::write(f.dir.join("exit-delete"), "1").unwrap();
    let out = f.wrapper(&["delete", "c1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        f.state_of("c1").is_some(),
        "a refused delete must not release"
    );
    // Once runc no longer knows it, delete releases.
    std::fs::write(f.dir.join("exit-state"), "1").unwrap();
    f.wrapper(&["delete", "c1"]);
    assert!(f.state_of("c1").is_none());
}

#[test]
fn exec_process_file_gets_the_variables() {
    let f = Fake::new("exec");
    let b = bundle_arg(&f);
    assert!(
        f.wrapper(&["create", "--bundle", &b, "c1"])
            .status
            .success()
    );
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
    let env: Vec<&str> = v["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
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
    let f = Fake::new("pass");
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
    let f = Fake::new("loop");
    let cfg = std::fs::read_to_string(&f.config).unwrap();
    let fake = f.dir.join("fake-runc").display().to_string();
    std::fs::write(
        &f.config,
        cfg.replace(&fake, &wrapper_bin().display().to_string()),
    )
    .unwrap();
    let b = bundle_arg(&f);
    let out = f.wrapper(&["create", "--bundle", &b, "c1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runtime.runc") && err.contains("wrapper itself"),
        "{err}"
    );
    let check = Command::new(cli_bin())
        .arg("--config")
        .arg(&f.config)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("runtime.runc"));
}

#[test]
fn hook_stages_through_the_cli() {
    let f = Fake::new("hooks");
    let b = bundle_arg(&f);
    assert!(
        f.wrapper(&["create", "--bundle", &b, "c1"])
            .status
            .success()
    );
    let hook = |stage: &str, stdin: &str| {
        use std::io::Write;
        let mut c = Command::new(cli_bin())
            .arg("--config")
            .arg(&f.config)
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
