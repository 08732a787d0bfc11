//! `envoy-sidecar install` / `uninstall`: binaries, a commented default configuration
//! (never overwriting one), the containerd drop-in for CRI, and the gc timer. Every
//! file install writes is listed in a manifest, so uninstall removes exactly that —
//! never a configuration the operator had before.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub const DROP_IN: &str = "etc/containerd/conf.d/envoy-sidecar.toml";
const MANIFEST: &str = "var/lib/envoy-sidecar/installed-files";

const CONFIG: &str = include_str!("../../hooks/config.toml");
const CONTAINERD: &str = include_str!("../../hooks/containerd-runtime.toml");
const GC_SERVICE: &str = include_str!("../../hooks/envoy-sidecar-gc.service");
const GC_TIMER: &str = include_str!("../../hooks/envoy-sidecar-gc.timer");
const HOOK_CREATE: &str = include_str!("../../hooks/oci-hooks.d/envoy-sidecar-createRuntime.json");
const HOOK_POSTSTART: &str = include_str!("../../hooks/oci-hooks.d/envoy-sidecar-poststart.json");
const HOOK_POSTSTOP: &str = include_str!("../../hooks/oci-hooks.d/envoy-sidecar-poststop.json");

enum Source {
    File(PathBuf),
    Text(&'static str),
}

struct Item {
    to: &'static str,
    source: Source,
    mode: u32,
    /// Leave an existing file alone (the operator's configuration).
    keep_existing: bool,
}

fn items(bin_dir: &Path) -> Vec<Item> {
    vec![
        Item {
            to: "usr/local/bin/envoy-sidecar",
            source: Source::File(bin_dir.join(crate::CLI_NAME)),
            mode: 0o755,
            keep_existing: false,
        },
        Item {
            to: "usr/local/bin/envoy-sidecar-runc",
            source: Source::File(bin_dir.join(crate::WRAPPER_NAME)),
            mode: 0o755,
            keep_existing: false,
        },
        Item {
            to: "etc/envoy-sidecar/config.toml",
            source: Source::Text(CONFIG),
            mode: 0o644,
            keep_existing: true,
        },
        Item {
            to: DROP_IN,
            source: Source::Text(CONTAINERD),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "etc/systemd/system/envoy-sidecar-gc.service",
            source: Source::Text(GC_SERVICE),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "etc/systemd/system/envoy-sidecar-gc.timer",
            source: Source::Text(GC_TIMER),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "usr/share/containers/oci/hooks.d/envoy-sidecar-createRuntime.json",
            source: Source::Text(HOOK_CREATE),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "usr/share/containers/oci/hooks.d/envoy-sidecar-poststart.json",
            source: Source::Text(HOOK_POSTSTART),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            to: "usr/share/containers/oci/hooks.d/envoy-sidecar-poststop.json",
            source: Source::Text(HOOK_POSTSTOP),
            mode: 0o644,
            keep_existing: false,
        },
    ]
}

/// Install below `root` (`/` normally; a staging directory for packaging and tests)
/// the binaries found in `bin_dir`. Returns one line per action.
pub fn install(root: &Path, bin_dir: &Path, dry_run: bool) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    let mut written = read_manifest(root)?;
    for it in items(bin_dir) {
        let to = root.join(it.to);
        if it.keep_existing && to.exists() && !written.contains(&to) {
            actions.push(format!("keep {} (exists; not overwritten)", to.display()));
            continue;
        }
        actions.push(format!("write {} (mode {:o})", to.display(), it.mode));
        if dry_run {
            continue;
        }
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        let bytes = match &it.source {
            Source::File(p) => std::fs::read(p).at(p)?,
            Source::Text(t) => t.as_bytes().to_vec(),
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

        let dry = install(&root, &bins, true).unwrap();
        assert!(
            dry.iter()
                .any(|a| a.contains("keep") && a.contains("config.toml")),
            "{dry:?}"
        );
        assert!(
            !root.join("usr/local/bin/envoy-sidecar").exists(),
            "dry run writes nothing"
        );

        install(&root, &bins, false).unwrap();
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
        install(&root, &bins, false).unwrap();

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

    #[test]
    fn fresh_install_writes_the_default_config() {
        let root = crate::state::store::tests::tempdir("install-fresh");
        let bins = root.join("build");
        std::fs::create_dir_all(&bins).unwrap();
        std::fs::write(bins.join("envoy-sidecar"), b"cli").unwrap();
        std::fs::write(bins.join("envoy-sidecar-runc"), b"wrapper").unwrap();
        install(&root, &bins, false).unwrap();
        let cfg = root.join("etc/envoy-sidecar/config.toml");
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), CONFIG);
        uninstall(&root, false).unwrap();
        assert!(!cfg.exists(), "a config install wrote is removed again");
        std::fs::remove_dir_all(root).unwrap();
    }
}
