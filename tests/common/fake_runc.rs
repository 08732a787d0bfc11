//! A recording stand-in for runc ([`FakeRunc`]), and the wrapper in front of one
//! without containerd or root ([`FakeStack`]): the tests of argv hand-over, spec
//! patching and release paths (tests/wrapper.rs, tests/nerdctl.rs), and a runc that
//! fails one subcommand (tests/create.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use super::sandbox::generate_ca;
use super::slots::UNROUTED;
use super::util::{TempDir, wrapper_bin, write_script};

/// The subcommands the stand-in answers itself.
const ANSWERED: &str = "create|delete|exec|features|state|start|kill";

/// `<dir>/fake-runc`: appends its argv to `<dir>/argv.log` (a line per call). For the
/// first argument that is one of [`ANSWERED`] it exits with the code in
/// `<dir>/exit-<subcommand>` if that file exists; otherwise it succeeds (`features`
/// printing a fixed JSON) or, made with [`FakeRunc::passthrough`], runs the real runc.
/// Answering itself, a `create` writes its caller's pid (the wrapper's, in the host's
/// netns) to its `--pid-file`, and `state` reports that pid as a created container's:
/// what the wrapper reads after `create` to start the sidecar.
pub struct FakeRunc {
    pub path: PathBuf,
    pub argv_log: PathBuf,
    dir: PathBuf,
}

impl FakeRunc {
    /// Answers everything itself.
    pub fn new(dir: &Path) -> FakeRunc {
        FakeRunc::write(dir, None)
    }

    /// Hands every call without an `exit-<subcommand>` file to `real`.
    pub fn passthrough(dir: &Path, real: &str) -> FakeRunc {
        FakeRunc::write(dir, Some(real))
    }

    fn write(dir: &Path, real: Option<&str>) -> FakeRunc {
        let path = dir.join("fake-runc");
        let argv_log = dir.join("argv.log");
        let (answer, otherwise) = match real {
            None => (
                format!(
                    "[ \"$a\" = features ] && echo '{}'\n  \
                     [ -f {d}/exit-$a ] && exit $(cat {d}/exit-$a)\n  \
                     [ \"$a\" = create ] && [ -n \"$pidfile\" ] && echo $PPID > \"$pidfile\"\n  \
                     [ \"$a\" = state ] && echo '{{\"status\":\"created\",\"pid\":'$PPID'}}'\n  \
                     exit 0",
                    json!({"ociVersionMin": "1.0.0"}),
                    d = dir.display()
                ),
                String::new(),
            ),
            Some(real) => (
                format!(
                    "[ -f {d}/exit-$a ] && exit $(cat {d}/exit-$a)\n  break",
                    d = dir.display()
                ),
                format!("exec {real} \"$@\"\n"),
            ),
        };
        write_script(
            &path,
            &format!(
                "#!/bin/sh\necho \"$*\" >> {log}\npidfile=; prev=\n\
                 for a; do [ \"$prev\" = --pid-file ] && pidfile=$a; \
                 case \"$a\" in --pid-file=*) pidfile=${{a#--pid-file=}};; esac; prev=$a; done\n\
                 for a; do case \"$a\" in {ANSWERED})\n  \
                 {answer};; esac; done\n{otherwise}",
                log = argv_log.display(),
            ),
        );
        FakeRunc {
            path,
            argv_log,
            dir: dir.to_path_buf(),
        }
    }

    /// From now on `subcommand` exits with `code`.
    pub fn fail(&self, subcommand: &str, code: i32) {
        std::fs::write(
            self.dir.join(format!("exit-{subcommand}")),
            code.to_string(),
        )
        .unwrap();
    }

