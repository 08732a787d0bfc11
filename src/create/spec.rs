//! Reading and patching an OCI runtime spec (`config.json`) or an exec process file as a
//! JSON tree. Going through typed structs would drop fields newer runtimes added; here
//! only the paths we change are touched and everything else survives byte-for-byte in
//! meaning (and in key order, thanks to serde_json's `preserve_order`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::error::{Error, IoContext, Result};
use crate::state::store::User;
use crate::sys::fs as fsutil;

/// Upper bound on a spec file we are willing to parse (runc's are a few KiB).
const MAX_SPEC_BYTES: u64 = 16 << 20;

/// Where a spec puts the container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetTarget {
    /// A namespace runc makes for it (no `path`): nothing else can be in it yet.
    Fresh,
    /// No network namespace entry: the host's (`nerdctl --network host`).
    Host,
    /// An existing namespace: a bind mount (`ctr --cni`, CNI, CRI) or another
    /// container's `/proc/<pid>/ns/net` (`nerdctl --network container:<id>`).
    Path(PathBuf),
}

pub struct JsonFile {
    pub path: PathBuf,
    pub value: Value,
    mode: u32,
}

/// Whether runc refuses this spec file by itself: missing, or (within the size we
/// read) not a JSON object — empty, truncated, `null`, garbage.
pub fn runc_refuses(path: &Path) -> bool {
    match std::fs::read(path) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(b) if b.len() as u64 > MAX_SPEC_BYTES => false,
        Ok(b) => !serde_json::from_slice::<Value>(&b).is_ok_and(|v| v.is_object()),
    }
}

impl JsonFile {
    /// A spec or process file on disk: a regular file of bounded size.
    pub fn load(path: &Path) -> Result<JsonFile> {
        Self::load_from(path, true)
    }

    /// Also a pipe (Garden's dadoo hands the exec process spec over on one).
    pub fn load_stream(path: &Path) -> Result<JsonFile> {
        Self::load_from(path, false)
    }

