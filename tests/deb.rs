//! The Debian package (`make deb`, which `make test` builds first): `dpkg -i` on this
//! machine, `doctor` and a proxied container through the installed
//! `/usr/bin/envoy-sidecar-runc`, then `dpkg -r` (conffiles stay) and `dpkg -P`
//! (nothing of the package is left).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// `target/envoy-sidecar_<version>_amd64.deb`.
fn deb() -> Option<PathBuf> {
    let p = repo().join(format!(
        "target/envoy-sidecar_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    p.exists().then_some(p)
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap()
}

#[test]
fn the_deb_installs_runs_a_proxied_container_and_purges_clean() {
    if !can_run("the_deb_installs_runs_a_proxied_container_and_purges_clean") {
        return;
    }
    let Some(deb) = deb() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no target/envoy-sidecar_*.deb (make test builds it with make deb)"
        );
        eprintln!("SKIP the_deb_installs...: no .deb (run `make deb` first)");
        return;
    };
    // A package already installed on this machine is not ours to remove.
    let before = run("dpkg-query", &["-W", "-f=${Status}", "envoy-sidecar"]);
    assert!(
        !String::from_utf8_lossy(&before.stdout).contains("installed"),
        "envoy-sidecar is installed on this machine already; not touching it"
    );
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let _ = Command::new("dpkg").args(["-P", "envoy-sidecar"]).output();
        }
    }
    let _purge = Purge;

    let o = run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    let listed = run("dpkg", &["-L", "envoy-sidecar"]);
    let files: Vec<PathBuf> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    for want in [
        "/usr/bin/envoy-sidecar",
        "/usr/bin/envoy-sidecar-runc",
        "/etc/envoy-sidecar/config.toml",
        "/etc/containerd/conf.d/envoy-sidecar.toml",
        "/lib/systemd/system/envoy-sidecar-gc.timer",
        "/lib/systemd/system/envoy-sidecar-metrics.service",
        "/usr/share/containers/oci/hooks.d/envoy-sidecar-poststart.json",
        "/usr/share/envoy-sidecar/runtimeclass.yaml",
        "/usr/share/bash-completion/completions/envoy-sidecar",
        "/usr/share/man/man1/envoy-sidecar-status.1.gz",
    ] {
        assert!(
            files.contains(&PathBuf::from(want)),
            "{want} not in the package"
        );
    }
    let drop_in = std::fs::read_to_string("/etc/containerd/conf.d/envoy-sidecar.toml").unwrap();
    assert!(
        drop_in.contains("BinaryName = \"/usr/bin/envoy-sidecar-runc\""),
        "{drop_in}"
    );
    let hook =
        std::fs::read_to_string("/usr/share/containers/oci/hooks.d/envoy-sidecar-poststart.json")
            .unwrap();
    assert!(hook.contains("\"/usr/bin/envoy-sidecar\""), "{hook}");
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "envoy-sidecar"]);
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/envoy-sidecar/config.toml"),
        "{}",
        text(&conffiles)
    );

    // The installed binaries: versions, doctor, a proxied container.
    let v = run("/usr/bin/envoy-sidecar-runc", &["--version"]);
    assert!(
        String::from_utf8_lossy(&v.stdout)
            .starts_with(&format!("envoy-sidecar-runc {}", env!("CARGO_PKG_VERSION"))),
        "{}",
        text(&v)
    );
    let sb = Sandbox::new("deb", "", "");
    let doctor = Command::new("/usr/bin/envoy-sidecar")
        .args(["--config", sb.config.to_str().unwrap(), "doctor"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&doctor.stdout).to_string();
    assert!(
        out.lines().any(|l| l.starts_with("ok")
            && l.contains("versions")
            && l.contains("/usr/bin/envoy-sidecar-runc: envoy-sidecar-runc")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("config")),
        "{out}"
    );
    let runtime = sb.dir.join("installed-runc");
    write_script(
        &runtime,
        &format!(
            "#!/bin/sh\nENVOY_SIDECAR_CONFIG={} exec /usr/bin/envoy-sidecar-runc \"$@\"\n",
            sb.config.display()
        ),
    );
    *sb.runtime_override.lock().unwrap() = Some(runtime);
    let net = sb.slot.netns(0);
    let id = "es-deb-1";
    let (c, _st, addr) = sb.start_served(id, &net);
    // The installed wrapper starts the installed CLI as the supervisor (after runc's
    // create; no hook of ours is in the spec of a `create`).
    let sup = sb.record(id)["supervisor"]["pid"]
        .as_i64()
        .expect("the supervisor recorded its pid");
    let exe = std::fs::read_link(format!("/proc/{sup}/exe")).unwrap();
    assert_eq!(
        exe,
        Path::new("/usr/bin/envoy-sidecar"),
        "the supervisor is the installed CLI"
    );
    let out = openssl_wait_for(&addr, &sb.ca(), id, HELLO);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    c.remove();
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());

    // Remove: the conffiles stay; purge: nothing of the package is left.
    let o = run("dpkg", &["-r", "envoy-sidecar"]);
    assert!(o.status.success(), "dpkg -r: {}", text(&o));
    assert!(!Path::new("/usr/bin/envoy-sidecar-runc").exists());
    assert!(
        Path::new("/etc/envoy-sidecar/config.toml").exists(),
        "conffile kept by -r"
    );
    let o = run("dpkg", &["-P", "envoy-sidecar"]);
    assert!(o.status.success(), "dpkg -P: {}", text(&o));
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new("/etc/envoy-sidecar").exists());
    assert!(!Path::new("/var/lib/envoy-sidecar").exists());
}
