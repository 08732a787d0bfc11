//! The per-container Envoy configuration: the bootstrap, the SDS file holding the
//! instance identity, and Envoy's command line.
//!
//! Everything is JSON (Envoy reads `.json` bootstraps and SDS files): no YAML 1.1
//! boolean traps, and every operator- or user-supplied string is escaped by serde, so
//! it can only ever be a string value. Field names follow Envoy's v3 API; Envoy
//! rejects unknown fields, so `envoy --mode validate` on the golden files
//! (`tests/envoy_tls.rs`) checks every name here against the installed Envoy.
//!
//! Order of operations: [`write_sds`] before Envoy starts — Envoy 1.40 refuses to
//! start (and to validate) when the SDS file does not exist.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::envoy::sizing;
use crate::error::Result;

/// The SDS file inside [`Inputs::sds_dir`]; replaced only by rename (see [`write_sds`]).
pub const SDS_FILE: &str = "tls-certificate.json";
/// The name of the one SDS secret: the instance identity certificate and key.
pub const SECRET_NAME: &str = "instance-identity";
/// With mutual TLS: the SDS file inside [`Inputs::sds_dir`] holding the validation
/// context (trusted client CAs, SAN matchers), so that new trusted CAs reach Envoy by
/// a rename, without a restart that would reset open connections.
pub const VALIDATION_FILE: &str = "validation-context.json";
/// The name of the validation-context SDS secret.
pub const VALIDATION_SECRET_NAME: &str = "trusted-client-cas";
/// `node.cluster`: file-based SDS refuses to start without `node.id` and `node.cluster`.
pub const NODE_CLUSTER: &str = "envoy-sidecar";

/// Bounds the memory a stalled connection can pin (~75 KiB instead of ~1.75 MiB with
/// Envoy's 1 MiB default), on both the listener and the cluster side.
pub const BUFFER_LIMIT_BYTES: u32 = 32 * 1024;
/// The app is on loopback: a refused connect fails at once, so this only matters when
/// the app's accept queue is full and the kernel drops the SYN. 2 s rides out one SYN
/// retransmission (initial RTO 1 s) instead of resetting the client just before it.
pub const CONNECT_TIMEOUT: &str = "2s";
/// Envoy's form of a duration: seconds with up to nanosecond decimals (`"1.5s"`).
pub fn envoy_duration(d: Duration) -> String {
    let (s, n) = (d.as_secs(), d.subsec_nanos());
    if n == 0 {
        format!("{s}s")
    } else {
        let frac = format!("{n:09}");
        format!("{s}.{}s", frac.trim_end_matches('0'))
    }
}

/// The admin paths the product uses. Admin has no authentication and the app shares
/// the network namespace, so everything else (`/config_dump`, `/quitquitquit`,
/// `/logging`, `/runtime_modify`, `/healthcheck/fail`, ...) is refused with 403.
/// Envoy matches these against the whole request target *including* the query string,
/// hence the separate entries for `?graceful` and `/stats?...`.
const ADMIN_ALLOW_EXACT: &[&str] = &[
    // Supervisor: cheap "Envoy is up" check and LIVE/DRAINING state (readiness itself
    // is a real TLS handshake: /ready says LIVE even without a certificate).
    "/ready",
    // Supervisor: state, uptime and the version of the Envoy actually running.
    "/server_info",
    // Rotation: the serial and expiry Envoy has loaded, without a handshake. Only
    // public certificate data; private keys are never shown.
    "/certs",
    // Metrics/bench: Envoy's own heap accounting (tcmalloc), read-only.
    "/memory",
    // Metrics: connection counters and gauges, read-only.
    "/stats",
    // Stop: close the listeners at once (fallback when there is nothing to drain) ...
    "/drain_listeners",
    // ... or keep accepting for --drain-time-s, then refuse (the normal stop).
    "/drain_listeners?graceful",
];
/// `/stats` with query parameters (`filter`, `format`, `usedonly`): dispatch ignores
/// the query, so the prefix cannot reach another handler. Not `/stats/` — that
/// subtree includes the `recentlookups` mutators.
const ADMIN_ALLOW_PREFIX: &[&str] = &["/stats?"];
/// The admin socket's mode: Envoy's uid only (root, the wrapper and the supervisor,
/// connects regardless).
const ADMIN_SOCKET_MODE: u32 = 0o600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// Advertise `h2` then `http/1.1` (the reference's default).
    H2Http11,
    /// Advertise only `http/1.1`: Envoy does not translate protocols at L4, so an
    /// HTTP/1.1-only app behind an h2 advertisement breaks clients that prefer h2.
    Http11,
    /// No ALPN extension at all (non-HTTP apps, or `enable_http2 = false`).
    None,
}

