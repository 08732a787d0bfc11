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
//!
//! It also follows the container's network: under `ctr run --cni` and Garden the
//! address appears only after runc's poststart (which starts us), so an rtnetlink
//! subscription wakes the loop on every address change; a new address gets the host
//! NAT (run in the host's netns, where the table is) and a certificate with the new
//! IP SAN. The operator CA files are re-read when they change (checked every
//! `CA_CHECK`), and SIGHUP (`envoy-sidecar rotate`) re-issues at once. What all this
//! amounts to is recorded as one status (`sidecar::status`).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::envoy::admin;
use crate::envoy::bootstrap::{self, Inputs, Listener, Mtls};
use crate::envoy::probe::Probe;
use crate::error::{Error, IoContext, Result};
use crate::identity::{self, Ca, Identity, Issued};
use crate::nat::{Nat, ingress};
use crate::sidecar::control::{self, Paths, Record};
use crate::sidecar::ingress_guard::{IngressGuard, Outcome};
use crate::sidecar::logfile::BoundedLog;
use crate::sidecar::policy::{Action, Event, Phase, Policy};
use crate::sidecar::{sandbox, status};
use crate::state::record::{Network, State, Status};
use crate::state::store::{ContainerState, Store};
use crate::sys::cgroup::SidecarCgroup;
use crate::sys::clock::{Clock, SystemClock};
use crate::sys::fs::now_rfc3339;
use crate::sys::netns::{self, AddrWatch};
use crate::sys::process::{self, ProcId};
use crate::sys::{exec, landlock, pagecache};

/// How long one probe handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);
/// A liveness handshake may take longer: a busy Envoy is slow, not dead (three slow
/// answers in a row would restart it).
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);
/// Envoy's --drain-time-s: bounds how long a graceful drain would keep listeners open.
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// How often the operator CA and trusted CA files are checked for a change.
const CA_CHECK: Duration = Duration::from_secs(10);
/// The wait before retrying host NAT that failed.
const NAT_RETRY: Duration = Duration::from_secs(5);

/// Envoy's stdout and stderr: the pipe's read end and the bounded file it is drained
/// into.
struct EnvoyOutput {
    pipe: Option<OwnedFd>,
    file: BoundedLog,
}

impl EnvoyOutput {
    /// What Envoy wrote since the last look, into the file: at most 1 MiB per call,
    /// so an Envoy that writes without pause cannot keep the supervisor here (what is
    /// left keeps the pipe readable: the next poll returns at once and drains more).
    fn drain(&mut self) {
        for _ in 0..16 {
            let Some(fd) = &self.pipe else {
                return;
            };
            match process::read_available(fd, 64 * 1024) {
                Ok(Some(b)) if b.is_empty() => break,
                Ok(Some(b)) => {
                    let _ = self.file.write(&b);
                }
                // End of file (Envoy and every copy of the write end are gone), or
                // an error: nothing more will come.
                Ok(None) | Err(_) => self.pipe = None,
            }
        }
    }
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
    /// The host's network namespace, where NAT changes run.
    host_ns: File,
    /// Address-change notifications (none in the host's netns: nothing to follow).
    watch: Option<AddrWatch>,
    /// Since when the container has had no IPv4 or IPv6 address (`None`: it has one).
    no_ip_since: Option<Instant>,
    nat_error: Option<String>,
    nat_retry_at: Option<Instant>,
    rotation_error: Option<String>,
    /// Why Envoy is not running or not ready; cleared once it is ready.
    envoy_error: Option<String>,
    /// The CA files as last loaded (identity of each), and when to look again.
    ca_stamp: Vec<Stamp>,
    next_ca_check: Instant,
    /// SIGHUP: re-issue now.
    rotate_now: bool,
    /// The CA (or the container IP) changed: the readiness probe is rebuilt.
    probe_stale: bool,
    /// Why we killed the running Envoy (unresponsive, not ready), until it is reaped.
    kill_reason: Option<String>,
    /// The sandbox level last written to the log (logged again only when it changes).
    sandbox_logged: Option<sandbox::Level>,
    /// The ingress filter under watch (unproxied mappings off, own netns).
    ingress: Option<IngressGuard>,
    /// The ingress filter could not be put back.
    ingress_error: Option<String>,
    /// Envoy's output, drained into `envoy.log`.
    envoy_out: Option<EnvoyOutput>,
}

