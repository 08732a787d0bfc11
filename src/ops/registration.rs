//! The containerd CRI registration: the drop-in that defines the runtime handler
//! `envoy-sidecar`, written in the config version the host's containerd speaks, and
//! the proof that containerd loaded it (from `containerd config dump`).
//!
//! What containerd does with a drop-in (read in its sources, see docs/ENGINES.md):
//! - 1.6 and 1.7 speak config version 2; CRI's runtimes live under
//!   `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<name>`.
//! - 2.x speaks version 3; CRI's runtimes moved to
//!   `plugins."io.containerd.cri.v1.runtime".containerd.runtimes.<name>`. An imported
//!   file is migrated from its own `version`: without a `version` line it counts as
//!   version 1 and its version-2 tables are dropped ("Ignoring unknown key in TOML").

use std::path::Path;

/// The handler's name (a RuntimeClass's `handler`).
pub const HANDLER: &str = "envoy-sidecar";
/// Where the drop-in points containerd's runc shim unless told otherwise.
pub const DEFAULT_BINARY: &str = "/usr/local/bin/envoy-sidecar-runc";

const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";

/// A containerd configuration version (the `version` line of its TOML).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVersion {
    /// containerd 1.6 and 1.7.
    V2,
    /// containerd 2.x.
    V3,
}

impl ConfigVersion {
    /// For a containerd of this major version.
    pub fn for_major(major: u32) -> ConfigVersion {
        if major >= 2 {
            ConfigVersion::V3
        } else {
            ConfigVersion::V2
        }
    }

    pub fn number(self) -> u32 {
        match self {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        }
    }
}

/// `(major, minor, patch)` from `containerd --version`'s line, e.g.
/// `containerd github.com/containerd/containerd/v2 2.1.9+unknown` or
/// `containerd containerd.io 1.7.24 88bf19b`.
pub fn parse_containerd_version(line: &str) -> Option<(u32, u32, u32)> {
    line.split_whitespace().skip(1).find_map(|w| {
        let w = w.strip_prefix('v').unwrap_or(w);
        let mut it = w.split(|c: char| !c.is_ascii_digit());
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        // The version word starts with its digits ("1.6.20~ds1"), a path does not.
        w.starts_with(|c: char| c.is_ascii_digit())
            .then_some((major, minor, patch))
    })
}

/// The drop-in text for `version`, with the runc shim running `binary`.
pub fn drop_in(version: ConfigVersion, binary: &str) -> String {
    let (plugin, who) = match version {
        ConfigVersion::V2 => (CRI_V2, "containerd 1.6/1.7"),
        ConfigVersion::V3 => (CRI_V3, "containerd 2.x"),
    };
    let table = format!("plugins.\"{plugin}\".containerd.runtimes.{HANDLER}");
    format!(
        "# {who} (config version {n}) drop-in, written by `envoy-sidecar install`: a CRI\n\
         # runtime handler \"{HANDLER}\" that is the runc shim running envoy-sidecar-runc\n\
         # instead of runc. Kubernetes selects it with a RuntimeClass whose handler is\n\
         # \"{HANDLER}\". The version line makes containerd read the tables below in that\n\
         # version's layout (2.x migrates a version-2 file; without the line it ignores it).\n\
         version = {n}\n\
         \n\
         [{table}]\n\
         \x20 runtime_type = \"io.containerd.runc.v2\"\n\
         \x20 pod_annotations = [\"envoy-sidecar/*\"]\n\
         \x20 container_annotations = [\"envoy-sidecar/*\"]\n\
         \x20 [{table}.options]\n\
         \x20   BinaryName = {binary:?}\n",
        n = version.number(),
    )
}

