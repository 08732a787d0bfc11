//! What a container asks for, read from its OCI annotations.
//!
//! Values are checked strictly: they end up in file names, environment variables and
//! (later) the Envoy configuration, so anything outside a small alphabet is refused with
//! an error naming the annotation.

use std::collections::BTreeMap;
use std::path::Path;

use crate::envoy::bootstrap::Alpn;
use crate::error::{Error, Result};

pub const PORTS: &str = "envoy-sidecar/ports";
pub const ENABLED: &str = "envoy-sidecar/enabled";
pub const INSTANCE_GUID: &str = "envoy-sidecar/instance-guid";
pub const APP_GUID: &str = "envoy-sidecar/app-guid";
pub const SPACE_GUID: &str = "envoy-sidecar/space-guid";
pub const ORG_GUID: &str = "envoy-sidecar/org-guid";
pub const NERDCTL_PORTS: &str = "nerdctl/ports";
/// nerdctl's per-container directory `<data root>/containers/<namespace>/<id>`; since
/// nerdctl 2.1.3 its `-p` mappings are in [`NERDCTL_NETWORK_CONFIG`] there, not in
/// [`NERDCTL_PORTS`] (nerdctl `pkg/netutil/networkstore`, written before the task).
pub const NERDCTL_STATE_DIR: &str = "nerdctl/state-dir";
pub const NERDCTL_NETWORK_CONFIG: &str = "network-config.json";
/// Larger than any real `network-config.json` by far; a bigger file is refused.
const MAX_NETWORK_CONFIG: u64 = 1 << 20;
/// The per-container ALPN override (the host default comes from `proxy.enable_http2`).
pub const ALPN: &str = "envoy-sidecar/alpn";

/// Written by the wrapper: the memory limit the user asked for (bytes, or `unlimited`).
pub const REQUESTED_MEMORY: &str = "envoy-sidecar/requested-memory-limit";
/// Written by the wrapper: environment variable names it added, so a second `create`
/// on the same bundle replaces rather than duplicates them.
pub const MANAGED_ENV: &str = "envoy-sidecar/managed-env";
/// The swap limit the user asked for, recorded beside `REQUESTED_MEMORY`.
pub const REQUESTED_SWAP: &str = "envoy-sidecar/requested-memory-swap";

const MAX_PORTS: usize = 64;
const MAX_GUID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// Container TCP ports to proxy, first-seen order, without duplicates.
    pub ports: Vec<u16>,
    pub instance_guid: Option<String>,
    pub app_guid: Option<String>,
    pub space_guid: Option<String>,
    pub org_guid: Option<String>,
    /// `envoy-sidecar/alpn`; `None`: the host default.
    pub alpn: Option<Alpn>,
    /// Host ports nerdctl's `-p` publishes for this container (TCP; its own portmap
    /// DNAT, set up by its createRuntime hook): never handed out by the product, and
    /// a create whose `-p` names a port the product holds is refused.
    pub published: Vec<u16>,
    /// Container ports every `-p` of which names a host address: their host ports
    /// (TLS and plain) are published on those addresses only.
    pub host_ips: BTreeMap<u16, Vec<std::net::IpAddr>>,
}

/// One TCP mapping of nerdctl's `-p` (a go-cni `PortMapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NerdctlMapping {
    pub container_port: u16,
    /// 0 or absent: none (nerdctl itself picks one before it writes the mapping).
    pub host_port: Option<u16>,
    /// `-p ADDR:H:C`; `None`: every host address (`""`, `0.0.0.0`, `::`).
    pub host_ip: Option<std::net::IpAddr>,
}

/// Reads a small file for [`Request::from_annotations`]: `Ok(None)` when it does not
/// exist. The seam that keeps the decision testable without files.
pub type ReadFile<'a> = &'a dyn Fn(&Path) -> std::io::Result<Option<String>>;

