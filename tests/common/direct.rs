//! Driving the wrapper directly as runc, without containerd (tests/garden.rs,
//! tests/nerdctl.rs, tests/security.rs): a plain runc bundle with a busybox rootfs, a
//! private `--root`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use super::sandbox::inspect;
use super::util::{TempDir, repo, text, wrapper_bin};
use super::wait::poll;

/// Fill `dir` with the busybox root filesystem of the test image (`oci/rootfs.sh`).
pub fn busybox_rootfs(dir: &Path) {
    let out = Command::new(repo().join("oci/rootfs.sh"))
        .arg(dir)
        .output()
        .expect("run oci/rootfs.sh");
    assert!(out.status.success(), "oci/rootfs.sh: {}", text(&out));
}

/// One container driven through the wrapper the way Garden's runtime plugin drives
/// runc: `--root <private dir> --log <file> --log-format json <command>`, with
/// `ENVOY_SIDECAR_CONFIG` set. The private root's parent is not named `runc`, so the
/// wrapper files everything under namespace `default`. On drop the container is
/// killed and force-deleted through the wrapper (releasing its sidecar), then with
/// runc itself, and the directory (root, bundle, logs) is removed.
pub struct DirectRun {
    _tmp: TempDir,
    pub id: String,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

impl DirectRun {
    /// Creates `<tmp>/es-direct-<name>-<pid>-<n>/{bundle,root}`; the bundle is empty.
    pub fn new(name: &str, id: &str, config: &Path) -> DirectRun {
        let tmp = TempDir::new(&format!("es-direct-{name}"));
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("bundle")).unwrap();
        DirectRun {
            _tmp: tmp,
            id: id.into(),
            config: config.to_path_buf(),
            root: dir.join("root"),
            bundle: dir.join("bundle"),
            log: dir.join("runc-log.json"),
            pid_file: dir.join("init.pid"),
            dir,
        }
    }

    /// The bundle as Garden's plugin gets it: the busybox rootfs and `runc spec`, then
    /// edited: no terminal, the network namespace at `netns`, then `edit`. Returns the
    /// path of `config.json`.
    pub fn runc_spec_bundle(&self, netns: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
        busybox_rootfs(&self.bundle.join("rootfs"));
        let out = self.runc(&["spec", "--bundle", &self.bundle.display().to_string()]);
        assert!(out.status.success(), "runc spec: {}", text(&out));
        let spec_path = self.bundle.join("config.json");
        let mut spec: Value = serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
        spec["process"]["terminal"] = json!(false);
        let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
        let n = ns.iter_mut().find(|n| n["type"] == "network").unwrap();
        *n = json!({"type": "network", "path": netns});
        edit(&mut spec);
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        spec_path
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
        Command::new(super::containerd::real_runc())
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
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
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
    pub fn inspect(&self) -> Option<Value> {
        inspect(&self.config, &self.id, "default")
    }
}

impl Drop for DirectRun {
    fn drop(&mut self) {
        if self.status().is_some() {
            self.wrapper(&["kill", &self.id, "KILL"]);
            let _ = poll(Duration::from_secs(5), Duration::from_millis(100), || {
                self.status().as_deref() != Some("running")
            });
        }
        // Also when runc no longer knows it: the wrapper then releases our state.
        self.wrapper(&["delete", "--force", &self.id]);
        if self.status().is_some() {
            self.runc(&["delete", "--force", &self.id]);
        }
        // The directory (root, bundle, logs) goes with `_tmp`.
    }
}
