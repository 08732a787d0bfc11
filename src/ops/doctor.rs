//! `envoy-sidecar doctor`: the checks an operator would make before enabling the
//! product on a host, one line each.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Config;

pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Passes, but says something the operator should look at (printed as `warn`).
    pub warn: bool,
    pub detail: String,
}

fn version_of(bin: &Path, arg: &str) -> Result<String, String> {
    let out = Command::new(bin)
        .arg(arg)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("{} {arg} exited {}", bin.display(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string())
}

fn check(name: &'static str, r: Result<String, String>) -> Check {
    match r {
        Ok(detail) => Check {
            name,
            ok: true,
            warn: false,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            warn: false,
            detail,
        },
    }
}

/// This binary's version and the wrapper's beside it (its `--version` first line: the
/// one an operator sees from containerd's `BinaryName`).
fn versions() -> Check {
    let mine = format!("{} {}", crate::CLI_NAME, crate::version());
    let wrapper = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(crate::WRAPPER_NAME)));
    match wrapper.as_deref().map(|w| (w, version_of(w, "--version"))) {
        Some((w, Ok(line))) if line.starts_with(crate::WRAPPER_NAME) => Check {
            name: "versions",
            ok: true,
            warn: line != format!("{} {}", crate::WRAPPER_NAME, crate::version()),
            detail: format!("{mine}; {}: {line}", w.display()),
        },
        Some((w, Ok(line))) => Check {
            name: "versions",
            ok: false,
            warn: false,
            detail: format!(
                "{mine}; {} --version says {line:?}: not the wrapper",
                w.display()
            ),
        },
        Some((w, Err(e))) => Check {
            name: "versions",
            ok: true,
            warn: true,
            detail: format!("{mine}; no wrapper beside it ({}: {e})", w.display()),
        },
        None => Check {
            name: "versions",
            ok: true,
            warn: true,
            detail: mine,
        },
    }
}

/// Host TCP listeners (v4 and v6) on ports inside `pool`.
fn listeners_in(pool: std::ops::RangeInclusive<u16>) -> Vec<u16> {
    crate::sys::listeners::host_tcp_listeners()
        .into_iter()
        .filter(|p| pool.contains(p))
        .collect()
}

/// The containerd whose CRI registration is checked.
pub struct Containerd {
    /// The binary (a path, or a name looked up in PATH).
    pub bin: PathBuf,
    /// Its config.toml (`containerd --config`).
    pub config: PathBuf,
    /// The drop-in `install` writes.
    pub drop_in: PathBuf,
}

/// The drop-in is there *and* containerd loads it: `containerd config dump` (no daemon
/// needed) shows the handler, or the reason it does not.
fn registration(c: &Containerd) -> Check {
    use crate::ops::registration::{HANDLER, Loaded, loaded};
    let name = "registration";
    if !c.drop_in.exists() {
        return check(
            name,
            Err(format!(
                "{} missing: CRI (Kubernetes) cannot select the envoy-sidecar runtime; `ctr run --runc-binary` still works (make install adds it)",
                c.drop_in.display()
            )),
        );
    }
    let out = Command::new(&c.bin)
        .arg("--config")
        .arg(&c.config)
        .args(["config", "dump"])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return Check {
                name,
                ok: true,
                warn: true,
                detail: format!(
                    "{} present; whether containerd loads it is not checked: {}: {e} (doctor --containerd BIN)",
                    c.drop_in.display(),
                    c.bin.display()
                ),
            };
        }
    };
    let dump = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let version = version_of(&c.bin, "--version").unwrap_or_default();
    match loaded(&dump, &log, &c.drop_in) {
        Loaded::Yes { binary: Some(b) } if !Path::new(&b).is_file() => check(
            name,
            Err(format!(
                "containerd defines runtime {HANDLER:?} but its BinaryName {b} does not exist (from {}; `envoy-sidecar install --binary-name PATH`)",
                c.drop_in.display()
            )),
        ),
        Loaded::Yes { binary } => check(
            name,
            Ok(format!(
                "{} loaded by {} ({}): runtime {HANDLER:?}, BinaryName {}",
                c.drop_in.display(),
                c.bin.display(),
                version,
                binary.as_deref().unwrap_or("runc (none set)")
            )),
        ),
        Loaded::No { reason } => check(
            name,
            Err(format!(
                "{} ({}, --config {}) does not define runtime {HANDLER:?}: {reason}",
                c.bin.display(),
                version,
                c.config.display()
            )),
        ),
    }
}

