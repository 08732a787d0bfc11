//! `envoy-sidecar install` / `uninstall`: binaries, a commented default configuration
//! (never overwriting one), the containerd drop-in for CRI, and the gc timer. Every
//! file install writes is listed in a manifest, so uninstall removes exactly that —
//! never a configuration the operator had before.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::ops::registration::{self, ConfigVersion};

pub const DROP_IN: &str = "etc/containerd/conf.d/envoy-sidecar.toml";
const MANIFEST: &str = "var/lib/envoy-sidecar/installed-files";

const CONFIG: &str = include_str!("../../hooks/config.toml");
const GC_SERVICE: &str = include_str!("../../hooks/envoy-sidecar-gc.service");
const GC_TIMER: &str = include_str!("../../hooks/envoy-sidecar-gc.timer");
const HOOK_CREATE: &str = include_str!("../../hooks/oci-hooks.d/envoy-sidecar-createRuntime.json");
const HOOK_POSTSTART: &str = include_str!("../../hooks/oci-hooks.d/envoy-sidecar-poststart.json");
const HOOK_POSTSTOP: &str = include_str!("../../hooks/oci-hooks.d/envoy-sidecar-poststop.json");

enum Source {
    File(PathBuf),
    Text(&'static str),
    Owned(String),
    Bytes(Vec<u8>),
}

/// What the containerd drop-in says: the config version it is written in (the host's
/// containerd's) and the wrapper the runc shim runs.
#[derive(Debug, Clone)]
pub struct DropIn {
    pub version: ConfigVersion,
    pub binary: String,
    /// How the version was chosen, for the action line.
    pub why: String,
}

impl Default for DropIn {
    fn default() -> DropIn {
        DropIn {
            version: ConfigVersion::V2,
            binary: registration::DEFAULT_BINARY.into(),
            why: "default".into(),
        }
    }
}

struct Item {
    to: String,
    source: Source,
    mode: u32,
    /// Leave an existing file alone (the operator's configuration).
    keep_existing: bool,
}

/// The drop-in for the containerd at `containerd` (a path or a name in PATH): an
/// explicit `config_version` wins; else the version `containerd --version` reports;
/// else version 2 with its `version` line, which 1.6/1.7 read and 2.x migrates.
pub fn drop_in_for(
    containerd: &Path,
    config_version: Option<u32>,
    binary: Option<String>,
) -> DropIn {
    let binary = binary.unwrap_or_else(|| registration::DEFAULT_BINARY.into());
    if let Some(n) = config_version {
        return DropIn {
            version: ConfigVersion::for_major(n.saturating_sub(1)),
            binary,
            why: "--containerd-config-version".into(),
        };
    }
    let line = std::process::Command::new(containerd)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    match line
        .as_deref()
        .and_then(registration::parse_containerd_version)
    {
        Some((major, minor, patch)) => DropIn {
            version: ConfigVersion::for_major(major),
            binary,
            why: format!("{} {major}.{minor}.{patch}", containerd.display()),
        },
        None => DropIn {
            version: ConfigVersion::V2,
            binary,
            why: format!(
                "{} --version gave no version: read by containerd 1.6/1.7, migrated by 2.x",
                containerd.display()
            ),
        },
    }
}

fn items(bin_dir: &Path, drop_in: &DropIn) -> Vec<Item> {
    vec![
        Item {
            to: "usr/local/bin/envoy-sidecar".into(),
            source: Source::File(bin_dir.join(crate::CLI_NAME)),
            mode: 0o755,
            keep_existing: false,
        },
        Item {
            to: "usr/local/bin/envoy-sidecar-runc".into(),
            source: Source::File(bin_dir.join(crate::WRAPPER_NAME)),
            mode: 0o755,
            keep_existing: false,
        },
        Item {
            to: "etc/envoy-sidecar/config.toml".into(),
            source: Source::Text(CONFIG),
            mode: 0o644,
            keep_existing: true,
        },
        Item {
            to: DROP_IN.into(),
            source: Source::Owned(registration::drop_in(drop_in.version, &drop_in.binary)),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "etc/systemd/system/envoy-sidecar-gc.service".into(),
            source: Source::Text(GC_SERVICE),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "etc/systemd/system/envoy-sidecar-gc.timer".into(),
            source: Source::Text(GC_TIMER),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "usr/share/containers/oci/hooks.d/envoy-sidecar-createRuntime.json".into(),
            source: Source::Text(HOOK_CREATE),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "usr/share/containers/oci/hooks.d/envoy-sidecar-poststart.json".into(),
            source: Source::Text(HOOK_POSTSTART),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "usr/share/containers/oci/hooks.d/envoy-sidecar-poststop.json".into(),
            source: Source::Text(HOOK_POSTSTOP),
            mode: 0o644,
            keep_existing: false,
        },
    ]
}

/// Install below `root` (`/` normally; a staging directory for packaging and tests)
/// the binaries found in `bin_dir`. Returns one line per action.
/// `docs`: generated files (completions, man pages), as (path below `root`, bytes).
pub fn install(
    root: &Path,
    bin_dir: &Path,
    drop_in: &DropIn,
    docs: &[(String, Vec<u8>)],
    dry_run: bool,
) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    let mut written = read_manifest(root)?;
    let generated = docs.iter().map(|(to, bytes)| Item {
        to: to.clone(),
        source: Source::Bytes(bytes.clone()),
        mode: 0o644,
        keep_existing: false,
    });
    for it in items(bin_dir, drop_in).into_iter().chain(generated) {
        let to = root.join(&it.to);
        if it.keep_existing && to.exists() && !written.contains(&to) {
            actions.push(format!("keep {} (exists; not overwritten)", to.display()));
            continue;
        }
        if it.to == DROP_IN {
            actions.push(format!(
                "write {} (mode {:o}; containerd config version {}, {}; BinaryName {})",
                to.display(),
                it.mode,
                drop_in.version.number(),
                drop_in.why,
                drop_in.binary
            ));
        } else {
            actions.push(format!("write {} (mode {:o})", to.display(), it.mode));
        }
        if dry_run {
            continue;
        }
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        let bytes = match &it.source {
            Source::File(p) => std::fs::read(p).at(p)?,
            Source::Text(t) => t.as_bytes().to_vec(),
            Source::Owned(t) => t.clone().into_bytes(),
            Source::Bytes(b) => b.clone(),
        };
        // Atomic, so a running container never sees a half-written binary.
        crate::sys::fs::write_atomic(&to, &bytes, it.mode)?;
        if !written.contains(&to) {
            written.push(to);
        }
    }
    if !dry_run {
        write_manifest(root, &written)?;
    }
    let m = root.join(MANIFEST);
    actions.push(format!(
        "{} {}",
        if dry_run { "would record" } else { "recorded" },
        m.display()
    ));
    if !root.join("etc/containerd/config.toml").exists()
        || !std::fs::read_to_string(root.join("etc/containerd/config.toml"))
            .unwrap_or_default()
            .contains("conf.d")
    {
        actions.push(format!(
            "note: containerd reads {} only if its config.toml has `imports = [\"/etc/containerd/conf.d/*.toml\"]`",
            root.join(DROP_IN).display()
        ));
    }
    Ok(actions)
}

