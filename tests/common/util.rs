//! Small things every suite uses: the binaries under test, command output, scripts,
//! temporary directories, child and process helpers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn wrapper_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_envoy-sidecar-runc"))
}

pub fn cli_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_envoy-sidecar"))
}

/// `envoy-sidecar --config CONFIG` (arguments to be added).
pub fn cli(config: &Path) -> Command {
    let mut c = Command::new(cli_bin());
    c.arg("--config").arg(config);
    c
}

/// The source tree (scripts, fixtures, golden files).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Exit status, stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status={:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// stdout then stderr, as one string.
pub fn out_err(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `sh -c c`; fails the test unless it succeeds.
pub fn sh(c: &str) {
    let o = Command::new("sh").arg("-c").arg(c).output().unwrap();
    assert!(o.status.success(), "{c}: {}", text(&o));
}

/// Write an executable script.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A script that runs `target` with the script's arguments and `env` set:
/// `#!/bin/sh\nK=V ... exec TARGET "$@"`; with `log`, each call's arguments are
/// appended to that file first (a line per call).
pub fn write_exec_script(path: &Path, env: &[(&str, &str)], target: &Path, log: Option<&Path>) {
    let env: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let log = log
        .map(|l| format!("echo \"$*\" >> {}\n", l.display()))
        .unwrap_or_default();
    write_script(
        path,
        &format!("#!/bin/sh\n{log}{env}exec {} \"$@\"\n", target.display()),
    );
}

/// The wrapper's script for `--runc-binary` (and the CRI handler): the wrapper with
/// `env` and `ENVOY_SIDECAR_CONFIG=config`.
pub fn write_wrapper_script(path: &Path, config: &Path, env: &[(&str, &str)], log: Option<&Path>) {
    let config = config.display().to_string();
    let mut all = env.to_vec();
    all.push(("ENVOY_SIDECAR_CONFIG", &config));
    write_exec_script(path, &all, &wrapper_bin(), log);
}

/// A fresh directory `<base>/<prefix>-<pid>-<n>`, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Under the system temp directory.
    pub fn new(prefix: &str) -> TempDir {
        TempDir::under(&std::env::temp_dir(), prefix)
    }

    pub fn under(base: &Path, prefix: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let d = base.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the child (and reaps it) on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Alive and not a zombie.
pub fn alive(pid: impl Into<i64>) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.into()))
        .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(false)
}

/// Pids of the children of `pid` (its main thread's).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
