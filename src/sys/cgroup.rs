//! Envoy's place in the container's cgroups: a child `envoy-sidecar` of the container's
//! memory (and pids) cgroup, so Envoy's memory counts against the container's limit —
//! which is what the additional allocation pays for — and can still be read on its own.
//!
//! cgroup v2: the child has no memory controller of its own (a cgroup with processes
//! cannot delegate domain controllers), but its pages are charged to the container's
//! cgroup all the same; only the separate read-out is lost.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

pub const CHILD: &str = "envoy-sidecar";
const ROOT: &str = "/sys/fs/cgroup";
/// v1 hierarchies Envoy joins. cpuset is left out: a new cpuset child starts empty and
/// refuses members until configured.
const V1_CONTROLLERS: [&str; 2] = ["memory", "pids"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarCgroup {
    /// The child directories, one per hierarchy; the first is the memory one.
    pub dirs: Vec<PathBuf>,
}

impl SidecarCgroup {
    /// The child cgroups for the container whose init is `pid` (from `/proc/<pid>/cgroup`).
    pub fn for_container(pid: i32) -> Result<SidecarCgroup> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = std::fs::read_to_string(&path).at(&path)?;
        Ok(Self::from_proc_cgroup(&text, Path::new(ROOT)))
    }

    fn from_proc_cgroup(text: &str, root: &Path) -> SidecarCgroup {
        let mut dirs = Vec::new();
        let mut v2 = None;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let rel = p.trim_start_matches('/');
            if ctrls.is_empty() {
                v2 = Some(rel.to_string());
                continue;
            }
            for c in V1_CONTROLLERS {
                if ctrls.split(',').any(|x| x == c) {
                    let d = root.join(ctrls).join(rel).join(CHILD);
                    if c == "memory" {
                        dirs.insert(0, d);
                    } else {
                        dirs.push(d);
                    }
                }
            }
        }
        if dirs.is_empty()
            && let Some(rel) = v2
        {
            dirs.push(root.join(rel).join(CHILD));
        }
        SidecarCgroup { dirs }
    }

    pub fn create(&self) -> Result<()> {
        for d in &self.dirs {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::Io {
                        path: d.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// `cgroup.procs` paths as C strings, prepared before fork for the pre-exec child.
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                    .expect("no NUL in a path")
            })
            .collect()
    }

    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort();
        pids.dedup();
        pids
    }

    /// Memory charged to the child (cgroup v1 only), for exact attribution.
    pub fn memory_usage(&self) -> Option<u64> {
        let d = self.dirs.first()?;
        std::fs::read_to_string(d.join("memory.usage_in_bytes"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kill whatever is still inside (Envoy after a supervisor crash, say) and remove
    /// the directories, so runc can remove the container's cgroup. Idempotent.
    pub fn kill_and_remove(&self) -> Result<()> {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Io {
                        path: d.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_hybrid_prefers_memory_and_pids() {
        let t = "9:name=systemd:/\n8:pids:/ns/c1\n4:memory:/ns/c1\n2:cpu,cpuacct:/ns/c1\n0::/\n";
        let c = SidecarCgroup::from_proc_cgroup(t, Path::new("/sys/fs/cgroup"));
        assert_eq!(
            c.dirs,
            [
                PathBuf::from("/sys/fs/cgroup/memory/ns/c1/envoy-sidecar"),
                PathBuf::from("/sys/fs/cgroup/pids/ns/c1/envoy-sidecar"),
            ]
        );
    }

    #[test]
    fn v2_unified() {
        let c = SidecarCgroup::from_proc_cgroup(
            "0::/system.slice/ns-c1.scope\n",
            Path::new("/sys/fs/cgroup"),
        );
        assert_eq!(
            c.dirs,
            [PathBuf::from(
                "/sys/fs/cgroup/system.slice/ns-c1.scope/envoy-sidecar"
            )]
        );
    }
}
