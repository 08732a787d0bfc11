//! The environment a proxied container's processes see (`CF_INSTANCE_*`).

use crate::state::store::ContainerState;

/// Where the instance identity credentials are mounted in the container.
pub const CREDENTIALS_MOUNT: &str = "/etc/cf-instance-credentials";

/// Environment the app (and every later `exec`) sees; recomputed from the state so
/// that create and exec agree by construction.
pub fn env_vars(s: &ContainerState) -> Vec<(String, String)> {
    let mut v = vec![(
        "CF_INSTANCE_PORTS".to_string(),
        serde_json::to_string(&s.ports).expect("ports serialise"),
    )];
    v.push(("CF_INSTANCE_IP".into(), s.host_ip.to_string()));
    if let Some(ext) = s.ports.first().and_then(|p| p.external) {
        v.push(("CF_INSTANCE_PORT".into(), ext.to_string()));
        v.push(("CF_INSTANCE_ADDR".into(), format!("{}:{ext}", s.host_ip)));
    }
    v.push((
        "CF_INSTANCE_CERT".into(),
        format!("{CREDENTIALS_MOUNT}/instance.crt"),
    ));
    v.push((
        "CF_INSTANCE_KEY".into(),
        format!("{CREDENTIALS_MOUNT}/instance.key"),
    ));
    v
}
