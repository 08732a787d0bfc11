//! Load on a container's proxy and what it costs: `scripts/tls-load.py hold` driven
//! from a test, cgroup file figures (tests/overload.rs, tests/cgroups.rs).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::util::{ChildGuard, repo};
use super::wait::wait_until_every;

/// A number from a cgroup (or /proc) file: the whole file, or the value of its
/// `field` line (`oom_kill 3`).
pub fn read_u64(path: &Path, field: Option<&str>) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v = match field {
        None => text.trim(),
        Some(f) => text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{f} ")))
            .unwrap_or_else(|| panic!("{}: no {f}: {text}", path.display()))
            .trim(),
    };
    v.parse()
        .unwrap_or_else(|e| panic!("{}: {v:?}: {e}", path.display()))
}

/// `tls-load.py hold`: `n` TLS connections to `host:port` (SNI `server_name`, trusting
/// `ca`), opened and held; `extra` goes to the script as is (`--parallel`, `--cert`,
/// ...). Killed when dropped.
pub struct TlsHold {
    pub load: ChildGuard,
    ready: std::path::PathBuf,
}

impl TlsHold {
    pub fn start(
        host: &str,
        port: u16,
        ca: &Path,
        server_name: &str,
        n: usize,
        ready: &Path,
        extra: &[&str],
    ) -> TlsHold {
        let load = ChildGuard(
            Command::new("python3")
                .arg(repo().join("scripts/tls-load.py"))
                .args(["hold", "--host", host, "--port", &port.to_string()])
                .arg("--ca")
                .arg(ca)
                .args(["--server-name", server_name, "--n", &n.to_string()])
                .arg("--ready-file")
                .arg(ready)
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        TlsHold {
            load,
            ready: ready.to_path_buf(),
        }
    }

    /// The script's ready report (`{"opened": N, "failed": M, ...}`) once the
    /// connections are open; panics if the script exits first.
    pub fn wait_opened(&mut self, what: &str, timeout: Duration) -> Value {
        wait_until_every(what, timeout, Duration::from_millis(100), || {
            if let Some(st) = self.load.0.try_wait().unwrap() {
                panic!("tls-load exited early: {st}");
            }
            std::fs::read(&self.ready)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        })
    }
}