impl Alpn {
    /// Host default: `proxy.enable_http2 = true` → h2 + http/1.1, `false` → no ALPN.
    pub fn host_default(enable_http2: bool) -> Alpn {
        if enable_http2 {
            Alpn::H2Http11
        } else {
            Alpn::None
        }
    }

    /// The annotation value that selects this setting.
    pub fn as_str(self) -> &'static str {
        match self {
            Alpn::H2Http11 => "h2,http/1.1",
            Alpn::Http11 => "http/1.1",
            Alpn::None => "none",
        }
    }

    /// Protocols in server preference order; empty = no `alpn_protocols` key.
    pub fn protocols(self) -> &'static [&'static str] {
        match self {
            Alpn::H2Http11 => &["h2", "http/1.1"],
            Alpn::Http11 => &["http/1.1"],
            Alpn::None => &[],
        }
    }
}

impl Alpn {
    pub const ALL: [Alpn; 3] = [Alpn::H2Http11, Alpn::Http11, Alpn::None];

    /// The choice `value` names (exactly: see `create::annotations::parse_alpn`).
    pub fn from_value(value: &str) -> Option<Alpn> {
        Alpn::ALL.into_iter().find(|a| a.as_str() == value)
    }
}

/// One TLS proxy port in front of one app port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proxy_port: u16,
    pub app_port: u16,
}

/// Client certificate verification (`proxy.require_and_verify_client_certificates`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mtls {
    /// One or more PEM `CERTIFICATE` blocks (already checked by the config loader).
    pub trusted_ca_pem: String,
    /// Empty: any certificate from a trusted CA is accepted.
    pub verify_subject_alt_names: Vec<String>,
}

/// Everything one container's bootstrap depends on.
/// Where admin listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAddress<'a> {
    /// `127.0.0.1:<port>` in the container's netns (`admin_listener = "loopback"`).
    Loopback(u16),
    /// A unix socket Envoy creates, mode 0600 (its own uid; root connects).
    Unix(&'a Path),
}

#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// `<namespace>/<container id>`.
    pub node_id: &'a str,
    pub listeners: &'a [Listener],
    pub admin: AdminAddress<'a>,
    pub alpn: Alpn,
    pub mtls: Option<&'a Mtls>,
    /// Directory Envoy watches; holds [`SDS_FILE`].
    pub sds_dir: &'a Path,
    /// Where the app listens from Envoy's view: 127.0.0.1 (Envoy shares the netns).
    pub upstream_address: IpAddr,
    /// Listen on `[::]:<proxy port>` as well as `0.0.0.0:<proxy port>` (the kernel
    /// has IPv6). Two sockets, the IPv6 one IPv6-only, so that each family's traffic
    /// comes from its own address and a kernel without IPv6 still gets its listener.
    pub ipv6: bool,
    /// Cap on open downstream connections, over all listeners.
    pub max_connections: u32,
    /// Envoy's heap budget (`envoy::sizing::heap_budget_bytes` of the additional
    /// allocation): past [`HEAP_REJECT_PERCENT`](crate::envoy::sizing::HEAP_REJECT_PERCENT)
    /// of it, new connections are refused.
    pub heap_budget_bytes: u64,
    /// The overload manager's refresh: how often the heap monitor samples
    /// (`Config::overload_refresh`, `envoy::sizing::heap_refresh_ms`).
    pub overload_refresh: Duration,
    /// How long a peer may take from accept to a completed TLS handshake
    /// (`proxy.handshake_timeout`): the filter chain's
    /// `transport_socket_connect_timeout`. Until then a connection that never sends a
    /// ClientHello holds one of `max_connections` (the downstream-connections monitor
    /// counts from accept), and with the upstream connect deferred to after the
    /// handshake nothing else would close it before tcp_proxy's 1 h idle timeout.
    pub handshake_timeout: Duration,
}

/// The Envoy bootstrap. Deterministic: same inputs, same bytes (keys keep insertion
/// order with serde_json's `preserve_order`).
pub fn bootstrap(i: &Inputs) -> Value {
    // One cluster per app port, first-seen order; a repeated app port would otherwise
    // produce a duplicate cluster name, which Envoy refuses.
    let mut app_ports: Vec<u16> = Vec::new();
    for l in i.listeners {
        if !app_ports.contains(&l.app_port) {
            app_ports.push(l.app_port);
        }
    }
    json!({
        "node": { "id": i.node_id, "cluster": NODE_CLUSTER },
        "admin": admin(i.admin),
        "overload_manager": overload_manager(i),
        "layered_runtime": layered_runtime(),
        // Idle timers (issue 23: a host of 200 idle Envoys). No stats sink is
        // configured and everything the product reads from `/stats` is a counter or a
        // gauge, live at every admin request; the flush timer (every 5 s by default)
        // only latches histograms for sinks: flushed on admin requests instead.
        "stats_flush_on_admin": true,
        "watchdogs": watchdogs(),
        "static_resources": {
            "listeners": i.listeners.iter().map(|l| listener(i, l)).collect::<Vec<_>>(),
            "clusters": app_ports.iter().map(|&p| cluster(i, p)).collect::<Vec<_>>(),
        },
    })
}

