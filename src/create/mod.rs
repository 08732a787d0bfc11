//! Everything decided at container `create`: proxy and host ports, environment,
//! credentials mount, memory limit and hooks — recorded in the state store and
//! written into the bundle's `config.json`, all or nothing.

pub mod annotations;
pub mod env;
pub mod memory;
pub mod pod;
pub mod ports;
pub mod shared_netns;
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
use crate::state::store::{self, ContainerState, Member, Memory, Pod, PortMapping, Store, User};
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
    /// Whether runc runs our hooks from the spec. `false` for the wrapper's `create`:
    /// the app waits for `runc start`, so the wrapper itself does createRuntime's and
    /// poststart's work once runc returns (`control::start_for_running`), and its
    /// `delete` poststop's — two processes fewer on every lifecycle. `runc run` keeps
    /// them (the app starts before runc returns; a foreground run is runc itself).
    pub hooks_in_spec: bool,
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
        Ok(ann) => match Request::from_annotations(&ann, &annotations::read_small_file) {
            Ok(None) => Asks::Nothing,
            Ok(Some(_)) | Err(_) => Asks::Proxy,
        },
    }
}

/// What `create` decided for a container.
#[derive(Debug)]
pub enum Prepared {
    /// No proxy: `config.json` is not touched.
    Nothing,
    /// A proxy of its own — or, for a CRI pod sandbox, the pod's.
    Proxy(ContainerState),
    /// A container of a CRI pod: it got the pod's environment and credentials, and is
    /// listed in the pod's record. `adopted`: the pod had no proxy yet (no annotation
    /// on the pod) and this container's annotation set one up; its sandbox already
    /// runs, so the caller starts the pod's sidecar now
    /// ([`crate::sidecar::control::start_for_running`]).
    Member { pod: ContainerState, adopted: bool },
}

impl Prepared {
    pub fn is_nothing(&self) -> bool {
        matches!(self, Prepared::Nothing)
    }
}

/// Decide and apply. `exists_in_runc` is asked only when a state for this id already
/// exists.
pub fn prepare(
    cfg: &Config,
    t: &Target,
    exists_in_runc: impl FnOnce() -> bool,
) -> Result<Prepared> {
    if !cfg.proxy.enabled {
        return Ok(Prepared::Nothing);
    }
    let spec_path = t.bundle.join("config.json");
    let mut spec = match JsonFile::load(&spec_path) {
        Ok(s) => s,
        // A spec runc itself refuses (missing, empty, not a JSON object): runc reads the
        // same file and answers in its own words and exit code ("runc create failed:
        // EOF"), nothing of ours is decided. Not for one only we refuse (too large).
        Err(_) if t.mutate_spec && spec::runc_refuses(&spec_path) => return Ok(Prepared::Nothing),
        Err(e) => return Err(e),
    };
    let ann = spec.annotations()?;
    let req = Request::from_annotations(&ann, &annotations::read_small_file)?;
    let role = match pod::Role::of(&ann) {
        Ok(r) => r,
        // Malformed CRI markers on a container that asks for nothing: not ours to judge.
        Err(_) if req.is_none() => return Ok(Prepared::Nothing),
        Err(e) => return Err(e),
    };
    if let pod::Role::Member { sandbox_id, name } = &role {
        return member(cfg, t, &mut spec, &ann, req, sandbox_id, name.clone());
    }
    let Some(req) = req else {
        return Ok(Prepared::Nothing);
    };

    // Our own earlier patch of this bundle (a second create) is undone, not stacked.
    let managed = managed_env(&ann);
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
    let sandbox = matches!(role, pod::Role::Sandbox { .. });
    // A pod sandbox keeps its limits: the pod's Envoy is paid by the RuntimeClass
    // overhead (in the pod cgroup the kubelet sized), which is what the record claims.
    let (requested, new_limit, new_swap) = if sandbox {
        (None, None, None)
    } else {
        raise_memory(limit, swap, additional)
    };
    let user = spec.user()?;
    let target = spec.network_namespace()?;

    let store = Store::of(cfg);
    let lock = store.lock()?;
    if store.read(t.namespace, t.id)?.is_some() {
        if exists_in_runc() {
            // Let runc report "container exists"; never touch a live container's state.
            return Ok(Prepared::Nothing);
        }
        store.remove_locked(&lock, t.namespace, t.id)?;
    }
    let limit_bytes = new_limit.filter(|l| *l > 0).map(i64::unsigned_abs);
    let memory = Memory {
        requested_bytes: requested,
        limit_bytes,
        additional_bytes: if limit_bytes.is_some() || sandbox {
            additional
        } else {
            0
        },
    };
    let pod = match &role {
        pod::Role::Sandbox { pod_name } => Some(Pod {
            name: pod_name.clone(),
            members: Vec::new(),
        }),
        _ => None,
    };
    let state = record(cfg, t, (&store, &lock), &req, &target, (memory, user), pod)?;

    // From here on the state claims ports and memory: undo it on any failure.
    let applied = (|| {
        crate::sys::fault::kill_point("create:state-written");
        fault_delay();
        if !t.mutate_spec {
            return Ok(());
        }
        if sandbox {
            // The pause container needs no environment, credentials or memory: only
            // the hooks that run the pod's sidecar.
            set_hooks(&mut spec, &state, cfg, t)?;
        } else {
            patch_spec(
                &mut spec,
                &state,
                cfg,
                t,
                &managed,
                (limit, swap),
                (new_limit, new_swap),
            )?;
        }
        spec.save()
    })();
    if let Err(e) = applied {
        let _ = store.remove_locked(&lock, t.namespace, t.id);
        let _ = store
            .leases()
            .release(state.envoy_uid, &store.owner(t.namespace, t.id));
        return Err(e);
    }
    Ok(Prepared::Proxy(state))
}

