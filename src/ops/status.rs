//! `envoy-sidecar status`: one row per proxied container on the host — the table an
//! operator runs first. The supervisor records its status; this adds what only an
//! outside look can tell (the supervisor itself is gone, the container stopped).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;

use crate::state::layout::Paths;
use crate::state::record::{Network, Record, State};
use crate::state::store::{ContainerState, Store};
use crate::sys::process::Processes;

/// One app port's way in: app port <- proxy port <- host ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortRow {
    pub app: u16,
    pub proxy: u16,
    pub host_tls: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_plain: Option<u16>,
    /// Published on these host addresses only (nerdctl `-p ADDR:H:C`; loopback ones
    /// are not published at all); absent: on every address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub host_ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub namespace: String,
    pub id: String,
    pub status: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the supervisor entered the status it recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    pub ports: Vec<PortRow>,
    pub network: Network,
    pub container_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_ipv6: Option<std::net::Ipv6Addr>,
    pub nat_applied: bool,
    pub supervisor_pid: Option<i32>,
    pub envoy_pid: Option<i32>,
    pub ready_since: Option<String>,
    pub restarts: u32,
    /// OOM kills in Envoy's child cgroup (cumulative over the container's life);
    /// `None` when not readable (cgroup v2 child without a memory controller, no
    /// Envoy cgroup yet).
    pub envoy_oom_kills: Option<u64>,
    /// OOM kills anywhere in the container, Envoy included (cgroup v2: the
    /// container's `memory.events`; v1: its `memory.oom_control` plus Envoy's child);
    /// the `OOM KILLS` column. `None` when not readable.
    pub oom_kills: Option<u64>,
    /// Times the ingress filter was found removed or changed and put back.
    pub ingress_repairs: u32,
    /// How Envoy is confined (`Landlock ABI 7 enforced (10 rules)`, `NOT enforced:
    /// ...`, `off`), from its last start.
    pub sandbox: Option<String>,
    /// Unix seconds.
    pub cert_not_after: Option<u64>,
    pub last_error: Option<String>,
    /// A Kubernetes pod's proxy (the row is its sandbox's): the pod and its containers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The pod's containers that use its proxy: CRI name, else id.
    pub containers: Vec<String>,
    pub container_ids: Vec<String>,
}

/// What the row says, from the state, the supervisor's record and a look at the
/// processes. Pure but for `procs` and the read of Envoy's cgroup OOM counter.
pub fn row(s: &ContainerState, rec: Option<&Record>, procs: &dyn Processes) -> Row {
    row_known(s, rec, procs, None)
}

/// [`row`], told whether runc still knows the container (`None`: not asked).
pub fn row_known(
    s: &ContainerState,
    rec: Option<&Record>,
    procs: &dyn Processes,
    runc_knows: Option<bool>,
) -> Row {
    let empty = Record::default();
    let r = rec.unwrap_or(&empty);
    let init_running = s.init_pid.is_some_and(|p| procs.exists(p));
    let supervised = r.supervisor.is_some_and(|p| procs.alive(&p));
    let recorded = r.status.clone();
    let (status, reason, since) = if runc_knows == Some(false) && !init_running {
        // A create that failed after our part (the engine removed the container), or
        // a delete we did not see: nothing will start or release it but gc.
        (
            State::Gone,
            Some("gc will remove it: the engine no longer has this container".into()),
            None,
        )
    } else if s.started_at.is_none() {
        (
            State::Starting,
            Some("created, not started yet".to_string()),
            None,
        )
    } else if !init_running {
        (
            State::Stopping,
            Some("the container's init has exited".to_string()),
            None,
        )
    } else if r.supervisor.is_none() && launching(s.started_at.as_deref(), SystemTime::now()) {
        // The wrapper after runc's create (or the poststart hook) records
        // `started_at`, maps NAT, then launches the supervisor: a look in between is
        // no fault.
        (
            State::Starting,
            Some("started; the supervisor is being launched".to_string()),
            None,
        )
    } else if !supervised {
        (
            State::Degraded,
            Some(match r.supervisor {
                Some(p) => format!(
                    "supervisor pid {} is not running: nothing restarts Envoy or rotates its \
                     certificate (`envoy-sidecar gc` restarts it)",
                    p.pid
                ),
                None => "no supervisor ever started (its launch after create failed?)".to_string(),
            }),
            None,
        )
    } else {
        match recorded {
            Some(st) => (st.state, st.reason, Some(st.since)),
            None => (State::Starting, None, None),
        }
    };
    Row {
        namespace: s.namespace.clone(),
        id: s.id.clone(),
        status,
        reason,
        since,
        ports: s
            .ports
            .iter()
            .map(|p| PortRow {
                app: p.internal,
                proxy: p.internal_tls_proxy,
                host_tls: p.external_tls_proxy,
                host_plain: p.external,
                host_ips: s.host_ips.get(&p.internal).cloned().unwrap_or_default(),
            })
            .collect(),
        network: r.network,
        container_ip: r.container_ip,
        container_ipv6: r.container_ipv6,
        nat_applied: r.nat_applied,
        supervisor_pid: r.supervisor.filter(|_| supervised).map(|p| p.pid),
        envoy_pid: r.envoy.filter(|p| procs.alive(p)).map(|p| p.pid),
        ready_since: r.ready_at.clone(),
        restarts: r.envoy_restarts,
        envoy_oom_kills: r.cgroup.oom_kills(),
        oom_kills: r.cgroup.oom_kills_in_container(),
        ingress_repairs: r.ingress_repairs,
        sandbox: r.sandbox.clone(),
        cert_not_after: r.cert_not_after,
        last_error: r.last_error.clone(),
        pod: s.pod.as_ref().map(|p| PodRow {
            name: p.name.clone(),
            containers: p
                .members
                .iter()
                .map(|m| m.name.clone().unwrap_or_else(|| m.id.clone()))
                .collect(),
            container_ids: p.members.iter().map(|m| m.id.clone()).collect(),
        }),
    }
}

