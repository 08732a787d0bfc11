//! Footprint and clean-up helpers for the scale and fault suites (tests/scale.rs,
//! tests/faults.rs): what the product holds on the host for one sandbox, and guards
//! that take it all back whatever happens.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::containerd::{NAMESPACE, address, ctr_at, owned, run_args, strs};
use super::sandbox::Sandbox;
use super::util::{cli, text};
use super::wait::poll;

/// `(host port, "container ip . container port")` of every element of the NAT map
/// whose host port lies in `pool`.
pub fn nat_in_pool(pool: &RangeInclusive<u16>) -> Vec<(u16, String)> {
    let mut v = nat_in_pool_of("ip", pool);
    v.extend(nat_in_pool_of("ip6", pool));
    v
}

/// [`nat_in_pool`] of one family's table (`ip` or `ip6`): the `ports` map's elements
/// as `(host port, "ip . port")`, the address-bound `ports_at` map's as
/// `(host port, "ip . port @host-address")`.
pub fn nat_in_pool_of(family: &str, pool: &RangeInclusive<u16>) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for map in ["ports", "ports_at"] {
        let o = Command::new("nft")
            .args(["list", "map", family, "envoy_sidecar", map])
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&o.stdout);
        out.extend(t.split([',', '{', '}', '\n']).filter_map(|e| {
            // "tcp . 50000 : 203.0.113.82 . 61001", or with "192.0.2.7 . " in front.
            let f: Vec<&str> = e.split_whitespace().collect();
            let (at, f) = match f.len() {
                9 if f[1] == "." => (Some(f[0]), &f[2..]),
                7 => (None, &f[..]),
                _ => return None,
            };
            if f[1] != "." || f[3] != ":" || f[0] != "tcp" {
                return None;
            }
            let port: u16 = f[2].parse().ok()?;
            let to = match at {
                Some(a) => format!("{} . {} @{a}", f[4], f[6]),
                None => format!("{} . {}", f[4], f[6]),
            };
            pool.contains(&port).then_some((port, to))
        }));
    }
    out
}

/// Delete NAT elements in `pool` (clean-up after a failed test only).
pub fn nat_flush_pool(pool: &RangeInclusive<u16>) {
    for (port, to) in nat_in_pool(pool) {
        let (to, at) = match to.split_once(" @") {
            Some((to, a)) => (to.to_string(), Some(a.to_string())),
            None => (to, None),
        };
        let family = if to.contains(':') { "ip6" } else { "ip" };
        let (map, key) = match at {
            Some(a) => ("ports_at", format!("{a} . tcp . {port}")),
            None => ("ports", format!("tcp . {port}")),
        };
        let _ = Command::new("nft")
            .arg(format!(
                "delete element {family} envoy_sidecar {map} {{ {key} : {to} }}"
            ))
            .output();
    }
}

/// `(pid, command line)` of every process whose command line contains `needle`
/// (this test process excepted).
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    use envoy_sidecar::sys::process::{Processes, Procfs};
    Procfs
        .scan()
        .into_iter()
        .map(|(p, args)| (p.pid, args.join(" ")))
        .filter(|(_, cmd)| cmd.contains(needle))
        .collect()
}

/// Processes of this sandbox: supervisors (`--config <dir>/config.toml`), Envoys
/// (`-c <dir>/state/...`), wrappers and hooks.
pub fn our_processes(sb: &Sandbox) -> Vec<(i32, String)> {
    processes_mentioning(&format!("{}/", sb.dir.display()))
}

/// Files and directories under `dir`, recursively (0 if it does not exist).
pub fn count_entries(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        n += 1;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            n += count_entries(&e.path());
        }
    }
    n
}

/// Cgroup directories `/sys/fs/cgroup/<hierarchy>/<namespace>/<id>` left for `ids`.
pub fn cgroup_leftovers(namespace: &str, ids: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for id in ids {
            let d = h.path().join(namespace).join(id);
            if d.is_dir() {
                out.push(d);
            }
        }
    }
    out
}

/// Running `containerd-shim-runc-v2` processes of `namespace` whose container id
/// starts with `id_prefix` (`""`: the whole namespace).
pub fn shims(namespace: &str, id_prefix: &str) -> usize {
    processes_mentioning(&format!("-namespace {namespace} -id {id_prefix}"))
        .iter()
        .filter(|(_, c)| c.contains("containerd-shim"))
        .count()
}

