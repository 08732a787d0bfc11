//! Everything decided at container `create`: proxy and host ports, environment,
//! credentials mount, memory limit and hooks — recorded in the state store and
//! written into the bundle's `config.json`, all or nothing.

pub mod annotations;
pub mod env;
pub mod memory;
pub mod ports;
pub mod spec;

pub use env::{CREDENTIALS_MOUNT, env_vars};
pub use memory::raise_memory;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::Config;
use crate::create::annotations::Request;
use crate::create::spec::JsonFile;
use crate::error::{Error, Result};
use crate::state::store::{self, ContainerState, Memory, PortMapping, Store};
use crate::sys::fs::now_rfc3339;

/// Envoy's admin socket for `envoy_uid`, or why the path cannot be a unix socket.
fn admin_socket(cfg: &Config, envoy_uid: u32) -> Result<PathBuf> {
    use crate::state::layout::{self, SUN_PATH_MAX};
    let path = layout::admin_socket(&cfg.runtime.state_dir, envoy_uid);
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        let room = SUN_PATH_MAX - (len - cfg.runtime.state_dir.as_os_str().len());
        return Err(Error::Config {
            path: cfg
                .source
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            key: "runtime.state_dir".into(),
            msg: format!(
                "Envoy's admin socket {} would be {len} bytes, over the {SUN_PATH_MAX} a unix \
                 socket path holds; valid: a runtime.state_dir of at most {room} bytes, or \
                 proxy.admin_listener = \"loopback\"",
                path.display()
            ),
        });
    }
    Ok(path)
}

const UNLIMITED: &str = "unlimited";

/// Hook stages we register, with where our entry goes and runc's timeout (seconds).
/// createRuntime only when it has work (the ingress filter, before the app starts).
const HOOKS: [(&str, bool, u64); 3] = [
    ("createRuntime", false, 30),
    ("poststart", false, 30),
    ("poststop", true, 30),
];

/// Who is being created, as the wrapper parsed it from runc's argv.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub bundle: &'a Path,
    /// The `envoy-sidecar` CLI that hooks run.
    pub cli: &'a Path,
    /// runc's `--root` (where `gc` asks runc whether the container still exists).
    pub runc_root: Option<&'a Path>,
    /// `false` in hooks-only mode (podman/CRI-O hooks.d, no wrapper): the spec is
    /// already in force, so nothing is written to it — no env, mount or extra memory.
    pub mutate_spec: bool,
}