    fn load_from(path: &Path, regular_only: bool) -> Result<JsonFile> {
        let meta = std::fs::metadata(path).at(path)?;
        let bytes = fsutil::read_bounded(path, MAX_SPEC_BYTES, regular_only)
            .map_err(|e| spec_err(path, format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| spec_err(path, format!("invalid JSON: {e}")))?;
        if !value.is_object() {
            return Err(spec_err(path, "top level is not a JSON object"));
        }
        Ok(JsonFile {
            path: path.to_path_buf(),
            value,
            mode: meta.permissions().mode() & 0o7777,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.value).expect("JSON value serialises")
    }

    pub fn save(&self) -> Result<()> {
        fsutil::write_atomic(&self.path, &self.to_bytes(), self.mode)
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        spec_err(&self.path, msg)
    }

    /// `annotations` as strings; a non-string value is an error (the OCI spec says
    /// `map[string]string`).
    pub fn annotations(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        match self.value.get("annotations") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let v = v
                        .as_str()
                        .ok_or_else(|| self.err(format!("annotation {k:?} is not a string")))?;
                    out.insert(k.clone(), v.to_string());
                }
            }
            Some(_) => return Err(self.err("\"annotations\" is not an object")),
        }
        Ok(out)
    }

    /// The network namespace the spec puts the container in (`linux.namespaces`).
    pub fn network_namespace(&self) -> Result<NetTarget> {
        let ns = self.value.pointer("/linux/namespaces");
        let list = match ns {
            None | Some(Value::Null) => return Ok(NetTarget::Host),
            Some(Value::Array(l)) => l,
            Some(_) => return Err(self.err("\"linux.namespaces\" is not an array")),
        };
        let Some(net) = list
            .iter()
            .find(|n| n.get("type") == Some(&json!("network")))
        else {
            return Ok(NetTarget::Host);
        };
        match net.get("path") {
            None | Some(Value::Null) => Ok(NetTarget::Fresh),
            Some(Value::String(p)) if p.is_empty() => Ok(NetTarget::Fresh),
            Some(Value::String(p)) => Ok(NetTarget::Path(PathBuf::from(p))),
            Some(_) => Err(self.err("the network namespace's \"path\" is not a string")),
        }
    }

    pub fn set_annotation(&mut self, key: &str, value: &str) -> Result<()> {
        let path = self.path.clone();
        let m = object_at(&mut self.value, &["annotations"]).map_err(|m| spec_err(&path, m))?;
        m.insert(key.into(), Value::String(value.into()));
        Ok(())
    }

    /// The process object: the top level of an exec process file, `process` of a spec.
    fn process_mut(&mut self, is_spec: bool) -> Result<&mut Map<String, Value>> {
        let path = self.path.clone();
        let v = if is_spec {
            match self.value.get_mut("process") {
                Some(p @ Value::Object(_)) => p,
                _ => return Err(spec_err(&path, "\"process\" is missing or not an object")),
            }
        } else {
            &mut self.value
        };
        Ok(v.as_object_mut().expect("checked above"))
    }

    pub fn env(&self, is_spec: bool) -> Result<Vec<String>> {
        let p = if is_spec {
            self.value.get("process")
        } else {
            Some(&self.value)
        };
        match p.and_then(|p| p.get("env")) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.err("process.env holds a non-string entry"))
                })
                .collect(),
            Some(_) => Err(self.err("process.env is not an array")),
        }
    }

    /// Set `vars` in the process environment. Entries named in `replace` are removed
    /// first (our own from an earlier patch); any other existing entry of the same
    /// name is kept when `keep_existing`, else it is an error.
    pub fn merge_env(
        &mut self,
        is_spec: bool,
        vars: &[(String, String)],
        replace: &[String],
        keep_existing: bool,
    ) -> Result<()> {
        let mut env = self.env(is_spec)?;
        let name_of = |e: &str| e.split('=').next().unwrap_or("").to_string();
        env.retain(|e| !replace.contains(&name_of(e)));
        for (k, v) in vars {
            if env.iter().any(|e| name_of(e) == *k) {
                if keep_existing {
                    continue;
                }
                return Err(self.err(format!(
                    "process.env already sets {k}, which envoy-sidecar provides; \
                     remove it from the container's environment (or opt out with envoy-sidecar/enabled=false)"
                )));
            }
            env.push(format!("{k}={v}"));
        }
        let p = self.process_mut(is_spec)?;
        p.insert(
            "env".into(),
            Value::Array(env.into_iter().map(Value::String).collect()),
        );
        Ok(())
    }

    /// `process.user` uid/gid (0/0 when absent, as runc does).
    pub fn user(&self) -> Result<User> {
        let u = self.value.get("process").and_then(|p| p.get("user"));
        let field = |name: &str| -> Result<u32> {
            match u.and_then(|u| u.get(name)) {
                None | Some(Value::Null) => Ok(0),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| self.err(format!("process.user.{name} is not a uid/gid"))),
            }
        };
        Ok(User {
            uid: field("uid")?,
            gid: field("gid")?,
        })
    }

    /// Bind-mount `source` read-only at `destination`, replacing an earlier mount of
    /// ours (same source) and refusing to shadow a mount the user asked for.
    pub fn set_bind_mount(&mut self, source: &Path, destination: &str) -> Result<()> {
        let path = self.path.clone();
        let mounts = array_at(&mut self.value, "mounts").map_err(|m| spec_err(&path, m))?;
        let src = source.to_string_lossy();
        let mut clash: Option<String> = None;
        mounts.retain(|m| {
            let same_dest = m.get("destination").and_then(Value::as_str) == Some(destination);
            let ours = m.get("source").and_then(Value::as_str) == Some(&*src);
            // Any other mount there is the user's (OCI mounts need no source).
            if same_dest && !ours && clash.is_none() {
                clash = Some(match m.get("source").and_then(Value::as_str) {
                    Some(other) => other.to_string(),
                    None => format!(
                        "a {} mount",
                        m.get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("source-less")
                    ),
                });
            }
            !ours
        });
        if let Some(other) = clash {
            return Err(spec_err(
                &path,
                format!(
                    "mounts: {destination} is already mounted from {other}; envoy-sidecar mounts the instance credentials there"
                ),
            ));
        }
        mounts.push(json!({
            "destination": destination,
            "type": "bind",
            "source": src,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        }));
        Ok(())
    }

    /// `linux.resources.memory.{limit,swap}`; `None` = not set (unlimited).
    pub fn memory(&self) -> Result<(Option<i64>, Option<i64>)> {
        let m = self
            .value
            .pointer("/linux/resources/memory")
            .filter(|v| !v.is_null());
        let field = |name: &str| -> Result<Option<i64>> {
            match m.and_then(|m| m.get(name)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                    self.err(format!("linux.resources.memory.{name} is not an integer"))
                }),
            }
        };
        Ok((field("limit")?, field("swap")?))
    }

    pub fn set_memory(&mut self, limit: Option<i64>, swap: Option<i64>) -> Result<()> {
        let path = self.path.clone();
        let m = object_at(&mut self.value, &["linux", "resources", "memory"])
            .map_err(|e| spec_err(&path, e))?;
        for (k, v) in [("limit", limit), ("swap", swap)] {
            match v {
                Some(v) => {
                    m.insert(k.into(), json!(v));
                }
                None => {
                    m.remove(k);
                }
            }
        }
        Ok(())
    }

    /// Add our hook at `stage`, first or last, after dropping any earlier hook of ours
    /// (same executable) so that a second `create` on one bundle does not add it twice.
    /// Remove our entry (same `path` as `hook`) from `stage`, if there is one (a
    /// re-create of a bundle whose earlier patch registered it).
    pub fn remove_hook(&mut self, stage: &str, hook: &Value) -> Result<()> {
        let ours = &hook["path"];
        if let Some(list) = self
            .value
            .get_mut("hooks")
            .and_then(|h| h.get_mut(stage))
            .and_then(Value::as_array_mut)
        {
            list.retain(|h| h.get("path") != Some(ours));
        }
        Ok(())
    }

    pub fn set_hook(&mut self, stage: &str, hook: Value, first: bool) -> Result<()> {
        let path = self.path.clone();
        let ours = hook["path"].clone();
        let hooks = object_at(&mut self.value, &["hooks"]).map_err(|e| spec_err(&path, e))?;
        let list = hooks
            .entry(stage.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if list.is_null() {
            *list = Value::Array(Vec::new());
        }
        let list = list
            .as_array_mut()
            .ok_or_else(|| spec_err(&path, format!("hooks.{stage} is not an array")))?;
        list.retain(|h| h.get("path") != Some(&ours));
        if first {
            list.insert(0, hook);
        } else {
            list.push(hook);
        }
        Ok(())
    }
}

