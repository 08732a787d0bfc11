//! Operator configuration (`/etc/envoy-sidecar/config.toml`).
//!
//! The `[proxy]` keys mirror the Diego rep job's `containers.proxy.*` properties with the
//! same defaults. Everything is validated up front so that a bad value is reported by
//! `check-config` (and by the first `create`) naming the key and what would be valid,
//! never discovered half-way through setting a container up.

pub mod pem;

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::identity::{Ca, KeyType};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/envoy-sidecar/config.toml";
pub const CONFIG_ENV: &str = "ENVOY_SIDECAR_CONFIG";

/// Bounds that make a value "absurd" rather than merely large.
const MAX_ADDITIONAL_MEMORY_MB: i64 = 64 * 1024;
/// Short validities exist to exercise rotation; production wants hours.
const MIN_VALIDITY: Duration = Duration::from_secs(20);
const MAX_VALIDITY: Duration = Duration::from_secs(366 * 24 * 3600);
/// Upper bound of `[proxy] max_connections`.
pub const MAX_CONNECTIONS: i64 = 1_000_000;
/// `[proxy] handshake_timeout` default: a TLS handshake takes 2–3 round trips, so 5 s
/// leaves a slow mobile client room while an idle or stalled peer gives its slot back
/// within seconds (Envoy's own default is 10 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT: &str = "5s";
const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: Proxy,
    pub instance_identity: InstanceIdentity,
    pub runtime: Runtime,
    pub ports: Ports,
    pub host: Host,
    pub metrics: Metrics,
    pub log: Log,
    /// Where the configuration was read from; `None` when built-in defaults are in use.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Proxy {
    pub enabled: bool,
    /// Signed so that a negative value is reported as such instead of as a TOML type error.
    pub additional_memory_allocation_mb: i64,
    pub enable_http2: bool,
    pub require_and_verify_client_certificates: bool,
    /// Each entry is a PEM file path or inline PEM text.
    pub trusted_ca_certificates: Vec<String>,
    pub verify_subject_alt_name: Vec<String>,
    pub enable_unproxied_port_mappings: bool,
    pub envoy_path: PathBuf,
    /// Envoy worker threads; 1 keeps memory independent of the host's CPU count.
    pub concurrency: i64,
    /// Envoy runs as a uid (and gid) of its own per container, from this range, with no
    /// capabilities: one container's Envoy cannot read another's instance key.
    pub envoy_uid_pool_start: i64,
    pub envoy_uid_pool_size: i64,
    /// Envoy's cap on open downstream connections (global_downstream_max_connections).
    /// Unset: what `additional_memory_allocation_mb` holds by the measured model
    /// ([`Config::max_connections`]).
    pub max_connections: Option<i64>,
    /// How long a container may run without an IPv4 address before its status turns
    /// `degraded` (humantime: `30s`, `2m`).
    pub network_wait: String,
    /// How often the supervisor checks a running Envoy with a TLS handshake on every
    /// listener (each pause drawn from 75–125 % of it); "0s" turns liveness checks off.
    /// 30 s: one check costs Envoy ~1 ms of CPU per listener (handshake, the upstream
    /// connection tcp_proxy opens, teardown), a third of an idle Envoy's at 10 s.
    pub liveness_interval: String,
    /// Confine Envoy with Landlock: it may read only its binary, the system libraries,
    /// its bootstrap and SDS files (`sidecar::sandbox::allow_list`). Best effort: on a
    /// kernel without Landlock Envoy runs unconfined and the supervisor log and `doctor`
    /// say so.
    pub sandbox: bool,
    /// More files or directories (absolute) the sandboxed Envoy may read and execute,
    /// e.g. the real binary a wrapper-script `envoy_path` execs.
    pub sandbox_allow_read: Vec<PathBuf>,
    /// How long a downstream peer may take from TCP accept to a completed TLS handshake
    /// before Envoy closes the connection (humantime: `5s`, `1500ms`). Connections that
    /// never send a ClientHello count against `max_connections` until then.
    pub handshake_timeout: String,
    /// After draining the listeners on SIGTERM/SIGINT/SIGQUIT, how long the wrapper
    /// waits for Envoy's open downstream connections to finish before the app is
    /// signalled (humantime; `0` = do not wait).
    pub drain_timeout: String,
    /// Where Envoy's admin API listens: `unix` (a socket under `runtime.state_dir`,
    /// out of the app's reach) or `loopback` (the reference's 127.0.0.1 port).
    pub admin_listener: String,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            enabled: false,
            additional_memory_allocation_mb: 32,
            enable_http2: true,
            require_and_verify_client_certificates: false,
            trusted_ca_certificates: Vec::new(),
            verify_subject_alt_name: Vec::new(),
            enable_unproxied_port_mappings: true,
            envoy_path: PathBuf::from("/usr/local/bin/envoy"),
            concurrency: 1,
            envoy_uid_pool_start: 2_000_000_000,
            envoy_uid_pool_size: 65536,
            max_connections: None,
            network_wait: "30s".into(),
            liveness_interval: "30s".into(),
            sandbox: true,
            sandbox_allow_read: Vec::new(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT.into(),
            drain_timeout: "5s".into(),
            admin_listener: "unix".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceIdentity {
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// humantime syntax: `24h`, `90m`, `7d`.
    pub validity: String,
    /// Leaf key algorithm: `ecdsa-p256`, `rsa-2048` or `rsa-3072`.
    pub key_type: String,
}

impl Default for InstanceIdentity {
    fn default() -> Self {
        InstanceIdentity {
            ca_cert: None,
            ca_key: None,
            validity: "24h".into(),
            key_type: KeyType::default().as_str().into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// The real runc the wrapper hands over to.
    pub runc: PathBuf,
    /// Per-container state, allocation records and credentials live below this.
    pub state_dir: PathBuf,
    /// The `envoy-sidecar` CLI that runc hooks call; default: next to the wrapper.
    pub cli: Option<PathBuf>,
    /// Host-wide Envoy uid leases: must be the same for every configuration on the
    /// host (the default is), so that no two containers' Envoys share a uid.
    pub uid_lease_dir: PathBuf,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            runc: PathBuf::from("/usr/sbin/runc"),
            state_dir: PathBuf::from("/run/envoy-sidecar"),
            cli: None,
            uid_lease_dir: PathBuf::from(crate::state::leases::LEASE_DIR),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// Host port pool for NAT, inclusive.
    pub pool_start: i64,
    pub pool_end: i64,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            pool_start: 61001,
            pool_end: 65534,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// "linear" (the reference: usage x requested / (requested + additional)) or
    /// "exact" (container usage minus Envoy's own cgroup; cgroup v1).
    pub mode: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            mode: "linear".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Cap of each per-container log file (`supervisor.log`, `envoy.log`) in KiB; at
    /// the cap the file becomes `<name>.1` (replacing the one before) and a new one is
    /// started, so a container's logs never take more than twice this each.
    pub max_file_kb: i64,
    /// `text` (default: one line, `key=value` fields) or `json` (one object per line).
    pub format: crate::logging::Format,
    /// The least severe level written: `error`, `warn`, `info` (default), `debug`, `trace`.
    pub level: crate::logging::Threshold,
    /// Also send the lines to the systemd journal (`CONTAINER_ID=`, `CONTAINER_NAMESPACE=`).
    pub journal: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            max_file_kb: 1024,
            format: crate::logging::Format::default(),
            level: crate::logging::Threshold::default(),
            journal: false,
        }
    }
}

impl Log {
    pub fn settings(&self) -> crate::logging::Settings {
        crate::logging::Settings {
            format: self.format,
            level: self.level,
            journal: self.journal,
        }
    }
}

/// `[log] max_file_kb` bounds: a few lines at least; no more than 1 GiB of RAM (the
/// state dir is usually a tmpfs).
const LOG_KB: std::ops::RangeInclusive<i64> = 4..=1024 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Host {
    /// What all proxied containers' memory limits may add up to; default: physical memory.
    pub memory_capacity_mb: Option<i64>,
    /// Address routers use to reach this host (`CF_INSTANCE_IP`/`CF_INSTANCE_ADDR`);
    /// default: the source address of the default route, else 127.0.0.1.
    pub address: Option<IpAddr>,
}

impl Config {
    /// The configuration file to use: `--config`, else `$ENVOY_SIDECAR_CONFIG`, else the
    /// default path. Only the default path may be absent (built-in defaults: proxy off).
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os(CONFIG_ENV) {
                Some(p) if !p.is_empty() => (PathBuf::from(p), true),
                _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut cfg = Config::parse(&text, &path)?;
                cfg.source = Some(path);
                Ok(cfg)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::ConfigSyntax {
                path: path.display().to_string(),
                msg: format!("cannot read: {e}"),
            }),
        }
    }

    /// Parse only (syntax, types, unknown keys); see [`Config::validate`].
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        toml::from_str(text).map_err(|e| Error::ConfigSyntax {
            path: path.display().to_string(),
            msg: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// The configuration file, or what stands for it when there is none.
    pub fn source_name(&self) -> String {
        self.source
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(built-in defaults)".into())
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self
                .source
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(built-in defaults)".into()),
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// Every check an operator can fail. `wrapper_paths` are the files that are this
    /// product's wrapper, which `runtime.runc` must not point back to.
    pub fn validate(&self, wrapper_paths: &[PathBuf]) -> Result<()> {
        self.validate_for(wrapper_paths, true)
    }

    /// `validate` without reading the CA and trusted-CA files (`files = false`): what
    /// runc's pass-through commands need (they only use `runtime.runc`), so that the
    /// wrapper does not load the CA on every `state`/`kill`/`delete` call.
    pub fn validate_for(&self, wrapper_paths: &[PathBuf], files: bool) -> Result<()> {
        let p = &self.proxy;
        if !(0..=MAX_ADDITIONAL_MEMORY_MB).contains(&p.additional_memory_allocation_mb) {
            return Err(self.err(
                "proxy.additional_memory_allocation_mb",
                format!(
                    "{} is out of range; valid: 0 to {MAX_ADDITIONAL_MEMORY_MB} (MiB)",
                    p.additional_memory_allocation_mb
                ),
            ));
        }
        if !p.enable_unproxied_port_mappings && !p.enabled {
            return Err(self.err(
                "proxy.enable_unproxied_port_mappings",
                "false requires proxy.enabled = true (without the proxy the app would be unreachable)",
            ));
        }
        if p.require_and_verify_client_certificates && p.trusted_ca_certificates.is_empty() {
            return Err(self.err(
                "proxy.trusted_ca_certificates",
                "must list at least one CA (PEM file path or inline PEM) when \
                 proxy.require_and_verify_client_certificates = true",
            ));
        }
        for (i, entry) in p
            .trusted_ca_certificates
            .iter()
            .enumerate()
            .filter(|_| files)
        {
            let key = format!("proxy.trusted_ca_certificates[{i}]");
            pem::certificates(entry).map_err(|m| self.err(&key, m))?;
        }
        for (i, san) in p.verify_subject_alt_name.iter().enumerate() {
            if san.is_empty() || san.len() > 253 || san.chars().any(|c| c.is_control()) {
                return Err(self.err(
                    &format!("proxy.verify_subject_alt_name[{i}]"),
                    "must be a non-empty name of at most 253 printable characters",
                ));
            }
        }
        if !(1..=64).contains(&p.concurrency) {
            return Err(self.err(
                "proxy.concurrency",
                format!("{} is out of range; valid: 1 to 64", p.concurrency),
            ));
        }
        if let Some(m) = p.max_connections
            && !(1..=MAX_CONNECTIONS).contains(&m)
        {
            return Err(self.err(
                "proxy.max_connections",
                format!("{m} is out of range; valid: 1 to {MAX_CONNECTIONS}"),
            ));
        }
        let (u0, un) = (p.envoy_uid_pool_start, p.envoy_uid_pool_size);
        if !(1000..=4_294_967_294).contains(&u0)
            || !(1..=1 << 24).contains(&un)
            || u0 + un - 1 > 4_294_967_294
        {
            return Err(self.err(
                "proxy.envoy_uid_pool_start/envoy_uid_pool_size",
                format!(
                    "{u0}+{un} is not a valid uid range; valid: start >= 1000 (never root or a system user), \
                     1 <= size <= 16777216, start + size - 1 <= 4294967294 (default 2000000000 + 65536)"
                ),
            ));
        }
        for (i, extra) in p.sandbox_allow_read.iter().enumerate() {
            if !extra.is_absolute() {
                return Err(self.err(
                    &format!("proxy.sandbox_allow_read[{i}]"),
                    format!("{} is not absolute; valid: absolute paths", extra.display()),
                ));
            }
            if files && p.enabled && !extra.exists() {
                return Err(self.err(
                    &format!("proxy.sandbox_allow_read[{i}]"),
                    format!("{} does not exist", extra.display()),
                ));
            }
        }
        if p.enabled {
            if !p.envoy_path.is_absolute() {
                return Err(self.err("proxy.envoy_path", "must be an absolute path"));
            }
            let ii = &self.instance_identity;
            let cert = ii.ca_cert.as_ref().ok_or_else(|| {
                self.err(
                    "instance_identity.ca_cert",
                    "required when proxy.enabled = true (path to the operator CA certificate, PEM)",
                )
            })?;
            let key = ii.ca_key.as_ref().ok_or_else(|| {
                self.err(
                    "instance_identity.ca_key",
                    "required when proxy.enabled = true (path to the operator CA private key, PEM)",
                )
            })?;
            // Without `files`, presence only: contents are checked where they are used.
            if files {
                pem::certificate_file(cert)
                    .map_err(|m| self.err("instance_identity.ca_cert", m))?;
                pem::private_key_file(key).map_err(|m| self.err("instance_identity.ca_key", m))?;
                pem::private_key_mode(key).map_err(|m| self.err("instance_identity.ca_key", m))?;
                // Loading proves what issuing needs: a supported key that matches a CA
                // certificate which has not expired. The message names the file.
                Ca::load(cert, key).map_err(|e| match e {
                    Error::Identity(m) => self.err("instance_identity", m),
                    e => e,
                })?;
            }
        }
        if p.enabled
            && files
            && let Err(Access::Denied(m)) = self.unprivileged_access()
        {
            return Err(self.err(m.0, m.1));
        }
        self.validity()?;
        self.network_wait()?;
        self.liveness_interval()?;
        self.handshake_timeout()?;
        self.drain_timeout()?;
        self.admin_listener()?;
        self.metrics_mode()?;
        self.key_type()?;
        if !LOG_KB.contains(&self.log.max_file_kb) {
            return Err(self.err(
                "log.max_file_kb",
                format!(
                    "{} is out of range; valid: {} to {} (KiB per file)",
                    self.log.max_file_kb,
                    LOG_KB.start(),
                    LOG_KB.end()
                ),
            ));
        }

        let pool = (self.ports.pool_start, self.ports.pool_end);
        if !(1024..=65535).contains(&pool.0) || !(1024..=65535).contains(&pool.1) || pool.0 > pool.1
        {
            return Err(self.err(
                "ports.pool_start/pool_end",
                format!(
                    "{}-{} is not a valid pool; valid: 1024 <= pool_start <= pool_end <= 65535",
                    pool.0, pool.1
                ),
            ));
        }
        if let Some(mb) = self.host.memory_capacity_mb
            && !(1..=1 << 30).contains(&mb)
        {
            return Err(self.err(
                "host.memory_capacity_mb",
                format!("{mb} is out of range; valid: 1 to {} (MiB)", 1u64 << 30),
            ));
        }

        let rt = &self.runtime;
        if !rt.runc.is_absolute() {
            return Err(self.err("runtime.runc", "must be an absolute path to the real runc"));
        }
        if let Ok(real) = std::fs::canonicalize(&rt.runc) {
            let is_wrapper = real.file_name().is_some_and(|n| n == crate::WRAPPER_NAME)
                || wrapper_paths
                    .iter()
                    .filter_map(|w| std::fs::canonicalize(w).ok())
                    .any(|w| w == real);
            if is_wrapper {
                return Err(self.err(
                    "runtime.runc",
                    format!(
                        "{} resolves to the envoy-sidecar wrapper itself ({}); it must name the real runc, e.g. /usr/sbin/runc",
                        rt.runc.display(),
                        real.display()
                    ),
                ));
            }
        }
        if !rt.uid_lease_dir.is_absolute() {
            return Err(self.err("runtime.uid_lease_dir", "must be an absolute path"));
        }
        if !rt.state_dir.is_absolute() {
            return Err(self.err("runtime.state_dir", "must be an absolute path"));
        }
        if let Some(cli) = &rt.cli
            && !cli.is_absolute()
        {
            return Err(self.err("runtime.cli", "must be an absolute path"));
        }
        Ok(())
    }

    /// `[log] max_file_kb` in bytes (validated).
    pub fn log_cap_bytes(&self) -> u64 {
        u64::try_from(self.log.max_file_kb.clamp(*LOG_KB.start(), *LOG_KB.end()))
            .expect("clamped to a positive range")
            * 1024
    }

    pub fn metrics_mode(&self) -> Result<MetricsMode> {
        match self.metrics.mode.as_str() {
            "linear" => Ok(MetricsMode::Linear),
            "exact" => Ok(MetricsMode::Exact),
            other => Err(self.err(
                "metrics.mode",
                format!("{other:?} is not a mode; valid: \"linear\", \"exact\""),
            )),
        }
    }

    /// `[proxy] admin_listener`; checked by `validate`.
    pub fn admin_listener(&self) -> Result<AdminListener> {
        match self.proxy.admin_listener.as_str() {
            "unix" => Ok(AdminListener::Unix),
            "loopback" => Ok(AdminListener::Loopback),
            other => Err(self.err(
                "proxy.admin_listener",
                format!(
                    "{:?} is not a choice; valid: \"unix\" (default), \"loopback\"",
                    other.chars().take(80).collect::<String>()
                ),
            )),
        }
    }

    /// Certificate validity; checked by `validate`.
    pub fn validity(&self) -> Result<Duration> {
        let v = &self.instance_identity.validity;
        let d = humantime::parse_duration(v).map_err(|e| {
            self.err(
                "instance_identity.validity",
                format!("{v:?}: {e}; valid: a duration such as \"24h\", \"90m\", \"7d\""),
            )
        })?;
        if !(MIN_VALIDITY..=MAX_VALIDITY).contains(&d) {
            return Err(self.err(
                "instance_identity.validity",
                format!("{v:?} is out of range; valid: 20s to 366d"),
            ));
        }
        Ok(d)
    }

    /// `[proxy] network_wait`; checked by `validate`.
    pub fn network_wait(&self) -> Result<Duration> {
        let v = &self.proxy.network_wait;
        let d = humantime::parse_duration(v).map_err(|e| {
            self.err(
                "proxy.network_wait",
                format!("{v:?}: {e}; valid: a duration such as \"30s\", \"2m\""),
            )
        })?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) {
            return Err(self.err(
                "proxy.network_wait",
                format!("{v:?} is out of range; valid: 1s to 1h"),
            ));
        }
        Ok(d)
    }

    /// `[proxy] liveness_interval`; `None` when "0s" (off). Checked by `validate`.
    pub fn liveness_interval(&self) -> Result<Option<Duration>> {
        let v = &self.proxy.liveness_interval;
        let d = humantime::parse_duration(v).map_err(|e| {
            self.err(
                "proxy.liveness_interval",
                format!("{v:?}: {e}; valid: a duration such as \"10s\", or \"0s\" for off"),
            )
        })?;
        if d.is_zero() {
            return Ok(None);
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) {
            return Err(self.err(
                "proxy.liveness_interval",
                format!("{v:?} is out of range; valid: 0s (off), or 1s to 1h"),
            ));
        }
        Ok(Some(d))
    }

    /// Whether Envoy verifies client certificates: the sizing model's mTLS figures apply.
    fn mtls(&self) -> bool {
        self.proxy.require_and_verify_client_certificates
    }

    /// The additional allocation in MiB (validated: 0 to 65536).
    fn additional_mb(&self) -> u64 {
        self.proxy.additional_memory_allocation_mb.unsigned_abs()
    }

    /// Envoy's connection cap: `[proxy] max_connections` when set (an explicit value
    /// wins), else what the additional allocation holds by the measured model
    /// (`envoy::sizing::default_max_connections`: 386 TLS / 316 mTLS connections for
    /// the default 32 MiB). Validated values only.
    pub fn max_connections(&self) -> u32 {
        let n = match self.proxy.max_connections {
            Some(m) => m.unsigned_abs(),
            None => crate::envoy::sizing::default_max_connections(
                self.additional_mb(),
                self.mtls(),
                MAX_CONNECTIONS.unsigned_abs(),
            ),
        };
        u32::try_from(n.min(MAX_CONNECTIONS.unsigned_abs())).unwrap_or(u32::MAX)
    }

    /// Envoy's heap budget, bytes: `envoy::sizing::heap_budget_bytes` of the additional
    /// allocation (16.4 MiB TLS / 17.8 MiB mTLS for the default 32 MiB). Past 90 % of
    /// it Envoy refuses new connections, whatever `max_connections` says.
    pub fn heap_budget_bytes(&self) -> u64 {
        crate::envoy::sizing::heap_budget_bytes(self.additional_mb(), self.mtls())
    }

    /// Envoy's overload manager refresh, i.e. how often the heap monitor samples:
    /// `envoy::sizing::heap_refresh_ms` (1 s when the connection cap trips before the
    /// heap budget, as the default cap does from 27 MiB up; 100 ms otherwise, e.g. an
    /// explicit `max_connections` past what the allocation holds).
    pub fn overload_refresh(&self) -> Duration {
        Duration::from_millis(crate::envoy::sizing::heap_refresh_ms(
            u64::from(self.max_connections()),
            self.additional_mb(),
            self.mtls(),
        ))
    }

    /// What is valid but will not behave as the operator probably expects: an explicit
    /// `max_connections` the additional allocation cannot hold, or an allocation that
    /// does not even hold an idle Envoy. `check-config` and `doctor` print these.
    pub fn warnings(&self) -> Vec<String> {
        use crate::envoy::sizing;
        let mut out = Vec::new();
        if !self.proxy.enabled {
            return out;
        }
        let (mb, mtls) = (self.additional_mb(), self.mtls());
        let mode = if mtls { "mutual TLS" } else { "TLS" };
        let idle = sizing::recommend_mb(0, mtls);
        if mb < idle {
            out.push(format!(
                "proxy.additional_memory_allocation_mb = {mb} does not hold an idle Envoy \
                 ({idle} MiB by the measured model): Envoy's memory comes out of the app's \
                 limit; valid but short — `envoy-sidecar recommend-memory --connections N` \
                 gives a value"
            ));
        }
        if let Some(m) = self.proxy.max_connections {
            let m = m.unsigned_abs();
            let need = sizing::recommend_mb(m, mtls);
            if need > mb {
                out.push(format!(
                    "proxy.max_connections = {m} needs about {need} MiB of additional \
                     allocation ({mode}, measured model: `envoy-sidecar recommend-memory \
                     --connections {m}`), but proxy.additional_memory_allocation_mb = {mb} \
                     holds about {} connections: past about {} (fewer when they carry \
                     data) Envoy refuses new connections: its heap budget ({:.1} MiB) \
                     follows the allocation, not max_connections; raise the allocation, \
                     or lower max_connections (or leave it unset: it then follows the \
                     allocation)",
                    sizing::connections_for_mb(mb, mtls),
                    sizing::heap_budget_connections(mb, mtls),
                    sizing::heap_budget_bytes(mb, mtls) as f64 / f64::from(1u32 << 20),
                ));
            }
        }
        out
    }

    /// `[proxy] handshake_timeout`; checked by `validate`.
    pub fn handshake_timeout(&self) -> Result<Duration> {
        let v = &self.proxy.handshake_timeout;
        let d = humantime::parse_duration(v).map_err(|e| {
            self.err(
                "proxy.handshake_timeout",
                format!("{v:?}: {e}; valid: a duration such as \"5s\", \"1500ms\""),
            )
        })?;
        if !(MIN_HANDSHAKE_TIMEOUT..=MAX_HANDSHAKE_TIMEOUT).contains(&d) {
            return Err(self.err(
                "proxy.handshake_timeout",
                format!("{v:?} is out of range; valid: 100ms to 60s"),
            ));
        }
        Ok(d)
    }

    /// `[proxy] drain_timeout`; checked by `validate`. Zero turns the wait off.
    pub fn drain_timeout(&self) -> Result<Duration> {
        let v = &self.proxy.drain_timeout;
        let d = humantime::parse_duration(v).map_err(|e| {
            self.err(
                "proxy.drain_timeout",
                format!("{v:?}: {e}; valid: a duration from 0 (off) to 2m, such as \"5s\""),
            )
        })?;
        if d > Duration::from_secs(120) {
            return Err(self.err(
                "proxy.drain_timeout",
                format!("{v:?} is out of range; valid: 0 (off) to 2m"),
            ));
        }
        Ok(d)
    }

    /// Whether Envoy, running as an unprivileged uid of its own, can execute
    /// `proxy.envoy_path` and reach its files under `runtime.state_dir`. The one
    /// decision `check-config`, `doctor`, `create` and the supervisor share: a binary
    /// that is there but out of reach is refused at create (the container would never
    /// get its proxy); a missing one fails `check-config`/`doctor` but not create (it
    /// may be installed later: the supervisor retries and reports it in `status`).
    pub fn unprivileged_access(&self) -> std::result::Result<(), Access> {
        let bin = &self.proxy.envoy_path;
        let key = "proxy.envoy_path";
        let fix = format!(
            "install a copy Envoy's uid can run, e.g. `install -m 0755 {} /usr/local/bin/envoy`, \
             and set proxy.envoy_path to it",
            bin.display()
        );
        let denied = |k: &'static str, m: String| Err(Access::Denied((k, m)));
        // Every directory on the way, for the path as given and as resolved.
        let real = std::fs::canonicalize(bin).ok();
        for path in std::iter::once(bin.as_path()).chain(real.as_deref()) {
            for d in path.ancestors().skip(1) {
                match std::fs::metadata(d) {
                    Ok(m) if m.permissions().mode() & 0o001 == 0 => {
                        return denied(
                            key,
                            format!(
                                "{}: directory {} (mode {:o}) is not searchable by others, so \
                                 Envoy's unprivileged uid cannot execute it; {fix} (or `chmod o+x {}`)",
                                bin.display(),
                                d.display(),
                                m.permissions().mode() & 0o7777,
                                d.display()
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        match std::fs::metadata(bin) {
            Err(e) => {
                return Err(Access::Missing((
                    key,
                    format!(
                        "{}: {e}; install Envoy there or point proxy.envoy_path at it",
                        bin.display()
                    ),
                )));
            }
            Ok(m) if !m.is_file() => {
                return denied(key, format!("{}: not a regular file", bin.display()));
            }
            Ok(m) if m.permissions().mode() & 0o001 == 0 => {
                return denied(
                    key,
                    format!(
                        "{}: mode {:o} is not executable by others, so Envoy's unprivileged uid \
                         cannot execute it; `chmod o+x` it or {fix}",
                        bin.display(),
                        m.permissions().mode() & 0o7777
                    ),
                );
            }
            Ok(_) => {}
        }
        let sd = &self.runtime.state_dir;
        for a in sd.ancestors().skip(1) {
            if let Ok(m) = std::fs::metadata(a)
                && m.permissions().mode() & 0o001 == 0
            {
                return denied(
                    "runtime.state_dir",
                    format!(
                        "{}: its parent {} (mode {:o}) is not searchable by others, so Envoy's \
                         unprivileged uid cannot read its configuration; `chmod o+x {}` or use a \
                         state_dir whose parents are (the default /run/envoy-sidecar is)",
                        sd.display(),
                        a.display(),
                        m.permissions().mode() & 0o7777,
                        a.display()
                    ),
                );
            }
        }
        Ok(())
    }

    /// Leaf key algorithm; checked by `validate`.
    pub fn key_type(&self) -> Result<KeyType> {
        self.instance_identity
            .key_type
            .parse()
            .map_err(|m: String| self.err("instance_identity.key_type", m))
    }

    pub fn additional_memory_bytes(&self) -> u64 {
        self.proxy.additional_memory_allocation_mb.unsigned_abs() * 1024 * 1024
    }

    /// The per-container Envoy uids (validated to fit in u32).
    pub fn envoy_uid_pool(&self) -> std::ops::RangeInclusive<u32> {
        let fit = |v: i64| u32::try_from(v).expect("validated by Config::check");
        let start = fit(self.proxy.envoy_uid_pool_start);
        start..=start + (fit(self.proxy.envoy_uid_pool_size) - 1)
    }

    /// The host port pool (validated to be ports).
    pub fn pool(&self) -> std::ops::RangeInclusive<u16> {
        let port = |v: i64| u16::try_from(v).expect("validated by Config::check");
        port(self.ports.pool_start)..=port(self.ports.pool_end)
    }

    /// `[host] memory_capacity_mb` in bytes, defaulting to physical memory.
    pub fn memory_capacity_bytes(&self) -> Result<u64> {
        match self.host.memory_capacity_mb {
            Some(mb) => Ok(mb.unsigned_abs() * 1024 * 1024),
            None => physical_memory_bytes(),
        }
    }
}

/// Where Envoy's admin API listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListener {
    /// A unix socket in the host-side state directory: nothing in the container's
    /// network or mount namespace reaches it.
    Unix,
    /// `127.0.0.1:<admin port>` in the container's netns, where the app can reach it
    /// (the reference's choice; the path allow-list still applies).
    Loopback,
}

/// Why an unprivileged Envoy could not do its job: `(config key, message)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The binary is not there (yet).
    Missing((&'static str, String)),
    /// It is there but out of reach of an unprivileged uid.
    Denied((&'static str, String)),
}

impl Access {
    pub fn key_and_message(&self) -> (&'static str, &str) {
        match self {
            Access::Missing((k, m)) | Access::Denied((k, m)) => (k, m),
        }
    }
}

/// `[metrics] mode`: `linear` rescales usage to the requested quota (the reference's
/// way); `exact` subtracts Envoy's own cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    Linear,
    Exact,
}

fn physical_memory_bytes() -> Result<u64> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Io {
            path: path.into(),
            source: std::io::Error::other("no MemTotal line"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let mut c = Config::parse(text, Path::new("test.toml"))?;
        c.source = Some("test.toml".into());
        Ok(c)
    }

    fn invalid(text: &str) -> String {
        let c = parse(text).unwrap();
        c.validate(&[]).unwrap_err().to_string()
    }

    #[test]
    fn unprivileged_access_names_the_path_and_the_fix() {
        use std::fs::Permissions;
        let root = crate::state::store::tests::tempdir("access");
        std::fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        let open = root.join("open");
        let closed = root.join("closed");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::create_dir_all(&closed).unwrap();
        std::fs::set_permissions(&closed, Permissions::from_mode(0o700)).unwrap();
        for (p, mode) in [
            (open.join("envoy"), 0o755),
            (open.join("private"), 0o750),
            (closed.join("envoy"), 0o755),
        ] {
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, Permissions::from_mode(mode)).unwrap();
        }
        let cfg = |bin: &Path, state: &Path| {
            let mut c = Config::default();
            c.proxy.envoy_path = bin.into();
            c.runtime.state_dir = state.into();
            c
        };
        let state_ok = open.join("state");
        assert_eq!(
            cfg(&open.join("envoy"), &state_ok).unprivileged_access(),
            Ok(())
        );

        let Err(Access::Denied((k, m))) =
            cfg(&closed.join("envoy"), &state_ok).unprivileged_access()
        else {
            panic!("a binary under a 0700 directory must be refused");
        };
        assert_eq!(k, "proxy.envoy_path");
        assert!(
            m.contains(&closed.display().to_string()) && m.contains("mode 700"),
            "{m}"
        );
        assert!(
            m.contains("install -m 0755") && m.contains("chmod o+x"),
            "{m}"
        );

        // Through a symlink, the target's directories count.
        let link = open.join("envoy-link");
        std::os::unix::fs::symlink(closed.join("envoy"), &link).unwrap();
        assert!(matches!(
            cfg(&link, &state_ok).unprivileged_access(),
            Err(Access::Denied(_))
        ));

        let Err(Access::Denied((_, m))) =
            cfg(&open.join("private"), &state_ok).unprivileged_access()
        else {
            panic!("mode 0750 is not executable by others");
        };
        assert!(m.contains("not executable by others"), "{m}");

        assert!(matches!(
            cfg(&open.join("missing"), &state_ok).unprivileged_access(),
            Err(Access::Missing(("proxy.envoy_path", _)))
        ));

        let Err(Access::Denied((k, m))) =
            cfg(&open.join("envoy"), &closed.join("state")).unprivileged_access()
        else {
            panic!("a state_dir under a 0700 parent must be refused");
        };
        assert_eq!(k, "runtime.state_dir");
        assert!(m.contains("not searchable by others"), "{m}");

        std::fs::set_permissions(&closed, Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn liveness_interval_defaults_to_30s_and_0s_is_off() {
        assert_eq!(
            Config::default().liveness_interval().unwrap(),
            Some(Duration::from_secs(30))
        );
        let mut c = Config::default();
        c.proxy.liveness_interval = "0s".into();
        assert_eq!(c.liveness_interval().unwrap(), None);
        let e = invalid("[proxy]\nliveness_interval = \"often\"\n");
        assert!(
            e.contains("proxy.liveness_interval") && e.contains("valid:"),
            "{e}"
        );
        let e = invalid("[proxy]\nliveness_interval = \"500ms\"\n");
        assert!(e.contains("out of range") && e.contains("1s to 1h"), "{e}");
    }

    #[test]
    fn max_connections_follows_the_allocation_unless_set() {
        let c = Config::default();
        assert_eq!(c.proxy.max_connections, None);
        assert_eq!(c.max_connections(), 386);
        let c = parse("[proxy]\nadditional_memory_allocation_mb = 90\n").unwrap();
        assert_eq!(c.max_connections(), 2019);
        let c = parse(
            "[proxy]\nadditional_memory_allocation_mb = 90\nrequire_and_verify_client_certificates = true\n",
        )
        .unwrap();
        assert_eq!(c.max_connections(), 1655);
        let c = parse("[proxy]\nadditional_memory_allocation_mb = 0\n").unwrap();
        assert_eq!(c.max_connections(), 64);
        let c = parse("[proxy]\nmax_connections = 4096\n").unwrap();
        assert_eq!(c.max_connections(), 4096);
        let c = parse("[proxy]\nmax_connections = 10\n").unwrap();
        assert_eq!(c.max_connections(), 10);
    }

    #[test]
    fn overload_refresh_is_slow_unless_the_cap_exceeds_the_allocation() {
        assert_eq!(Config::default().overload_refresh(), Duration::from_secs(1));
        let c = parse("[proxy]\nmax_connections = 4096\n").unwrap();
        assert_eq!(c.overload_refresh(), Duration::from_millis(100));
        let c = parse("[proxy]\nmax_connections = 10\n").unwrap();
        assert_eq!(c.overload_refresh(), Duration::from_secs(1));
        // 21 MiB: the derived cap (76) exceeds the heap budget's floor (64).
        let c = parse("[proxy]\nadditional_memory_allocation_mb = 21\n").unwrap();
        assert_eq!(c.overload_refresh(), Duration::from_millis(100));
    }

    #[test]
    fn warnings_name_the_pair_that_does_not_fit() {
        let on = "[proxy]\nenabled = true\n";
        // Defaults: nothing to say.
        assert!(parse(on).unwrap().warnings().is_empty());
        // Disabled proxy: nothing either, whatever the numbers.
        let c = parse("[proxy]\nmax_connections = 4096\n").unwrap();
        assert!(c.warnings().is_empty());
        let c = parse(&format!("{on}max_connections = 4096\n")).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        for part in [
            "proxy.max_connections = 4096",
            "164 MiB",
            "additional_memory_allocation_mb = 32",
            "about 386 connections",
            "past about 407",
            "refuses new connections",
            "heap budget (16.4 MiB)",
        ] {
            assert!(w[0].contains(part), "{part}: {}", w[0]);
        }
        // A pair that fits.
        let c = parse(&format!(
            "{on}max_connections = 2000\nadditional_memory_allocation_mb = 90\n"
        ))
        .unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // An allocation below an idle Envoy.
        let c = parse(&format!("{on}additional_memory_allocation_mb = 8\n")).unwrap();
        let w = c.warnings();
        assert!(
            w.len() == 1 && w[0].contains("does not hold an idle Envoy"),
            "{w:?}"
        );
    }

    #[test]
    fn handshake_timeout_is_a_bounded_duration() {
        assert_eq!(
            Config::default().handshake_timeout().unwrap(),
            Duration::from_secs(5)
        );
        let c = parse("[proxy]\nhandshake_timeout = \"1500ms\"\n").unwrap();
        assert_eq!(c.handshake_timeout().unwrap(), Duration::from_millis(1500));
        for bad in ["\"soon\"", "\"0s\"", "\"50ms\"", "\"2m\""] {
            let e = invalid(&format!("[proxy]\nhandshake_timeout = {bad}\n"));
            assert!(
                e.contains("proxy.handshake_timeout") && e.contains("valid:"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn network_wait_is_a_bounded_duration() {
        assert_eq!(
            Config::default().network_wait().unwrap(),
            Duration::from_secs(30)
        );
        let e = invalid("[proxy]\nnetwork_wait = \"forever\"\n");
        assert!(
            e.contains("proxy.network_wait") && e.contains("valid:"),
            "{e}"
        );
        let e = invalid("[proxy]\nnetwork_wait = \"2h\"\n");
        assert!(e.contains("1s to 1h"), "{e}");
    }

    #[test]
    fn admin_listener_is_unix_or_loopback() {
        assert_eq!(
            Config::default().admin_listener().unwrap(),
            AdminListener::Unix
        );
        let c = parse("[proxy]\nadmin_listener = \"loopback\"\n").unwrap();
        assert_eq!(c.admin_listener().unwrap(), AdminListener::Loopback);
        let e = invalid("[proxy]\nadmin_listener = \"tcp\"\n");
        assert!(
            e.contains("proxy.admin_listener")
                && e.contains("valid: \"unix\" (default), \"loopback\""),
            "{e}"
        );
    }

    #[test]
    fn drain_timeout_is_a_bounded_duration() {
        assert_eq!(
            Config::default().drain_timeout().unwrap(),
            Duration::from_secs(5)
        );
        for off in ["0", "0s"] {
            let c = parse(&format!("[proxy]\ndrain_timeout = {off:?}\n")).unwrap();
            assert_eq!(c.drain_timeout().unwrap(), Duration::ZERO, "{off}");
        }
        let e = invalid("[proxy]\ndrain_timeout = \"soon\"\n");
        assert!(
            e.contains("proxy.drain_timeout") && e.contains("valid: a duration from 0"),
            "{e}"
        );
        let e = invalid("[proxy]\ndrain_timeout = \"3m\"\n");
        assert!(
            e.contains("proxy.drain_timeout") && e.contains("0 (off) to 2m"),
            "{e}"
        );
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = parse("").unwrap();
        assert!(!c.proxy.enabled);
        assert_eq!(c.proxy.additional_memory_allocation_mb, 32);
        assert!(c.proxy.enable_http2);
        assert!(!c.proxy.require_and_verify_client_certificates);
        assert!(c.proxy.enable_unproxied_port_mappings);
        assert_eq!(c.validity().unwrap(), Duration::from_secs(24 * 3600));
        assert_eq!(c.key_type().unwrap(), KeyType::EcdsaP256);
        assert_eq!(c.runtime.runc, PathBuf::from("/usr/sbin/runc"));
        assert_eq!(c.pool(), 61001..=65534);
        c.validate(&[]).unwrap();
    }

    #[test]
    fn log_format_level_and_journal() {
        let c = parse("[log]\nformat = \"json\"\nlevel = \"debug\"\njournal = true\n").unwrap();
        let s = c.log.settings();
        assert_eq!(s.format, crate::logging::Format::Json);
        assert_eq!(s.level, crate::logging::Threshold::Debug);
        assert!(s.journal);
        let d = parse("").unwrap().log.settings();
        assert_eq!(
            (d.format, d.level, d.journal),
            (
                crate::logging::Format::Text,
                crate::logging::Threshold::Info,
                false
            )
        );
        // A wrong value names the key and what is valid.
        let e = parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
        assert!(
            e.contains("format") && e.contains("xml") && e.contains("`json`"),
            "{e}"
        );
        let e = parse("[log]\nlevel = \"verbose\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("level") && e.contains("`trace`"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("[proxy]\nenabeld = true\n").unwrap_err().to_string();
        assert!(e.contains("enabeld"), "{e}");
        let e = parse("[proxxy]\n").unwrap_err().to_string();
        assert!(e.contains("proxxy"), "{e}");
    }

    #[test]
    fn enabled_proxy_needs_ca() {
        let e = invalid("[proxy]\nenabled = true\n");
        assert!(
            e.contains("instance_identity.ca_cert") && e.contains("required"),
            "{e}"
        );
        let e = invalid(
            "[proxy]\nenabled = true\n[instance_identity]\nca_cert = \"/nonexistent/ca.crt\"\n",
        );
        assert!(e.contains("instance_identity.ca_key"), "{e}");
        let e = invalid(
            "[proxy]\nenabled = true\n[instance_identity]\nca_cert = \"/nonexistent/ca.crt\"\nca_key = \"/nonexistent/ca.key\"\n",
        );
        assert!(
            e.contains("instance_identity.ca_cert") && e.contains("/nonexistent/ca.crt"),
            "{e}"
        );
    }

    #[test]
    fn pass_through_validation_reads_no_files() {
        let c = parse(
            "[proxy]\nenabled = true\n[instance_identity]\nca_cert = \"/nonexistent/ca.crt\"\nca_key = \"/nonexistent/ca.key\"\n",
        )
        .unwrap();
        assert!(
            c.validate(&[]).is_err(),
            "create-time validation reads the CA"
        );
        c.validate_for(&[], false).unwrap();
        let c = parse("[proxy]\nenabled = true\n").unwrap();
        assert!(
            c.validate_for(&[], false).is_err(),
            "missing keys are still errors"
        );
    }

    #[test]
    fn non_pem_ca_is_rejected() {
        let dir = std::env::temp_dir().join(format!("es-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("ca.crt");
        std::fs::write(&cert, "not a certificate").unwrap();
        let e = invalid(&format!(
            "[proxy]\nenabled = true\n[instance_identity]\nca_cert = {:?}\nca_key = {:?}\n",
            cert, cert
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("instance_identity.ca_cert") && e.contains("PEM"),
            "{e}"
        );
    }

    #[test]
    fn ca_key_must_match_the_certificate() {
        let dir = std::env::temp_dir().join(format!("es-cfg-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::identity::ca::generate(&dir.join("a"), "A").unwrap();
        crate::identity::ca::generate(&dir.join("b"), "B").unwrap();
        let cfg = |crt: &str, key: &str| {
            format!(
                "[proxy]\nenabled = true\n[instance_identity]\nca_cert = {:?}\nca_key = {:?}\n",
                dir.join(crt),
                dir.join(key)
            )
        };
        parse(&cfg("a/ca.crt", "a/ca.key"))
            .unwrap()
            .validate(&[])
            .unwrap();
        let e = invalid(&cfg("a/ca.crt", "b/ca.key"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("instance_identity: CA key")
                && e.contains("b/ca.key")
                && e.contains("does not match"),
            "{e}"
        );
    }

    #[test]
    fn sandbox_allow_read_entries_are_absolute_existing_paths() {
        let e = invalid("[proxy]\nsandbox_allow_read = [\"relative/envoy\"]\n");
        assert!(
            e.contains("proxy.sandbox_allow_read[0]") && e.contains("not absolute"),
            "{e}"
        );
        let c = parse("[proxy]\nsandbox = false\nsandbox_allow_read = [\"/usr\"]\n").unwrap();
        c.validate(&[]).unwrap();
        assert!(!c.proxy.sandbox);
        assert!(Config::default().proxy.sandbox, "on by default");
    }

    #[test]
    fn key_type_is_checked() {
        for kt in ["ecdsa-p256", "rsa-2048", "rsa-3072"] {
            let c = parse(&format!("[instance_identity]\nkey_type = {kt:?}\n")).unwrap();
            c.validate(&[]).unwrap();
            assert_eq!(c.key_type().unwrap().as_str(), kt);
        }
        let e = invalid("[instance_identity]\nkey_type = \"ed25519\"\n");
        assert!(
            e.contains("instance_identity.key_type")
                && e.contains("ed25519")
                && e.contains("ecdsa-p256, rsa-2048, rsa-3072"),
            "{e}"
        );
    }

    #[test]
    fn mtls_needs_trusted_ca() {
        let e = invalid("[proxy]\nrequire_and_verify_client_certificates = true\n");
        assert!(e.contains("proxy.trusted_ca_certificates"), "{e}");
        let e = invalid(
            "[proxy]\ntrusted_ca_certificates = [\"-----BEGIN CERTIFICATE-----\\ngarbage\\n-----END CERTIFICATE-----\\n\"]\n",
        );
        assert!(e.contains("proxy.trusted_ca_certificates[0]"), "{e}");
    }

    #[test]
    fn unproxied_off_needs_proxy() {
        let e = invalid("[proxy]\nenable_unproxied_port_mappings = false\n");
        assert!(e.contains("proxy.enable_unproxied_port_mappings"), "{e}");
    }

    #[test]
    fn absurd_sizes() {
        let e = invalid("[proxy]\nadditional_memory_allocation_mb = -1\n");
        assert!(
            e.contains("additional_memory_allocation_mb") && e.contains("-1"),
            "{e}"
        );
        let e = invalid("[proxy]\nadditional_memory_allocation_mb = 10000000\n");
        assert!(e.contains("out of range"), "{e}");
        let e = invalid("[proxy]\nconcurrency = 0\n");
        assert!(e.contains("proxy.concurrency"), "{e}");
        let e = invalid("[proxy]\nenvoy_uid_pool_start = 0\n");
        assert!(
            e.contains("envoy_uid_pool_start") && e.contains("root"),
            "{e}"
        );
        let e = invalid("[proxy]\nenvoy_uid_pool_start = 4294967000\nenvoy_uid_pool_size = 1000\n");
        assert!(e.contains("4294967294"), "{e}");
        let e = invalid("[proxy]\nmax_connections = 0\n");
        assert!(e.contains("proxy.max_connections"), "{e}");
        let e = invalid("[proxy]\nmax_connections = 1000001\n");
        assert!(
            e.contains("proxy.max_connections") && e.contains("1 to 1000000"),
            "{e}"
        );
        let e = invalid("[metrics]\nmode = \"fuzzy\"\n");
        assert!(e.contains("metrics.mode") && e.contains("exact"), "{e}");
        let e = invalid("[host]\nmemory_capacity_mb = 0\n");
        assert!(e.contains("host.memory_capacity_mb"), "{e}");
        let e = invalid("[ports]\npool_start = 70000\n");
        assert!(e.contains("pool_start"), "{e}");
        let e = invalid("[ports]\npool_start = 62000\npool_end = 61000\n");
        assert!(e.contains("pool_start <= pool_end"), "{e}");
        let e = invalid("[instance_identity]\nvalidity = \"1s\"\n");
        assert!(e.contains("instance_identity.validity"), "{e}");
        let e = invalid("[instance_identity]\nvalidity = \"soon\"\n");
        assert!(
            e.contains("instance_identity.validity") && e.contains("24h"),
            "{e}"
        );
    }

    #[test]
    fn runc_must_not_be_the_wrapper() {
        let dir = std::env::temp_dir().join(format!("es-cfg-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wrapper = dir.join("my-runtime");
        std::fs::write(&wrapper, "").unwrap();
        let link = dir.join("runc");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&wrapper, &link).unwrap();
        let c = parse(&format!("[runtime]\nrunc = {:?}\n", link)).unwrap();
        let e = c
            .validate(std::slice::from_ref(&wrapper))
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("runtime.runc") && e.contains("wrapper itself"),
            "{e}"
        );
        let e = invalid("[runtime]\nrunc = \"runc\"\n");
        assert!(e.contains("absolute"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped, commented config must parse to exactly the built-in defaults.
    #[test]
    fn shipped_example_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &path).unwrap();
        c.validate(&[]).unwrap();
        let d = Config::default();
        assert_eq!(format!("{:?}", c.proxy), format!("{:?}", d.proxy));
        assert_eq!(
            format!("{:?}", c.instance_identity),
            format!("{:?}", d.instance_identity)
        );
        assert_eq!(format!("{:?}", c.runtime), format!("{:?}", d.runtime));
        assert_eq!(format!("{:?}", c.ports), format!("{:?}", d.ports));
        assert_eq!(format!("{:?}", c.host), format!("{:?}", d.host));
        assert_eq!(format!("{:?}", c.metrics), format!("{:?}", d.metrics));
    }
}
