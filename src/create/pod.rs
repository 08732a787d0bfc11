//! Kubernetes pods under CRI: the pod's sandbox and every container in it share one
//! network namespace, so the proxy belongs to the pod — one record, one Envoy, one set
//! of ports, keyed by the sandbox id — and the pod's containers ("members") take their
//! `CF_INSTANCE_*` and credentials from it.
//!
//! containerd's CRI plugin marks each spec with the annotations below (containerd
//! `internal/cri/annotations`, the same keys in 1.6, 1.7 and 2.x).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::state::store::{self, ContainerState};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

/// What a spec is to the engine that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not a CRI spec (ctr, nerdctl, Garden, podman): a container with a netns of its own.
    Standalone,
    /// A CRI pod sandbox (the pause container): owner of the pod's proxy.
    Sandbox { pod_name: Option<String> },
    /// A container of the CRI pod whose sandbox is `sandbox_id`.
    Member {
        sandbox_id: String,
        name: Option<String>,
    },
}

impl Role {
    pub fn of(a: &BTreeMap<String, String>) -> Result<Role> {
        let Some(kind) = a.get(CONTAINER_TYPE) else {
            return Ok(Role::Standalone);
        };
        let short = |k: &str| {
            a.get(k)
                .filter(|v| !v.is_empty())
                .map(|v| v.chars().take(253).collect::<String>())
        };
        match kind.as_str() {
            "sandbox" => Ok(Role::Sandbox {
                pod_name: match (short(SANDBOX_NAMESPACE), short(SANDBOX_NAME)) {
                    (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                    (None, Some(n)) => Some(n),
                    _ => None,
                },
            }),
            "container" => {
                let sandbox_id = a.get(SANDBOX_ID).ok_or_else(|| {
                    crate::create::annotations::bad(
                        CONTAINER_TYPE,
                        kind,
                        format!("a CRI container spec needs {SANDBOX_ID} naming its pod sandbox"),
                    )
                })?;
                store::check_id(sandbox_id).map_err(|e| {
                    crate::create::annotations::bad(SANDBOX_ID, sandbox_id, e.to_string())
                })?;
                Ok(Role::Member {
                    sandbox_id: sandbox_id.clone(),
                    name: short(CONTAINER_NAME),
                })
            }
            other => Err(crate::create::annotations::bad(
                CONTAINER_TYPE,
                other,
                "valid: \"sandbox\" or \"container\" (containerd's CRI plugin)",
            )),
        }
    }
}

/// The ports a member declares that the pod's proxy does not cover (empty: covered).
pub fn uncovered(pod: &ContainerState, declared: &[u16]) -> Vec<u16> {
    declared
        .iter()
        .copied()
        .filter(|p| !pod.ports.iter().any(|m| m.internal == *p))
        .collect()
}

/// The refusal of a member whose ports the pod's proxy does not cover.
pub fn not_covered(pod: &ContainerState, member: &str, missing: &[u16]) -> Error {
    let list =
        |v: &mut dyn Iterator<Item = u16>| v.map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    Error::Pod(format!(
        "container {member} declares port(s) {} that the proxy of its pod {} does not cover \
         (it proxies {}); a pod has one proxy with its ports fixed when it is set up: \
         declare every port on the pod (annotation envoy-sidecar/ports on the pod, with \
         pod_annotations = [\"envoy-sidecar/*\"] in the runtime handler), or on the first \
         container",
        list(&mut missing.iter().copied()),
        pod.id,
        list(&mut pod.ports.iter().map(|m| m.internal)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn roles_from_cri_annotations() {
        assert_eq!(Role::of(&ann(&[])).unwrap(), Role::Standalone);
        assert_eq!(
            Role::of(&ann(&[
                (CONTAINER_TYPE, "sandbox"),
                (SANDBOX_NAME, "web"),
                (SANDBOX_NAMESPACE, "shop")
            ]))
            .unwrap(),
            Role::Sandbox {
                pod_name: Some("shop/web".into())
            }
        );
        assert_eq!(
            Role::of(&ann(&[
                (CONTAINER_TYPE, "container"),
                (SANDBOX_ID, "abc123"),
                (CONTAINER_NAME, "app")
            ]))
            .unwrap(),
            Role::Member {
                sandbox_id: "abc123".into(),
                name: Some("app".into())
            }
        );
    }

    #[test]
    fn bad_cri_annotations_name_the_key() {
        let e = Role::of(&ann(&[(CONTAINER_TYPE, "pod")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(CONTAINER_TYPE) && e.contains("\"sandbox\""),
            "{e}"
        );
        let e = Role::of(&ann(&[(CONTAINER_TYPE, "container")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(SANDBOX_ID), "{e}");
        let e = Role::of(&ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "../x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(SANDBOX_ID), "{e}");
    }

    #[test]
    fn coverage_and_its_refusal() {
        let root = crate::state::store::tests::tempdir("pod-cover");
        let s = crate::state::store::tests::sample("k8s.io", "sb1", &root, (61011, None));
        assert!(uncovered(&s, &[8080]).is_empty());
        assert_eq!(uncovered(&s, &[8080, 9090]), vec![9090]);
        let e = not_covered(&s, "c2", &[9090]).to_string();
        assert!(
            e.contains("9090") && e.contains("sb1") && e.contains("proxies 8080"),
            "{e}"
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