/// The real [`ReadFile`]: a regular file of at most [`MAX_NETWORK_CONFIG`] bytes (a
/// FIFO there would block create; more is an error), UTF-8.
pub fn read_small_file(path: &Path) -> std::io::Result<Option<String>> {
    match crate::sys::fs::read_bounded(path, MAX_NETWORK_CONFIG, true) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Request {
    /// `Ok(None)` when the container gets no proxy: opted out, or no ports declared.
    /// Ports: `envoy-sidecar/ports`, else nerdctl's `nerdctl/ports` label (nerdctl up
    /// to 2.1.2), else nerdctl's `network-config.json` in `nerdctl/state-dir` (2.1.3
    /// and later), read through `read`.
    pub fn from_annotations(
        a: &BTreeMap<String, String>,
        read: ReadFile<'_>,
    ) -> Result<Option<Request>> {
        if let Some(v) = a.get(ENABLED) {
            match v.as_str() {
                "true" => {}
                "false" => return Ok(None),
                _ => return Err(bad(ENABLED, v, "valid: \"true\" or \"false\"")),
            }
        }
        // nerdctl's -p is read whenever nerdctl made the spec, even when ours names the
        // ports: its host ports must not collide with the ones the product hands out.
        let nerdctl = match (a.get(NERDCTL_PORTS), a.get(NERDCTL_STATE_DIR)) {
            (Some(v), _) => Some(parse_nerdctl_mappings(v)?),
            (None, Some(dir)) => Some(nerdctl_network_config(dir, read)?),
            (None, None) => None,
        };
        let ports = match (a.get(PORTS), &nerdctl) {
            (Some(v), _) => parse_ports(v)?,
            (None, Some(m)) => container_ports(m),
            (None, None) => return Ok(None),
        };
        if ports.is_empty() {
            return Ok(None);
        }
        let mut published: Vec<u16> = nerdctl
            .iter()
            .flatten()
            .filter_map(|m| m.host_port)
            .collect();
        published.sort_unstable();
        published.dedup();
        let host_ips = bound_addresses(nerdctl.as_deref().unwrap_or_default());
        Ok(Some(Request {
            ports,
            published,
            host_ips,
            instance_guid: guid(a, INSTANCE_GUID)?,
            app_guid: guid(a, APP_GUID)?,
            space_guid: guid(a, SPACE_GUID)?,
            org_guid: guid(a, ORG_GUID)?,
            alpn: a.get(ALPN).map(|v| parse_alpn(v)).transpose()?,
        }))
    }
}

/// The value of [`ALPN`]. Exact values only (no trimming, no reordering): the set is
/// tiny and a near-miss is more likely a mistake than an intent.
pub fn parse_alpn(value: &str) -> Result<Alpn> {
    Alpn::from_value(value).ok_or_else(|| {
        bad(
            ALPN,
            value,
            "valid: \"h2,http/1.1\", \"http/1.1\" or \"none\"",
        )
    })
}

pub(crate) fn bad(key: &str, value: &str, msg: impl Into<String>) -> Error {
    // Keep hostile values from flooding logs: the message shows at most 80 chars.
    let shown: String = value.chars().take(80).collect();
    Error::Annotation {
        key: key.into(),
        value: shown,
        msg: msg.into(),
    }
}

fn push_unique(ports: &mut Vec<u16>, p: u16, key: &str, value: &str) -> Result<()> {
    if !ports.contains(&p) {
        if ports.len() == MAX_PORTS {
            return Err(bad(
                key,
                value,
                format!("at most {MAX_PORTS} ports can be proxied"),
            ));
        }
        ports.push(p);
    }
    Ok(())
}

/// `8080,9999,2222` (spaces around entries allowed; an empty value means no ports).
pub fn parse_ports(value: &str) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    if value.trim().is_empty() {
        return Ok(ports);
    }
    for item in value.split(',') {
        let item = item.trim();
        let p = item
            .parse::<u32>()
            .ok()
            .filter(|p| (1..=65535).contains(p) && item.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                bad(
                    PORTS,
                    value,
                    format!(
                        "{:?} is not a TCP port; valid: comma-separated numbers 1-65535, e.g. 8080,9999",
                        item.chars().take(20).collect::<String>()
                    ),
                )
            })?;
        push_unique(
            &mut ports,
            u16::try_from(p).expect("checked 1-65535 above"),
            PORTS,
            value,
        )?;
    }
    Ok(ports)
}

/// nerdctl's `nerdctl/ports`: a JSON array of go-cni `PortMapping`s. Only TCP container
/// ports are proxied; UDP/SCTP mappings are left to nerdctl.
pub fn parse_nerdctl_ports(value: &str) -> Result<Vec<u16>> {
    parse_nerdctl_mappings(value).map(|m| container_ports(&m))
}