fn managed_env(ann: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    ann.get(annotations::MANAGED_ENV)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// Claim memory, host ports and an Envoy uid for `t` and write its record, under
/// `lock`. Nothing is left claimed on failure.
fn record(
    cfg: &Config,
    t: &Target,
    (store, lock): (&Store, &store::Lock),
    req: &Request,
    target: &spec::NetTarget,
    (memory, user): (Memory, User),
    pod: Option<Pod>,
) -> Result<ContainerState> {
    // Another proxied container (or any listener) in the namespace this one joins:
    // an Envoy of its own on ports of its own, and a filter table of its own.
    let near = shared_netns::look(target, store);
    near.check_app_ports(&req.ports)?;
    let proxy = ports::select_proxy_ports_avoiding(&req.ports, |p| near.taken(p))?;
    let ingress_table = (!near.proxied.is_empty())
        .then(|| crate::nat::ingress::table_for_joiner(t.namespace, t.id));
    let uid_pool = cfg.envoy_uid_pool();
    let mut index = store.index(lock, &uid_pool)?;

    let claim = if pod.is_some() {
        memory.additional_bytes
    } else {
        memory.limit_bytes.unwrap_or(0)
    };
    if claim > 0 {
        let capacity = cfg.memory_capacity_bytes()?;
        let total = index.memory_limit_bytes.saturating_add(claim);
        if total > capacity {
            let what = if pod.is_some() {
                format!(
                    "pod sandbox {}'s proxy needs {} MiB (proxy.additional_memory_allocation_mb, \
                     the RuntimeClass overhead)",
                    t.id,
                    mib(claim)
                )
            } else {
                format!(
                    "container {} needs a memory limit of {} MiB ({} MiB requested + {} MiB proxy allocation)",
                    t.id,
                    mib(claim),
                    mib(memory.requested_bytes.unwrap_or(0)),
                    mib(memory.additional_bytes)
                )
            };
            return Err(Error::Memory(format!(
                "{what}; with the {} proxied containers already running that is {} MiB, over [host] memory_capacity_mb = {} MiB",
                index.containers,
                mib(total),
                mib(capacity)
            )));
        }
    }

    let unproxied = cfg.proxy.enable_unproxied_port_mappings;
    let n = req.ports.len();
    // nerdctl's -p on a host port the product already forwards: two DNAT rules for one
    // port, and which wins is undefined. Refused before anything is held.
    if let Some(p) = req.published.iter().find(|p| index.port_taken(**p)) {
        return Err(Error::Ports(format!(
            "host port {p} of this container's -p (nerdctl) is already mapped by \
             envoy-sidecar to another proxied container (`envoy-sidecar status` lists it); \
             valid: a -p host port outside ports.pool_start/pool_end ({}-{}) or one no \
             container holds",
            cfg.ports.pool_start, cfg.ports.pool_end
        )));
    }
    // Not a port the product holds, nor one a host process listens on (nerdctl >=
    // 2.1.6 binds its -p ports, and any service may sit in the pool), nor one another
    // DNAT rule on the host forwards (CNI portmap's for an earlier nerdctl -p), nor
    // this container's own -p (its portmap rule comes only with its createRuntime hook).
    let forwarded = crate::nat::foreign::host_dnat_ports(&crate::nat::Nat::default().nft);
    let listening = crate::sys::listeners::host_tcp_listeners();
    let host = ports::allocate_host_ports(if unproxied { 2 * n } else { n }, cfg.pool(), |p| {
        index.port_taken(p)
            || listening.contains(&p)
            || forwarded.contains(&p)
            || req.published.contains(&p)
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
    let admin_socket = match cfg.admin_listener() {
        Ok(crate::config::AdminListener::Loopback) => Ok(None),
        Ok(crate::config::AdminListener::Unix) => admin_socket(cfg, envoy_uid).map(Some),
        Err(e) => Err(e),
    };
    let admin_socket = match admin_socket {
        Ok(a) => a,
        Err(e) => {
            let _ = store.leases().release(envoy_uid, &owner);
            return Err(e);
        }
    };
    let dir = store.dir(t.namespace, t.id);
    let state = ContainerState {
        version: store::new_state_version(),
        namespace: t.namespace.into(),
        id: t.id.into(),
        bundle: t.bundle.to_path_buf(),
        config: cfg.source.clone(),
        instance_guid: req.instance_guid.clone().unwrap_or_else(|| t.id.into()),
        app_guid: req.app_guid.clone(),
        space_guid: req.space_guid.clone(),
        org_guid: req.org_guid.clone(),
        ports: mappings,
        admin_port: proxy.admin,
        admin_socket,
        alpn: req
            .alpn
            .unwrap_or_else(|| crate::envoy::bootstrap::Alpn::host_default(cfg.proxy.enable_http2))
            .as_str()
            .into(),
        host_ip: cfg.host.address.unwrap_or_else(default_host_ip),
        memory,
        user,
        envoy_uid,
        credentials_dir: dir.join(store::CREDENTIALS_DIR),
        runc_root: t.runc_root.map(Path::to_path_buf),
        created_at: now_rfc3339(),
        init_pid: None,
        started_at: None,
        pod,
        ingress_table,
        // Only ports this container proxies (ours may name fewer than -p).
        host_ips: req
            .host_ips
            .iter()
            .filter(|(p, _)| req.ports.contains(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect(),
    };
    if let Err(e) = store.create(lock, &mut index, &state) {
        let _ = store.remove_locked(lock, t.namespace, t.id);
        let _ = store.leases().release(envoy_uid, &owner);
        return Err(e);
    }
    Ok(state)
}

/// A container of a CRI pod: the pod's proxy, if it has one, or one set up from this
/// container's annotation (then keyed by the sandbox, and living as long as it does).
/// No Envoy, hooks or extra memory of its own: its environment and credentials come
/// from the pod's record, and its declared ports must be among the pod's.
#[allow(clippy::too_many_arguments)]
fn member(
    cfg: &Config,
    t: &Target,
    spec: &mut JsonFile,
    ann: &std::collections::BTreeMap<String, String>,
    req: Option<Request>,
    sandbox_id: &str,
    name: Option<String>,
) -> Result<Prepared> {
    let store = Store::of(cfg);
    let lock = store.lock()?;
    let declared = req.as_ref().map(|r| r.ports.clone()).unwrap_or_default();
    let (mut pod_state, adopted) = match store.read(t.namespace, sandbox_id)? {
        Some(p) if p.pod.is_some() => (p, false),
        Some(_) => {
            return Err(Error::Pod(format!(
                "the record of sandbox {sandbox_id} is not a pod's (created by an older \
                 envoy-sidecar?); recreate the pod"
            )));
        }
        None => {
            let Some(req) = req.as_ref() else {
                return Ok(Prepared::Nothing);
            };
            if !t.mutate_spec {
                // Hooks-only (no wrapper): nothing would follow the sandbox's life.
                return Err(Error::Pod(format!(
                    "container {} declares ports but its pod {sandbox_id} has no proxy; without \
                     the runc wrapper a pod's proxy comes only from an annotation on the pod",
                    t.id
                )));
            }
            // CRI bundles are siblings: <task dir>/<namespace>/<id>.
            let sandbox_bundle = t
                .bundle
                .parent()
                .map(|d| d.join(sandbox_id))
                .filter(|b| b.join("config.json").is_file())
                .unwrap_or_else(|| t.bundle.to_path_buf());
            // The pod's user and name are the sandbox's, when its spec can be read.
            let sandbox_spec = JsonFile::load(&sandbox_bundle.join("config.json")).ok();
            let user = match sandbox_spec.as_ref().map(JsonFile::user) {
                Some(Ok(u)) => u,
                _ => spec.user()?,
            };
            let pod_name = sandbox_spec
                .and_then(|s| s.annotations().ok())
                .and_then(|a| match pod::Role::of(&a) {
                    Ok(pod::Role::Sandbox { pod_name }) => pod_name,
                    _ => None,
                });
            let st = Target {
                namespace: t.namespace,
                id: sandbox_id,
                bundle: &sandbox_bundle,
                cli: t.cli,
                runc_root: t.runc_root,
                mutate_spec: t.mutate_spec,
                hooks_in_spec: t.hooks_in_spec,
            };
            let memory = Memory {
                requested_bytes: None,
                limit_bytes: None,
                additional_bytes: cfg.additional_memory_bytes(),
            };
            let pod = Pod {
                name: pod_name,
                members: Vec::new(),
            };
            (
                record(
                    cfg,
                    &st,
                    (&store, &lock),
                    req,
                    // The pod's namespace: its listeners are avoided too.
                    &spec.network_namespace()?,
                    (memory, user),
                    Some(pod),
                )?,
                true,
            )
        }
    };
    let undo = |store: &Store| {
        if adopted {
            let _ = store.remove_locked(&lock, t.namespace, sandbox_id);
        }
    };
    let missing = pod::uncovered(&pod_state, &declared);
    if !missing.is_empty() {
        undo(&store);
        return Err(pod::not_covered(&pod_state, t.id, &missing));
    }
    if !t.mutate_spec {
        // Hooks-only: the spec is in force; the pod's Envoy already serves this netns.
        return Ok(Prepared::Nothing);
    }
    let applied = (|| {
        let (limit, _) = spec.memory()?;
        let requested = match ann.get(annotations::REQUESTED_MEMORY) {
            Some(r) => parse_recorded(
                &t.bundle.join("config.json"),
                annotations::REQUESTED_MEMORY,
                r,
            )?,
            None => limit,
        };
        let p = pod_state.pod.as_mut().expect("a pod record");
        p.members.retain(|m| m.id != t.id);
        p.members.push(Member {
            id: t.id.into(),
            name,
            requested_bytes: requested.filter(|l| *l > 0).map(i64::unsigned_abs),
            declares_ports: !declared.is_empty(),
            joined_at: now_rfc3339(),
        });
        store.write(&pod_state)?;
        let vars = env_vars(&pod_state);
        spec.merge_env(true, &vars, &managed_env(ann), false)?;
        let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        spec.set_annotation(annotations::MANAGED_ENV, &names.join(","))?;
        spec.set_bind_mount(&pod_state.credentials_dir, CREDENTIALS_MOUNT)?;
        spec.save()
    })();
    if let Err(e) = applied {
        if adopted {
            undo(&store);
        } else if let Some(p) = pod_state.pod.as_mut() {
            p.members.retain(|m| m.id != t.id);
            let _ = store.write(&pod_state);
        }
        return Err(e);
    }
    Ok(Prepared::Member {
        pod: pod_state,
        adopted,
    })
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
    set_hooks(spec, s, cfg, t)
}

fn set_hooks(spec: &mut JsonFile, s: &ContainerState, cfg: &Config, t: &Target) -> Result<()> {
    for (stage, first, timeout) in HOOKS {
        let entry = hook_entry(cfg, t, stage, timeout);
        if !t.hooks_in_spec {
            // A bundle created before by `runc run` (or an older wrapper) loses ours.
            spec.remove_hook(stage, &entry)?;
            continue;
        }
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
            hooks_in_spec: true,
        };
        (bundle, t)
    }

    #[test]
    fn prepare_is_all_or_nothing_and_idempotent() {
        let (root, cfg) = setup("prep", "", spec_with("8080,9999", 256));
        let (bundle, t) = target(&root, "c1");
        let Prepared::Proxy(s) = prepare(&cfg, &t, || false).unwrap() else {
            panic!("a proxy")
        };
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.memory.limit_bytes, Some(288 << 20));
        let once = fs::read_to_string(bundle.join("config.json")).unwrap();
        // A second create on the same bundle after the first was deleted.
        Store::of(&cfg).remove("default", "c1").unwrap();
        assert!(!prepare(&cfg, &t, || false).unwrap().is_nothing());
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

    /// The wrapper's `create` (it does the hooks' work itself): none of ours in the
    /// spec, and a bundle that carried ours from a `runc run` loses them; others stay.
    #[test]
    fn a_create_without_hooks_in_the_spec_removes_ours_and_keeps_theirs() {
        let (root, cfg) = setup("nohooks", "", spec_with("8080", 256));
        let (bundle, mut t) = target(&root, "c1");
        assert!(!prepare(&cfg, &t, || false).unwrap().is_nothing());
        let spec_path = bundle.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&fs::read(&spec_path).unwrap()).unwrap();
        assert_eq!(v["hooks"]["poststart"].as_array().unwrap().len(), 1);
        let theirs = json!({"path": "/usr/libexec/nri", "args": ["nri"]});
        v["hooks"]["poststop"]
            .as_array_mut()
            .unwrap()
            .push(theirs.clone());
        fs::write(&spec_path, v.to_string()).unwrap();
        Store::of(&cfg).remove("default", "c1").unwrap();
        t.hooks_in_spec = false;
        assert!(!prepare(&cfg, &t, || false).unwrap().is_nothing());
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&spec_path).unwrap()).unwrap();
        assert_eq!(v["hooks"]["poststart"], json!([]), "{v}");
        assert_eq!(v["hooks"]["poststop"], json!([theirs]), "{v}");
        assert!(
            v["hooks"]
                .get("createRuntime")
                .is_none_or(|h| h == &json!([])),
            "{v}"
        );
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

    fn cri_spec(
        kind: &str,
        sandbox: &str,
        ports: Option<&str>,
        limit_mb: i64,
    ) -> serde_json::Value {
        let mut ann = serde_json::Map::new();
        ann.insert(pod::CONTAINER_TYPE.into(), kind.into());
        ann.insert(pod::SANDBOX_ID.into(), sandbox.into());
        ann.insert(pod::SANDBOX_NAME.into(), "web".into());
        ann.insert(pod::SANDBOX_NAMESPACE.into(), "shop".into());
        if let Some(p) = ports {
            ann.insert(annotations::PORTS.into(), p.into());
        }
        let mut v = spec_with("0", limit_mb);
        v["annotations"] = serde_json::Value::Object(ann);
        v
    }

    /// A second bundle beside the first (CRI's task dirs are siblings).
    fn sibling<'a>(root: &'a Path, id: &'a str, spec: &serde_json::Value) -> Target<'a> {
        let bundle = root.join(id);
        fs::create_dir_all(&bundle).unwrap();
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        Target {
            namespace: "k8s.io",
            id,
            bundle: Box::leak(bundle.into_boxed_path()),
            cli: Path::new("/usr/local/bin/envoy-sidecar"),
            runc_root: None,
            mutate_spec: true,
            hooks_in_spec: true,
        }
    }

    fn env_of(t: &Target) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(t.bundle.join("config.json")).unwrap()).unwrap();
        v["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_pod_has_one_proxy_its_containers_share() {
        let (root, cfg) = setup("pod", "", spec_with("0", 0));
        let sb = sibling(&root, "sb1", &cri_spec("sandbox", "sb1", Some("8080"), 0));
        let Prepared::Proxy(pod) = prepare(&cfg, &sb, || false).unwrap() else {
            panic!("the sandbox holds the pod's proxy")
        };
        assert_eq!(pod.pod.as_ref().unwrap().name.as_deref(), Some("shop/web"));
        // Not raised: the overhead pays for Envoy; it is what the record claims.
        assert_eq!(pod.memory.limit_bytes, None);
        assert_eq!(pod.memory.additional_bytes, cfg.additional_memory_bytes());
        let sb_spec: serde_json::Value =
            serde_json::from_slice(&fs::read(sb.bundle.join("config.json")).unwrap()).unwrap();
        assert!(sb_spec["hooks"]["poststart"].is_array(), "{sb_spec}");
        assert!(sb_spec.get("mounts").is_none(), "{sb_spec}");

        // Two containers, one with the pod's (copied) annotation, one with none.
        let app = sibling(
            &root,
            "app1",
            &cri_spec("container", "sb1", Some("8080"), 128),
        );
        let shipper = sibling(&root, "log1", &cri_spec("container", "sb1", None, 64));
        for t in [&app, &shipper] {
            let Prepared::Member { pod: p, adopted } = prepare(&cfg, t, || false).unwrap() else {
                panic!("{} is a member", t.id)
            };
            assert!(!adopted);
            assert_eq!(p.id, "sb1");
            let env = env_of(t);
            let ports = format!(
                "CF_INSTANCE_PORTS={}",
                serde_json::to_string(&pod.ports).unwrap()
            );
            assert!(env.contains(&ports), "{env:?}");
            let v: serde_json::Value =
                serde_json::from_slice(&fs::read(t.bundle.join("config.json")).unwrap()).unwrap();
            assert_eq!(
                v["linux"],
                spec_with("0", if t.id == "app1" { 128 } else { 64 })["linux"]
            );
            assert!(v.get("hooks").is_none(), "no hooks of its own: {v}");
            assert!(v["mounts"].to_string().contains(CREDENTIALS_MOUNT));
        }
        let store = Store::of(&cfg);
        let rec = store.read("k8s.io", "sb1").unwrap().unwrap();
        let members = &rec.pod.as_ref().unwrap().members;
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].requested_bytes, Some(128 << 20));
        assert!(members[0].declares_ports && !members[1].declares_ports);
        assert_eq!(store.list().unwrap().len(), 1, "one record for the pod");
        assert_eq!(
            store.pod_of_member("k8s.io", "log1").unwrap().unwrap().id,
            "sb1"
        );
        assert!(store.leave_pod("k8s.io", "log1").unwrap());
        assert!(store.pod_of_member("k8s.io", "log1").unwrap().is_none());

        // A container declaring a port the pod does not proxy: refused, nothing changed.
        let other = sibling(
            &root,
            "c9",
            &cri_spec("container", "sb1", Some("8080,9090"), 0),
        );
        let before = fs::read(other.bundle.join("config.json")).unwrap();
        let e = prepare(&cfg, &other, || false).unwrap_err().to_string();
        assert!(e.contains("9090") && e.contains("sb1"), "{e}");
        assert_eq!(fs::read(other.bundle.join("config.json")).unwrap(), before);
        assert!(store.pod_of_member("k8s.io", "c9").unwrap().is_none());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_pod_without_annotation_takes_its_first_annotated_containers_ports() {
        let (root, cfg) = setup("podfirst", "", spec_with("0", 0));
        let sb = sibling(&root, "sb2", &cri_spec("sandbox", "sb2", None, 0));
        assert!(prepare(&cfg, &sb, || false).unwrap().is_nothing());
        // Nothing declared, no pod proxy: nothing.
        let plain = sibling(&root, "p0", &cri_spec("container", "sb2", None, 0));
        assert!(prepare(&cfg, &plain, || false).unwrap().is_nothing());
        let app = sibling(
            &root,
            "a1",
            &cri_spec("container", "sb2", Some("8080"), 256),
        );
        let Prepared::Member { pod, adopted } = prepare(&cfg, &app, || false).unwrap() else {
            panic!("a member")
        };
        assert!(adopted, "the pod's proxy was set up by this container");
        assert_eq!(pod.id, "sb2");
        assert_eq!(pod.bundle, root.join("sb2"), "the sandbox's bundle");
        assert_eq!(pod.pod.as_ref().unwrap().name.as_deref(), Some("shop/web"));
        assert_eq!(pod.ports[0].internal, 8080);
        let store = Store::of(&cfg);
        assert!(store.read("k8s.io", "a1").unwrap().is_none());
        // The app's memory is its own.
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(app.bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 256 << 20);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn pod_proxy_ports_avoid_every_declared_port() {
        let (root, cfg) = setup("podrange", "", spec_with("0", 0));
        let sb = sibling(
            &root,
            "sb3",
            &cri_spec("sandbox", "sb3", Some("61001,61002,8080"), 0),
        );
        let Prepared::Proxy(pod) = prepare(&cfg, &sb, || false).unwrap() else {
            panic!("a proxy")
        };
        let declared = [61001, 61002, 8080];
        for m in &pod.ports {
            assert!(!declared.contains(&m.internal_tls_proxy), "{:?}", pod.ports);
        }
        assert!(!declared.contains(&pod.admin_port));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn pods_count_their_overhead_against_host_capacity() {
        // 1000 MiB capacity, 32 MiB overhead each: the 32nd pod does not fit.
        let (root, cfg) = setup("podcap", "", spec_with("0", 0));
        let mut refused = None;
        for i in 0u64..40 {
            let id: &'static str = Box::leak(format!("sb{i}").into_boxed_str());
            let sb = sibling(&root, id, &cri_spec("sandbox", id, Some("8080"), 0));
            if let Err(e) = prepare(&cfg, &sb, || false) {
                refused = Some((i, e.to_string()));
                break;
            }
        }
        let (i, e) = refused.expect("capacity reached");
        assert_eq!(i * cfg.additional_memory_bytes() / (1 << 20), 992, "{e}");
        assert!(
            e.contains("RuntimeClass overhead") && e.contains("memory_capacity_mb"),
            "{e}"
        );
        fs::remove_dir_all(root).unwrap();
    }
}