/// Two monitors, either of which makes Envoy refuse new connections (reset at accept)
/// rather than grow into the container's limit and be OOM-killed:
///
/// - the connection cap, a proactive monitor enforced at accept (no action needed);
/// - a heap budget derived from the additional allocation
///   ([`sizing::heap_budget_bytes`]): `envoy.resource_monitors.fixed_heap` with
///   `reject_incoming_connections` at [`sizing::HEAP_REJECT_PERCENT`]. It is what
///   trips when connections cost more than the idle ones the cap is sized for, or an
///   explicit `max_connections` exceeds what the allocation holds.
///
/// The heap monitor counts allocated bytes ([`layered_runtime`]). By default it
/// counts tcmalloc's heap less its free and unmapped pages, and that figure hardly
/// falls when a flood closes (the freed memory stays in tcmalloc's per-size caches):
/// measured on Envoy 1.40 with this budget (16.4 MiB for 32 MiB) and refusal at 90 %,
/// a flood of 4000 held TLS connections left it at 92–93 % with no connection open and
/// 5.9 MiB allocated, and Envoy refused every new connection for good (the next flood
/// got 0). Counting allocated bytes it is 35–55 % once a flood closes, and a new
/// connection is served within 0.9 s (`docs/BENCHMARKS.md`, "Envoy heap budget";
/// `tests/overload.rs` fails with the default counting). `shrink_heap` and
/// `memory_allocator_manager` release cached pages but did not bring the default
/// figure down reliably (one run from 95 % to 74 % after 5.4 s).
/// `refresh_interval` ([`Inputs::overload_refresh`], `sizing::heap_refresh_ms`): 100 ms
/// when an explicit cap exceeds what the allocation holds, so the monitor samples while
/// a flood handshakes ~600 connections a second on one worker (at 250 ms one flood
/// overshot to 120 % of the budget, at 1 s to 1088 connections; at 100 ms floods
/// stopped at 93–97 %); 1 s under a cap within the allocation, where the cap trips
/// first and each sample (~0.1 ms of Envoy's CPU) would be most of an idle Envoy's.
fn overload_manager(i: &Inputs) -> Value {
    json!({
        "refresh_interval": envoy_duration(i.overload_refresh),
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": i.max_connections,
                },
            },
            {
                "name": HEAP_MONITOR,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": i.heap_budget_bytes,
                },
            },
        ],
        "actions": [{
            "name": "envoy.overload_actions.reject_incoming_connections",
            "triggers": [{
                "name": HEAP_MONITOR,
                "threshold": { "value": sizing::HEAP_REJECT_PERCENT as f64 / 100.0 },
            }],
        }],
    })
}

const HEAP_MONITOR: &str = "envoy.resource_monitors.fixed_heap";

/// Envoy's guard dog wakes at the smallest of its timeouts and makes every thread's
/// dispatcher touch its watchdog at half that: with the defaults (miss 200 ms, megamiss
/// 1 s) each thread wakes 10 times a second, idle or not. Nothing is killed on a miss
/// by default (a stat and a log line only), and a hung Envoy is the supervisor's
/// liveness handshake's to find (`proxy.liveness_interval`, restarted after two
/// failures): 60 s trades only the watchdog's miss statistics for 1 wake-up per 30 s.
fn watchdogs() -> Value {
    let relaxed = json!({ "miss_timeout": WATCHDOG_TIMEOUT, "megamiss_timeout": WATCHDOG_TIMEOUT });
    json!({ "main_thread_watchdog": relaxed, "worker_watchdog": relaxed })
}

const WATCHDOG_TIMEOUT: &str = "60s";

/// One static runtime layer: the heap monitor counts tcmalloc's allocated bytes
/// (`fixed_heap_use_allocated`, a runtime flag off by default in Envoy 1.37–1.40),
/// which fall back when connections close; see [`overload_manager`].
fn layered_runtime() -> Value {
    json!({
        "layers": [{
            "name": "envoy-sidecar",
            "static_layer": { "envoy.reloadable_features.fixed_heap_use_allocated": true },
        }],
    })
}