/// How long after `started_at` a container with no supervisor yet is `starting`, not
/// `degraded`: the wrapper (or the poststart hook) may still be mapping NAT before it
/// launches one.
pub const LAUNCH_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `started_at` (RFC 3339) is less than [`LAUNCH_GRACE`] before `now`. An
/// unreadable stamp is not recent: a fault is never hidden by a bad record.
fn launching(started_at: Option<&str>, now: SystemTime) -> bool {
    started_at
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        // A stamp in the future (clock stepped back) counts as just now.
        .map(|t| now.duration_since(t).unwrap_or_default() < LAUNCH_GRACE)
        .unwrap_or(false)
}

/// How long after its create a record is left alone by the "gone" look: the
/// wrapper records a container before runc has created it.
pub const GONE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Every proxied container under `store` (in `namespace`, if given), sorted. With
/// `runc`, records older than [`GONE_GRACE`] whose container runc no longer knows
/// (one `runc list` per root) say `gone`.
pub fn rows(
    store: &Store,
    namespace: Option<&str>,
    procs: &dyn Processes,
    runc: Option<&dyn crate::runc::query::RuncQuery>,
) -> crate::Result<Vec<Row>> {
    let mut known = runc.map(crate::runc::query::Listing::new);
    let now = std::time::SystemTime::now();
    let mut out: Vec<Row> = store
        .list()?
        .into_iter()
        .filter(|s| namespace.is_none_or(|n| n == s.namespace))
        .map(|s| {
            let rec = Paths::new(store, &s.namespace, &s.id)
                .read_record()
                .ok()
                .flatten();
            let old = humantime::parse_rfc3339(&s.created_at)
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_none_or(|age| age >= GONE_GRACE);
            let knows = known.as_mut().filter(|_| old).map(|k| {
                let root = s
                    .runc_root
                    .clone()
                    .unwrap_or_else(|| crate::ops::gc::RUNC_DEFAULT_ROOT.into());
                k.knows(&root, &s.id)
            });
            row_known(&s, rec.as_ref(), procs, knows)
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
    Ok(out)
}

fn expiry(secs: Option<u64>) -> String {
    secs.map_or("-".into(), |s| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
            .to_string()
    })
}

/// `OOM KILLS`: the container's count, with Envoy's share where it is known on its
/// own (cgroup v1) and not zero: `3 (envoy 1)`.
fn oom_cell(container: Option<u64>, envoy: Option<u64>) -> String {
    match (container, envoy) {
        (None, None) => "-".into(),
        (Some(c), Some(e)) if e > 0 => format!("{c} (envoy {e})"),
        (Some(c), _) => c.to_string(),
        (None, Some(e)) => format!("? (envoy {e})"),
    }
}

/// The table: fixed columns, one line per container, reasons and errors last.
pub fn table(rows: &[Row]) -> String {
    let mut lines = vec![[
        "NAMESPACE/ID".to_string(),
        "STATUS".into(),
        "PORTS (app<-proxy<-host tls[,plain])".into(),
        "IP".into(),
        "NAT".into(),
        "ENVOY".into(),
        "READY SINCE".into(),
        "RESTARTS".into(),
        "OOM KILLS".into(),
        "CERT EXPIRES".into(),
        "LAST ERROR".into(),
    ]];
    for r in rows {
        let ports = r
            .ports
            .iter()
            .map(|p| {
                let on = p
                    .host_ips
                    .iter()
                    .map(|a| format!("@{a}"))
                    .collect::<String>();
                match p.host_plain {
                    Some(h) => format!("{}<-{}<-{},{h}{on}", p.app, p.proxy, p.host_tls),
                    None => format!("{}<-{}<-{}{on}", p.app, p.proxy, p.host_tls),
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let status = match &r.reason {
            Some(why) => format!("{} ({why})", r.status.as_str()),
            None => r.status.as_str().to_string(),
        };
        let ip = match (r.network, r.container_ip, r.container_ipv6) {
            (Network::Host, ..) => "host-network".to_string(),
            (_, Some(ip), Some(v6)) => format!("{ip},{v6}"),
            (_, Some(ip), None) => ip.to_string(),
            (_, None, Some(v6)) => v6.to_string(),
            (_, None, None) => "-".into(),
        };
        let nat = match (r.network, r.nat_applied) {
            (Network::Host, _) => "n/a",
            (_, true) => "yes",
            (_, false) => "no",
        };
        let who = match &r.pod {
            None => format!("{}/{}", r.namespace, r.id),
            Some(p) => format!(
                "{}/{} (pod {}: {})",
                r.namespace,
                r.id,
                p.name.as_deref().unwrap_or("-"),
                if p.containers.is_empty() {
                    "no containers".to_string()
                } else {
                    p.containers.join(",")
                }
            ),
        };
        lines.push([
            who,
            status,
            ports,
            ip,
            nat.into(),
            r.envoy_pid.map_or("-".into(), |p| p.to_string()),
            r.ready_since.clone().unwrap_or_else(|| "-".into()),
            r.restarts.to_string(),
            oom_cell(r.oom_kills, r.envoy_oom_kills),
            expiry(r.cert_not_after),
            r.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    // Widths from every column but the last two free-text ones' overflow.
    let mut widths = [0usize; 11];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut line = String::new();
        for (i, c) in l.iter().enumerate() {
            if i + 1 == l.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::Status;
    use crate::state::store::tests::sample;
    use crate::sys::process::{FakeProcesses, ProcId};

    fn started(root: &std::path::Path) -> ContainerState {
        let mut s = sample("ns", "c1", root, (61010, Some(61011)));
        s.init_pid = Some(10);
        s.started_at = Some("2026-01-01T00:00:00Z".into());
        s
    }

    fn rec(sup: ProcId, state: State, reason: Option<&str>) -> Record {
        Record {
            supervisor: Some(sup),
            status: Some(Status {
                state,
                since: "2026-01-01T00:00:01Z".into(),
                reason: reason.map(str::to_string),
            }),
            container_ip: Some("203.0.113.7".parse().unwrap()),
            nat_applied: true,
            ..Record::default()
        }
    }

    #[test]
    fn a_supervised_container_shows_what_its_supervisor_recorded() {
        let p = FakeProcesses::default();
        p.add(10, &["init"]);
        let sup = p.add(11, &["envoy-sidecar", "supervise"]);
        let s = started(std::path::Path::new("/r"));
        let r = row(&s, Some(&rec(sup, State::Ready, None)), &p);
        assert_eq!((r.status, r.reason.as_deref()), (State::Ready, None));
        assert_eq!(r.supervisor_pid, Some(11));
        assert_eq!(
            r.ports,
            [PortRow {
                app: 8080,
                proxy: 61001,
                host_tls: 61010,
                host_plain: Some(61011),
                host_ips: vec![],
            }]
        );
        let t = table(&[r]);
        assert!(t.starts_with("NAMESPACE/ID"), "{t}");
        assert!(
            t.contains("ns/c1") && t.contains("8080<-61001<-61010,61011"),
            "{t}"
        );
        assert!(t.contains("203.0.113.7") && t.contains("ready"), "{t}");
    }

    #[test]
    fn a_record_runc_forgot_is_gone_not_starting() {
        let p = FakeProcesses::default();
        let mut s = started(std::path::Path::new("/r"));
        s.started_at = None; // a create whose runc create then failed
        let r = row_known(&s, None, &p, Some(false));
        assert_eq!(r.status, State::Gone);
        assert!(r.reason.unwrap().contains("gc will remove it"));
        // Known to runc (or not asked): what it was.
        assert_eq!(row_known(&s, None, &p, Some(true)).status, State::Starting);
        assert_eq!(row_known(&s, None, &p, None).status, State::Starting);
        // The real store, through `rows`: old enough and unknown to runc.
        let root = crate::state::store::tests::tempdir("status-gone");
        let store = Store::with_leases(root.join("state"), root.join("leases"));
        let st = crate::state::store::tests::sample("ns", "c1", store.root(), (61010, None));
        crate::state::store::tests::record(&store, &st);
        let none = crate::runc::query::FakeRunc::default();
        let rows = rows(&store, None, &p, Some(&none)).unwrap();
        assert_eq!(rows[0].status, State::Gone);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_pod_is_one_row_naming_its_containers() {
        use crate::state::store::{Member, Pod};
        let p = FakeProcesses::default();
        p.add(10, &["pause"]);
        let sup = p.add(11, &["envoy-sidecar", "supervise"]);
        let mut s = started(std::path::Path::new("/r"));
        let member = |id: &str, name: Option<&str>| Member {
            id: id.into(),
            name: name.map(str::to_string),
            requested_bytes: None,
            declares_ports: true,
            joined_at: String::new(),
        };
        s.pod = Some(Pod {
            name: Some("shop/web".into()),
            members: vec![member("a1", Some("app")), member("b2", None)],
        });
        let r = row(&s, Some(&rec(sup, State::Ready, None)), &p);
        assert_eq!(r.pod.as_ref().unwrap().container_ids, ["a1", "b2"]);
        let t = table(&[r]);
        assert!(t.contains("ns/c1 (pod shop/web: app,b2)"), "{t}");
        s.pod.as_mut().unwrap().members.clear();
        let t = table(&[row(&s, Some(&rec(sup, State::Ready, None)), &p)]);
        assert!(t.contains("(pod shop/web: no containers)"), "{t}");
    }

    #[test]
    fn oom_kills_of_the_container_and_of_envoy_come_from_the_cgroups() {
        let p = FakeProcesses::default();
        p.add(10, &["init"]);
        let sup = p.add(11, &["envoy-sidecar", "supervise"]);
        let s = started(std::path::Path::new("/r"));
        let dir = std::env::temp_dir().join(format!("es-status-oom-{}", std::process::id()));
        let child = dir.join("c1/envoy-sidecar");
        std::fs::create_dir_all(&child).unwrap();
        // cgroup v1: the container's own kills plus Envoy's child's.
        std::fs::write(
            dir.join("c1/memory.oom_control"),
            "under_oom 0\noom_kill 3\n",
        )
        .unwrap();
        std::fs::write(
            child.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        let mut rc = rec(sup, State::Ready, None);
        rc.cgroup = crate::sys::cgroup::SidecarCgroup {
            dirs: vec![child.clone()],
        };
        let r = row(&s, Some(&rc), &p);
        assert_eq!((r.oom_kills, r.envoy_oom_kills), (Some(5), Some(2)));
        let cell = |r: &Row| {
            let t = table(std::slice::from_ref(r));
            let (head, line) = (t.lines().next().unwrap(), t.lines().nth(1).unwrap());
            let col = head.find("OOM KILLS").expect("OOM KILLS column");
            line[col..].split("  ").next().unwrap().trim().to_string()
        };
        assert_eq!(cell(&r), "5 (envoy 2)");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (v["oom_kills"].as_u64(), v["envoy_oom_kills"].as_u64()),
            (Some(5), Some(2))
        );
        // cgroup v2: Envoy's child has no memory files; the container's memory.events
        // counts every kill in it.
        std::fs::remove_file(child.join("memory.oom_control")).unwrap();
        std::fs::remove_file(dir.join("c1/memory.oom_control")).unwrap();
        std::fs::write(dir.join("c1/memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let r = row(&s, Some(&rc), &p);
        assert_eq!((r.oom_kills, r.envoy_oom_kills), (Some(1), None));
        assert_eq!(cell(&r), "1");
        std::fs::remove_dir_all(&dir).unwrap();
        // Unknown (no cgroup recorded): "-", null.
        let r = row(&s, Some(&rec(sup, State::Ready, None)), &p);
        assert_eq!((r.oom_kills, r.envoy_oom_kills), (None, None));
        assert_eq!(cell(&r), "-");
        assert!(serde_json::to_value(&r).unwrap()["oom_kills"].is_null());
    }

    #[test]
    fn a_dead_supervisor_is_degraded_whatever_it_last_recorded() {
        let p = FakeProcesses::default();
        p.add(10, &["init"]);
        let gone = ProcId {
            pid: 12,
            start_time: 1,
        };
        let s = started(std::path::Path::new("/r"));
        let r = row(&s, Some(&rec(gone, State::Ready, None)), &p);
        assert_eq!(r.status, State::Degraded);
        assert!(
            r.reason
                .unwrap()
                .contains("supervisor pid 12 is not running")
        );
        assert_eq!(r.supervisor_pid, None);
    }

    #[test]
    fn no_supervisor_yet_is_starting_for_the_launch_grace_then_degraded() {
        let p = FakeProcesses::default();
        p.add(10, &["init"]);
        let mut s = started(std::path::Path::new("/r"));
        s.started_at = Some(crate::sys::fs::now_rfc3339());
        let r = row(&s, None, &p);
        assert_eq!(r.status, State::Starting, "{r:?}");
        assert!(r.reason.unwrap().contains("supervisor is being launched"));
        s.started_at = Some("2026-01-01T00:00:00Z".into());
        let r = row(&s, None, &p);
        assert_eq!(r.status, State::Degraded);
        assert!(r.reason.unwrap().contains("no supervisor ever started"));

        let t0 = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let at = |secs| t0 + std::time::Duration::from_secs(secs);
        assert!(launching(Some("2026-01-01T00:00:00Z"), at(9)));
        assert!(!launching(Some("2026-01-01T00:00:00Z"), at(10)));
        assert!(
            launching(Some("2026-01-01T00:00:05Z"), at(0)),
            "future stamp"
        );
        assert!(!launching(Some("garbage"), at(0)));
        assert!(!launching(None, at(0)));
    }

    #[test]
    fn created_and_stopped_containers_say_so() {
        let p = FakeProcesses::default();
        let mut s = started(std::path::Path::new("/r"));
        s.started_at = None;
        assert_eq!(row(&s, None, &p).status, State::Starting);
        s.started_at = Some("x".into());
        let r = row(&s, None, &p); // init 10 is not in the table
        assert_eq!(r.status, State::Stopping);
    }

    #[test]
    fn degraded_reason_and_host_network_in_the_table() {
        let p = FakeProcesses::default();
        p.add(10, &["init"]);
        let sup = p.add(11, &["s"]);
        let s = started(std::path::Path::new("/r"));
        let mut rc = rec(sup, State::Degraded, Some("no network: no IPv4 address"));
        rc.network = Network::Host;
        let t = table(&[row(&s, Some(&rc), &p)]);
        assert!(t.contains("degraded (no network: no IPv4 address)"), "{t}");
        assert!(t.contains("host-network") && t.contains("n/a"), "{t}");
        let json = serde_json::to_value(row(&s, Some(&rc), &p)).unwrap();
        assert_eq!(json["status"], "degraded");
        assert_eq!(json["network"], "host");
    }

    #[test]
    fn ports_bound_to_host_addresses_say_where() {
        let p = FakeProcesses::default();
        let mut s = started(std::path::Path::new("/r"));
        let r = row(&s, None, &p);
        assert!(
            serde_json::to_value(&r).unwrap()["ports"][0]
                .get("host_ips")
                .is_none()
        );
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        s.host_ips.insert(8080, vec![a]);
        let r = row(&s, None, &p);
        assert_eq!(
            serde_json::to_value(&r).unwrap()["ports"][0]["host_ips"],
            serde_json::json!(["192.0.2.7"])
        );
        let t = table(&[r]);
        assert!(t.contains("8080<-61001<-61010,61011@192.0.2.7"), "{t}");
    }
}
