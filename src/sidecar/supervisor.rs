//! `envoy-sidecar supervise`: one small process per container that owns its Envoy.
//!
//! It joins the container's network namespace (so the container IP and Envoy's
//! listeners are where the app is), issues the instance identity, writes Envoy's
//! config, runs Envoy in a child of the container's cgroup as an unprivileged user,
//! restarts it with backoff, rotates credentials before expiry, and leaves — after
//! stopping Envoy — when the container's init is gone or it is told to (SIGTERM).
//!
//! The decisions (when to start, restart, kill, rotate or stop) are the policy's
//! (`sidecar::policy`); this loop performs them and reports what happened.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::envoy::bootstrap::{self, Inputs, Listener, Mtls};
use crate::envoy::probe::Probe;
use crate::error::{Error, IoContext, Result};
use crate::identity::{self, Ca, Identity, Issued};
use crate::sidecar::control::{Paths, Record};
use crate::sidecar::policy::{Action, Event, Policy};
use crate::state::store::{ContainerState, Store};
use crate::sys::cgroup::SidecarCgroup;
use crate::sys::clock::{Clock, SystemClock};
use crate::sys::fs::now_rfc3339;
use crate::sys::process::{self, ProcId};
use crate::sys::{exec, pagecache};

/// How long one probe handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);
/// Envoy's --drain-time-s: bounds how long a graceful drain would keep listeners open.
const DRAIN_TIME: Duration = Duration::from_secs(5);

fn log(msg: impl AsRef<str>) {
    eprintln!("{} supervisor: {}", now_rfc3339(), msg.as_ref());
}

/// The supervisor's error for container `ns/id`.
fn failure(ns: &str, id: &str, msg: String) -> Error {
    Error::Supervisor {
        container: format!("{ns}/{id}"),
        msg,
    }
}

struct Supervisor<'a> {
    cfg: &'a Config,
    state: ContainerState,
    paths: Paths,
    record: Record,
    ca: Ca,
    ca_pem: String,
    init_fd: OwnedFd,
    sig_fd: OwnedFd,
    envoy: Option<(Child, OwnedFd)>,
    clock: SystemClock,
    /// Listener ports that have not completed a TLS handshake since Envoy started.
    pending: Vec<u16>,
    /// Why the last failed handshake failed.
    probe_err: String,
    /// Set-up or rotation code ran: drop its text pages before idling.
    trim: bool,
}

/// Entry point; returns when the container is gone or on SIGTERM.
pub fn run(cfg: &Config, ns: &str, id: &str) -> Result<()> {
    let store = Store::new(&cfg.runtime.state_dir);
    let state = store
        .read(ns, id)?
        .ok_or_else(|| failure(ns, id, "no state: not a proxied container".into()))?;
    let pid = state.init_pid.ok_or_else(|| {
        failure(
            ns,
            id,
            "init pid not recorded (createRuntime hook did not run)".into(),
        )
    })?;
    if ProcId::of(pid).is_none() {
        return Err(failure(ns, id, format!("init pid {pid} is gone")));
    }
    let paths = Paths::new(&store, ns, id);
    let mut record = paths.read_record()?.unwrap_or_default();
    if let Some(other) = record
        .supervisor
        .filter(|s| s.alive() && s.pid != process::self_pid())
    {
        log(format!(
            "another supervisor (pid {}) already runs for {ns}/{id}; leaving",
            other.pid
        ));
        return Ok(());
    }
    // Taking over from a supervisor that died (gc restarts supervision): its Envoy
    // still holds the ports; stop it so ours can bind and be supervised again.
    if let Some(orphan) = record.envoy.filter(|e| e.alive()) {
        log(format!(
            "{ns}/{id}: taking over; stopping the unsupervised Envoy pid {}",
            orphan.pid
        ));
        orphan.terminate(Duration::from_secs(2));
        record.envoy = None;
    }
    record.supervisor = ProcId::of(process::self_pid());
    record.ready_at = None;
    paths.write_record(&record)?;

    // Signals first, so a SIGTERM from delete during set-up is not lost.
    let sig_fd = process::termination_signalfd().at("signalfd")?;
    let init_fd = process::pidfd_open(pid).at(format!("pidfd of init {pid}"))?;
    process::enter_netns(pid).at(format!("/proc/{pid}/ns/net"))?;
    record.container_ip = process::first_ipv4().map(IpAddr::V4);
    record.cgroup = SidecarCgroup::for_container(pid)?;
    record.cgroup.create()?;
    paths.write_record(&record)?;
    log(format!(
        "{ns}/{id}: init {pid}, container IP {}, cgroup {:?}",
        record
            .container_ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| "none".into()),
        record.cgroup.dirs
    ));

    let ii = &cfg.instance_identity;
    let (cert_path, key_path) = (ii.ca_cert.as_ref().unwrap(), ii.ca_key.as_ref().unwrap());
    let ca = Ca::load(cert_path, key_path)?;
    let ca_pem = std::fs::read_to_string(cert_path).at(cert_path)?;
    let mut s = Supervisor {
        cfg,
        state,
        paths,
        record,
        ca,
        ca_pem,
        init_fd,
        sig_fd,
        envoy: None,
        clock: SystemClock,
        pending: Vec::new(),
        probe_err: String::new(),
        trim: false,
    };
    let result = s.main_loop();
    s.shutdown();
    result
}