/// Run every check; `cfg` is the loaded configuration or why it failed to load.
pub fn run(cfg: Result<Config, String>, containerd: &Containerd) -> Vec<Check> {
    let mut out = Vec::new();
    let cfg = match cfg {
        Ok(c) => {
            let src = c
                .source
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "built-in defaults (proxy disabled)".into());
            out.push(Check {
                name: "config",
                ok: true,
                warn: false,
                detail: format!("valid: {src}"),
            });
            c
        }
        Err(e) => {
            out.push(Check {
                name: "config",
                ok: false,
                warn: false,
                detail: e,
            });
            Config::default()
        }
    };
    out.push(versions());
    out.push(check("runc", version_of(&cfg.runtime.runc, "--version")));
    out.push(check(
        "envoy",
        version_of(&cfg.proxy.envoy_path, "--version").and_then(|v| {
            v.split_whitespace()
                .find_map(|w| {
                    w.split('/')
                        .nth(1)
                        .filter(|x| x.chars().next().is_some_and(|c| c.is_ascii_digit()))
                })
                .map(|ver| format!("{} {ver}", cfg.proxy.envoy_path.display()))
                .ok_or(format!("unexpected version output: {v}"))
        }),
    ));
    out.push(check("cgroup memory", {
        match crate::sys::cgroup::memory_controller_v1() {
            Some(true) => Ok("cgroup v1 memory controller (Envoy's memory readable on its own)".into()),
            Some(false) => Ok("cgroup v2 memory controller: Envoy in a child cgroup without controllers, charged to the container's memory.max; OOM KILLS counts the whole container (memory.events), not Envoy alone; [metrics] mode = \"exact\" falls back to linear (v1 only); swap: memory.swap.max is the user's own swap allowance, the proxy adds memory only".into()),
            None => Err("no memory controller found under /sys/fs/cgroup".into()),
        }
    }));
    out.push(check(
        "nftables",
        Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map_err(|e| format!("nft: {e} (install nftables)"))
            .and_then(|o| {
                if o.status.success() {
                    Ok("nft usable".into())
                } else {
                    Err(format!(
                        "nft list tables: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
            }),
    ));
    out.push(check(
        "conntrack",
        crate::sys::nfnetlink::ct_count()
            .map(|n| format!("ctnetlink usable ({n} connections tracked)"))
            .map_err(|e| format!("ctnetlink: {e} (is nf_conntrack_netlink available?)")),
    ));
    out.push(check(
        "CA",
        if !cfg.proxy.enabled {
            Ok("not needed: proxy disabled".into())
        } else {
            match (
                &cfg.instance_identity.ca_cert,
                &cfg.instance_identity.ca_key,
            ) {
                (Some(c), Some(k)) => crate::config::pem::private_key_mode(k)
                    .map_err(|m| format!("instance_identity.ca_key: {m}"))
                    .and_then(|()| {
                        crate::identity::Ca::load(c, k)
                            .map(|_| format!("{} can sign", c.display()))
                            .map_err(|e| e.to_string())
                    }),
                _ => Err("instance_identity.ca_cert/ca_key not set".into()),
            }
        },
    ));
    out.push(registration(containerd));
    out.push(check("port pool", {
        let pool = cfg.pool();
        let busy = listeners_in(pool.clone());
        if busy.is_empty() {
            Ok(format!("{}-{} free of host listeners", pool.start(), pool.end()))
        } else {
            Err(format!(
                "host processes listen on {busy:?} inside [ports] {}-{}: create skips those host ports (NAT would take their outside traffic)",
                pool.start(),
                pool.end()
            ))
        }
    }));
    out.push(check(
        "unprivileged Envoy",
        match cfg.unprivileged_access() {
            Ok(()) => Ok(format!(
                "uid {}+ can execute {} and reach {}",
                cfg.proxy.envoy_uid_pool_start,
                cfg.proxy.envoy_path.display(),
                cfg.runtime.state_dir.display()
            )),
            Err(a) => {
                let (key, msg) = a.key_and_message();
                Err(format!("{key}: {msg}"))
            }
        },
    ));
    out.push(check("Envoy sandbox", sandbox_check(&cfg)));
    out.push(check(
        "IPv6",
        Ok(ipv6_report(
            crate::sys::netns::ipv6_supported(),
            &std::fs::read_to_string(IPV6_FORWARDING).unwrap_or_default(),
        )),
    ));
    out.push(check("state dir", {
        let d = &cfg.runtime.state_dir;
        std::fs::create_dir_all(d)
            .and_then(|()| tempfile_probe(d))
            .map(|()| format!("{} writable", d.display()))
            .map_err(|e| format!("{}: {e}", d.display()))
    }));
    out.push(check("allocation index", index_agrees(&cfg)));
    out.push(sizing(&cfg));
    out
}

const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// What IPv6 support means here: informational, never a failure (IPv4 alone works).
fn ipv6_report(supported: bool, forwarding: &str) -> String {
    if !supported {
        return "kernel without IPv6 (ipv6.disable=1 or not built): proxies listen on IPv4 only"
            .into();
    }
    let fwd = if forwarding.trim() == "1" {
        "on"
    } else {
        "off (turned on when the first container with an IPv6 address is mapped)"
    };
    format!(
        "proxies listen on [::] too; IPv6 host NAT in table ip6 envoy_sidecar; IPv6 forwarding {fwd}"
    )
}

/// Whether the kernel confines Envoy to `sidecar::sandbox::allow_list`, and builds
/// that list's ruleset for the configured `envoy_path`.
fn sandbox_check(cfg: &Config) -> Result<String, String> {
    use crate::sidecar::sandbox;
    if !cfg.proxy.sandbox {
        return Ok(sandbox::Level::Off.to_string());
    }
    let abi = sandbox::kernel_support().map_err(|why| {
        format!("cannot be enforced: {why}; Envoy would read every world-readable host file")
    })?;
    if !cfg.proxy.enabled {
        return Ok(format!(
            "Landlock ABI {abi} enforced when the proxy is enabled"
        ));
    }
    // No container's envoy dir exists yet: the temp dir stands in for it.
    let s = sandbox::prepare(&cfg.proxy, &std::env::temp_dir(), None).map_err(|e| e.to_string())?;
    Ok(format!(
        "{} for {}",
        s.level,
        cfg.proxy.envoy_path.display()
    ))
}

/// The connection cap Envoy gets, and whether the allocation holds them
/// (`Config::warnings`): a warning, not a failure.
fn sizing(cfg: &Config) -> Check {
    let warnings = cfg.warnings();
    let summary = format!(
        "max_connections {} ({}), heap budget {:.1} MiB, additional_memory_allocation_mb = {}",
        cfg.max_connections(),
        if cfg.proxy.max_connections.is_some() {
            "set"
        } else {
            "from the allocation"
        },
        cfg.heap_budget_bytes() as f64 / f64::from(1u32 << 20),
        cfg.proxy.additional_memory_allocation_mb
    );
    Check {
        name: "sizing",
        ok: true,
        warn: !warnings.is_empty(),
        detail: if warnings.is_empty() {
            summary
        } else {
            format!("{summary}; {}", warnings.join("; "))
        },
    }
}

/// The index `create` allocates from is the union of the state files (`gc` rewrites
/// it when not).
fn index_agrees(cfg: &Config) -> Result<String, String> {
    let store = crate::state::store::Store::of(cfg);
    let pool = cfg.envoy_uid_pool();
    let truth = store.rebuild_index(&pool).map_err(|e| e.to_string())?;
    let stored = store.stored_index().map_err(|e| e.to_string())?;
    let reasons = crate::ops::gc::index_disagreement(stored, &truth, &pool);
    if reasons.is_empty() {
        Ok(format!(
            "agrees with the {} state files ({} host ports, {} MiB committed)",
            truth.containers,
            truth.ports.count(),
            truth.memory_limit_bytes.div_ceil(1 << 20)
        ))
    } else {
        Err(format!(
            "{}; `envoy-sidecar gc` rewrites it from the state files",
            reasons.join("; ")
        ))
    }
}

fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".doctor-{}", std::process::id()));
    std::fs::write(&p, b"")?;
    std::fs::remove_file(&p)
}

