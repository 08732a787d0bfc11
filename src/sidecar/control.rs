//! The sidecar's lifecycle as seen from outside the supervisor: where its files live,
//! what it records, and how the wrapper and hooks start, drain and stop it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::nat::{Applied, Mapping, Nat};
use crate::state::store::Store;
use crate::sys::cgroup::SidecarCgroup;
use crate::sys::fs as fsutil;
use crate::sys::process::{self, ProcId};

pub const RECORD_FILE: &str = "supervisor.json";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
pub const ENVOY_LOG: &str = "envoy.log";
pub const ENVOY_DIR: &str = "envoy";
pub const BOOTSTRAP_FILE: &str = "bootstrap.json";
pub const SDS_DIR: &str = "sds";
pub const NAT_FILE: &str = "nat.json";

/// How long the supervisor gets to stop Envoy and leave after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the supervisor records about itself (`supervisor.json`, written only by it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub supervisor: Option<ProcId>,
    pub envoy: Option<ProcId>,
    pub envoy_restarts: u32,
    /// RFC 3339 time of the first successful TLS handshake of the current Envoy.
    pub ready_at: Option<String>,
    pub container_ip: Option<IpAddr>,
    pub cert_serial: Option<String>,
    /// Unix seconds.
    pub cert_not_after: Option<u64>,
    pub cgroup: SidecarCgroup,
    pub last_error: Option<String>,
}

/// Paths of one container's sidecar.
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(store: &Store, ns: &str, id: &str) -> Paths {
        Paths {
            dir: store.dir(ns, id),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join(SUPERVISOR_LOG)
    }
    pub fn envoy_log(&self) -> PathBuf {
        self.dir.join(ENVOY_LOG)
    }
    pub fn envoy_dir(&self) -> PathBuf {
        self.dir.join(ENVOY_DIR)
    }
    pub fn bootstrap(&self) -> PathBuf {
        self.envoy_dir().join(BOOTSTRAP_FILE)
    }
    pub fn sds_dir(&self) -> PathBuf {
        self.envoy_dir().join(SDS_DIR)
    }
    pub fn nat(&self) -> PathBuf {
        self.dir.join(NAT_FILE)
    }

    pub fn read_record(&self) -> Result<Option<Record>> {
        let p = self.record();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::State {
                    path: p,
                    msg: format!("malformed supervisor record: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { path: p, source: e }),
        }
    }

    pub fn write_record(&self, r: &Record) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(r).expect("record serialises");
        fsutil::write_atomic(&self.record(), &bytes, 0o600)
    }
}

/// Start the supervisor for a container, fully detached: own session, stdio to its log
/// file, nothing inherited from runc (runc waits for its hooks' pipes to close).
pub fn launch(config: Option<&Path>, store: &Store, ns: &str, id: &str) -> Result<()> {
    let paths = Paths::new(store, ns, id);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.supervisor_log())
        .at(paths.supervisor_log())?;
    let exe = std::env::current_exe().at("/proc/self/exe")?;
    let mut cmd = Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(["supervise", id, "--namespace", ns])
        .stdin(Stdio::null())
        .stdout(log.try_clone().at(paths.supervisor_log())?)
        .stderr(log);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().at(paths.supervisor_log())?;
    Ok(())
}

/// Stop the supervisor and Envoy and empty Envoy's cgroups, so that runc can remove
/// the container's cgroup. Idempotent; works after a supervisor crash (by pid record
/// and by cgroup membership).
pub fn stop(store: &Store, ns: &str, id: &str) -> Result<()> {
    let paths = Paths::new(store, ns, id);
    let Some(rec) = paths.read_record()? else {
        return Ok(());
    };
    if let Some(s) = rec.supervisor {
        s.terminate(STOP_GRACE);
    }
    if let Some(e) = rec.envoy {
        e.terminate(Duration::from_secs(2));
    }
    // The supervisor may have recorded the cgroup after we read the record.
    let rec = paths.read_record()?.unwrap_or(rec);
    rec.cgroup.kill_and_remove()
}