fn admin(at: AdminAddress) -> Value {
    let allow: Vec<Value> = ADMIN_ALLOW_EXACT
        .iter()
        .map(|p| json!({ "exact": p }))
        .chain(ADMIN_ALLOW_PREFIX.iter().map(|p| json!({ "prefix": p })))
        .collect();
    json!({
        "address": match at {
            AdminAddress::Loopback(port) => socket_address("127.0.0.1", port),
            AdminAddress::Unix(path) => json!({
                "pipe": { "path": path.to_string_lossy(), "mode": ADMIN_SOCKET_MODE },
            }),
        },
        // The supervisor must still reach admin (to drain) when the app's listeners
        // are at the connection cap.
        "ignore_global_conn_limit": true,
        "allow_paths": allow,
    })
}

fn socket_address(address: &str, port: u16) -> Value {
    json!({ "socket_address": { "address": address, "port_value": port } })
}

fn cluster_name(app_port: u16) -> String {
    format!("app-{app_port}")
}

fn listener(i: &Inputs, l: &Listener) -> Value {
    let cluster = cluster_name(l.app_port);
    let mut v = json!({
        "name": format!("tls-{}", l.proxy_port),
        "address": socket_address("0.0.0.0", l.proxy_port),
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
        "filter_chains": [{
            "transport_socket_connect_timeout": envoy_duration(i.handshake_timeout),
            "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": format!("tls-{}-to-{}", l.proxy_port, l.app_port),
                    "cluster": cluster,
                    // Connect to the app only after the TLS handshake succeeded, and
                    // buffer nothing before: a peer that fails the handshake (no or
                    // untrusted client certificate, wrong SAN, plain TCP, a port
                    // scanner) never opens a connection to the app. Set with and
                    // without mTLS; it costs one loopback connect of latency.
                    "upstream_connect_mode": "ON_DOWNSTREAM_TLS_HANDSHAKE",
                    "max_early_data_bytes": 0,
                },
            }],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": downstream_tls_context(i),
            },
        }],
    });
    if i.ipv6 {
        // One listener, two sockets: its stats, drain and connection cap cover both.
        // Envoy binds `::` IPv6-only (no `ipv4_compat`), beside the IPv4 socket.
        v["additional_addresses"] = json!([{ "address": socket_address("::", l.proxy_port) }]);
    }
    v
}

fn downstream_tls_context(i: &Inputs) -> Value {
    let mut common = json!({
        "tls_params": { "tls_minimum_protocol_version": "TLSv1_2" },
    });
    let c = common.as_object_mut().expect("object literal");
    if !i.alpn.protocols().is_empty() {
        c.insert("alpn_protocols".into(), json!(i.alpn.protocols()));
    }
    c.insert(
        "tls_certificate_sds_secret_configs".into(),
        json!([{
            "name": SECRET_NAME,
            "sds_config": {
                // Envoy re-reads `path` whenever something is moved into the watched
                // directory; in-place writes are ignored (see write_sds).
                "path_config_source": {
                    "path": i.sds_dir.join(SDS_FILE).to_string_lossy(),
                    "watched_directory": { "path": i.sds_dir.to_string_lossy() },
                },
                "resource_api_version": "V3",
            },
        }]),
    );
    if i.mtls.is_some() {
        // The trusted CAs and SAN matchers themselves are in VALIDATION_FILE
        // (`validation_sds_response`), watched like the certificate.
        c.insert(
            "validation_context_sds_secret_config".into(),
            json!({
                "name": VALIDATION_SECRET_NAME,
                "sds_config": {
                    "path_config_source": {
                        "path": i.sds_dir.join(VALIDATION_FILE).to_string_lossy(),
                        "watched_directory": { "path": i.sds_dir.to_string_lossy() },
                    },
                    "resource_api_version": "V3",
                },
            }),
        );
    }
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": common,
    });
    if i.mtls.is_some() {
        ctx.as_object_mut()
            .expect("object literal")
            .insert("require_client_certificate".into(), json!(true));
    }
    ctx
}

/// Each configured name is accepted as an exact DNS SAN *or* an exact URI SAN: the
/// reference's `verify_subject_alt_name` used Envoy's untyped matcher, which looked at
/// every SAN type; DNS and URI keep hostnames (`gorouter.service.cf.internal`) and
/// SPIFFE-style IDs (`spiffe://...`) working while an e-mail or IP SAN that happens to
/// spell the same string does not authenticate a router. An exact DNS matcher still
/// accepts a wildcard certificate SAN covering the name (Envoy's DNS matching rules).
fn validation_context(m: &Mtls) -> Value {
    let mut v = json!({ "trusted_ca": { "inline_string": m.trusted_ca_pem } });
    if !m.verify_subject_alt_names.is_empty() {
        let matchers: Vec<Value> = m
            .verify_subject_alt_names
            .iter()
            .flat_map(|name| {
                ["DNS", "URI"].map(|t| json!({ "san_type": t, "matcher": { "exact": name } }))
            })
            .collect();
        v.as_object_mut()
            .expect("object literal")
            .insert("match_typed_subject_alt_names".into(), json!(matchers));
    }
    v
}