/// For each container port all of whose mappings name a host address, those
/// addresses (sorted, once each); a port with any unbound mapping is on every address.
fn bound_addresses(m: &[NerdctlMapping]) -> BTreeMap<u16, Vec<std::net::IpAddr>> {
    let mut out: BTreeMap<u16, Vec<std::net::IpAddr>> = BTreeMap::new();
    for p in container_ports(m) {
        let of_p = m.iter().filter(|x| x.container_port == p);
        if let Some(mut addrs) = of_p.map(|x| x.host_ip).collect::<Option<Vec<_>>>() {
            addrs.sort_unstable();
            addrs.dedup();
            out.insert(p, addrs);
        }
    }
    out
}

/// The TCP container ports of `m`, first-seen order, no duplicates.
fn container_ports(m: &[NerdctlMapping]) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    for p in m.iter().map(|m| m.container_port) {
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// [`parse_nerdctl_ports`] with the host ports.
pub fn parse_nerdctl_mappings(value: &str) -> Result<Vec<NerdctlMapping>> {
    let items: Vec<serde_json::Value> = serde_json::from_str(value).map_err(|e| {
        bad(
            NERDCTL_PORTS,
            value,
            // serde's message may quote the input: give the position only.
            format!(
                "not a JSON array of port mappings (error at line {} column {}); \
                 valid: [{{\"ContainerPort\":80,\"Protocol\":\"tcp\"}}, ...]",
                e.line(),
                e.column()
            ),
        )
    })?;
    tcp_mappings(&items).map_err(|m| bad(NERDCTL_PORTS, value, m))
}

/// The TCP ports of `<dir>/network-config.json`, `{"portMappings":[PortMapping...]}`
/// (nerdctl >= 2.1.3; `{}` without `-p`). No file: no ports (an older nerdctl, which
/// writes the label instead). A file that cannot be read or parsed is an error naming
/// it: never a silent container without its proxy.
fn nerdctl_network_config(dir: &str, read: ReadFile<'_>) -> Result<Vec<NerdctlMapping>> {
    let d = Path::new(dir);
    if !d.is_absolute() || d.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(bad(
            NERDCTL_STATE_DIR,
            dir,
            "not an absolute path without '..'; valid: nerdctl's \
             <data root>/containers/<namespace>/<id>",
        ));
    }
    let file = d.join(NERDCTL_NETWORK_CONFIG);
    let text = match read(&file) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Vec::new()),
        Err(e) => {
            return Err(bad(
                NERDCTL_STATE_DIR,
                dir,
                format!(
                    "{}: cannot read nerdctl's port mappings: {e}",
                    file.display()
                ),
            ));
        }
    };
    let malformed = |why: String| {
        bad(
            NERDCTL_STATE_DIR,
            dir,
            format!(
                "{}: {why}; valid: {{\"portMappings\":[{{\"HostPort\":8080,\
                 \"ContainerPort\":80,\"Protocol\":\"tcp\",\"HostIP\":\"\"}}]}}",
                file.display()
            ),
        )
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        malformed(format!(
            "not JSON (error at line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Some(obj) = v.as_object() else {
        return Err(malformed("not a JSON object".into()));
    };
    match obj.get("portMappings") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => tcp_mappings(items).map_err(malformed),
        Some(_) => Err(malformed("\"portMappings\" is not an array".into())),
    }
}

const HOST_IP_VALID: &str = "\"HostIP\" must be \"\", 0.0.0.0, :: or one IP address of the host";