/// The last `n` non-empty lines of a log file (reading at most its last 4 KiB).
fn tail(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

impl Supervisor<'_> {
    fn main_loop(&mut self) -> Result<()> {
        self.prepare_envoy_dirs()?;
        let mut policy = Policy::new(self.clock.now());
        let rotate_at = self.issue()?;
        policy.on(
            Event::Issued { rotate_at },
            self.clock.now(),
            self.clock.wall(),
        );
        self.write_bootstrap()?;
        let probe = Probe::new(
            &self.ca_pem,
            &self.state.instance_guid,
            self.record.container_ip,
        )
        .map_err(|e| self.fail(e))?;
        loop {
            if std::mem::take(&mut self.trim) {
                // Set-up or rotation code (issuance, config, TLS) is done: idle with a
                // small RSS.
                process::trim_text_pages();
            }
            let timeout = policy.next_wake(self.clock.now(), self.clock.wall());
            let mut event = self.wait(timeout)?;
            if event == Event::EnvoyExited {
                self.reap_envoy();
            }
            // Do what the policy says, telling it each outcome, until it says wait.
            loop {
                let action = policy.on(event, self.clock.now(), self.clock.wall());
                if action == Action::Stop {
                    return Ok(());
                }
                match self.perform(action, &probe) {
                    Some(outcome) => event = outcome,
                    None => break,
                }
            }
        }
    }

    /// Carry out `action`; returns its outcome when the policy awaits one.
    fn perform(&mut self, action: Action, probe: &Probe) -> Option<Event> {
        match action {
            Action::Wait | Action::Stop => None,
            Action::Start => Some(match self.start_envoy() {
                Ok(()) => Event::Started,
                Err(e) => {
                    // A missing or broken binary may be fixed by the operator: keep trying.
                    self.record.last_error = Some(e.to_string());
                    Event::StartFailed
                }
            }),
            Action::RetryStart { backoff } => {
                log(format!("{}; retrying in {backoff:?}", self.last_error()));
                self.save();
                None
            }
            Action::Probe => Some(Event::Probed {
                ready: self.probe_round(probe),
            }),
            Action::Ready { after } => {
                self.record.ready_at = Some(now_rfc3339());
                self.save();
                log(format!(
                    "ready after {after:?} (TLS handshake on {:?})",
                    self.ports()
                ));
                self.trim = true;
                None
            }
            Action::Kill { not_ready_after } => {
                log(format!(
                    "not ready after {not_ready_after:?}: {}; restarting Envoy",
                    self.probe_err
                ));
                self.record.last_error = Some(format!("not ready: {}", self.probe_err));
                // Its exit wakes the loop like any other (the pidfd), and it restarts.
                let envoy = self.envoy.as_ref();
                if let Some(p) =
                    envoy.and_then(|(c, _)| i32::try_from(c.id()).ok().and_then(ProcId::of))
                {
                    p.signal(libc::SIGKILL);
                }
                None
            }
            Action::Restart { ran, backoff } => {
                self.record.envoy_restarts += 1;
                self.record.ready_at = None;
                self.save();
                log(format!(
                    "Envoy exited after {ran:?}; restart #{} in {backoff:?}",
                    self.record.envoy_restarts
                ));
                None
            }
            Action::Rotate => {
                self.trim = true;
                Some(match self.issue() {
                    Ok(rotate_at) => Event::Issued { rotate_at },
                    Err(e) => {
                        self.record.last_error = Some(e.to_string());
                        Event::IssueFailed
                    }
                })
            }
            Action::RetryRotation { after } => {
                log(format!(
                    "rotation failed, retrying in {after:?}: {}",
                    self.last_error()
                ));
                None
            }
        }
    }

    fn fail(&self, msg: String) -> Error {
        failure(&self.state.namespace, &self.state.id, msg)
    }

    fn last_error(&self) -> &str {
        self.record.last_error.as_deref().unwrap_or_default()
    }

    fn ports(&self) -> Vec<u16> {
        self.state
            .ports
            .iter()
            .map(|m| m.internal_tls_proxy)
            .collect()
    }

    fn save(&self) {
        if let Err(e) = self.paths.write_record(&self.record) {
            log(format!("writing {}: {e}", self.paths.record().display()));
        }
    }

    fn prepare_envoy_dirs(&self) -> Result<()> {
        let (uid, gid) = (self.state.envoy_uid, self.state.envoy_uid);
        // Envoy (unprivileged) must reach its files: every ancestor of the state root
        // must be searchable by others (we do not change directories we do not own).
        for a in self.cfg.runtime.state_dir.ancestors().skip(1) {
            let mode = std::fs::metadata(a).at(a)?.permissions().mode();
            if mode & 0o001 == 0 {
                return Err(self.fail(format!(
                    "runtime.state_dir {}: its parent {} (mode {:o}) is not searchable by others, \
                     so Envoy (uid {uid}) cannot read its configuration; use a state_dir whose \
                     parents are world-searchable (the default /run/envoy-sidecar is)",
                    self.cfg.runtime.state_dir.display(),
                    a.display(),
                    mode & 0o7777
                )));
            }
        }
        // Envoy (unprivileged) must traverse to its files; it may list nothing else.
        for d in [
            &self.paths.dir,
            &self.paths.dir.parent().unwrap().to_path_buf(),
            &self.cfg.runtime.state_dir,
        ] {
            let mut perm = std::fs::metadata(d).at(d)?.permissions();
            if perm.mode() & 0o111 != 0o111 {
                perm.set_mode(perm.mode() | 0o111);
                std::fs::set_permissions(d, perm).at(d)?;
            }
        }
        let envoy_dir = self.paths.envoy_dir();
        let sds = self.paths.sds_dir();
        std::fs::DirBuilder::new()
            .mode(0o750)
            .recursive(true)
            .create(&sds)
            .at(&sds)?;
        std::os::unix::fs::chown(&envoy_dir, Some(0), Some(gid)).at(&envoy_dir)?;
        std::os::unix::fs::chown(&sds, Some(uid), Some(gid)).at(&sds)?;
        std::fs::set_permissions(&sds, std::fs::Permissions::from_mode(0o500)).at(&sds)?;
        Ok(())
    }

    /// Issue a fresh identity, hand it to the app and to Envoy (both atomically);
    /// returns when it is due for rotation.
    fn issue(&mut self) -> Result<SystemTime> {
        let s = &self.state;
        let issued: Issued = self.ca.issue(&Identity {
            instance_guid: &s.instance_guid,
            app_guid: s.app_guid.as_deref(),
            space_guid: s.space_guid.as_deref(),
            org_guid: s.org_guid.as_deref(),
            ip: self.record.container_ip,
            validity: self.cfg.validity()?,
            key_type: self.cfg.key_type()?,
        })?;
        identity::write_credentials(&s.credentials_dir, &issued, s.user.uid, s.user.gid)?;
        bootstrap::write_sds(
            &self.paths.sds_dir(),
            &issued.cert_chain_pem,
            &issued.key_pem,
            self.state.envoy_uid,
            self.state.envoy_uid,
        )?;
        let rotate_at = identity::rotate_after(&issued);
        self.record.cert_serial = Some(issued.serial_hex.clone());
        self.record.cert_not_after = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        self.record.last_error = None;
        self.save();
        log(format!(
            "issued certificate serial {} (rotation due in {:?})",
            issued.serial_hex,
            rotate_at
                .duration_since(self.clock.wall())
                .unwrap_or_default()
        ));
        Ok(rotate_at)
    }

    fn write_bootstrap(&self) -> Result<()> {
        let p = &self.cfg.proxy;
        let listeners: Vec<Listener> = self
            .state
            .ports
            .iter()
            .map(|m| Listener {
                proxy_port: m.internal_tls_proxy,
                app_port: m.internal,
            })
            .collect();
        let mtls_owned;
        let mtls = if p.require_and_verify_client_certificates {
            let mut pem = String::new();
            for entry in &p.trusted_ca_certificates {
                if entry.trim_start().starts_with("-----BEGIN") {
                    pem.push_str(entry);
                } else {
                    pem.push_str(&std::fs::read_to_string(entry).at(entry)?);
                }
                if !pem.ends_with('\n') {
                    pem.push('\n');
                }
            }
            mtls_owned = Mtls {
                trusted_ca_pem: pem,
                verify_subject_alt_names: p.verify_subject_alt_name.clone(),
            };
            Some(&mtls_owned)
        } else {
            None
        };
        let node_id = format!("{}/{}", self.state.namespace, self.state.id);
        let sds_dir = self.paths.sds_dir();
        let inputs = Inputs {
            node_id: &node_id,
            listeners: &listeners,
            admin_port: self.state.admin_port,
            alpn: bootstrap::parse_alpn(&self.state.alpn)?,
            mtls,
            sds_dir: &sds_dir,
            upstream_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            max_connections: u32::try_from(p.max_connections).expect("validated by Config::check"),
        };
        let json = serde_json::to_vec_pretty(&bootstrap::bootstrap(&inputs)).expect("serialises");
        let path = self.paths.bootstrap();
        crate::sys::fs::write_atomic(&path, &json, 0o640)?;
        std::os::unix::fs::chown(&path, Some(0), Some(self.state.envoy_uid)).at(&path)?;
        Ok(())
    }

    fn start_envoy(&mut self) -> Result<()> {
        let p = &self.cfg.proxy;
        pagecache::preload(&p.envoy_path);
        let log_path = self.paths.envoy_log();
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .at(&log_path)?;
        let procs = self.record.cgroup.procs_files();
        let (uid, gid) = (self.state.envoy_uid, self.state.envoy_uid);
        let mut cmd = Command::new(&p.envoy_path);
        cmd.args(bootstrap::args(
            &self.paths.bootstrap(),
            u32::try_from(p.concurrency).expect("validated by Config::check"),
            DRAIN_TIME,
        ))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().at(&log_path)?)
        .stderr(log_file);
        // Join the cgroups before exec so every page Envoy touches is charged there.
        exec::confine(&mut cmd, procs, uid, gid);
        let child = cmd.spawn().map_err(|e| {
            Error::process(
                format!("starting proxy.envoy_path {}", p.envoy_path.display()),
                e,
            )
        })?;
        let pid = i32::try_from(child.id()).expect("pids fit in pid_t");
        let fd = process::pidfd_open(pid).at(format!("pidfd of envoy {pid}"))?;
        self.record.envoy = ProcId::of(pid);
        self.save();
        log(format!("started Envoy pid {pid}"));
        self.envoy = Some((child, fd));
        self.pending = self.ports();
        self.probe_err.clear();
        Ok(())
    }

    /// One TLS handshake on each listener not yet ready; true once all have
    /// completed one.
    fn probe_round(&mut self, probe: &Probe) -> bool {
        let err = &mut self.probe_err;
        self.pending.retain(|port| {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            match probe.handshake(addr, HANDSHAKE_TIMEOUT) {
                Ok(()) => false,
                Err(e) => {
                    *err = e;
                    true
                }
            }
        });
        self.pending.is_empty()
    }

    /// Wait up to `timeout` for the container's init or Envoy to exit, or a signal.
    fn wait(&self, timeout: Duration) -> Result<Event> {
        let mut fds = vec![&self.init_fd, &self.sig_fd];
        if let Some((_, fd)) = &self.envoy {
            fds.push(fd);
        }
        // poll counts whole milliseconds, rounding down; round up instead so a wake-up
        // is never early (one would find nothing due yet and poll again at once).
        let timeout = timeout.saturating_add(Duration::from_nanos(999_999));
        let ready = process::poll_readable(&fds, timeout).at("poll")?;
        Ok(if ready.contains(&0) {
            Event::InitExited
        } else if ready.contains(&1) {
            Event::Terminate
        } else if ready.contains(&2) {
            Event::EnvoyExited
        } else {
            Event::Timeout
        })
    }

    /// Collect the exited Envoy and say why it exited.
    fn reap_envoy(&mut self) {
        if let Some((mut c, _)) = self.envoy.take() {
            let st = c.wait();
            // Say why: Envoy's own last words (bad config, unreadable files, ...).
            let why = tail(&self.paths.envoy_log(), 2);
            log(format!(
                "Envoy pid {} exited: {st:?}; envoy.log: {why}",
                c.id()
            ));
            self.record.last_error = Some(format!("Envoy exited ({st:?}): {why}"));
            self.record.envoy = None;
        }
    }

    /// Stop Envoy and empty its cgroups (runc cannot remove a busy cgroup).
    fn shutdown(&mut self) {
        if let Some((mut c, _)) = self.envoy.take() {
            if let Some(p) = i32::try_from(c.id()).ok().and_then(ProcId::of) {
                p.terminate(Duration::from_secs(2));
            }
            let _ = c.wait();
        }
        self.record.envoy = None;
        self.record.ready_at = None;
        if let Err(e) = self.record.cgroup.kill_and_remove() {
            log(format!("removing Envoy cgroups: {e}"));
        }
        self.save();
        log("stopped");
    }
}