fn cluster(i: &Inputs, app_port: u16) -> Value {
    let name = cluster_name(app_port);
    let limit = i.max_connections;
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
        // Envoy reads only the first thresholds entry per priority: all limits in one.
        // Sized to the global cap so that one app port may take every connection
        // (Envoy's per-cluster default of 1024 would otherwise cut in first).
        "circuit_breakers": {
            "thresholds": [{
                "priority": "DEFAULT",
                "max_connections": limit,
                "max_pending_requests": limit,
                "max_requests": limit,
                "max_retries": 0,
            }],
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{
                "lb_endpoints": [{
                    "endpoint": {
                        "address": socket_address(&i.upstream_address.to_string(), app_port),
                    },
                }],
            }],
        },
    })
}

/// The SDS file: a DiscoveryResponse with one Secret. Certificate and key are inline,
/// so the one rename in [`write_sds`] swaps them together (separate files can be seen
/// half-rotated, which Envoy rejects with KEY_VALUES_MISMATCH and keeps the old pair).
pub fn sds_response(cert_chain_pem: &str, key_pem: &str) -> Value {
    json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": SECRET_NAME,
            "tls_certificate": {
                "certificate_chain": { "inline_string": cert_chain_pem },
                "private_key": { "inline_string": key_pem },
            },
        }],
    })
}

/// The validation-context SDS file's content (mutual TLS): trusted client CAs and the
/// subject-alt-name matchers.
pub fn validation_sds_response(m: &Mtls) -> Value {
    json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": VALIDATION_SECRET_NAME,
            "validation_context": validation_context(m),
        }],
    })
}

/// Atomically replace `<sds_dir>/VALIDATION_FILE` (by rename, as [`write_sds`]).
pub fn write_validation_sds(sds_dir: &Path, m: &Mtls, uid: u32, gid: u32) -> Result<()> {
    crate::sys::fs::write_atomic_with(
        &sds_dir.join(VALIDATION_FILE),
        &render(&validation_sds_response(m)),
        crate::sys::fs::WriteOptions {
            mode: 0o400,
            owner: Some((uid, gid)),
        },
    )
}

/// Pretty JSON with a trailing newline: the on-disk form of a bootstrap or SDS file.
pub fn render(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("a JSON value always serialises");
    out.push(b'\n');
    out
}

/// Atomically replace `<sds_dir>/SDS_FILE`: write a temp file inside `sds_dir` (a
/// rename must not cross file systems, and Envoy only reacts to moves *into* the
/// watched directory, never to in-place writes), give it to `uid:gid` with mode 0400
/// (it holds the private key), then rename(2) it over [`SDS_FILE`].
pub fn write_sds(
    sds_dir: &Path,
    cert_chain_pem: &str,
    key_pem: &str,
    uid: u32,
    gid: u32,
) -> Result<()> {
    // Inside `sds_dir` (a rename must not cross file systems), by rename only.
    crate::sys::fs::write_atomic_with(
        &sds_dir.join(SDS_FILE),
        &render(&sds_response(cert_chain_pem, key_pem)),
        crate::sys::fs::WriteOptions {
            mode: 0o400,
            owner: Some((uid, gid)),
        },
    )
}

/// Envoy's argv (without the binary).
///
/// `--disable-hot-restart` always: otherwise two Envoys in one netns collide on base-id
/// 0 and leave shm files in /dev/shm. `concurrency` 0 is raised to 1 (Envoy's own
/// default would be the host's CPU count, far too many threads for a sidecar).
/// Paths are passed as UTF-8 (state paths are ASCII in practice).
pub fn args(bootstrap_path: &Path, concurrency: u32, drain_time: Duration) -> Vec<String> {
    vec![
        "-c".into(),
        bootstrap_path.to_string_lossy().into_owned(),
        "--concurrency".into(),
        concurrency.max(1).to_string(),
        "--disable-hot-restart".into(),
        "--drain-time-s".into(),
        drain_time.as_secs().to_string(),
        "--log-level".into(),
        "warn".into(),
    ]
}

