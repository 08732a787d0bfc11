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

use std::io::ErrorKind;

use crate::error::{IoContext, Result};
use crate::sys::fs::tolerate;

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
            tolerate(d, ErrorKind::AlreadyExists, std::fs::create_dir(d))?;
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

    /// How many times the kernel's OOM killer killed a process in the child (Envoy):
    /// cgroup v1 `memory.oom_control` field `oom_kill`, v2 `memory.events` `oom_kill`.
    /// `None` when neither file is readable (no memory controller of its own, as a v2
    /// child under a cgroup with processes, or the cgroup is gone). Cumulative over the
    /// child's life, which is the container's: it survives Envoy restarts.
    pub fn oom_kills(&self) -> Option<u64> {
        let d = self.dirs.first()?;
        ["memory.oom_control", "memory.events"]
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            .and_then(|text| oom_kill_field(&text))
    }

    /// OOM kills anywhere in the container, Envoy included: what an operator needs to
    /// see on both hierarchies. cgroup v2: the container's `memory.events` `oom_kill`,
    /// hierarchical by default and in any case covering Envoy's child, which has no
    /// memory controller of its own and is accounted to the container. cgroup v1:
    /// the container's `memory.oom_control` `oom_kill` (its own processes) plus
    /// Envoy's child's. `None` when the container's files cannot be read.
    pub fn oom_kills_in_container(&self) -> Option<u64> {
        let child = self.dirs.first()?;
        let container = child.parent()?;
        if let Ok(text) = std::fs::read_to_string(container.join("memory.oom_control")) {
            let own = oom_kill_field(&text)?;
            return Some(own.saturating_add(self.oom_kills().unwrap_or(0)));
        }
        let text = std::fs::read_to_string(container.join("memory.events")).ok()?;
        oom_kill_field(&text)
    }

    /// Working set of the child (usage minus inactive file cache; cgroup v1 only).
    pub fn working_set(&self) -> Option<u64> {
        let d = self.dirs.first()?;
        let usage: u64 = std::fs::read_to_string(d.join("memory.usage_in_bytes"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(d.join("memory.stat")).ok()?;
        let inactive: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("total_inactive_file "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(usage.saturating_sub(inactive))
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
                crate::sys::process::kill(p, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in &self.dirs {
            tolerate(d, ErrorKind::NotFound, std::fs::remove_dir(d))?;
        }
        Ok(())
    }
}

/// Which memory controller the host has: `Some(true)` cgroup v1, `Some(false)` v2,
/// `None` none found.
pub fn memory_controller_v1() -> Option<bool> {
    let root = Path::new(ROOT);
    if root.join("memory/memory.limit_in_bytes").exists() {
        return Some(true);
    }
    std::fs::read_to_string(root.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
        .then_some(false)
}

/// An Envoy child cgroup found on the host, with the container it belongs to (from
/// containerd's default cgroups path `/<namespace>/<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub namespace: String,
    pub id: String,
    pub cgroup: SidecarCgroup,
}

/// The `oom_kill N` line of `memory.oom_control` (v1) or `memory.events` (v2).
fn oom_kill_field(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// cgroup access as gc needs it: the seam that lets its decisions run against a fake
/// hierarchy.
pub trait Cgroups {
    /// Every Envoy child cgroup under the product's layout, cgroup v1 and v2.
    fn envoy_children(&self) -> Vec<Found>;
    /// Whether the container's own cgroup (the parent of Envoy's) still has processes.
    fn container_busy(&self, cg: &SidecarCgroup) -> bool;
    /// Kill what is inside and remove the directories.
    fn kill_and_remove(&self, cg: &SidecarCgroup) -> Result<()>;
}

/// The real hierarchy under `root` (normally `/sys/fs/cgroup`).
#[derive(Debug, Clone)]
pub struct CgroupFs {
    pub root: PathBuf,
}

impl Default for CgroupFs {
    fn default() -> Self {
        CgroupFs { root: ROOT.into() }
    }
}

impl CgroupFs {
    fn is_unified(&self) -> bool {
        self.root.join("cgroup.controllers").is_file()
    }

    /// Every `<parent>/<container>/envoy-sidecar` under `base`, as (parent path
    /// relative to `base`, container directory name, child path): containerd's
    /// `/<namespace>/<id>` layout, systemd scopes (`system.slice/<prefix>-<id>.scope`)
    /// and kubelet's deeper pod slices alike. Bounded depth; never descends into an
    /// Envoy child.
    fn children_under(base: &Path) -> Vec<(String, String, PathBuf)> {
        const MAX_DEPTH: usize = 8;
        let mut out = Vec::new();
        let mut stack = vec![(base.to_path_buf(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = e.path();
                if e.file_name() == CHILD {
                    let parent = path.parent().unwrap_or(base);
                    let (Some(id), Some(grand)) = (parent.file_name(), parent.parent()) else {
                        continue;
                    };
                    if parent == base {
                        continue;
                    }
                    let ns = grand.strip_prefix(base).unwrap_or(grand);
                    out.push((
                        ns.to_string_lossy().into_owned(),
                        id.to_string_lossy().into_owned(),
                        path,
                    ));
                } else if depth + 1 < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            }
        }
        out.sort();
        out
    }
}

impl Cgroups for CgroupFs {
    fn envoy_children(&self) -> Vec<Found> {
        if self.is_unified() {
            return Self::children_under(&self.root)
                .into_iter()
                .map(|(namespace, id, d)| Found {
                    namespace,
                    id,
                    cgroup: SidecarCgroup { dirs: vec![d] },
                })
                .collect();
        }
        // v1: the memory hierarchy decides; the pids counterpart joins it.
        Self::children_under(&self.root.join("memory"))
            .into_iter()
            .map(|(namespace, id, d)| {
                let memory = self.root.join("memory");
                let pids = self
                    .root
                    .join("pids")
                    .join(d.strip_prefix(&memory).unwrap_or(&d));
                let mut dirs = vec![d];
                if pids.is_dir() {
                    dirs.push(pids);
                }
                Found {
                    namespace,
                    id,
                    cgroup: SidecarCgroup { dirs },
                }
            })
            .collect()
    }

    fn container_busy(&self, cg: &SidecarCgroup) -> bool {
        cg.dirs
            .first()
            .and_then(|d| d.parent())
            .is_some_and(|parent| {
                std::fs::read_to_string(parent.join("cgroup.procs"))
                    .is_ok_and(|t| !t.trim().is_empty())
            })
    }

    fn kill_and_remove(&self, cg: &SidecarCgroup) -> Result<()> {
        cg.kill_and_remove()
    }
}

/// An in-memory hierarchy for unit tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeCgroups {
    pub found: std::cell::RefCell<Vec<Found>>,
    /// Containers (`ns/id`) whose own cgroup still has processes.
    pub busy: Vec<String>,
    pub removed: std::cell::RefCell<Vec<SidecarCgroup>>,
}

#[cfg(test)]
impl Cgroups for FakeCgroups {
    fn envoy_children(&self) -> Vec<Found> {
        self.found.borrow().clone()
    }
    fn container_busy(&self, cg: &SidecarCgroup) -> bool {
        self.found
            .borrow()
            .iter()
            .any(|f| &f.cgroup == cg && self.busy.contains(&format!("{}/{}", f.namespace, f.id)))
    }
    fn kill_and_remove(&self, cg: &SidecarCgroup) -> Result<()> {
        self.found.borrow_mut().retain(|f| &f.cgroup != cg);
        self.removed.borrow_mut().push(cg.clone());
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

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("es-cg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn oom_kills_from_v1_and_v2_files() {
        let v1 = tempdir("oom1");
        std::fs::write(
            v1.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        let cg = SidecarCgroup {
            dirs: vec![v1.clone()],
        };
        assert_eq!(cg.oom_kills(), Some(3));
        let v2 = tempdir("oom2");
        std::fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        let cg = SidecarCgroup {
            dirs: vec![v2.clone()],
        };
        assert_eq!(cg.oom_kills(), Some(1));
        // No memory controller of its own / gone / no cgroup recorded: unknown.
        let none = tempdir("oom3");
        let cg = SidecarCgroup {
            dirs: vec![none.clone()],
        };
        assert_eq!(cg.oom_kills(), None);
        assert_eq!(SidecarCgroup::default().oom_kills(), None);
        for d in [v1, v2, none] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn oom_kills_in_the_whole_container() {
        // v2: the container's memory.events covers Envoy's controller-less child.
        let v2 = tempdir("oomc2");
        std::fs::create_dir_all(v2.join("c1/envoy-sidecar")).unwrap();
        std::fs::write(v2.join("c1/memory.events"), "oom 3\noom_kill 2\n").unwrap();
        let cg = SidecarCgroup {
            dirs: vec![v2.join("c1/envoy-sidecar")],
        };
        assert_eq!(
            (cg.oom_kills(), cg.oom_kills_in_container()),
            (None, Some(2))
        );
        // v1: the container's own kills plus Envoy's child's.
        let v1 = tempdir("oomc1");
        std::fs::create_dir_all(v1.join("c1/envoy-sidecar")).unwrap();
        std::fs::write(
            v1.join("c1/memory.oom_control"),
            "under_oom 0\noom_kill 4\n",
        )
        .unwrap();
        std::fs::write(
            v1.join("c1/envoy-sidecar/memory.oom_control"),
            "under_oom 0\noom_kill 1\n",
        )
        .unwrap();
        let cg = SidecarCgroup {
            dirs: vec![v1.join("c1/envoy-sidecar")],
        };
        assert_eq!(
            (cg.oom_kills(), cg.oom_kills_in_container()),
            (Some(1), Some(5))
        );
        // Gone: unknown, not zero.
        let gone = SidecarCgroup {
            dirs: vec![v1.join("c9/envoy-sidecar")],
        };
        assert_eq!(gone.oom_kills_in_container(), None);
        assert_eq!(SidecarCgroup::default().oom_kills_in_container(), None);
        for d in [v1, v2] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn scan_v2_finds_systemd_scopes_and_pod_slices_but_not_inside_a_child() {
        let root = tempdir("v2sd");
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let scope = "system.slice/envoy-sidecar-test-c1.scope";
        let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-c2.scope";
        for d in [scope, pod] {
            std::fs::create_dir_all(root.join(d).join("envoy-sidecar")).unwrap();
        }
        // An Envoy child's own subdirectory is not another container.
        std::fs::create_dir_all(root.join(scope).join("envoy-sidecar/envoy-sidecar")).unwrap();
        let found = CgroupFs { root: root.clone() }.envoy_children();
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.namespace.as_str(), f.id.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice",
                    "cri-containerd-c2.scope"
                ),
                ("system.slice", "envoy-sidecar-test-c1.scope"),
            ]
        );
        assert_eq!(
            found[1].cgroup.dirs,
            [root.join(scope).join("envoy-sidecar")]
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn scan_v1_pairs_memory_with_pids() {
        let root = tempdir("v1");
        std::fs::create_dir_all(root.join("memory/ns1/c1/envoy-sidecar")).unwrap();
        std::fs::create_dir_all(root.join("pids/ns1/c1/envoy-sidecar")).unwrap();
        std::fs::create_dir_all(root.join("memory/ns1/c2")).unwrap();
        let found = CgroupFs { root: root.clone() }.envoy_children();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].namespace.as_str(), found[0].id.as_str()),
            ("ns1", "c1")
        );
        assert_eq!(found[0].cgroup.dirs.len(), 2);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn scan_v2_unified() {
        let root = tempdir("v2");
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::create_dir_all(root.join("k8s.io/c9/envoy-sidecar")).unwrap();
        std::fs::create_dir_all(root.join("system.slice/ssh.service")).unwrap();
        std::fs::write(root.join("k8s.io/c9/cgroup.procs"), "").unwrap();
        let fs = CgroupFs { root: root.clone() };
        let found = fs.envoy_children();
        assert_eq!(
            found,
            [Found {
                namespace: "k8s.io".into(),
                id: "c9".into(),
                cgroup: SidecarCgroup {
                    dirs: vec![root.join("k8s.io/c9/envoy-sidecar")]
                },
            }]
        );
        assert!(!fs.container_busy(&found[0].cgroup));
        std::fs::write(root.join("k8s.io/c9/cgroup.procs"), "42\n").unwrap();
        assert!(fs.container_busy(&found[0].cgroup));
        std::fs::remove_dir_all(root).unwrap();
    }
}