#[cfg(test)]
fn no_containerd(drop_in: &str) -> Containerd {
    Containerd {
        bin: "/nonexistent/containerd".into(),
        config: "/nonexistent/config.toml".into(),
        drop_in: drop_in.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_check_and_names_failures() {
        let mut cfg = Config::default();
        cfg.runtime.runc = "/nonexistent/runc".into();
        cfg.runtime.state_dir = crate::state::store::tests::tempdir("doctor");
        let checks = run(Ok(cfg.clone()), &no_containerd("/nonexistent/drop-in.toml"));
        let by = |n: &str| checks.iter().find(|c| c.name == n).unwrap();
        assert!(!by("runc").ok && by("runc").detail.contains("/nonexistent/runc"));
        assert!(!by("registration").ok && by("registration").detail.contains("make install"));
        assert!(by("state dir").ok, "{}", by("state dir").detail);
        assert!(by("CA").ok && by("CA").detail.contains("proxy disabled"));
        assert!(by("IPv6").ok && !by("IPv6").warn, "{}", by("IPv6").detail);
        if crate::sidecar::sandbox::kernel_support().is_ok() {
            let d = &by("Envoy sandbox").detail;
            assert!(by("Envoy sandbox").ok && d.contains("Landlock ABI"), "{d}");
        }
        assert!(
            by("allocation index").ok,
            "{}",
            by("allocation index").detail
        );
        // An index that claims a port no state file does.
        let store = crate::state::store::Store::of(&cfg);
        let lock = store.lock().unwrap();
        let mut ix = store.index(&lock, &cfg.envoy_uid_pool()).unwrap();
        ix.ports.set(61007, true);
        store.write_index(&lock, &ix).unwrap();
        drop(lock);
        let checks = run(Ok(cfg.clone()), &no_containerd("/nonexistent/drop-in.toml"));
        let by = |n: &str| checks.iter().find(|c| c.name == n).unwrap();
        let d = &by("allocation index").detail;
        assert!(
            !by("allocation index").ok && d.contains("61007") && d.contains("gc"),
            "{d}"
        );
        let s = by("sizing");
        assert!(s.ok && !s.warn, "{}", s.detail);
        assert!(
            s.detail
                .contains("max_connections 386 (from the allocation), heap budget 16.4 MiB"),
            "{}",
            s.detail
        );
        // An explicit cap the allocation cannot hold: a warning, not a failure.
        let mut big = cfg.clone();
        big.proxy.enabled = true;
        big.proxy.max_connections = Some(4096);
        let s = sizing(&big);
        assert!(s.ok && s.warn, "{}", s.detail);
        assert!(
            s.detail.contains("max_connections 4096 (set)") && s.detail.contains("164 MiB"),
            "{}",
            s.detail
        );
        let checks = run(Err("config x: bad".into()), &no_containerd("/x"));
        assert!(!checks[0].ok && checks[0].detail == "config x: bad");
        std::fs::remove_dir_all(&cfg.runtime.state_dir).unwrap();
    }

    #[test]
    fn ipv6_is_reported_not_required() {
        assert!(ipv6_report(false, "").contains("IPv4 only"));
        let on = ipv6_report(true, "1\n");
        assert!(on.contains("[::]") && on.contains("forwarding on"), "{on}");
        assert!(ipv6_report(true, "0\n").contains("forwarding off (turned on when"));
    }

    #[test]
    fn finds_listeners_in_the_pool() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert_eq!(listeners_in(p..=p), vec![p]);
    }
}