/// argv for `envoy --mode validate`: checks every field name and type in well under a
/// second, without binding ports. It does not parse the CA or the SDS file, but the
/// SDS file must exist (as for a real start).
pub fn validate_args(bootstrap_path: &Path) -> Vec<String> {
    vec![
        "--mode".into(),
        "validate".into(),
        "-c".into(),
        bootstrap_path.to_string_lossy().into_owned(),
        "--log-level".into(),
        "warn".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn golden_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/envoy")
    }

    fn router_ca() -> String {
        fs::read_to_string(golden_dir().join("router-ca.pem")).unwrap()
    }

    /// Compare with `tests/golden/envoy/<name>.json`; `UPDATE_GOLDEN=1` rewrites it.
    fn assert_golden(name: &str, v: &Value) {
        let path = golden_dir().join(format!("{name}.json"));
        let got = String::from_utf8(render(v)).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            fs::write(&path, &got).unwrap();
            return;
        }
        let want = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert!(
            got == want,
            "{} differs from the generated bootstrap (UPDATE_GOLDEN=1 rewrites it):\n{got}",
            path.display()
        );
    }

    fn inputs<'a>(listeners: &'a [Listener], alpn: Alpn, mtls: Option<&'a Mtls>) -> Inputs<'a> {
        Inputs {
            node_id: "default/app1",
            listeners,
            admin: AdminAddress::Unix(Path::new("/run/envoy-sidecar/.admin/2000000000/admin.sock")),
            alpn,
            mtls,
            sds_dir: Path::new("/run/envoy-sidecar/default/app1/sds"),
            upstream_address: LOOPBACK,
            ipv6: true,
            max_connections: 1000,
            heap_budget_bytes: sizing::heap_budget_bytes(32, false),
            overload_refresh: Duration::from_millis(sizing::HEAP_REFRESH_UNCAPPED_MS),
            handshake_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_overload_refresh_follows_the_inputs() {
        let slow = bootstrap(&Inputs {
            overload_refresh: Duration::from_secs(1),
            ..inputs(ONE, Alpn::H2Http11, None)
        });
        assert_eq!(slow["overload_manager"]["refresh_interval"], "1s");
        let fast = bootstrap(&inputs(ONE, Alpn::H2Http11, None));
        assert_eq!(fast["overload_manager"]["refresh_interval"], "0.1s");
    }

    #[test]
    fn ipv6_listens_on_both_families_or_on_ipv4_alone() {
        let b = bootstrap(&inputs(ONE, Alpn::H2Http11, None));
        let l = &b["static_resources"]["listeners"][0];
        assert_eq!(l["address"]["socket_address"]["address"], "0.0.0.0");
        assert_eq!(
            l["additional_addresses"][0]["address"]["socket_address"],
            json!({"address": "::", "port_value": 61001})
        );
        let v4 = bootstrap(&Inputs {
            ipv6: false,
            ..inputs(ONE, Alpn::H2Http11, None)
        });
        let l = &v4["static_resources"]["listeners"][0];
        assert!(l.get("additional_addresses").is_none(), "{l}");
        assert_eq!(l["address"]["socket_address"]["port_value"], 61001);
    }

    const ONE: &[Listener] = &[Listener {
        proxy_port: 61001,
        app_port: 8080,
    }];
    const THREE: &[Listener] = &[
        Listener {
            proxy_port: 61001,
            app_port: 8080,
        },
        Listener {
            proxy_port: 61002,
            app_port: 9999,
        },
        Listener {
            proxy_port: 61003,
            app_port: 2222,
        },
    ];

    fn mtls() -> Mtls {
        Mtls {
            trusted_ca_pem: router_ca(),
            verify_subject_alt_names: vec![
                "gorouter.service.cf.internal".into(),
                "spiffe://cf.internal/gorouter".into(),
            ],
        }
    }

    #[test]
    fn golden_one_port_default_alpn() {
        let alpn = Alpn::host_default(true);
        assert_golden("one-port-default", &bootstrap(&inputs(ONE, alpn, None)));
    }

    #[test]
    fn heap_budget_refuses_and_counts_allocated_bytes() {
        let mut i = inputs(ONE, Alpn::host_default(true), None);
        i.heap_budget_bytes = 123_456_789;
        let v = bootstrap(&i);
        let om = &v["overload_manager"];
        let monitors = om["resource_monitors"].as_array().unwrap();
        assert_eq!(monitors.len(), 2, "{om}");
        assert_eq!(
            monitors[0]["typed_config"]["max_active_downstream_connections"],
            1000
        );
        assert_eq!(monitors[1]["name"], HEAP_MONITOR);
        assert_eq!(
            monitors[1]["typed_config"]["max_heap_size_bytes"],
            123_456_789
        );
        let actions = om["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 1, "{om}");
        assert_eq!(
            actions[0]["name"],
            "envoy.overload_actions.reject_incoming_connections"
        );
        assert_eq!(actions[0]["triggers"][0]["name"], HEAP_MONITOR);
        assert_eq!(actions[0]["triggers"][0]["threshold"]["value"], 0.9);
        // Without the flag the monitor's figure stays up after a flood (see
        // `overload_manager`): refusal for good.
        assert_eq!(
            v["layered_runtime"]["layers"][0]["static_layer"]["envoy.reloadable_features.fixed_heap_use_allocated"],
            true
        );
    }

    #[test]
    fn golden_admin_loopback() {
        let alpn = Alpn::host_default(true);
        let mut i = inputs(ONE, alpn, None);
        i.admin = AdminAddress::Loopback(61002);
        let b = bootstrap(&i);
        assert_eq!(
            b["admin"]["address"],
            json!({"socket_address": {"address": "127.0.0.1", "port_value": 61002}})
        );
        assert_golden("admin-loopback", &b);
    }

    #[test]
    fn admin_socket_is_envoys_only() {
        let b = bootstrap(&inputs(ONE, Alpn::host_default(true), None));
        assert_eq!(
            b["admin"]["address"],
            json!({"pipe": {"path": "/run/envoy-sidecar/.admin/2000000000/admin.sock", "mode": 0o600}})
        );
        // The same allow-list either way.
        assert_eq!(b["admin"]["allow_paths"].as_array().unwrap().len(), 8);
    }

    #[test]
    fn golden_three_ports_no_alpn() {
        let alpn = Alpn::host_default(false);
        assert_golden(
            "three-ports-no-alpn",
            &bootstrap(&inputs(THREE, alpn, None)),
        );
    }

    #[test]
    fn golden_mtls_with_sans() {
        let m = mtls();
        let b = bootstrap(&inputs(ONE, Alpn::H2Http11, Some(&m)));
        assert_golden("mtls-sans", &b);
    }

    #[test]
    fn golden_http11_only() {
        assert_golden("http11-only", &bootstrap(&inputs(ONE, Alpn::Http11, None)));
    }

    #[test]
    fn deterministic() {
        let m = mtls();
        let i = inputs(THREE, Alpn::H2Http11, Some(&m));
        let first = render(&bootstrap(&i));
        for _ in 0..20 {
            assert_eq!(render(&bootstrap(&i)), first);
        }
    }

    #[test]
    fn alpn_keys() {
        let ctx = |alpn| {
            let b = bootstrap(&inputs(ONE, alpn, None));
            b["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
                ["typed_config"]["common_tls_context"]
                .clone()
        };
        assert_eq!(
            ctx(Alpn::H2Http11)["alpn_protocols"],
            json!(["h2", "http/1.1"])
        );
        assert_eq!(ctx(Alpn::Http11)["alpn_protocols"], json!(["http/1.1"]));
        // No key at all, not an empty list.
        assert!(ctx(Alpn::None).get("alpn_protocols").is_none());
    }

    #[test]
    fn mtls_without_sans_has_no_matchers() {
        let m = Mtls {
            trusted_ca_pem: router_ca(),
            verify_subject_alt_names: vec![],
        };
        let b = bootstrap(&inputs(ONE, Alpn::H2Http11, Some(&m)));
        let tls = &b["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"];
        assert_eq!(tls["require_client_certificate"], json!(true));
        // The bootstrap names the validation SDS file; the CAs are in that file.
        let v = &tls["common_tls_context"]["validation_context_sds_secret_config"];
        assert_eq!(v["name"], json!(VALIDATION_SECRET_NAME));
        assert_eq!(
            v["sds_config"]["path_config_source"]["path"],
            json!("/run/envoy-sidecar/default/app1/sds/validation-context.json")
        );
        assert!(
            tls["common_tls_context"]
                .get("validation_context")
                .is_none()
        );
        let sds = validation_sds_response(&m);
        let vc = &sds["resources"][0]["validation_context"];
        assert_eq!(sds["resources"][0]["name"], json!(VALIDATION_SECRET_NAME));
        assert_eq!(vc["trusted_ca"]["inline_string"], json!(router_ca()));
        assert!(vc.get("match_typed_subject_alt_names").is_none());
        // Without mTLS: neither key.
        let b = bootstrap(&inputs(ONE, Alpn::H2Http11, None));
        let tls = &b["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"];
        assert!(tls.get("require_client_certificate").is_none());
        assert!(
            tls["common_tls_context"]
                .get("validation_context_sds_secret_config")
                .is_none()
        );
    }

    #[test]
    fn repeated_app_port_gets_one_cluster() {
        let ls = [
            Listener {
                proxy_port: 61001,
                app_port: 8080,
            },
            Listener {
                proxy_port: 61002,
                app_port: 8080,
            },
        ];
        let b = bootstrap(&inputs(&ls, Alpn::None, None));
        assert_eq!(
            b["static_resources"]["listeners"].as_array().unwrap().len(),
            2
        );
        assert_eq!(
            b["static_resources"]["clusters"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn hostile_strings_stay_string_values() {
        let hostile = [
            "a\"b",
            "x\n\"require_client_certificate\": false,",
            "\"}]},{\"exact\":\"",
            "\\\"",
            "\u{0}\u{1f}\u{2028}",
            "../../etc/passwd",
        ];
        let m = Mtls {
            trusted_ca_pem: "-----BEGIN CERTIFICATE-----\n\"}\n-----END CERTIFICATE-----\n".into(),
            verify_subject_alt_names: hostile.iter().map(|s| s.to_string()).collect(),
        };
        let i = Inputs {
            node_id: "ns\"/id\n",
            sds_dir: Path::new("/run/x\"y\nz"),
            ..inputs(ONE, Alpn::H2Http11, Some(&m))
        };
        let text = render(&bootstrap(&i));
        let back: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, bootstrap(&i));
        let tls = &back["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
            ["typed_config"];
        assert_eq!(tls["require_client_certificate"], json!(true));
        let vsds: Value = serde_json::from_slice(&render(&validation_sds_response(&m))).unwrap();
        let sans = vsds["resources"][0]["validation_context"]["match_typed_subject_alt_names"]
            .as_array()
            .unwrap();
        assert_eq!(sans.len(), 2 * hostile.len());
        for (k, want) in hostile.iter().enumerate() {
            for m in &sans[2 * k..2 * k + 2] {
                assert_eq!(m["matcher"]["exact"].as_str(), Some(*want));
                assert_eq!(m.as_object().unwrap().len(), 2, "{m}");
            }
        }
        assert_eq!(back["node"]["id"].as_str(), Some("ns\"/id\n"));
        let sds = &tls["common_tls_context"]["tls_certificate_sds_secret_configs"][0]["sds_config"]
            ["path_config_source"];
        assert_eq!(
            sds["path"].as_str(),
            Some("/run/x\"y\nz/tls-certificate.json")
        );
        assert_eq!(
            sds["watched_directory"]["path"].as_str(),
            Some("/run/x\"y\nz")
        );

        let v = sds_response("c\"}]\n", "k\\\"");
        let back: Value = serde_json::from_slice(&render(&v)).unwrap();
        let tc = &back["resources"][0]["tls_certificate"];
        assert_eq!(
            tc["certificate_chain"]["inline_string"].as_str(),
            Some("c\"}]\n")
        );
        assert_eq!(tc["private_key"]["inline_string"].as_str(), Some("k\\\""));
        assert_eq!(back["resources"].as_array().unwrap().len(), 1);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("es-envoycfg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_sds_replaces_by_rename() {
        use std::os::unix::fs::MetadataExt;
        let dir = temp_dir("sds");
        let (uid, gid) = crate::sys::process::effective_ids();
        write_sds(&dir, "CERT1", "KEY1", uid, gid).unwrap();
        let path = dir.join(SDS_FILE);
        let m1 = fs::metadata(&path).unwrap();
        assert_eq!(m1.mode() & 0o7777, 0o400);
        assert_eq!((m1.uid(), m1.gid()), (uid, gid));
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v, sds_response("CERT1", "KEY1"));

        write_sds(&dir, "CERT2", "KEY2", uid, gid).unwrap();
        let m2 = fs::metadata(&path).unwrap();
        // A new inode: the file was moved into place, not rewritten (Envoy ignores
        // in-place writes).
        assert_ne!(m1.ino(), m2.ino());
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v, sds_response("CERT2", "KEY2"));
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SDS_FILE)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_sds_error_names_the_path() {
        let dir = std::env::temp_dir().join(format!("es-envoycfg-missing-{}", std::process::id()));
        let e = write_sds(&dir, "C", "K", 0, 0).unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
    }

    #[test]
    fn durations_in_envoys_form() {
        assert_eq!(envoy_duration(Duration::from_secs(5)), "5s");
        assert_eq!(envoy_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(envoy_duration(Duration::from_millis(100)), "0.1s");
        assert_eq!(
            envoy_duration(Duration::from_nanos(1_000_000_001)),
            "1.000000001s"
        );
        let mut i = inputs(ONE, Alpn::None, None);
        i.handshake_timeout = Duration::from_millis(1250);
        let b = bootstrap(&i);
        assert_eq!(
            b["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket_connect_timeout"],
            json!("1.25s")
        );
    }

    #[test]
    fn argv() {
        let a = args(Path::new("/run/b.json"), 2, Duration::from_secs(5));
        assert_eq!(
            a.join(" "),
            "-c /run/b.json --concurrency 2 --disable-hot-restart --drain-time-s 5 --log-level warn"
        );
        let a = args(Path::new("/b"), 0, Duration::from_millis(1500));
        assert!(a.windows(2).any(|w| w == ["--concurrency", "1"]), "{a:?}");
        assert!(a.windows(2).any(|w| w == ["--drain-time-s", "1"]), "{a:?}");
        assert_eq!(
            validate_args(Path::new("/b")).join(" "),
            "--mode validate -c /b --log-level warn"
        );
    }
}