/// `MemAvailable` from /proc/meminfo, in KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemAvailable in /proc/meminfo")
}

/// User + system CPU time of `pid` so far.
pub fn cpu_time(pid: i32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return Duration::ZERO;
    };
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 1000 / clock_ticks().max(1))
}

/// The clock ticks per second that /proc counts CPU time in (`getconf CLK_TCK`).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let o = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(100)
    })
}

/// `envoy-sidecar --config C gc ARGS`; panics unless it succeeds; returns stdout.
pub fn gc(config: &Path, args: &[&str]) -> String {
    let o = cli(config).arg("gc").args(args).output().unwrap();
    assert!(o.status.success(), "gc {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A containerd task (and container) in any containerd/namespace, removed on drop
/// with bounded waits: SIGKILL, `task rm` until it is stopped (60 s, then -f),
/// `containers rm`.
pub struct Task {
    pub id: String,
    pub address: String,
    pub namespace: String,
}

impl Task {
    /// A handle on `id` in the private containerd's test namespace (however it was
    /// started).
    pub fn adopt(id: &str) -> Task {
        Task {
            id: id.into(),
            address: address(),
            namespace: NAMESPACE.into(),
        }
    }

    /// `ctr run -d --runc-binary RUNTIME [--annotation K=V]... OPTS IMAGE ID CMD...`.
    /// The handle is returned whether or not the run succeeded (it cleans up).
    pub fn run(
        address: &str,
        namespace: &str,
        runtime: &Path,
        id: &str,
        annotations: &[(&str, &str)],
        opts: &[&str],
        cmd: &[&str],
    ) -> (Task, Output) {
        let t = Task {
            id: id.into(),
            address: address.into(),
            namespace: namespace.into(),
        };
        let a = run_args("-d", runtime, id, annotations, &owned(opts), &owned(cmd));
        let out = ctr_at(address, namespace, 120, &strs(&a));
        (t, out)
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        ctr_at(&self.address, &self.namespace, 60, args)
    }

    /// The task's pid and status from `ctr task ls` (None: no task).
    pub fn status(&self) -> Option<(u32, String)> {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == self.id).then(|| (f[1].parse().unwrap_or(0), f[2].into()))
        })
    }

    pub fn remove(&self) -> Result<(), String> {
        let gone = |o: &Output| {
            o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not found")
        };
        self.ctr(&["task", "kill", "-s", "SIGKILL", &self.id]);
        let every = Duration::from_millis(200);
        let stopped = poll(Duration::from_secs(60), every, || {
            let o = self.ctr(&["task", "rm", &self.id]);
            if gone(&o) { Ok(()) } else { Err(text(&o)) }
        });
        if stopped.is_err() {
            let f = self.ctr(&["task", "rm", "-f", &self.id]);
            if !gone(&f) {
                return Err(format!("task rm {}: {}", self.id, text(&f)));
            }
        }
        poll(Duration::from_secs(30), every, || {
            let o = self.ctr(&["containers", "rm", &self.id]);
            if gone(&o) { Ok(()) } else { Err(text(&o)) }
        })
        .map_err(|last| format!("containers rm {}: {last}", self.id))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("clean-up: {e}");
        }
    }
}

/// Last line of defence for one sandbox, dropped after its containers and before
/// the sandbox: kills what is left of its processes, runs `gc --grace 0`, and
/// deletes NAT elements left in its pool.
pub struct Scrub {
    pub config: PathBuf,
    pub dir: PathBuf,
    pub pool: RangeInclusive<u16>,
}

impl Scrub {
    /// For `sb` and its host port pool.
    pub fn new(sb: &Sandbox) -> Scrub {
        Scrub {
            config: sb.config.clone(),
            dir: sb.dir.clone(),
            pool: sb.pool(),
        }
    }
}

impl Drop for Scrub {
    fn drop(&mut self) {
        let _ = cli(&self.config).args(["gc", "--grace", "0"]).output();
        for (pid, cmd) in processes_mentioning(&format!("{}/", self.dir.display())) {
            if !cmd.starts_with("ctr ") {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        nat_flush_pool(&self.pool);
    }
}