/// Ask Envoy to stop accepting new connections (before the app gets SIGTERM). Runs in
/// a thread that enters the container's netns, where the admin port is.
pub fn drain(store: &Store, ns: &str, id: &str) -> Result<bool> {
    let Some(state) = store.read(ns, id)? else {
        return Ok(false);
    };
    let paths = Paths::new(store, ns, id);
    let envoy_up = paths
        .read_record()?
        .and_then(|r| r.envoy)
        .is_some_and(|e| e.alive());
    let Some(pid) = state.init_pid.filter(|_| envoy_up) else {
        return Ok(false);
    };
    let admin = state.admin_port;
    let t = std::thread::spawn(move || -> std::io::Result<()> {
        process::enter_netns(pid)?;
        crate::envoy::admin::drain_listeners(admin, Duration::from_secs(2))
    });
    t.join()
        .map_err(|_| Error::Hook("drain thread panicked".into()))?
        .at(format!("/proc/{pid}/ns/net (admin 127.0.0.1:{admin})"))?;
    Ok(true)
}

/// Map the container's host ports (from its state) to its IP, now that it has one
/// (networking is set up between create and start). Recorded in `nat.json` so that
/// removal deletes exactly what was added. Returns the mappings (empty: no IPv4).
pub fn apply_nat(store: &Store, nat: &Nat, ns: &str, id: &str) -> Result<Vec<Mapping>> {
    let Some(state) = store.read(ns, id)? else {
        return Ok(Vec::new());
    };
    let Some(pid) = state.init_pid else {
        return Ok(Vec::new());
    };
    let Some(ip) = process::ipv4_of(pid).at(format!("/proc/{pid}/ns/net"))? else {
        return Ok(Vec::new());
    };
    let mut maps = Vec::new();
    for p in &state.ports {
        if let Some(ext) = p.external {
            maps.push(Mapping {
                host_port: ext,
                container_ip: ip,
                container_port: p.internal,
            });
        }
        maps.push(Mapping {
            host_port: p.external_tls_proxy,
            container_ip: ip,
            container_port: p.internal_tls_proxy,
        });
    }
    let paths = Paths::new(store, ns, id);
    // Record first: a crash after the nft call still leaves the record for removal.
    let bytes = serde_json::to_vec_pretty(&Applied {
        mappings: maps.clone(),
    })
    .expect("serialises");
    fsutil::write_atomic(&paths.nat(), &bytes, 0o600)?;
    let _lock = store.lock()?;
    ensure_forwarding()?;
    if let Err(e) = nat.add(&maps) {
        let _ = std::fs::remove_file(paths.nat());
        return Err(e);
    }
    Ok(maps)
}

/// DNAT to containers is forwarding; CNI's bridge plugin turns it on the same way.
fn ensure_forwarding() -> Result<()> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p).at(p)?.trim() != "1" {
        std::fs::write(p, "1").at(p)?;
    }
    Ok(())
}

/// Remove what `apply_nat` added. Idempotent.
pub fn remove_nat(store: &Store, nat: &Nat, ns: &str, id: &str) -> Result<()> {
    let paths = Paths::new(store, ns, id);
    let Some(applied) = Applied::read(&paths.nat())? else {
        return Ok(());
    };
    nat.remove(&applied.mappings)?;
    match std::fs::remove_file(paths.nat()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            path: paths.nat(),
            source: e,
        }),
    }
}

/// Everything of a container's sidecar except its state: processes, cgroups, NAT.
/// Both steps are attempted; the first error is returned.
pub fn teardown(store: &Store, ns: &str, id: &str) -> Result<()> {
    let stopped = stop(store, ns, id);
    let unmapped = remove_nat(store, &Nat::default(), ns, id);
    stopped.and(unmapped)
}
