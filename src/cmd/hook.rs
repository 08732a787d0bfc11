//! `envoy-sidecar hook <stage>`: what runc runs at each lifecycle stage, with the OCI
//! state JSON on stdin. runc gives poststop no pid, and a failing poststop hook stops
//! the others and fails `runc delete`: poststop therefore logs and succeeds.

use std::io::Read;

use serde::Deserialize;

use crate::config::Config;
use crate::create::Target;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::state::store::{self, ContainerState, Store};
use crate::sys::fs::now_rfc3339;

/// runc's state JSON is a few hundred bytes; anything near this is not runc's.
const MAX_STATE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    CreateRuntime,
    Poststart,
    Poststop,
}

impl Stage {
    pub fn parse(s: &str) -> Result<Stage> {
        match s {
            "createRuntime" => Ok(Stage::CreateRuntime),
            "poststart" => Ok(Stage::Poststart),
            "poststop" => Ok(Stage::Poststop),
            _ => Err(Error::Hook(format!(
                "unknown stage {s:?}; valid: createRuntime, poststart, poststop"
            ))),
        }
    }
}

/// The fields of the OCI state we use.
#[derive(Debug, Deserialize)]
pub struct OciState {
    pub id: String,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub bundle: Option<std::path::PathBuf>,
}

pub fn read_state(mut input: impl Read) -> Result<OciState> {
    let mut buf = Vec::new();
    input
        .by_ref()
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::Hook(format!("reading the OCI state from stdin: {e}")))?;
    if buf.len() as u64 > MAX_STATE_BYTES {
        return Err(Error::Hook(format!(
            "OCI state on stdin is larger than {MAX_STATE_BYTES} bytes"
        )));
    }
    let s: OciState = serde_json::from_slice(&buf).map_err(|e| {
        Error::Hook(format!(
            "stdin is not an OCI state JSON object with an \"id\": {e}"
        ))
    })?;
    store::check_id(&s.id).map_err(|e| match e {
        Error::Args(m) => Error::Hook(format!("OCI state on stdin: {m}")),
        other => other,
    })?;
    Ok(s)
}

/// Run one stage for a container created in `namespace`.
pub fn run(cfg: &Config, stage: Stage, namespace: &str, st: &OciState) -> Result<()> {
    store::check_namespace(namespace)?;
    let store = &Store::of(cfg);
    let host = &Host::system(&cfg.runtime.runc);
    match stage {
        Stage::Poststop => {
            // Second line after the wrapper's delete: stop the sidecar, then release.
            let stopped = crate::sidecar::control::teardown(store, host, namespace, &st.id);
            store.remove(namespace, &st.id)?;
            stopped?;
        }
        Stage::CreateRuntime => {
            let state = match store.read(namespace, &st.id)? {
                Some(s) => Some(s),
                // No state: either the container asked for no proxy, or there is no
                // wrapper (hooks-only registration): decide now, without the spec.
                None => hooks_only_create(cfg, namespace, st)?,
            };
            if let Some(mut s) = state {
                s.init_pid = st.pid;
                store.write(&s)?;
                crate::sidecar::control::ingress_filter(&s)?;
            }
        }
        Stage::Poststart => {
            let Some(mut s) = store.read(namespace, &st.id)? else {
                return Ok(());
            };
            // Without an ingress filter there is no createRuntime hook: the pid is
            // recorded here, in the same write.
            if s.init_pid.is_none() {
                s.init_pid = st.pid;
            }
            s.started_at = Some(now_rfc3339());
            store.write(&s)?;
            // A network configured before create (CRI, nerdctl): mapped now. Under
            // runc 1.1 poststart runs at the end of `create`, before `ctr run --cni`
            // or Garden configure the network: then the supervisor maps it when the
            // address appears (rtnetlink). It also retries whatever fails here.
            if let Some(pid) = s.init_pid.or(st.pid)
                && let Err(e) =
                    crate::sidecar::control::map_if_addressed(store, host.nat.as_ref(), &s, pid)
            {
                tracing::warn!(
                    "poststart: NAT for {namespace}/{}: {} (the supervisor retries)",
                    st.id,
                    crate::error::render(&e)
                );
            }
            crate::sidecar::control::launch(
                host.procs.as_ref(),
                cfg.source.as_deref(),
                store,
                namespace,
                &st.id,
            )?;
        }
    }
    Ok(())
}

/// Hooks-only mode (podman/CRI-O hooks.d): allocate ports and record the container
/// as the wrapper would, leaving the spec (env, mounts, memory) as it is.
fn hooks_only_create(
    cfg: &Config,
    namespace: &str,
    st: &OciState,
) -> Result<Option<ContainerState>> {
    let Some(bundle) = &st.bundle else {
        return Ok(None);
    };
    let cli =
        std::env::current_exe().map_err(|e| Error::Hook(format!("locating envoy-sidecar: {e}")))?;
    let target = Target {
        namespace,
        id: &st.id,
        bundle,
        cli: &cli,
        runc_root: None,
        mutate_spec: false,
        hooks_in_spec: true,
    };
    Ok(match crate::create::prepare(cfg, &target, || false)? {
        crate::create::Prepared::Proxy(s) => Some(s),
        // A pod's container: the pod's Envoy serves its netns.
        crate::create::Prepared::Member { .. } | crate::create::Prepared::Nothing => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::tests::{sample, tempdir};

    #[test]
    fn stages_update_and_release() {
        let root = tempdir("hook");
        let store = Store::new(&root);
        let mut cfg = Config::default();
        cfg.runtime.state_dir = root.clone();
        crate::state::store::tests::record(
            &store,
            &sample("default", "c1", &root, (61001, Some(61002))),
        );
        let st = read_state(
            &br#"{"ociVersion":"1.0.2","id":"c1","pid":4242,"status":"created","bundle":"/b"}"#[..],
        )
        .unwrap();
        run(&cfg, Stage::CreateRuntime, "default", &st).unwrap();
        assert_eq!(
            store.read("default", "c1").unwrap().unwrap().init_pid,
            Some(4242)
        );
        run(&cfg, Stage::Poststop, "default", &st).unwrap();
        run(&cfg, Stage::Poststop, "default", &st).unwrap();
        assert!(store.read("default", "c1").unwrap().is_none());
        // Containers the wrapper did not touch are no-ops.
        run(&cfg, Stage::CreateRuntime, "default", &st).unwrap();
        assert!(store.read("default", "c1").unwrap().is_none());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_input() {
        assert!(
            read_state(&b"not json"[..])
                .unwrap_err()
                .to_string()
                .contains("OCI state")
        );
        assert!(read_state(&br#"{"id":"../x"}"#[..]).is_err());
        assert!(
            read_state(&vec![b' '; 2 << 20][..])
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
        assert!(
            Stage::parse("prestart")
                .unwrap_err()
                .to_string()
                .contains("poststop")
        );
        let root = tempdir("hook-ns");
        let st = read_state(&br#"{"id":"c1"}"#[..]).unwrap();
        let mut cfg = Config::default();
        cfg.runtime.state_dir = root.clone();
        assert!(run(&cfg, Stage::Poststop, "../etc", &st).is_err());
        std::fs::remove_dir_all(root).unwrap();
    }
}