    /// The argv of every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.argv_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A private directory with a CA, a wrapper config whose `runtime.runc` is a
/// [`FakeRunc`] (`[host] address` [`UNROUTED`]) and whose `runtime.cli` is a stand-in
/// that logs its argv to `<dir>/cli.log` (the supervisor the wrapper starts after
/// `create`), a bundle whose `config.json` is the given spec, and containerd's runc
/// root layout for a namespace (`<dir>/runc-root/runc/<namespace>`); removed on drop.
pub struct FakeStack {
    _tmp: TempDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    pub bundle: PathBuf,
    /// The `--log` runc is given (the wrapper's errors for containerd go there).
    pub runc_log: PathBuf,
    pub runc: FakeRunc,
    /// `runtime.cli`: the stand-in for the CLI (hooks' path, the supervisor's binary).
    pub cli: PathBuf,
    namespace: String,
}

impl FakeStack {
    /// `host_extra`: more keys for the `[host]` table.
    pub fn new(prefix: &str, namespace: &str, host_extra: &str, spec: &Value) -> FakeStack {
        let tmp = TempDir::new(prefix);
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("bundle")).unwrap();
        let runc = FakeRunc::new(&dir);
        generate_ca(&dir.join("ca"));
        let state = dir.join("state");
        let config = dir.join("config.toml");
        let cli = dir.join("fake-cli");
        write_script(
            &cli,
            &format!(
                "#!/bin/sh\necho \"$*\" >> {}\n",
                dir.join("cli.log").display()
            ),
        );
        std::fs::write(
            &config,
            format!(
                "[proxy]\nenabled = true\n[instance_identity]\nca_cert = {:?}\nca_key = {:?}\n\
                 [runtime]\nrunc = {:?}\ncli = {:?}\nstate_dir = {:?}\nuid_lease_dir = {:?}\n\
                 [host]\naddress = \"{UNROUTED}\"\n{host_extra}",
                dir.join("ca/ca.crt"),
                dir.join("ca/ca.key"),
                runc.path,
                cli,
                state,
                // Leases of this stack only: the host-wide directory needs root.
                dir.join("uid-leases")
            ),
        )
        .unwrap();
        std::fs::write(dir.join("bundle/config.json"), spec.to_string()).unwrap();
        FakeStack {
            _tmp: tmp,
            runc_log: dir.join("log.json"),
            bundle: dir.join("bundle"),
            dir,
            cli,
            config,
            state,
            runc,
            namespace: namespace.into(),
        }
    }

    /// The wrapper as containerd's runc shim runs it for the namespace.
    pub fn wrapper(&self, args: &[&str]) -> Output {
        let root = self.dir.join("runc-root/runc").join(&self.namespace);
        Command::new(wrapper_bin())
            .arg("--root")
            .arg(&root)
            .arg("--log")
            .arg(&self.runc_log)
            .args(["--log-format", "json"])
            .args(args)
            .env("ENVOY_SIDECAR_CONFIG", &self.config)
            .output()
            .unwrap()
    }

    /// `create --bundle <bundle> [args...] ID` through the wrapper.
    pub fn create(&self, args: &[&str], id: &str) -> Output {
        let b = self.bundle.display().to_string();
        let mut a = vec!["create", "--bundle", &b];
        a.extend(args);
        a.push(id);
        self.wrapper(&a)
    }

    pub fn spec(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.bundle.join("config.json")).unwrap()).unwrap()
    }

    /// Set an annotation in the bundle's spec.
    pub fn set_spec_annotation(&self, k: &str, v: &str) {
        let mut s = self.spec();
        s["annotations"][k] = json!(v);
        std::fs::write(self.bundle.join("config.json"), s.to_string()).unwrap();
    }

    /// The wrapper's state of `id` in the namespace.
    pub fn state_of(&self, id: &str) -> Option<Value> {
        std::fs::read(self.state.join(&self.namespace).join(id).join("state.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// What the stand-in for runc was called with.
    pub fn calls(&self) -> Vec<String> {
        self.runc.calls()
    }

    /// What the stand-in for the CLI was called with (`supervise <id> ...`), in order.
    pub fn cli_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("cli.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}
