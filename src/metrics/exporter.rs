//! `envoy-sidecar serve-metrics`: a Prometheus text endpoint (`GET /metrics`) with
//! per-container gauges. Scrapes are rare and small, so one thread serves them one at
//! a time; a failing scrape (containerd restarting, a container vanishing mid-scrape)
//! degrades that scrape, never the server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::{self, Mode};
use crate::state::layout::Paths;
use crate::state::record::State;
use crate::state::store::{ContainerState, Store};

pub fn serve(cfg: &Config, listen: &str, address: &Path) -> Result<()> {
    let listener =
        TcpListener::bind(listen).map_err(|e| Error::Metrics(format!("--listen {listen}: {e}")))?;
    tracing::info!("serving metrics on http://{listen}/metrics");
    let store = Store::of(cfg);
    let mode = cfg.metrics_mode()?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if let Err(e) = answer(conn, &store, address, mode) {
            tracing::warn!("metrics request: {e}");
        }
    }
    Ok(())
}

fn answer(mut conn: TcpStream, store: &Store, address: &Path, mode: Mode) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Drain the headers (up to the blank line) so the client is not reset.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) =
        if request.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
            ("200 OK", render(store, address, mode))
        } else {
            ("404 Not Found", "see /metrics\n".to_string())
        };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

struct Gauge {
    name: &'static str,
    help: &'static str,
    samples: Vec<(String, u64)>,
}

fn labels(s: &ContainerState) -> String {
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    format!("namespace=\"{}\",id=\"{}\"", esc(&s.namespace), esc(&s.id))
}

/// One scrape's text. State-derived gauges are always there; usage gauges only for
/// containers containerd reported on.
pub fn render(store: &Store, address: &Path, mode: Mode) -> String {
    let g = |name, help| Gauge {
        name,
        help,
        samples: Vec::new(),
    };
    let mut quota = g(
        "envoy_sidecar_memory_quota_bytes",
        "Memory limit the user asked for (0: no limit).",
    );
    let mut usage = g(
        "envoy_sidecar_memory_usage_bytes",
        "Working set against the quota: rescaled (linear) or attributed (exact).",
    );
    let mut raw = g(
        "envoy_sidecar_memory_raw_usage_bytes",
        "Working set of the whole container, proxy included.",
    );
    let mut envoy = g(
        "envoy_sidecar_envoy_memory_bytes",
        "Working set of the container's Envoy (its own cgroup).",
    );
    let mut restarts = g(
        "envoy_sidecar_envoy_restarts",
        "Times the supervisor restarted the container's Envoy.",
    );
    let mut ooms = g(
        "envoy_sidecar_envoy_oom_kills",
        "Times the kernel OOM-killed the container's Envoy (its own cgroup; absent when not readable).",
    );
    let mut container_ooms = g(
        "envoy_sidecar_oom_kills",
        "Times the kernel OOM-killed a process in the container, Envoy included (cgroup v2 memory.events; v1 memory.oom_control of the container and Envoy's cgroup).",
    );
    let mut repairs = g(
        "envoy_sidecar_ingress_repairs",
        "Times the container's ingress filter was found removed or changed and put back.",
    );
    let mut expiry = g(
        "envoy_sidecar_credential_expiry_timestamp_seconds",
        "NotAfter of the instance identity certificate served.",
    );
    let mut up = g(
        "envoy_sidecar_containerd_up",
        "Whether containerd answered the last metrics request (per namespace).",
    );
    let mut ready = g(
        "envoy_sidecar_ready",
        "1 when the container's proxy is ready (TLS on every listener, network followed).",
    );
    let mut nat = g(
        "envoy_sidecar_nat_applied",
        "1 when host NAT to the container's current IP is in place.",
    );
    let mut status = g(
        "envoy_sidecar_status",
        "1 for the container's current status (waiting-for-network, starting, ready, degraded, stopping).",
    );

    let states = store.list().unwrap_or_default();
    let mut by_ns: BTreeMap<String, Vec<ContainerState>> = BTreeMap::new();
    for s in states {
        by_ns.entry(s.namespace.clone()).or_default().push(s);
    }
    for (ns, list) in &by_ns {
        let ids: Vec<String> = list.iter().flat_map(metrics::ids_of).collect();
        let fetched = metrics::fetch(address, ns, &ids, Duration::from_secs(3));
        up.samples
            .push((format!("namespace=\"{ns}\""), fetched.is_ok() as u64));
        let fetched = fetched.unwrap_or_default();
        for s in list {
            let l = labels(s);
            let rec = Paths::new(store, &s.namespace, &s.id)
                .read_record()
                .ok()
                .flatten();
            let row = crate::ops::status::row(s, rec.as_ref(), &crate::sys::process::Procfs);
            ready
                .samples
                .push((l.clone(), u64::from(row.status == State::Ready)));
            nat.samples.push((l.clone(), u64::from(row.nat_applied)));
            if let Some(n) = row.envoy_oom_kills {
                ooms.samples.push((l.clone(), n));
            }
            if let Some(n) = row.oom_kills {
                container_ooms.samples.push((l.clone(), n));
            }
            for st in State::ALL {
                status.samples.push((
                    format!("{l},status=\"{}\"", st.as_str()),
                    u64::from(row.status == st),
                ));
            }
            quota
                .samples
                .push((l.clone(), metrics::requested(s).unwrap_or(0)));
            if let Some(rec) = rec {
                restarts
                    .samples
                    .push((l.clone(), rec.envoy_restarts as u64));
                repairs
                    .samples
                    .push((l.clone(), u64::from(rec.ingress_repairs)));
                if let Some(t) = rec.cert_not_after {
                    expiry.samples.push((l.clone(), t));
                }
            }
            let e = metrics::envoy_working_set(store, s);
            if let Some(v) = e {
                envoy.samples.push((l.clone(), v));
            }
            if let Some(r) = metrics::raw_of(s, &fetched) {
                let rep = metrics::report(s, r, e, mode);
                usage.samples.push((l.clone(), rep.memory_bytes));
                raw.samples.push((l, rep.raw_working_set_bytes));
            }
        }
    }
    let mut out = String::new();
    for gauge in [
        quota,
        usage,
        raw,
        envoy,
        restarts,
        ooms,
        container_ooms,
        repairs,
        expiry,
        up,
        ready,
        nat,
        status,
    ] {
        let _ = writeln!(out, "# HELP {} {}", gauge.name, gauge.help);
        let _ = writeln!(out, "# TYPE {} gauge", gauge.name);
        for (l, v) in gauge.samples {
            let _ = writeln!(out, "{}{{{l}}} {v}", gauge.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::{sample, tempdir};

    #[test]
    fn renders_state_gauges_even_without_containerd() {
        let root = tempdir("exporter");
        let store = Store::new(&root);
        crate::state::store::tests::record(&store, &sample("default", "c1", &root, (61001, None)));
        let text = render(
            &store,
            Path::new("/nonexistent/containerd.sock"),
            Mode::Linear,
        );
        assert!(
            text.contains(
                "envoy_sidecar_memory_quota_bytes{namespace=\"default\",id=\"c1\"} 104857600"
            ),
            "{text}"
        );
        assert!(
            text.contains("envoy_sidecar_containerd_up{namespace=\"default\"} 0"),
            "{text}"
        );
        assert!(text.contains("# TYPE envoy_sidecar_memory_usage_bytes gauge"));
        assert!(
            !text.contains("envoy_sidecar_memory_usage_bytes{"),
            "no usage without containerd: {text}"
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