/// The TCP mappings of go-cni `PortMapping`s, in order (at most [`MAX_PORTS`] distinct
/// container ports).
fn tcp_mappings(items: &[serde_json::Value]) -> std::result::Result<Vec<NerdctlMapping>, String> {
    let mut ports = Vec::new();
    let mut out = Vec::new();
    for item in items {
        let proto = item
            .get("Protocol")
            .and_then(|p| p.as_str())
            .unwrap_or("tcp");
        if !proto.eq_ignore_ascii_case("tcp") {
            continue;
        }
        let p = item
            .get("ContainerPort")
            .and_then(|p| p.as_u64())
            .filter(|p| (1..=65535).contains(p))
            .ok_or("each entry needs \"ContainerPort\" between 1 and 65535")?;
        let p = u16::try_from(p).expect("checked 1-65535 above");
        if !ports.contains(&p) {
            if ports.len() == MAX_PORTS {
                return Err(format!("at most {MAX_PORTS} ports can be proxied"));
            }
            ports.push(p);
        }
        let host_port = match item.get("HostPort") {
            None | Some(serde_json::Value::Null) => None,
            Some(h) => match h.as_u64().filter(|h| *h <= 65535) {
                Some(0) => None,
                Some(h) => Some(u16::try_from(h).expect("checked <= 65535 above")),
                None => return Err("\"HostPort\" must be a number 0-65535".into()),
            },
        };
        let host_ip = match item.get("HostIP") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(a)) if a.is_empty() => None,
            Some(serde_json::Value::String(a)) => match a.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_unspecified() => None,
                Ok(ip) => Some(ip),
                Err(_) => return Err(HOST_IP_VALID.into()),
            },
            Some(_) => return Err(HOST_IP_VALID.into()),
        };
        out.push(NerdctlMapping {
            container_port: p,
            host_port,
            host_ip,
        });
    }
    Ok(out)
}

fn guid(a: &BTreeMap<String, String>, key: &str) -> Result<Option<String>> {
    match a.get(key) {
        None => Ok(None),
        Some(v) => {
            check_guid(v).map_err(|m| bad(key, v, m))?;
            Ok(Some(v.clone()))
        }
    }
}