#[cfg(test)]
mod ca_key_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_ca_key_readable_by_others_fails_the_ca_and_config_checks() {
        let dir = crate::state::store::tests::tempdir("doctor-ca");
        crate::identity::ca::generate(&dir.join("ca"), "T").unwrap();
        let key = dir.join("ca/ca.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "generate-ca writes an owner-only key");
        let mut cfg = Config::default();
        cfg.proxy.enabled = true;
        cfg.runtime.state_dir = dir.join("state");
        cfg.instance_identity.ca_cert = Some(dir.join("ca/ca.crt"));
        cfg.instance_identity.ca_key = Some(key.clone());
        let by = |checks: &[Check], n: &str| {
            let c = checks.iter().find(|c| c.name == n).unwrap();
            (c.ok, c.detail.clone())
        };
        let checks = run(Ok(cfg.clone()), &no_containerd("/x"));
        assert!(by(&checks, "CA").0, "{}", by(&checks, "CA").1);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let checks = run(Ok(cfg.clone()), &no_containerd("/x"));
        let (ok, d) = by(&checks, "CA");
        assert!(
            !ok && d.contains("ca.key") && d.contains("0644") && d.contains("chmod 600"),
            "{d}"
        );
        // check-config (Config::validate) refuses it too.
        let e = cfg.validate(&[]).unwrap_err().to_string();
        assert!(
            e.contains("instance_identity.ca_key") && e.contains("0644") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