/// Source address of the default route, found without sending a packet (a UDP
/// `connect` only consults the routing table).
pub fn default_host_ip() -> IpAddr {
    UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// What a bundle's spec asks for, for an argv the wrapper could not parse: with
/// nothing to proxy (or a spec runc refuses) the argv goes to runc unchanged.
#[derive(Debug, PartialEq, Eq)]
pub enum Asks {
    /// A proxy, or `envoy-sidecar/*` annotations that are invalid.
    Proxy,
    Nothing,
    /// runc will refuse the spec itself.
    Unreadable,
}

pub fn asks(bundle: &Path) -> Asks {
    let Ok(spec) = JsonFile::load(&bundle.join("config.json")) else {
        return Asks::Unreadable;
    };
    match spec.annotations() {
        Err(_) => Asks::Unreadable,
        Ok(ann) => match Request::from_annotations(&ann) {
            Ok(None) => Asks::Nothing,
            Ok(Some(_)) | Err(_) => Asks::Proxy,
        },
    }
}

/// Decide and apply. `Ok(None)`: the container gets no proxy and `config.json` is not
/// touched. `exists_in_runc` is asked only when a state for this id already exists.
pub fn prepare(
    cfg: &Config,
    t: &Target,
    exists_in_runc: impl FnOnce() -> bool,
) -> Result<Option<ContainerState>> {
    if !cfg.proxy.enabled {
        return Ok(None);
    }
    let spec_path = t.bundle.join("config.json");
    let mut spec = match JsonFile::load(&spec_path) {
        Ok(s) => s,
        // A spec runc itself refuses (missing, empty, not a JSON object): runc reads the
        // same file and answers in its own words and exit code ("runc create failed:
        // EOF"), nothing of ours is decided. Not for one only we refuse (too large).
        Err(_) if t.mutate_spec && spec::runc_refuses(&spec_path) => return Ok(None),
        Err(e) => return Err(e),
    };
    let ann = spec.annotations()?;
    let Some(req) = Request::from_annotations(&ann)? else {
        return Ok(None);
    };

    // Our own earlier patch of this bundle (a second create) is undone, not stacked.
    let managed: Vec<String> = ann
        .get(annotations::MANAGED_ENV)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let (mut limit, mut swap) = spec.memory()?;
    if let Some(r) = ann.get(annotations::REQUESTED_MEMORY) {
        limit = parse_recorded(&spec_path, annotations::REQUESTED_MEMORY, r)?;
        swap = match ann.get(annotations::REQUESTED_SWAP) {
            Some(s) => parse_recorded(&spec_path, annotations::REQUESTED_SWAP, s)?,
            None => None,
        };
    }
    // Without spec mutation the container keeps the limit it was given.
    let additional = if t.mutate_spec {
        cfg.additional_memory_bytes()
    } else {
        0
    };
    let (requested, new_limit, new_swap) = raise_memory(limit, swap, additional);
    let user = spec.user()?;
    let proxy = ports::select_proxy_ports(&req.ports)?;

    let store = Store::of(cfg);
    let lock = store.lock()?;
    if store.read(t.namespace, t.id)?.is_some() {
        if exists_in_runc() {
            // Let runc report "container exists"; never touch a live container's state.
            return Ok(None);
        }
        store.remove_locked(&lock, t.namespace, t.id)?;
    }
    let uid_pool = cfg.envoy_uid_pool();
    let mut index = store.index(&lock, &uid_pool)?;

    let limit_bytes = new_limit.filter(|l| *l > 0).map(i64::unsigned_abs);
    if let Some(l) = limit_bytes {
        let capacity = cfg.memory_capacity_bytes()?;
        let total = index.memory_limit_bytes.saturating_add(l);
        if total > capacity {
            return Err(Error::Memory(format!(
                "container {} needs a memory limit of {} MiB ({} MiB requested + {} MiB proxy allocation); \
                 with the {} proxied containers already running that is {} MiB, over [host] memory_capacity_mb = {} MiB",
                t.id,
                mib(l),
                mib(requested.unwrap_or(0)),
                mib(additional),
                index.containers,
                mib(total),
                mib(capacity)
            )));
        }
    }

    let unproxied = cfg.proxy.enable_unproxied_port_mappings;
    let n = req.ports.len();
    let host = ports::allocate_host_ports(if unproxied { 2 * n } else { n }, cfg.pool(), |p| {
        index.port_taken(p)
    })?;
    // Externals first, then TLS proxies, as in the reference's example.
    let (ext, tls) = if unproxied {
        host.split_at(n)
    } else {
        (&host[..0], &host[..])
    };
    let mappings: Vec<PortMapping> = req
        .ports
        .iter()
        .enumerate()
        .map(|(i, &internal)| PortMapping {
            internal_tls_proxy: proxy.proxy[i],
            external_tls_proxy: tls[i],
            internal,
            external: ext.get(i).copied(),
        })
        .collect();

    // This state dir's index, then the host-wide leases (other configurations).
    let owner = store.owner(t.namespace, t.id);
    let envoy_uid = store
        .leases()
        .claim(&uid_pool, |u| index.uid_taken(u), &owner)?
        .ok_or_else(|| {
            Error::UidPool(format!(
                "all {} Envoy uids of proxy.envoy_uid_pool_start/envoy_uid_pool_size are in use \
                 (by this and other configurations on the host)",
                cfg.proxy.envoy_uid_pool_size
            ))
        })?;
    let admin_socket = match cfg.admin_listener()? {
        crate::config::AdminListener::Loopback => None,
        crate::config::AdminListener::Unix => Some(admin_socket(cfg, envoy_uid)?),
    };
    let dir = store.dir(t.namespace, t.id);
    let state = ContainerState {
        version: store::new_state_version(),
        namespace: t.namespace.into(),
        id: t.id.into(),
        bundle: t.bundle.to_path_buf(),
        config: cfg.source.clone(),
        instance_guid: req.instance_guid.clone().unwrap_or_else(|| t.id.into()),
        app_guid: req.app_guid,
        space_guid: req.space_guid,
        org_guid: req.org_guid,
        ports: mappings,
        admin_port: proxy.admin,
        admin_socket,
        alpn: req
            .alpn
            .unwrap_or_else(|| crate::envoy::bootstrap::Alpn::host_default(cfg.proxy.enable_http2))
            .as_str()
            .into(),
        host_ip: cfg.host.address.unwrap_or_else(default_host_ip),
        memory: Memory {
            requested_bytes: requested,
            limit_bytes,
            additional_bytes: if limit_bytes.is_some() { additional } else { 0 },
        },
        user,
        envoy_uid,
        credentials_dir: dir.join(store::CREDENTIALS_DIR),
        runc_root: t.runc_root.map(Path::to_path_buf),
        created_at: now_rfc3339(),
        init_pid: None,
        started_at: None,
    };

    // From here on the state claims ports and memory: undo it on any failure.
    let applied = store.create(&lock, &mut index, &state).and_then(|()| {
        crate::sys::fault::kill_point("create:state-written");
        fault_delay();
        if !t.mutate_spec {
            return Ok(());
        }
        patch_spec(
            &mut spec,
            &state,
            cfg,
            t,
            &managed,
            (limit, swap),
            (new_limit, new_swap),
        )?;
        spec.save()
    });
    if let Err(e) = applied {
        let _ = store.remove_locked(&lock, t.namespace, t.id);
        let _ = store.leases().release(envoy_uid, &owner);
        return Err(e);
    }
    Ok(Some(state))
}

/// Fault injection for the reliability suite: `ENVOY_SIDECAR_FAULT_DELAY_CREATE_MS`
/// holds a create between recording its claims and writing the spec (under the host
/// lock), so a test can SIGKILL the wrapper mid-create. Unset in production.
fn fault_delay() {
    if let Some(ms) = std::env::var("ENVOY_SIDECAR_FAULT_DELAY_CREATE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
    }
}

#[allow(clippy::type_complexity)]
fn patch_spec(
    spec: &mut JsonFile,
    s: &ContainerState,
    cfg: &Config,
    t: &Target,
    managed: &[String],
    requested: (Option<i64>, Option<i64>),
    raised: (Option<i64>, Option<i64>),
) -> Result<()> {
    let vars = env_vars(s);
    spec.merge_env(true, &vars, managed, false)?;
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    spec.set_annotation(annotations::MANAGED_ENV, &names.join(","))?;

    spec.set_bind_mount(&s.credentials_dir, CREDENTIALS_MOUNT)?;

    spec.set_memory(raised.0, raised.1)?;
    let show = |v: Option<i64>| v.map(|b| b.to_string());
    spec.set_annotation(
        annotations::REQUESTED_MEMORY,
        &show(requested.0).unwrap_or_else(|| UNLIMITED.into()),
    )?;
    if let Some(sw) = show(requested.1) {
        spec.set_annotation(annotations::REQUESTED_SWAP, &sw)?;
    }

    for (stage, first, timeout) in HOOKS {
        let entry = hook_entry(cfg, t, stage, timeout);
        if stage == "createRuntime" && !crate::nat::ingress::wanted(s) {
            // Nothing to do before the app starts (no ingress filter): one process
            // less per container; poststart records the init pid.
            spec.remove_hook(stage, &entry)?;
            continue;
        }
        spec.set_hook(stage, entry, first)?;
    }
    Ok(())
}

fn hook_entry(cfg: &Config, t: &Target, stage: &str, timeout: u64) -> serde_json::Value {
    let mut args = vec!["envoy-sidecar".to_string()];
    if let Some(c) = &cfg.source {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    args.extend([
        "hook".into(),
        stage.into(),
        "--namespace".into(),
        t.namespace.into(),
    ]);
    json!({"path": t.cli.display().to_string(), "args": args, "timeout": timeout})
}

fn parse_recorded(path: &Path, key: &str, v: &str) -> Result<Option<i64>> {
    if v == UNLIMITED {
        return Ok(None);
    }
    v.parse::<i64>().map(Some).map_err(|_| Error::Spec {
        path: PathBuf::from(path),
        msg: format!("annotation {key}={v:?} is not a byte count or \"{UNLIMITED}\""),
    })
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::tempdir;
    use std::fs;

    #[test]
    fn admin_socket_path_fits_sun_path_or_names_the_key() {
        let mut cfg = Config::default();
        let p = admin_socket(&cfg, 2_000_000_000).unwrap();
        assert_eq!(
            p,
            PathBuf::from("/run/envoy-sidecar/.admin/2000000000/admin.sock")
        );
        // 78 bytes of state_dir + 29 = 107: the longest that fits.
        cfg.runtime.state_dir = PathBuf::from(format!("/{}", "s".repeat(77)));
        assert_eq!(
            admin_socket(&cfg, 2_000_000_000).unwrap().as_os_str().len(),
            107
        );
        cfg.runtime.state_dir = PathBuf::from(format!("/{}", "s".repeat(78)));
        let e = admin_socket(&cfg, 2_000_000_000).unwrap_err().to_string();
        assert!(
            e.contains("runtime.state_dir")
                && e.contains("108 bytes")
                && e.contains("at most 78 bytes")
                && e.contains("admin_listener = \"loopback\""),
            "{e}"
        );
    }

    #[test]
    fn memory_rules() {
        const M: i64 = 1 << 20;
        assert_eq!(raise_memory(None, None, 32 << 20), (None, None, None));
        assert_eq!(
            raise_memory(Some(-1), None, 32 << 20),
            (None, Some(-1), None)
        );
        assert_eq!(
            raise_memory(Some(256 * M), None, 16 << 20),
            (Some(256 << 20), Some(272 * M), None)
        );
        assert_eq!(
            raise_memory(Some(256 * M), Some(512 * M), 16 << 20),
            (Some(256 << 20), Some(272 * M), Some(528 * M))
        );
        assert_eq!(
            raise_memory(Some(256 * M), Some(-1), 16 << 20),
            (Some(256 << 20), Some(272 * M), Some(-1))
        );
    }

    #[test]
    fn cf_instance_ports_shape() {
        let root = tempdir("env");
        let mut s =
            crate::state::store::tests::sample("default", "c1", &root, (61011, Some(61008)));
        let vars = env_vars(&s);
        assert_eq!(
            vars[0].1,
            r#"[{"internal_tls_proxy":61001,"external_tls_proxy":61011,"internal":8080,"external":61008}]"#
        );
        assert!(vars.contains(&("CF_INSTANCE_ADDR".into(), "192.0.2.10:61008".into())));
        s.ports[0].external = None;
        let vars = env_vars(&s);
        assert!(!vars[0].1.contains("\"external\""));
        assert!(
            !vars
                .iter()
                .any(|(k, _)| k == "CF_INSTANCE_ADDR" || k == "CF_INSTANCE_PORT")
        );
        fs::remove_dir_all(root).unwrap();
    }

    fn setup(tag: &str, extra_cfg: &str, spec: serde_json::Value) -> (PathBuf, Config) {
        let root = tempdir(tag);
        let bundle = root.join("bundle");
        fs::create_dir_all(&bundle).unwrap();
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let text = format!(
            "[runtime]\nstate_dir = {:?}\n[host]\naddress = \"192.0.2.7\"\nmemory_capacity_mb = 1000\n{extra_cfg}",
            root.join("state")
        );
        let mut cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
        // The CA is not needed to decide: validation is the caller's business.
        cfg.proxy.enabled = true;
        // Leases of this test only (the host-wide directory needs root).
        cfg.runtime.uid_lease_dir = root.join("leases");
        (root, cfg)
    }

    fn spec_with(ports: &str, limit_mb: i64) -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "env": ["PATH=/bin"],
                        "user": {"uid": crate::sys::process::real_ids().0,
                                 "gid": crate::sys::process::real_ids().1}},
            "annotations": {"envoy-sidecar/ports": ports},
            "linux": {"resources": {"memory": {"limit": limit_mb << 20}}}
        })
    }

    fn target<'a>(root: &'a Path, id: &'a str) -> (PathBuf, Target<'a>) {
        let bundle = root.join("bundle");
        let t = Target {
            namespace: "default",
            id,
            bundle: Box::leak(bundle.clone().into_boxed_path()),
            cli: Path::new("/usr/local/bin/envoy-sidecar"),
            runc_root: None,
            mutate_spec: true,
        };
        (bundle, t)
    }

    #[test]
    fn prepare_is_all_or_nothing_and_idempotent() {
        let (root, cfg) = setup("prep", "", spec_with("8080,9999", 256));
        let (bundle, t) = target(&root, "c1");
        let s = prepare(&cfg, &t, || false).unwrap().unwrap();
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.memory.limit_bytes, Some(288 << 20));
        let once = fs::read_to_string(bundle.join("config.json")).unwrap();
        // A second create on the same bundle after the first was deleted.
        Store::of(&cfg).remove("default", "c1").unwrap();
        prepare(&cfg, &t, || false).unwrap().unwrap();
        let twice = fs::read_to_string(bundle.join("config.json")).unwrap();
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&once).unwrap(),
            serde_json::from_str(&twice).unwrap(),
        );
        assert_eq!(a["hooks"], b["hooks"]);
        assert_eq!(a["process"]["env"], b["process"]["env"]);
        assert_eq!(a["linux"], b["linux"]);
        assert_eq!(a["mounts"], b["mounts"]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn overcommit_refused_without_leftovers() {
        let (root, cfg) = setup("overcommit", "", spec_with("8080", 980));
        let (bundle, t) = target(&root, "big");
        let before = fs::read(bundle.join("config.json")).unwrap();
        let e = prepare(&cfg, &t, || false).unwrap_err().to_string();
        assert!(
            e.contains("memory_capacity_mb = 1000") && e.contains("1012 MiB"),
            "{e}"
        );
        assert_eq!(fs::read(bundle.join("config.json")).unwrap(), before);
        let store = Store::of(&cfg);
        assert!(store.list().unwrap().is_empty());
        assert!(!store.dir("default", "big").exists());
        fs::remove_dir_all(root).unwrap();
    }
}