/// Remove exactly the files the manifest lists, then the manifest.
pub fn uninstall(root: &Path, dry_run: bool) -> Result<Vec<String>> {
    let files = read_manifest(root)?;
    if files.is_empty() {
        return Err(Error::Io {
            path: root.join(MANIFEST),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no install manifest: nothing installed by `envoy-sidecar install`",
            ),
        });
    }
    let mut actions = Vec::new();
    for f in files.iter().chain(std::iter::once(&root.join(MANIFEST))) {
        actions.push(format!("remove {}", f.display()));
        if !dry_run {
            crate::sys::fs::remove_if_exists(f)?;
        }
    }
    Ok(actions)
}

fn read_manifest(root: &Path) -> Result<Vec<PathBuf>> {
    let m = root.join(MANIFEST);
    match std::fs::read_to_string(&m) {
        Ok(t) => Ok(t
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::Io { path: m, source: e }),
    }
}

fn write_manifest(root: &Path, files: &[PathBuf]) -> Result<()> {
    let m = root.join(MANIFEST);
    if let Some(d) = m.parent() {
        std::fs::create_dir_all(d).at(d)?;
    }
    let text: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
    crate::sys::fs::write_atomic(&m, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninstall_removes_exactly_what_install_added() {
        let root = crate::state::store::tests::tempdir("install");
        let bins = root.join("build");
        std::fs::create_dir_all(&bins).unwrap();
        std::fs::write(bins.join("envoy-sidecar"), b"cli").unwrap();
        std::fs::write(bins.join("envoy-sidecar-runc"), b"wrapper").unwrap();
        // The operator's own configuration exists already.
        let cfg = root.join("etc/envoy-sidecar/config.toml");
        std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
        std::fs::write(&cfg, "[proxy]\nenabled = true\n").unwrap();

        let dry = install(&root, &bins, &DropIn::default(), &[], true).unwrap();
        assert!(
            dry.iter()
                .any(|a| a.contains("keep") && a.contains("config.toml")),
            "{dry:?}"
        );
        assert!(
            !root.join("usr/local/bin/envoy-sidecar").exists(),
            "dry run writes nothing"
        );

        install(&root, &bins, &DropIn::default(), &[], false).unwrap();
        assert_eq!(
            std::fs::read(root.join("usr/local/bin/envoy-sidecar-runc")).unwrap(),
            b"wrapper"
        );
        assert!(root.join(DROP_IN).exists());
        assert_eq!(
            std::fs::read_to_string(&cfg).unwrap(),
            "[proxy]\nenabled = true\n"
        );
        // Installing again (an upgrade) is fine and still keeps the configuration.
        install(&root, &bins, &DropIn::default(), &[], false).unwrap();

        uninstall(&root, false).unwrap();
        assert!(!root.join("usr/local/bin/envoy-sidecar").exists());
        assert!(!root.join(DROP_IN).exists());
        assert!(
            !root
                .join("etc/systemd/system/envoy-sidecar-gc.timer")
                .exists()
        );
        assert!(cfg.exists(), "the operator's configuration stays");
        assert!(
            uninstall(&root, false).is_err(),
            "nothing left to uninstall"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The files in hooks/ are what install writes for each version (operators copy
    /// them by hand).
    #[test]
    fn shipped_drop_ins_are_the_generated_ones() {
        assert_eq!(
            include_str!("../../hooks/containerd-runtime.toml"),
            registration::drop_in(ConfigVersion::V2, registration::DEFAULT_BINARY)
        );
        assert_eq!(
            include_str!("../../hooks/containerd2-runtime.toml"),
            registration::drop_in(ConfigVersion::V3, registration::DEFAULT_BINARY)
        );
        // The RuntimeClass's overhead is the default proxy allocation.
        let default_mb = u64::try_from(
            crate::config::Config::default()
                .proxy
                .additional_memory_allocation_mb,
        )
        .unwrap();
        assert_eq!(
            include_str!("../../hooks/runtimeclass.yaml"),
            registration::runtime_class(default_mb)
        );
    }

    #[test]
    fn drop_in_in_the_chosen_version() {
        let root = crate::state::store::tests::tempdir("install-v3");
        let bins = root.join("build");
        std::fs::create_dir_all(&bins).unwrap();
        std::fs::write(bins.join("envoy-sidecar"), b"cli").unwrap();
        std::fs::write(bins.join("envoy-sidecar-runc"), b"wrapper").unwrap();
        let d = DropIn {
            version: ConfigVersion::V3,
            binary: "/opt/es/envoy-sidecar-runc".into(),
            why: "containerd 2.1.9".into(),
        };
        let actions = install(&root, &bins, &d, &[], false).unwrap();
        assert!(
            actions
                .iter()
                .any(|a| a.contains("config version 3, containerd 2.1.9")),
            "{actions:?}"
        );
        let text = std::fs::read_to_string(root.join(DROP_IN)).unwrap();
        assert_eq!(
            text,
            registration::drop_in(ConfigVersion::V3, "/opt/es/envoy-sidecar-runc")
        );
        uninstall(&root, false).unwrap();
        assert!(!root.join(DROP_IN).exists());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn fresh_install_writes_the_default_config() {
        let root = crate::state::store::tests::tempdir("install-fresh");
        let bins = root.join("build");
        std::fs::create_dir_all(&bins).unwrap();
        std::fs::write(bins.join("envoy-sidecar"), b"cli").unwrap();
        std::fs::write(bins.join("envoy-sidecar-runc"), b"wrapper").unwrap();
        install(&root, &bins, &DropIn::default(), &[], false).unwrap();
        let cfg = root.join("etc/envoy-sidecar/config.toml");
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), CONFIG);
        uninstall(&root, false).unwrap();
        assert!(!cfg.exists(), "a config install wrote is removed again");
        std::fs::remove_dir_all(root).unwrap();
    }
}