/// What identifies a file's content cheaply: device, inode, size, modification time
/// (a replaced file, renamed over or rewritten, changes at least one).
type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The files a rotation depends on: the CA pair and every trusted CA given as a path.
fn ca_files(cfg: &Config) -> Vec<std::path::PathBuf> {
    let ii = &cfg.instance_identity;
    let mut v: Vec<std::path::PathBuf> =
        ii.ca_cert.iter().chain(ii.ca_key.iter()).cloned().collect();
    if cfg.proxy.require_and_verify_client_certificates {
        v.extend(
            cfg.proxy
                .trusted_ca_certificates
                .iter()
                .filter(|e| !e.trim_start().starts_with("-----BEGIN"))
                .map(std::path::PathBuf::from),
        );
    }
    v
}

/// Entry point; returns when the container is gone or on SIGTERM.
pub fn run(cfg: &Config, ns: &str, id: &str) -> Result<()> {
    let store = Store::of(cfg);
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
    // From here on the supervisor's log is bounded ([log] max_file_kb).
    match BoundedLog::open(&paths.supervisor_log(), cfg.log_cap_bytes(), true) {
        Ok(l) => crate::logging::to_file(l),
        Err(e) => tracing::warn!(
            "{}: {e}: logging to stderr, unbounded",
            paths.supervisor_log().display()
        ),
    }
    let mut record = paths.read_record()?.unwrap_or_default();
    if let Some(other) = record
        .supervisor
        .filter(|s| s.alive() && s.pid != process::self_pid())
    {
        tracing::warn!(
            "another supervisor (pid {}) already runs for {ns}/{id}; leaving",
            other.pid
        );
        return Ok(());
    }
    // Taking over from a supervisor that died (gc restarts supervision): its Envoy
    // still holds the ports; stop it so ours can bind and be supervised again.
    if let Some(orphan) = record.envoy.filter(|e| e.alive()) {
        tracing::warn!(
            envoy_pid = orphan.pid,
            "{ns}/{id}: taking over; stopping the unsupervised Envoy pid {}",
            orphan.pid
        );
        orphan.terminate(Duration::from_secs(2));
        record.envoy = None;
    }
    record.supervisor = ProcId::of(process::self_pid());
    record.ready_at = None;
    paths.write_record(&record)?;

    // Signals first, so a SIGTERM from delete during set-up is not lost.
    let sig_fd = process::termination_signalfd().at("signalfd")?;
    let init_fd = process::pidfd_open(pid).at(format!("pidfd of init {pid}"))?;
    let host_ns = netns::current().at("/proc/thread-self/ns/net")?;
    // A container in the host's netns (`--net-host`) has the host's ports and
    // addresses: nothing to map, no address of its own to wait for.
    record.network = if netns::same(process::self_pid(), pid) {
        Network::Host
    } else {
        Network::Namespace
    };
    netns::enter(pid).at(format!("/proc/{pid}/ns/net"))?;
    // Subscribe before the first look, so an address added in between still wakes us.
    let watch = match record.network {
        Network::Host => None,
        Network::Namespace => Some(AddrWatch::open().at("rtnetlink socket")?),
    };
    record.set_addresses(netns::Addresses::default());
    record.nat_applied = false;
    record.status = None;
    record.cgroup = SidecarCgroup::for_container(pid)?;
    record.cgroup.create()?;
    paths.write_record(&record)?;
    tracing::info!(
        "{ns}/{id}: init {pid}, network {:?}, cgroup {:?}",
        record.network,
        record.cgroup.dirs
    );

    let ii = &cfg.instance_identity;
    let (cert_path, key_path) = (ii.ca_cert.as_ref().unwrap(), ii.ca_key.as_ref().unwrap());
    let stamps_before: Vec<Stamp> = ca_files(cfg).iter().map(|p| stamp(p)).collect();
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
        host_ns,
        watch,
        no_ip_since: Some(Instant::now()),
        nat_error: None,
        nat_retry_at: None,
        rotation_error: None,
        envoy_error: None,
        ca_stamp: stamps_before,
        next_ca_check: Instant::now() + CA_CHECK,
        rotate_now: false,
        probe_stale: false,
        kill_reason: None,
        sandbox_logged: None,
        ingress: None,
        ingress_error: None,
        envoy_out: None,
    };
    s.guard_ingress();
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
        let mut policy = Policy::new(self.clock.now())
            .with_liveness(self.cfg.liveness_interval()?)
            .with_jitter(u64::from(std::process::id()) | 1);
        // The address the container has now (pre-configured netns, CRI, nerdctl):
        // NAT at once, and the first certificate already carries the IP.
        self.follow_network(None);
        let rotate_at = self.issue()?;
        policy.on(
            Event::Issued { rotate_at },
            self.clock.now(),
            self.clock.wall(),
        );
        self.write_bootstrap()?;
        let mut probe = self.new_probe()?;
        loop {
            self.update_status(policy.phase(), false);
            if std::mem::take(&mut self.trim) {
                // Set-up or rotation code (issuance, config, TLS) is done: idle with a
                // small RSS.
                process::trim_text_pages();
            }
            let timeout = policy
                .next_wake(self.clock.now(), self.clock.wall())
                .min(self.own_wake());
            let mut event = self.wait(timeout)?;
            if event == Event::EnvoyExited {
                self.reap_envoy();
            }
            if !matches!(event, Event::InitExited | Event::Terminate) {
                // Our own concerns first: the network, the CA, a forced rotation.
                self.follow_network(Some(&mut policy));
                self.check_ca(&mut policy);
                if std::mem::take(&mut self.probe_stale) {
                    probe = self.new_probe()?;
                }
            }
            // Do what the policy says, telling it each outcome, until it says wait.
            loop {
                let action = policy.on(event, self.clock.now(), self.clock.wall());
                if action == Action::Stop {
                    self.update_status(policy.phase(), true);
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
                    let e = crate::error::render(&e);
                    self.record.last_error = Some(e.clone());
                    self.envoy_error = Some(e);
                    Event::StartFailed
                }
            }),
            Action::RetryStart { backoff } => {
                tracing::warn!("{}; retrying in {backoff:?}", self.last_error());
                self.save();
                None
            }
            Action::Probe => Some(Event::Probed {
                ready: self.probe_round(probe),
            }),
            Action::Ready { after } => {
                self.envoy_error = None;
                self.record.ready_at = Some(now_rfc3339());
                self.save();
                tracing::info!(
                    "ready after {after:?} (TLS handshake on {:?})",
                    self.ports()
                );
                self.trim = true;
                None
            }
            Action::Kill { not_ready_after } => {
                tracing::warn!(
                    "not ready after {not_ready_after:?}: {}; restarting Envoy",
                    self.probe_err
                );
                self.record.last_error = Some(format!("not ready: {}", self.probe_err));
                self.envoy_error = Some(self.probe_err.clone());
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
                tracing::warn!(
                    restarts = self.record.envoy_restarts,
                    "Envoy exited after {ran:?}; restart #{} in {backoff:?}",
                    self.record.envoy_restarts
                );
                None
            }
            Action::Check => Some(Event::Checked {
                alive: self.check_live(probe),
            }),
            Action::Unresponsive { failures } => {
                let why = format!(
                    "no TLS handshake in {failures} liveness checks in a row ({}); restarting Envoy",
                    self.probe_err
                );
                tracing::warn!("unresponsive: {why}");
                let reason = format!("unresponsive: {}", self.probe_err);
                self.record.last_error = Some(reason.clone());
                self.envoy_error = Some(reason.clone());
                self.kill_reason = Some(reason);
                // Killed outright (a stopped process ignores SIGTERM); its exit wakes
                // the loop through the pidfd and the policy restarts it.
                if let Some(p) = self
                    .envoy
                    .as_ref()
                    .and_then(|(c, _)| i32::try_from(c.id()).ok().and_then(ProcId::of))
                {
                    p.signal(libc::SIGKILL);
                }
                None
            }
            Action::Rotate => {
                self.trim = true;
                Some(self.issue_event())
            }
            Action::RetryRotation { after } => {
                tracing::error!(
                    "rotation failed, retrying in {after:?}: {}",
                    self.last_error()
                );
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
            tracing::error!("writing {}: {e}", self.paths.record().display());
        }
    }

    fn prepare_envoy_dirs(&self) -> Result<()> {
        let (uid, gid) = (self.state.envoy_uid, self.state.envoy_uid);
        // Envoy (unprivileged) must reach its files (and run its binary): the same
        // decision check-config, doctor and create make.
        if let Err(crate::config::Access::Denied((key, msg))) = self.cfg.unprivileged_access() {
            return Err(self.fail(format!("{key}: {msg} (uid {uid})")));
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
        if let Some(sock) = &self.state.admin_socket {
            // `<state_dir>/.admin` (root's, others may only traverse) / `<uid>` (Envoy's
            // own, 0700), where Envoy creates its admin socket (unlinking a stale one
            // itself, so Envoy restarts need nothing here). A socket an earlier Envoy
            // of this uid left behind is removed before it can be taken for this one's.
            let dir = sock.parent().expect("admin socket path has a directory");
            let parent = dir.parent().expect("admin socket directory has a parent");
            for (d, mode, owner) in [(parent, 0o711, 0), (dir, 0o700, uid)] {
                std::fs::DirBuilder::new()
                    .mode(mode)
                    .recursive(true)
                    .create(d)
                    .at(d)?;
                std::os::unix::fs::chown(d, Some(owner), Some(owner)).at(d)?;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).at(d)?;
            }
            crate::sys::fs::remove_if_exists(sock)?;
        }
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
            ips: self.record.addresses().list(),
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
        self.rotation_error = None;
        self.save();
        tracing::info!(
            serial = issued.serial_hex.as_str(),
            "issued certificate serial {} (rotation due in {:?})",
            issued.serial_hex,
            rotate_at
                .duration_since(self.clock.wall())
                .unwrap_or_default()
        );
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
            admin: match &self.state.admin_socket {
                Some(p) => bootstrap::AdminAddress::Unix(p),
                None => bootstrap::AdminAddress::Loopback(self.state.admin_port),
            },
            alpn: bootstrap::Alpn::from_value(&self.state.alpn).ok_or_else(|| {
                self.fail(format!(
                    "recorded alpn {:?} is not a valid choice",
                    self.state.alpn
                ))
            })?,
            mtls,
            sds_dir: &sds_dir,
            upstream_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ipv6: netns::ipv6_supported(),
            max_connections: self.cfg.max_connections(),
            heap_budget_bytes: self.cfg.heap_budget_bytes(),
            overload_refresh: self.cfg.overload_refresh(),
            handshake_timeout: self.cfg.handshake_timeout()?,
        };
        let json = serde_json::to_vec_pretty(&bootstrap::bootstrap(&inputs)).expect("serialises");
        let path = self.paths.bootstrap();
        crate::sys::fs::write_atomic(&path, &json, 0o640)?;
        std::os::unix::fs::chown(&path, Some(0), Some(self.state.envoy_uid)).at(&path)?;
        if let Some(m) = mtls {
            bootstrap::write_validation_sds(
                &sds_dir,
                m,
                self.state.envoy_uid,
                self.state.envoy_uid,
            )?;
        }
        Ok(())
    }

    fn start_envoy(&mut self) -> Result<()> {
        let p = &self.cfg.proxy;
        pagecache::preload(&p.envoy_path);
        let log_path = self.paths.envoy_log();
        // What the last Envoy wrote is in the file before this one writes anything.
        if let Some(o) = self.envoy_out.as_mut() {
            o.drain();
        }
        if self.envoy_out.is_none() {
            let file =
                BoundedLog::open(&log_path, self.cfg.log_cap_bytes(), false).at(&log_path)?;
            self.envoy_out = Some(EnvoyOutput { pipe: None, file });
        }
        let (pipe_r, pipe_w) = process::output_pipe().at("Envoy's output pipe")?;
        let pipe_w2 = pipe_w.try_clone().at("Envoy's output pipe")?;
        let procs = self.record.cgroup.procs_files();
        let (uid, gid) = (self.state.envoy_uid, self.state.envoy_uid);
        let mut cmd = Command::new(&p.envoy_path);
        cmd.args(bootstrap::args(
            &self.paths.bootstrap(),
            u32::try_from(p.concurrency).expect("validated by Config::check"),
            DRAIN_TIME,
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::from(pipe_w))
        .stderr(Stdio::from(pipe_w2));
        // Built here, before the fork: the child only applies it (`exec::confine`).
        let sandbox = sandbox::prepare(
            p,
            &self.paths.envoy_dir(),
            self.state
                .admin_socket
                .as_deref()
                .and_then(std::path::Path::parent),
        )
        .map_err(|e| self.fail(e.to_string()))?;
        if self.sandbox_logged.as_ref() != Some(&sandbox.level) {
            tracing::info!("Envoy sandbox: {}", sandbox.level);
            for g in &sandbox.granted {
                tracing::debug!(
                    "Envoy sandbox: allow {} {}",
                    landlock::describe(g.access),
                    g.path.display()
                );
            }
            self.sandbox_logged = Some(sandbox.level.clone());
        }
        // Join the cgroups before exec so every page Envoy touches is charged there.
        exec::confine(
            &mut cmd,
            procs,
            uid,
            gid,
            sandbox.ruleset.as_ref().map(landlock::Ruleset::raw_fd),
        );
        let spawned = cmd.spawn();
        // Our copies of the write end go with `cmd`: end of file comes when Envoy's do.
        drop(cmd);
        drop(sandbox);
        let child = spawned.map_err(|e| {
            Error::process(
                format!("starting proxy.envoy_path {}", p.envoy_path.display()),
                e,
            )
        })?;
        let pid = i32::try_from(child.id()).expect("pids fit in pid_t");
        let fd = process::pidfd_open(pid).at(format!("pidfd of envoy {pid}"))?;
        self.record.envoy = ProcId::of(pid);
        self.record.sandbox = self.sandbox_logged.as_ref().map(ToString::to_string);
        self.save();
        tracing::info!(envoy_pid = pid, "started Envoy pid {pid}");
        if let Some(o) = self.envoy_out.as_mut() {
            o.pipe = Some(pipe_r);
        }
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

    /// A running Envoy's liveness: a TLS handshake on every listener (the first that
    /// fails decides, so a hung Envoy holds the loop for one timeout at most).
    ///
    /// A refused handshake is not a dead Envoy when Envoy is refusing at its
    /// connection cap or heap budget: it accepts and closes at once, which is what a
    /// flood must get — restarting it would drop every connection it holds. So on a
    /// failure the check asks admin how many connections were refused at a limit,
    /// handshakes once more, and asks again: an increase (a worker accepted and
    /// refused, ours or another's) or a second handshake that succeeds counts as alive.
    fn check_live(&mut self, probe: &Probe) -> bool {
        for port in self.ports() {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if let Err(e) = probe.handshake(addr, LIVENESS_TIMEOUT) {
                if let Some(why) = self.refusing_at_limit(probe, addr) {
                    tracing::info!(
                        "liveness check on {port}: handshake refused ({e}), {why}: alive"
                    );
                    continue;
                }
                tracing::warn!("liveness check failed on {port}: {e}");
                self.probe_err = format!("port {port}: {e}");
                return false;
            }
        }
        true
    }

    /// After a failed liveness handshake on `addr`: why Envoy is alive after all, if it
    /// is (see [`Self::check_live`]); `None` when admin does not answer or nothing was
    /// refused at a limit.
    fn refusing_at_limit(&self, probe: &Probe, addr: SocketAddr) -> Option<String> {
        let at = admin::Endpoint::of(&self.state);
        let before = admin::refused_at_limit(&at, LIVENESS_TIMEOUT).ok()?;
        let again = probe.handshake(addr, LIVENESS_TIMEOUT);
        if again.is_ok() {
            return Some("the next one succeeded".into());
        }
        let after = admin::refused_at_limit(&at, LIVENESS_TIMEOUT).ok()?;
        (after > before).then(|| {
            format!(
                "Envoy is refusing at its connection cap or heap budget ({} refused \
                 meanwhile)",
                after - before
            )
        })
    }

    /// Wait up to `timeout` for the container's init or Envoy to exit, or a signal.
    fn wait(&mut self, timeout: Duration) -> Result<Event> {
        let mut fds = vec![&self.init_fd, &self.sig_fd];
        let envoy_at = self.envoy.as_ref().map(|(_, fd)| {
            fds.push(fd);
            fds.len() - 1
        });
        let watch_at = self.watch.as_ref().map(|w| {
            fds.push(w.fd());
            fds.len() - 1
        });
        let ingress_at = self.ingress.as_ref().map(|g| {
            fds.push(g.fd());
            fds.len() - 1
        });
        let output_at = self
            .envoy_out
            .as_ref()
            .and_then(|o| o.pipe.as_ref())
            .map(|p| {
                fds.push(p);
                fds.len() - 1
            });
        // poll counts whole milliseconds, rounding down; round up instead so a wake-up
        // is never early (one would find nothing due yet and poll again at once).
        let timeout = timeout.saturating_add(Duration::from_nanos(999_999));
        let ready = process::poll_readable(&fds, timeout).at("poll")?;
        if output_at.is_some_and(|i| ready.contains(&i))
            && let Some(o) = self.envoy_out.as_mut()
        {
            o.drain();
        }
        if let Some(i) = watch_at
            && ready.contains(&i)
            && let Some(w) = &self.watch
        {
            // What changed is looked at by `follow_network` after every wake-up.
            w.drain();
        }
        if ingress_at.is_some_and(|i| ready.contains(&i)) {
            self.check_ingress();
        }
        Ok(if ready.contains(&0) {
            Event::InitExited
        } else if ready.contains(&1) {
            match process::take_signal(&self.sig_fd) {
                Some(libc::SIGHUP) => {
                    self.rotate_now = true;
                    Event::Timeout
                }
                Some(_) => Event::Terminate,
                None => Event::Timeout,
            }
        } else if envoy_at.is_some_and(|i| ready.contains(&i)) {
            Event::EnvoyExited
        } else {
            Event::Timeout
        })
    }

    /// With unproxied mappings off in a netns of its own, watch the ingress filter
    /// (installing it if the engine ran no createRuntime hook). A filter that cannot
    /// be watched leaves the container degraded (the promise would go unchecked), and
    /// serving: the filter installed at create still stands.
    fn guard_ingress(&mut self) {
        if self.record.network != Network::Namespace || !ingress::wanted(&self.state) {
            return;
        }
        let ports: Vec<u16> = self.state.ports.iter().map(|p| p.internal).collect();
        let table = ingress::table_of(&self.state).to_string();
        match IngressGuard::start(Nat::default().nft, table, ports) {
            Ok((guard, found)) => {
                if let Some(what) = found {
                    // Missing: an engine that ran no createRuntime hook. Changed: while
                    // no supervisor watched.
                    tracing::info!("ingress filter {what} at the supervisor's start: installed");
                }
                self.ingress = Some(guard);
            }
            Err(e) => {
                let e = crate::error::render(&e);
                tracing::error!("ingress filter cannot be watched: {e}");
                self.record.last_error = Some(format!("ingress filter: {e}"));
                self.ingress_error = Some(format!("not watched: {e}"));
            }
        }
    }

    /// The ruleset changed in the container's netns: is the filter still ours?
    fn check_ingress(&mut self) {
        let Some(g) = self.ingress.as_mut() else {
            return;
        };
        match g.check() {
            Outcome::Intact => {
                if self.ingress_error.take().is_some() {
                    self.save();
                }
            }
            Outcome::Restored(what) => {
                self.record.ingress_repairs += 1;
                self.ingress_error = None;
                tracing::warn!(
                    "ingress filter {what} inside the container: restored (repair {})",
                    self.record.ingress_repairs
                );
                self.save();
            }
            Outcome::Failed(e) => {
                tracing::error!("ingress filter removed or changed, restoring failed: {e}");
                self.record.last_error = Some(format!("ingress filter: {e}"));
                self.ingress_error = Some(e);
                self.save();
            }
        }
    }

    /// The soonest of our own timers: the next CA check, a NAT retry, the end of the
    /// network wait (when the status turns degraded).
    fn own_wake(&self) -> Duration {
        let now = self.clock.now();
        let mut at = self.next_ca_check;
        if let Some(r) = self.nat_retry_at {
            at = at.min(r);
        }
        if let (Some(since), Ok(wait)) = (self.no_ip_since, self.cfg.network_wait())
            && now < since + wait
        {
            at = at.min(since + wait);
        }
        at.saturating_duration_since(now)
    }

    fn new_probe(&self) -> Result<Probe> {
        Probe::new(
            &self.ca_pem,
            &self.state.instance_guid,
            self.record.addresses().list().first().copied(),
        )
        .map_err(|e| self.fail(e))
    }

    /// Issue and say how it went, for the policy.
    fn issue_event(&mut self) -> Event {
        match self.issue() {
            Ok(rotate_at) => Event::Issued { rotate_at },
            Err(e) => {
                let e = crate::error::render(&e);
                self.record.last_error = Some(e.clone());
                self.rotation_error = Some(e);
                Event::IssueFailed
            }
        }
    }

    /// Look at the container's address; map its host ports to a new one (moving them
    /// from an old one), withdraw them when it is gone, and re-issue the certificate
    /// so its IP SAN follows. `policy` is `None` before the first issue.
    fn follow_network(&mut self, policy: Option<&mut Policy>) {
        if self.record.network == Network::Host {
            self.no_ip_since = None;
            return;
        }
        let addrs = netns::addresses();
        let now = self.clock.now();
        let old = self.record.addresses();
        if addrs != old {
            tracing::info!("container addresses {old} -> {addrs}");
            self.record.set_addresses(addrs);
            self.no_ip_since = if addrs.is_empty() { Some(now) } else { None };
            self.nat_retry_at = None;
            self.probe_stale = true;
            if let Some(p) = policy {
                // The IP SANs follow the addresses (no Envoy restart: SDS swap), before
                // NAT lets anyone in: a connection through the new mapping must not
                // meet a certificate without (or with the old) IP SAN.
                let ev = self.issue_event();
                self.tell(p, ev);
            }
            if addrs.is_empty() {
                self.unmap_nat();
            } else {
                self.map_nat(addrs);
            }
            self.save();
        } else if !addrs.is_empty() && self.nat_retry_at.is_some_and(|at| now >= at) {
            self.map_nat(addrs);
            self.save();
        }
    }

    /// Hand `event` to the policy outside its own loop, logging what it says.
    fn tell(&mut self, policy: &mut Policy, event: Event) {
        if let Action::RetryRotation { after } =
            policy.on(event, self.clock.now(), self.clock.wall())
        {
            tracing::error!(
                "rotation failed, retrying in {after:?}: {}",
                self.last_error()
            );
        }
    }

    /// Host NAT for `ip`, from the host's netns (where nft must act).
    fn map_nat(&mut self, ip: netns::Addresses) {
        let store = Store::of(self.cfg);
        let state = self.state.clone();
        let r = netns::run_in(&self.host_ns, move || {
            control::map_to(&store, &Nat::default(), &state, &ip)
                .map_err(|e| crate::error::render(&e))
        });
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(maps) => {
                tracing::info!(
                    container_ip = %ip,
                    "NAT applied: {} host port mappings to {ip}",
                    maps.len()
                );
                self.record.nat_applied = true;
                self.nat_error = None;
                self.nat_retry_at = None;
            }
            Err(e) => {
                tracing::warn!("NAT for {ip} failed, retrying in {NAT_RETRY:?}: {e}");
                self.record.nat_applied = false;
                self.record.last_error = Some(format!("NAT: {e}"));
                self.nat_error = Some(e);
                self.nat_retry_at = Some(self.clock.now() + NAT_RETRY);
            }
        }
    }

    fn unmap_nat(&mut self) {
        let store = Store::of(self.cfg);
        let (ns, id) = (self.state.namespace.clone(), self.state.id.clone());
        let r = netns::run_in(&self.host_ns, move || {
            control::remove_nat(&store, &Nat::default(), &ns, &id)
                .map_err(|e| crate::error::render(&e))
        });
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(()) => tracing::info!("NAT withdrawn: the container has no address"),
            Err(e) => tracing::warn!("withdrawing NAT: {e}"),
        }
        self.record.nat_applied = false;
        self.nat_error = None;
    }

    /// Every `CA_CHECK`, or at once on SIGHUP: reload the operator CA (and the trusted
    /// client CAs) if their files changed, and re-issue. A CA that does not load is
    /// reported (status degraded) and the old one kept.
    fn check_ca(&mut self, policy: &mut Policy) {
        let now = self.clock.now();
        let forced = std::mem::take(&mut self.rotate_now);
        if !forced && now < self.next_ca_check {
            return;
        }
        self.next_ca_check = now + CA_CHECK;
        let stamps: Vec<Stamp> = ca_files(self.cfg).iter().map(|p| stamp(p)).collect();
        let changed = stamps != self.ca_stamp;
        if !changed && !forced {
            return;
        }
        if changed {
            tracing::info!("CA files changed: reloading");
            // The first two are the operator CA pair; the rest trusted client CAs.
            let trusted_changed = stamps.get(2..) != self.ca_stamp.get(2..);
            if let Err(e) = self.reload_ca(trusted_changed) {
                let e = crate::error::render(&e);
                tracing::error!("reloading the CA failed (keeping the old one): {e}");
                self.record.last_error = Some(e.clone());
                self.rotation_error = Some(e);
                self.save();
                return;
            }
            self.ca_stamp = stamps;
            self.probe_stale = true;
        } else {
            tracing::info!("rotation requested (SIGHUP)");
        }
        let ev = self.issue_event();
        self.tell(policy, ev);
    }

    fn reload_ca(&mut self, trusted_changed: bool) -> Result<()> {
        let ii = &self.cfg.instance_identity;
        let (cert, key) = (ii.ca_cert.as_ref().unwrap(), ii.ca_key.as_ref().unwrap());
        let ca = Ca::load(cert, key)?;
        let pem = std::fs::read_to_string(cert).at(cert)?;
        if trusted_changed {
            // Trusted client CAs are in Envoy's validation SDS file: rewritten by
            // rename, Envoy picks them up without a restart (open connections stay).
            tracing::info!("trusted client CAs changed: new validation context for Envoy");
            self.write_bootstrap()?;
        }
        self.ca = ca;
        self.ca_pem = pem;
        Ok(())
    }

    /// Decide the status from what we know and record it when it changed (logged
    /// once per change, so a long wait for the network is one line, not one a second).
    fn update_status(&mut self, phase: Phase, stopping: bool) {
        let wait = self.cfg.network_wait().unwrap_or(Duration::from_secs(30));
        let (state, reason) = status::decide(&status::Inputs {
            phase,
            network: self.record.network,
            has_ip: !self.record.addresses().is_empty(),
            without_ip_for: self.no_ip_since.map_or(Duration::ZERO, |s| {
                self.clock.now().saturating_duration_since(s)
            }),
            network_wait: wait,
            nat_error: self.nat_error.as_deref(),
            rotation_error: self.rotation_error.as_deref(),
            envoy_error: self.envoy_error.as_deref(),
            ingress_error: self.ingress_error.as_deref(),
            stopping,
        });
        let same = self
            .record
            .status
            .as_ref()
            .is_some_and(|s| s.state == state && s.reason == reason);
        if same {
            return;
        }
        let status = state.as_str();
        match (&reason, state == State::Degraded) {
            (Some(r), true) => {
                tracing::warn!(status, reason = r.as_str(), "status: {status} ({r})")
            }
            (Some(r), false) => {
                tracing::info!(status, reason = r.as_str(), "status: {status} ({r})")
            }
            (None, _) => tracing::info!(status, "status: {status}"),
        }
        if state == State::Degraded {
            self.record.last_error = reason.clone();
        }
        self.record.status = Some(Status {
            state,
            since: now_rfc3339(),
            reason,
        });
        self.save();
    }

    /// Collect the exited Envoy and say why it exited.
    fn reap_envoy(&mut self) {
        if let Some((mut c, _)) = self.envoy.take() {
            let st = c.wait();
            if let Some(o) = self.envoy_out.as_mut() {
                o.drain();
            }
            // Say why: Envoy's own last words (bad config, unreadable files, ...).
            let why = tail(&self.paths.envoy_log(), 2);
            tracing::warn!(
                envoy_pid = c.id(),
                "Envoy pid {} exited: {st:?}; envoy.log: {why}",
                c.id()
            );
            self.record.last_error = Some(match self.kill_reason.take() {
                // Our own kill: its reason, not the signal, says what happened.
                Some(r) => format!("{r}; restarted"),
                None => format!("Envoy exited ({st:?}): {why}"),
            });
            self.envoy_error = self.record.last_error.clone();
            self.record.envoy = None;
        }
    }

    /// Stop Envoy and empty its cgroups (runc cannot remove a busy cgroup).
    fn shutdown(&mut self) {
        // The app is gone or being deleted, and draining happened at `kill` (before the
        // app's SIGTERM): nothing is left for a graceful Envoy exit to finish, so it is
        // killed outright (an Envoy still starting can take tens of ms over SIGTERM).
        if let Some((mut c, _)) = self.envoy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(o) = self.envoy_out.as_mut() {
            o.drain();
        }
        self.record.envoy = None;
        self.record.ready_at = None;
        if let Err(e) = self.record.cgroup.kill_and_remove() {
            tracing::warn!("removing Envoy cgroups: {e}");
        }
        self.save();
        tracing::info!("stopped");
    }
}