/// The Kubernetes RuntimeClass of the handler, with the pod's proxy allocation as its
/// fixed overhead: the scheduler adds it to the pod's requests and the kubelet to the
/// pod cgroup's limit (Pod Overhead, stable since Kubernetes 1.24), which is where the
/// pod's Envoy runs (the sandbox's cgroup). `additional_mb`: the configured
/// `proxy.additional_memory_allocation_mb`.
pub fn runtime_class(additional_mb: u64) -> String {
    format!(
        "# Kubernetes RuntimeClass for the \"{HANDLER}\" CRI handler that `envoy-sidecar install`\n\
         # registers. overhead.podFixed.memory must equal proxy.additional_memory_allocation_mb\n\
         # (`envoy-sidecar recommend-memory --connections N --runtime-class` prints it for a\n\
         # load): the pod's one Envoy runs in its sandbox's cgroup, inside the pod cgroup the\n\
         # kubelet sizes as the containers' limits plus this overhead. Containers' own limits\n\
         # are not raised under Kubernetes.\n\
         apiVersion: node.k8s.io/v1\n\
         kind: RuntimeClass\n\
         metadata:\n\
         \x20 name: {HANDLER}\n\
         handler: {HANDLER}\n\
         overhead:\n\
         \x20 podFixed:\n\
         \x20   memory: \"{additional_mb}Mi\"\n"
    )
}

/// What `containerd config dump` says of the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// Defined, with the runc shim's `BinaryName` (None: plain runc).
    Yes { binary: Option<String> },
    /// Not defined; why, as far as the dump and containerd's log tell.
    No { reason: String },
}