fn spec_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Spec {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The object at `keys`, creating empty objects on the way (and replacing `null`).
fn object_at<'a>(
    mut v: &'a mut Value,
    keys: &[&str],
) -> std::result::Result<&'a mut Map<String, Value>, String> {
    for (i, k) in keys.iter().enumerate() {
        let obj = v
            .as_object_mut()
            .ok_or_else(|| format!("{} is not an object", keys[..i].join(".")))?;
        let next = obj.entry(k.to_string()).or_insert_with(|| json!({}));
        if next.is_null() {
            *next = json!({});
        }
        v = next;
    }
    let name = keys.join(".");
    v.as_object_mut()
        .ok_or_else(|| format!("{name} is not an object"))
}

fn array_at<'a>(v: &'a mut Value, key: &str) -> std::result::Result<&'a mut Vec<Value>, String> {
    let obj = v.as_object_mut().ok_or("top level is not an object")?;
    let a = obj.entry(key.to_string()).or_insert_with(|| json!([]));
    if a.is_null() {
        *a = json!([]);
    }
    a.as_array_mut()
        .ok_or_else(|| format!("{key} is not an array"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(v: Value) -> JsonFile {
        JsonFile {
            path: "/b/config.json".into(),
            value: v,
            mode: 0o644,
        }
    }

    #[test]
    fn unknown_fields_survive() {
        let mut f = file(json!({
            "ociVersion": "1.2.0",
            "process": {"args": ["sh"], "env": ["A=1"], "futureField": {"x": 1}},
            "linux": {"resources": {"memory": {"limit": 100, "kernelTCP": 5}}, "newThing": [1]},
            "zzz": true
        }));
        f.merge_env(true, &[("B".into(), "2".into())], &[], false)
            .unwrap();
        f.set_memory(Some(200), None).unwrap();
        assert_eq!(f.value["process"]["futureField"], json!({"x": 1}));
        assert_eq!(f.value["linux"]["newThing"], json!([1]));
        assert_eq!(
            f.value["linux"]["resources"]["memory"]["kernelTCP"],
            json!(5)
        );
        assert_eq!(f.value["linux"]["resources"]["memory"]["limit"], json!(200));
        assert_eq!(f.value["zzz"], json!(true));
        assert_eq!(f.value["process"]["env"], json!(["A=1", "B=2"]));
        let keys: Vec<&String> = f.value.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ociVersion", "process", "linux", "zzz"]);
    }

    #[test]
    fn env_precedence() {
        let mut f = file(json!({"process": {"env": ["CF_INSTANCE_PORTS=mine"]}}));
        let vars = [("CF_INSTANCE_PORTS".to_string(), "[]".to_string())];
        let e = f
            .merge_env(true, &vars, &[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CF_INSTANCE_PORTS"), "{e}");
        // An exec process that sets it explicitly keeps its value.
        f.merge_env(true, &vars, &[], true).unwrap();
        assert_eq!(f.value["process"]["env"], json!(["CF_INSTANCE_PORTS=mine"]));
        // Our own earlier value is replaced.
        f.merge_env(true, &vars, &["CF_INSTANCE_PORTS".into()], false)
            .unwrap();
        assert_eq!(f.value["process"]["env"], json!(["CF_INSTANCE_PORTS=[]"]));
    }

    #[test]
    fn hooks_idempotent_and_ordered() {
        let theirs = json!({"path": "/usr/local/bin/nerdctl", "args": ["nerdctl", "oci-hook", "createRuntime"]});
        let mut f = file(
            json!({"hooks": {"createRuntime": [theirs.clone()], "poststop": [theirs.clone()]}}),
        );
        let ours =
            json!({"path": "/usr/local/bin/envoy-sidecar", "args": ["envoy-sidecar", "hook"]});
        for _ in 0..2 {
            f.set_hook("createRuntime", ours.clone(), false).unwrap();
            f.set_hook("poststop", ours.clone(), true).unwrap();
        }
        assert_eq!(
            f.value["hooks"]["createRuntime"],
            json!([theirs.clone(), ours.clone()])
        );
        assert_eq!(f.value["hooks"]["poststop"], json!([ours, theirs]));
    }

    #[test]
    fn mounts_replace_ours_refuse_theirs() {
        let mut f =
            file(json!({"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}));
        for _ in 0..2 {
            f.set_bind_mount(
                Path::new("/run/es/c/credentials"),
                "/etc/cf-instance-credentials",
            )
            .unwrap();
        }
        assert_eq!(f.value["mounts"].as_array().unwrap().len(), 2);
        let mut g = file(
            json!({"mounts": [{"destination": "/etc/cf-instance-credentials", "source": "/elsewhere"}]}),
        );
        let e = g
            .set_bind_mount(
                Path::new("/run/es/c/credentials"),
                "/etc/cf-instance-credentials",
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("/elsewhere"), "{e}");
    }

    #[test]
    fn malformed_inputs_are_named() {
        let f = file(json!({"annotations": {"a": 1}}));
        assert!(f.annotations().unwrap_err().to_string().contains("\"a\""));
        let f = file(json!({"process": {"env": "A=1"}}));
        assert!(f.env(true).unwrap_err().to_string().contains("process.env"));
        let f = file(json!({"linux": {"resources": {"memory": {"limit": "big"}}}}));
        assert!(f.memory().unwrap_err().to_string().contains("memory.limit"));
        let f = file(json!({"process": {"user": {"uid": -1}}}));
        assert!(
            f.user()
                .unwrap_err()
                .to_string()
                .contains("process.user.uid")
        );
        let mut f = file(json!({"hooks": {"poststop": {}}}));
        assert!(f.set_hook("poststop", json!({"path": "/x"}), true).is_err());
    }
}