/// Identities go into certificate subjects and file names: a small, safe alphabet.
pub fn check_guid(v: &str) -> std::result::Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= MAX_GUID_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !v.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "valid: 1-{MAX_GUID_LEN} characters of A-Z a-z 0-9 - _ . (not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`ReadFile`] for specs that name no nerdctl state directory.
    fn no_file(p: &Path) -> std::io::Result<Option<String>> {
        panic!("unexpected read of {}", p.display())
    }

    #[test]
    fn parse_alpn_table() {
        assert_eq!(parse_alpn("h2,http/1.1").unwrap(), Alpn::H2Http11);
        assert_eq!(parse_alpn("http/1.1").unwrap(), Alpn::Http11);
        assert_eq!(parse_alpn("none").unwrap(), Alpn::None);
        for a in [Alpn::H2Http11, Alpn::Http11, Alpn::None] {
            assert_eq!(parse_alpn(a.as_str()).unwrap(), a);
        }
        let huge = "h2,".repeat(10 * 1024 / 3);
        for v in [
            "",
            "h2",
            "http/1.1,h2",
            "h2, http/1.1",
            " none",
            "None",
            "HTTP/1.1",
            "none\n",
            "h2,\nhttp/1.1",
            "http/1.1\"]}",
            "\"none\"",
            "../../etc/passwd",
            "none\0",
            huge.as_str(),
        ] {
            let e = parse_alpn(v).unwrap_err().to_string();
            assert!(e.contains(ALPN), "{v:?}: {e}");
            assert!(
                e.contains("valid: \"h2,http/1.1\", \"http/1.1\" or \"none\""),
                "{e}"
            );
            // The offending value is shown, but bounded.
            assert!(e.len() < 400, "{} bytes", e.len());
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ports_dedup_in_order() {
        assert_eq!(
            parse_ports("8080,9999,2222").unwrap(),
            vec![8080, 9999, 2222]
        );
        assert_eq!(parse_ports(" 8080 , 8080,22").unwrap(), vec![8080, 22]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn bad_ports_name_the_annotation() {
        for v in [
            "0",
            "65536",
            "http",
            "80,",
            "-1",
            "+80",
            "8080;rm -rf /",
            "1e3",
        ] {
            let e = parse_ports(v).unwrap_err().to_string();
            assert!(e.contains("envoy-sidecar/ports"), "{v}: {e}");
            assert!(e.contains("valid:"), "{v}: {e}");
        }
        let many: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
        let e = parse_ports(&many.join(",")).unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
    }

    /// A [`ReadFile`] that serves one file's text (or an error), nothing else.
    fn one_file(
        path: &'static str,
        text: std::result::Result<&'static str, std::io::ErrorKind>,
    ) -> impl Fn(&Path) -> std::io::Result<Option<String>> {
        move |p| {
            if p != Path::new(path) {
                return Ok(None);
            }
            text.map(|t| Some(t.to_string()))
                .map_err(std::io::Error::from)
        }
    }

    #[test]
    fn nerdctl_network_config_json_gives_the_ports_of_nerdctl_2_1_3_and_later() {
        const DIR: &str = "/var/lib/nerdctl/1935db59/containers/default/c1";
        const FILE: &str = "/var/lib/nerdctl/1935db59/containers/default/c1/network-config.json";
        let state = [(NERDCTL_STATE_DIR, DIR)];
        // -p 8080:80 -p 5353:53/udp -p 127.0.0.1:9090:80 (nerdctl v2.3 writes these).
        let f = one_file(
            FILE,
            Ok(
                r#"{"portMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":""},{"HostPort":5353,"ContainerPort":53,"Protocol":"udp","HostIP":""},{"HostPort":9090,"ContainerPort":80,"Protocol":"tcp","HostIP":"127.0.0.1"}]}"#,
            ),
        );
        let r = Request::from_annotations(&ann(&state), &f)
            .unwrap()
            .unwrap();
        assert_eq!(r.ports, [80]);
        assert_eq!(r.published, [8080, 9090], "TCP host ports only");
        // 80 is also published on every address (-p 8080:80): not bound.
        assert!(r.host_ips.is_empty(), "{:?}", r.host_ips);
        let f2 = one_file(
            FILE,
            Ok(
                r#"{"portMappings":[{"HostPort":9090,"ContainerPort":80,"Protocol":"tcp","HostIP":"127.0.0.1"},{"HostPort":9091,"ContainerPort":80,"Protocol":"tcp","HostIP":"192.0.2.7"},{"HostPort":9092,"ContainerPort":81,"Protocol":"tcp","HostIP":"0.0.0.0"},{"HostPort":9093,"ContainerPort":82,"Protocol":"tcp","HostIP":"::"},{"HostPort":9094,"ContainerPort":83,"Protocol":"tcp","HostIP":"2001:db8::7"}]}"#,
            ),
        );
        let r = Request::from_annotations(&ann(&state), &f2)
            .unwrap()
            .unwrap();
        assert_eq!(r.ports, [80, 81, 82, 83]);
        let want: BTreeMap<u16, Vec<std::net::IpAddr>> = [
            (
                80,
                vec!["127.0.0.1".parse().unwrap(), "192.0.2.7".parse().unwrap()],
            ),
            (83, vec!["2001:db8::7".parse().unwrap()]),
        ]
        .into();
        assert_eq!(r.host_ips, want);
        // The label (nerdctl <= 2.1.2) wins over the file, which is not even read.
        let r = Request::from_annotations(
            &ann(&[
                (NERDCTL_STATE_DIR, DIR),
                (NERDCTL_PORTS, r#"[{"ContainerPort":81,"HostPort":8081}]"#),
            ]),
            &no_file,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.ports, r.published), (vec![81], vec![8081]));
        // Ours names the ports; nerdctl's -p host ports are still known.
        let r = Request::from_annotations(&ann(&[(NERDCTL_STATE_DIR, DIR), (PORTS, "9000")]), &f)
            .unwrap()
            .unwrap();
        assert_eq!((r.ports, r.published), (vec![9000], vec![8080, 9090]));
        let r = Request::from_annotations(&ann(&[(PORTS, "9000")]), &no_file)
            .unwrap()
            .unwrap();
        assert!(r.published.is_empty());
        // No -p ({}), no file (older nerdctl without -p), only UDP: no proxy.
        for text in [
            r#"{}"#,
            r#"{"portMappings":null}"#,
            r#"{"portMappings":[{"ContainerPort":53,"Protocol":"udp"}]}"#,
        ] {
            let f = move |_: &Path| Ok(Some(text.to_string()));
            assert_eq!(
                Request::from_annotations(&ann(&state), &f).unwrap(),
                None,
                "{text}"
            );
        }
        let none = |_: &Path| Ok(None);
        assert_eq!(
            Request::from_annotations(&ann(&state), &none).unwrap(),
            None
        );
    }

    #[test]
    fn a_bad_nerdctl_network_config_is_an_error_naming_the_file() {
        const DIR: &str = "/n/containers/default/c1";
        const FILE: &str = "/n/containers/default/c1/network-config.json";
        let state = [(NERDCTL_STATE_DIR, DIR)];
        for (text, says) in [
            (Ok("{"), "not JSON (error at line 1 column 1)"),
            (Ok("[]"), "not a JSON object"),
            (
                Ok(r#"{"portMappings":{}}"#),
                "\"portMappings\" is not an array",
            ),
            (
                Ok(r#"{"portMappings":[{"ContainerPort":0}]}"#),
                "between 1 and 65535",
            ),
            (
                Ok(r#"{"portMappings":[{"ContainerPort":80,"HostPort":70000}]}"#),
                "\"HostPort\" must be a number 0-65535",
            ),
            (
                Ok(r#"{"portMappings":[{"ContainerPort":80,"HostPort":"80"}]}"#),
                "\"HostPort\" must be a number 0-65535",
            ),
            (
                Ok(r#"{"portMappings":[{"ContainerPort":80,"HostIP":"localhost"}]}"#),
                "\"HostIP\" must be \"\", 0.0.0.0, :: or one IP address of the host",
            ),
            (
                Ok(r#"{"portMappings":[{"ContainerPort":80,"HostIP":7}]}"#),
                "\"HostIP\" must be",
            ),
            (
                Err(std::io::ErrorKind::PermissionDenied),
                "cannot read nerdctl's port mappings",
            ),
        ] {
            let f = one_file(FILE, text);
            let e = Request::from_annotations(&ann(&state), &f)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(FILE) && e.contains(says) && e.contains("nerdctl/state-dir"),
                "{e}"
            );
            if text.is_ok() {
                assert!(e.contains("valid: {\"portMappings\""), "{e}");
            }
        }
        for dir in ["relative/c1", "/n/../etc", ""] {
            let e = Request::from_annotations(&ann(&[(NERDCTL_STATE_DIR, dir)]), &no_file)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not an absolute path"), "{e}");
        }
    }

    #[test]
    fn nerdctl_ports_used_when_ours_absent() {
        let n = r#"[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"},
                    {"HostPort":53,"ContainerPort":53,"Protocol":"udp","HostIP":""},
                    {"HostPort":8443,"ContainerPort":443,"Protocol":"tcp","HostIP":""}]"#;
        let r = Request::from_annotations(&ann(&[(NERDCTL_PORTS, n)]), &no_file)
            .unwrap()
            .unwrap();
        assert_eq!(r.ports, vec![80, 443]);
        let r = Request::from_annotations(&ann(&[(NERDCTL_PORTS, n), (PORTS, "9000")]), &no_file)
            .unwrap()
            .unwrap();
        assert_eq!(r.ports, vec![9000]);
        let e = Request::from_annotations(&ann(&[(NERDCTL_PORTS, "{")]), &no_file).unwrap_err();
        assert!(e.to_string().contains("nerdctl/ports"), "{e}");
    }

    #[test]
    fn opt_out_and_absent() {
        assert_eq!(
            Request::from_annotations(&ann(&[]), &no_file).unwrap(),
            None
        );
        assert_eq!(
            Request::from_annotations(&ann(&[(PORTS, "8080"), (ENABLED, "false")]), &no_file)
                .unwrap(),
            None
        );
        let e = Request::from_annotations(&ann(&[(PORTS, "8080"), (ENABLED, "no")]), &no_file)
            .unwrap_err();
        assert!(e.to_string().contains("envoy-sidecar/enabled"), "{e}");
    }

    #[test]
    fn guids_are_checked() {
        let r =
            Request::from_annotations(&ann(&[(PORTS, "8080"), (APP_GUID, "a-1_b.c")]), &no_file)
                .unwrap()
                .unwrap();
        assert_eq!(r.app_guid.as_deref(), Some("a-1_b.c"));
        let r = Request::from_annotations(
            &ann(&[(PORTS, "8080"), ("envoy-sidecar/alpn", "http/1.1")]),
            &no_file,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.alpn, Some(Alpn::Http11));
        let e = Request::from_annotations(
            &ann(&[(PORTS, "8080"), ("envoy-sidecar/alpn", "h3")]),
            &no_file,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("envoy-sidecar/alpn") && e.contains("valid:"),
            "{e}"
        );
        for v in ["../etc", "a\nb", "", "a b", "x\"y", &"a".repeat(129)] {
            let e =
                Request::from_annotations(&ann(&[(PORTS, "8080"), (INSTANCE_GUID, v)]), &no_file)
                    .unwrap_err()
                    .to_string();
            assert!(e.contains(INSTANCE_GUID), "{v:?}: {e}");
        }
    }
}