/// The verdict from a dump (stdout, TOML) and containerd's log lines (stderr) for a
/// drop-in at `drop_in` that containerd should have imported.
pub fn loaded(dump: &str, log: &str, drop_in: &Path) -> Loaded {
    let Ok(v) = dump.parse::<toml::Table>() else {
        return Loaded::No {
            reason: format!(
                "`containerd config dump` printed no TOML: {}",
                first_line(log)
            ),
        };
    };
    for plugin in [CRI_V3, CRI_V2] {
        let h = v
            .get("plugins")
            .and_then(|p| p.get(plugin))
            .and_then(|p| p.get("containerd"))
            .and_then(|c| c.get("runtimes"))
            .and_then(|r| r.get(HANDLER));
        if let Some(h) = h {
            // containerd 1.6/1.7 replace a whole plugin section on import: a drop-in
            // imported beside a config.toml with its own CRI section takes the default
            // runtime (and sandbox image, CNI) with it, and CRI then fails to start.
            let cri = &v["plugins"][plugin];
            let default = cri
                .get("containerd")
                .and_then(|c| c.get("default_runtime_name"))
                .and_then(|d| d.as_str())
                .unwrap_or("runc");
            if default != HANDLER && cri["containerd"]["runtimes"].get(default).is_none() {
                return Loaded::No {
                    reason: format!(
                        "runtime {HANDLER:?} is defined but containerd's default runtime {default:?} \
                         is gone: containerd 1.6/1.7 replace a whole plugin section on import, so \
                         {} replaced config.toml's CRI section; paste its tables into config.toml \
                         instead of importing it",
                        drop_in.display()
                    ),
                };
            }
            let binary = h
                .get("options")
                .and_then(|o| o.get("BinaryName"))
                .and_then(|b| b.as_str())
                .filter(|b| !b.is_empty())
                .map(str::to_string);
            return Loaded::Yes { binary };
        }
    }
    let shown = drop_in.display();
    if let Some(l) = log
        .lines()
        .find(|l| l.contains("Ignoring unknown key") && l.contains(HANDLER))
    {
        return Loaded::No {
            reason: format!(
                "containerd read {shown} but ignored its tables (written for another config \
                 version, or without a `version` line); re-run `envoy-sidecar install` for this \
                 containerd. containerd said: {}",
                l.trim()
            ),
        };
    }
    let imports: Vec<String> = v
        .get("imports")
        .and_then(|i| i.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if !imports.iter().any(|i| i.as_str() == shown.to_string()) {
        return Loaded::No {
            reason: format!(
                "containerd does not import {shown} (its imports: {imports:?}); add \
                 `imports = [\"{}/*.toml\"]` to containerd's config.toml (containerd 1.6: paste \
                 the drop-in's tables into config.toml instead) and restart containerd",
                drop_in
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        };
    }
    Loaded::No {
        reason: format!(
            "containerd imports {shown} but defines no runtime {HANDLER:?} from it (a \
             containerd 1.6 import replaces a whole plugin section: paste the tables into \
             config.toml)"
        ),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_containerd() {
        let p = parse_containerd_version;
        assert_eq!(
            p("containerd github.com/containerd/containerd/v2 2.1.9+unknown "),
            Some((2, 1, 9))
        );
        assert_eq!(
            p("containerd github.com/containerd/containerd 1.6.20~ds1 "),
            Some((1, 6, 20))
        );
        assert_eq!(
            p("containerd containerd.io v1.7.24 88bf19b2105c8b17560993bee28a01ddc2f97182"),
            Some((1, 7, 24))
        );
        assert_eq!(p("containerd"), None);
        assert_eq!(p(""), None);
        assert_eq!(ConfigVersion::for_major(1), ConfigVersion::V2);
        assert_eq!(ConfigVersion::for_major(2), ConfigVersion::V3);
    }

    #[test]
    fn drop_ins_parse_and_carry_the_binary() {
        for (v, plugin) in [(ConfigVersion::V2, CRI_V2), (ConfigVersion::V3, CRI_V3)] {
            let t: toml::Table = drop_in(v, "/opt/es/envoy-sidecar-runc").parse().unwrap();
            assert_eq!(t["version"].as_integer(), Some(i64::from(v.number())));
            let h = &t["plugins"][plugin]["containerd"]["runtimes"][HANDLER];
            assert_eq!(h["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
            assert_eq!(
                h["options"]["BinaryName"].as_str(),
                Some("/opt/es/envoy-sidecar-runc")
            );
            assert_eq!(h["pod_annotations"][0].as_str(), Some("envoy-sidecar/*"));
            // What `containerd config dump` would show for it (beside runc) is recognised.
            let dump = format!(
                "{}\n[plugins.\"{plugin}\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n",
                drop_in(v, DEFAULT_BINARY)
            );
            assert_eq!(
                loaded(
                    &dump,
                    "",
                    Path::new("/etc/containerd/conf.d/envoy-sidecar.toml")
                ),
                Loaded::Yes {
                    binary: Some(DEFAULT_BINARY.into())
                }
            );
        }
    }

    #[test]
    fn reasons_when_not_loaded() {
        let d = Path::new("/etc/containerd/conf.d/envoy-sidecar.toml");
        let log = "time=\"2026-12-07\" level=warning msg=\"Ignoring unknown key in TOML for plugin\" \
                   error=\"strict mode: fields in the document are missing in the target struct\" \
                   key=\"containerd runtimes envoy-sidecar\" plugin=io.containerd.grpc.v1.cri";
        let dump = "version = 3\nimports = [\"/etc/containerd/conf.d/envoy-sidecar.toml\"]\n";
        match loaded(dump, log, d) {
            Loaded::No { reason } => {
                assert!(reason.contains("ignored its tables"), "{reason}");
                assert!(reason.contains(&d.display().to_string()), "{reason}");
            }
            y => panic!("{y:?}"),
        }
        match loaded("version = 3\nimports = []\n", "", d) {
            Loaded::No { reason } => {
                assert!(reason.contains("does not import"), "{reason}");
                assert!(reason.contains("/etc/containerd/conf.d/*.toml"), "{reason}");
            }
            y => panic!("{y:?}"),
        }
        match loaded(dump, "", d) {
            Loaded::No { reason } => assert!(reason.contains("1.6"), "{reason}"),
            y => panic!("{y:?}"),
        }
        // 1.6/1.7: the import replaced the CRI section; runc went with it.
        let replaced = format!(
            "version = 2\n{}",
            drop_in(ConfigVersion::V2, DEFAULT_BINARY).replace("version = 2\n", "")
        );
        match loaded(&replaced, "", d) {
            Loaded::No { reason } => assert!(reason.contains("\"runc\" is gone"), "{reason}"),
            y => panic!("{y:?}"),
        }
        match loaded("not toml [", "level=fatal msg=boom", d) {
            Loaded::No { reason } => assert!(reason.contains("boom"), "{reason}"),
            y => panic!("{y:?}"),
        }
    }
}
