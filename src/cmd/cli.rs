//! `envoy-sidecar`, the operator command (and the target of runc's hooks).

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::cmd::hook::{self, Stage};
use crate::config::Config;
use crate::state::store::{self, Store};

pub const USAGE: &str = "\
usage: envoy-sidecar [--config PATH] COMMAND

commands:
  check-config                    validate the configuration; non-zero exit on error
  status [--namespace NS] [--json]
                                  one row per proxied container: status (waiting-for-
                                  network, starting, ready, degraded + why, stopping),
                                  ports, IP, NAT, Envoy, restarts, cert expiry, error
  inspect ID [--namespace NS]     print a container's decided state and status as JSON
                                  (NS: default)
  rotate [ID...|--all] [--namespace NS]
                                  re-issue instance identity now (re-reading the CA)
  hook STAGE [--namespace NS]     run an OCI hook stage (createRuntime, poststart,
                                  poststop) with the OCI state JSON on stdin
  metrics [ID...] [--namespace NS] [--json] [--address SOCK]
                                  memory of proxied containers, rescaled to the quota
                                  the user asked for (containerd task metrics; SOCK:
                                  /run/containerd/containerd.sock)
  serve-metrics --listen ADDR:PORT [--address SOCK]
                                  the same for every proxied container, plus Envoy
                                  restarts and credential expiry, as Prometheus text
  recommend-memory --connections N [--mtls] [--runtime-class]
                                  additional_memory_allocation_mb for N concurrent
                                  connections, from Envoy's measured cost; with
                                  --runtime-class, the Kubernetes RuntimeClass whose
                                  overhead.podFixed.memory pays for it
  doctor [--containerd BIN] [--containerd-config PATH] [--root DIR]
                                  check this host before enabling the product (BIN:
                                  containerd in PATH; PATH: /etc/containerd/config.toml;
                                  DIR: where install put the drop-in, default /)
  install [--dry-run] [--root DIR] [--containerd BIN] [--containerd-config-version 2|3]
          [--binary-name PATH]
                                  binaries (from beside this one), default config (kept
                                  if present), containerd drop-in (in the config version
                                  of BIN's containerd; BinaryName PATH, default
                                  /usr/local/bin/envoy-sidecar-runc), gc timer; DIR: /
  uninstall [--dry-run] [--root DIR]
                                  remove exactly what install added
  gc [--dry-run] [--grace SECS]   remove state, NAT mappings, processes and cgroups of
                                  containers that no longer exist (print what; SECS:
                                  leave containers younger than this, default 60)
  supervise ID [--namespace NS]   run a container's sidecar supervisor (started by the
                                  poststart hook; runs until the container's init exits)
  generate-ca --out DIR [--cn NAME]
                                  write a self-signed CA (ca.crt, ca.key) for trials
  help                            this text

The configuration is --config PATH, else $ENVOY_SIDECAR_CONFIG, else
/etc/envoy-sidecar/config.toml (absent: built-in defaults, proxy disabled).";

#[derive(Debug, PartialEq, Eq)]
pub enum Cmd {
    CheckConfig,
    Status {
        namespace: Option<String>,
        json: bool,
    },
    Rotate {
        ids: Vec<String>,
        all: bool,
        namespace: String,
    },
    RecommendMemory {
        connections: u64,
        mtls: bool,
        runtime_class: bool,
    },
    Doctor {
        containerd: PathBuf,
        containerd_config: PathBuf,
        root: PathBuf,
    },
    Install {
        dry_run: bool,
        root: PathBuf,
        containerd: PathBuf,
        config_version: Option<u32>,
        binary_name: Option<String>,
    },
    Uninstall {
        dry_run: bool,
        root: PathBuf,
    },
    Inspect {
        id: String,
        namespace: String,
    },
    Hook {
        stage: String,
        namespace: String,
    },
    GenerateCa {
        out: PathBuf,
        cn: String,
    },
    Supervise {
        id: String,
        namespace: String,
    },
    Gc {
        dry_run: bool,
        grace_secs: u64,
    },
    Metrics {
        ids: Vec<String>,
        namespace: String,
        json: bool,
        address: PathBuf,
    },
    ServeMetrics {
        listen: String,
        address: PathBuf,
    },
    Help,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub cmd: Cmd,
}

/// `args` excludes argv[0].
pub fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut config = None;
    let mut namespace = None;
    let mut out = None;
    let mut cn = None;
    let mut dry_run = false;
    let mut grace = None;
    let mut json = false;
    let mut address = None;
    let mut listen = None;
    let mut root = None;
    let mut connections = None;
    let mut mtls = false;
    let mut runtime_class = false;
    let mut all = false;
    let mut containerd = None;
    let mut containerd_config = None;
    let mut config_version = None;
    let mut binary_name = None;
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |flag: &str| -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value")),
            }
        };
        match name {
            "--config" | "-c" => config = Some(PathBuf::from(value("--config")?)),
            "--namespace" | "-n" => namespace = Some(value("--namespace")?),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--cn" => cn = Some(value("--cn")?),
            "--dry-run" => dry_run = true,
            "--json" => json = true,
            "--address" | "-a" => address = Some(PathBuf::from(value("--address")?)),
            "--listen" => listen = Some(value("--listen")?),
            "--root" => root = Some(PathBuf::from(value("--root")?)),
            "--mtls" => mtls = true,
            "--runtime-class" => runtime_class = true,
            "--containerd" => containerd = Some(PathBuf::from(value("--containerd")?)),
            "--containerd-config" => {
                containerd_config = Some(PathBuf::from(value("--containerd-config")?))
            }
            "--containerd-config-version" => {
                let v = value("--containerd-config-version")?;
                config_version = Some(match v.as_str() {
                    "2" => 2,
                    "3" => 3,
                    _ => bail!(
                        "--containerd-config-version {v:?}: valid: 2 (containerd 1.6/1.7) or 3 (containerd 2.x)"
                    ),
                });
            }
            "--binary-name" => {
                let v = value("--binary-name")?;
                if !v.starts_with('/') {
                    bail!("--binary-name {v:?}: valid: an absolute path to envoy-sidecar-runc");
                }
                binary_name = Some(v);
            }
            "--all" => all = true,
            "--connections" => {
                let v = value("--connections")?;
                connections = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| *n <= 10_000_000)
                        .with_context(|| {
                            format!("--connections {v:?}: valid: a whole number from 0 to 10000000")
                        })?,
                );
            }
            "--grace" => {
                let v = value("--grace")?;
                grace =
                    Some(v.parse::<u64>().ok().with_context(|| {
                        format!("--grace {v:?}: valid: a whole number of seconds")
                    })?);
            }
            "--help" | "-h" => positional.push("help".to_string()),
            f if f.starts_with('-') && f.len() > 1 => {
                bail!(
                    "unknown flag {f:?}; valid: --config PATH, --namespace NS, --out DIR, --cn NAME, --dry-run, --grace SECS, --json, --address SOCK, --listen ADDR, --root DIR, --connections N, --mtls, --runtime-class, --all, --containerd BIN, --containerd-config PATH, --containerd-config-version 2|3, --binary-name PATH, --help\n\n{USAGE}"
                )
            }
            _ => positional.push(a.clone()),
        }
    }
    let namespace_given = namespace.clone();
    let namespace = namespace.unwrap_or_else(|| "default".into());
    let mut pos = positional.into_iter();
    let cmd = match pos.next().as_deref() {
        None | Some("help") => Cmd::Help,
        Some("check-config") => Cmd::CheckConfig,
        Some("status") => Cmd::Status {
            namespace: namespace_given,
            json,
        },
        Some("rotate") => {
            let ids: Vec<String> = pos.by_ref().collect();
            if all != ids.is_empty() {
                bail!("rotate needs container IDs or --all (not both)\n\n{USAGE}");
            }
            Cmd::Rotate {
                ids,
                all,
                namespace,
            }
        }
        Some("inspect") => Cmd::Inspect {
            id: pos.next().context("inspect needs a container ID")?,
            namespace,
        },
        Some("hook") => Cmd::Hook {
            stage: pos
                .next()
                .context("hook needs a STAGE (createRuntime, poststart, poststop)")?,
            namespace,
        },
        Some("doctor") => Cmd::Doctor {
            containerd: containerd.clone().unwrap_or_else(|| "containerd".into()),
            containerd_config: containerd_config
                .clone()
                .unwrap_or_else(|| "/etc/containerd/config.toml".into()),
            root: root.clone().unwrap_or_else(|| "/".into()),
        },
        Some("recommend-memory") => Cmd::RecommendMemory {
            connections: connections.context("recommend-memory needs --connections N")?,
            mtls,
            runtime_class,
        },
        Some("install") => Cmd::Install {
            dry_run,
            root: root.clone().unwrap_or_else(|| "/".into()),
            containerd: containerd.clone().unwrap_or_else(|| "containerd".into()),
            config_version,
            binary_name: binary_name.clone(),
        },
        Some("uninstall") => Cmd::Uninstall {
            dry_run,
            root: root.clone().unwrap_or_else(|| "/".into()),
        },
        Some("metrics") => Cmd::Metrics {
            ids: pos.by_ref().collect(),
            namespace,
            json,
            address: address.unwrap_or_else(|| crate::metrics::DEFAULT_ADDRESS.into()),
        },
        Some("serve-metrics") => Cmd::ServeMetrics {
            listen: listen
                .context("serve-metrics needs --listen ADDR:PORT (e.g. 127.0.0.1:9535)")?,
            address: address.unwrap_or_else(|| crate::metrics::DEFAULT_ADDRESS.into()),
        },
        Some("gc") => Cmd::Gc {
            dry_run,
            grace_secs: grace.unwrap_or(60),
        },
        Some("supervise") => Cmd::Supervise {
            id: pos.next().context("supervise needs a container ID")?,
            namespace,
        },
        Some("generate-ca") => Cmd::GenerateCa {
            out: out.context("generate-ca needs --out DIR")?,
            cn: cn.unwrap_or_else(|| "envoy-sidecar instance identity CA".into()),
        },
        Some(other) => bail!("unknown command {other:?}\n\n{USAGE}"),
    };
    if let Some(extra) = pos.next() {
        bail!("unexpected argument {extra:?}\n\n{USAGE}");
    }
    Ok(Args { config, cmd })
}

pub fn main(argv: Vec<String>) -> i32 {
    let args = match parse(&argv[1.min(argv.len())..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("envoy-sidecar: {e:#}");
            return 2;
        }
    };
    let is_poststop = matches!(&args.cmd, Cmd::Hook { stage, .. } if stage == "poststop");
    match run(args) {
        Ok(()) => 0,
        Err(e) if is_poststop => {
            // A failing poststop would stop runc's other poststop hooks and fail
            // `runc delete`; report and succeed.
            eprintln!(
                "envoy-sidecar: poststop: {}",
                crate::error::render(e.as_ref())
            );
            0
        }
        Err(e) => {
            eprintln!("envoy-sidecar: {}", crate::error::render(e.as_ref()));
            1
        }
    }
}

/// The configuration `status` lists with, and what is wrong with it: the file as
/// parsed if only validation fails, else its `runtime.state_dir` (or the default) read
/// on its own.
fn status_config(path: Option<&std::path::Path>) -> (Config, Option<String>) {
    match Config::load(path) {
        Ok(cfg) => {
            let problem = load(path).err().map(|e| {
                format!(
                    "config error (listing {} anyway): {e:#}",
                    cfg.runtime.state_dir.display()
                )
            });
            (cfg, problem)
        }
        Err(e) => {
            let mut cfg = Config::default();
            let file = path
                .map(std::path::Path::to_path_buf)
                .or_else(|| std::env::var_os(crate::config::CONFIG_ENV).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_CONFIG_PATH));
            // The file may not even be TOML: its state_dir line, read on its own.
            let dir = std::fs::read_to_string(&file).ok().and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == "state_dir")
                        .then(|| v.trim().trim_matches('"').trim_matches('\''))
                        .filter(|v| v.starts_with('/'))
                        .map(PathBuf::from)
                })
            });
            if let Some(d) = dir {
                cfg.runtime.state_dir = d;
            }
            let msg = format!(
                "config error (listing {} anyway): {}",
                cfg.runtime.state_dir.display(),
                crate::error::render(&e)
            );
            (cfg, Some(msg))
        }
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let self_exe: Vec<PathBuf> = std::env::current_exe()
        .ok()
        .map(|e| {
            let mut v = vec![e.clone()];
            if let Some(d) = e.parent() {
                v.push(d.join(crate::WRAPPER_NAME));
            }
            v
        })
        .unwrap_or_default();
    let cfg = Config::load(path)?;
    cfg.validate(&self_exe)?;
    Ok(cfg)
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Help => println!("{USAGE}"),
        Cmd::GenerateCa { out, cn } => {
            crate::identity::ca::generate(&out, &cn)?;
            println!("wrote {0}/ca.crt and {0}/ca.key", out.display());
        }
        Cmd::CheckConfig => {
            let cfg = load(args.config.as_deref())?;
            // `load` refused what create would refuse; a missing binary is the
            // operator's to fix as well (create lets it pass: it may come later).
            if cfg.proxy.enabled
                && let Err(a) = cfg.unprivileged_access()
            {
                let (key, msg) = a.key_and_message();
                bail!("config {}: {key}: {msg}", cfg.source_name());
            }
            // Valid, but probably not what was meant: said, exit status still 0.
            for w in cfg.warnings() {
                eprintln!("warning: config {}: {w}", cfg.source_name());
            }
            match &cfg.source {
                Some(p) => println!("config OK: {}", p.display()),
                None => println!("config OK: no file, built-in defaults (proxy disabled)"),
            }
        }
        Cmd::Inspect { id, namespace } => {
            store::check_id(&id)?;
            store::check_namespace(&namespace)?;
            let cfg = load(args.config.as_deref())?;
            let st = Store::of(&cfg);
            let s = st
                .read(&namespace, &id)?
                .with_context(|| format!("no envoy-sidecar state for container {id} in namespace {namespace} (not proxied, or removed)"))?;
            let rec = crate::state::layout::Paths::new(&st, &namespace, &id)
                .read_record()
                .ok()
                .flatten();
            let row = crate::ops::status::row(&s, rec.as_ref(), &crate::sys::process::Procfs);
            let mut v = serde_json::to_value(&s)?;
            v["status"] = serde_json::to_value(&row)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::Status { namespace, json } => {
            if let Some(ns) = &namespace {
                store::check_namespace(ns)?;
            }
            // Never refuses: a configuration that does not load is reported above the
            // table, and every container its state_dir holds is still listed.
            let (cfg, problem) = status_config(args.config.as_deref());
            let st = Store::of(&cfg);
            let runc = crate::runc::query::RuncBinary {
                path: cfg.runtime.runc.clone(),
            };
            let rows = crate::ops::status::rows(
                &st,
                namespace.as_deref(),
                &crate::sys::process::Procfs,
                Some(&runc),
            )?;
            if json {
                if let Some(p) = &problem {
                    eprintln!("envoy-sidecar: {p}");
                }
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                if let Some(p) = &problem {
                    println!("{p}\n");
                }
                print!("{}", crate::ops::status::table(&rows));
            }
        }
        Cmd::Rotate {
            ids,
            all,
            namespace,
        } => {
            store::check_namespace(&namespace)?;
            for id in &ids {
                store::check_id(id)?;
            }
            let cfg = load(args.config.as_deref())?;
            let st = Store::of(&cfg);
            let targets: Vec<(String, String)> = if all {
                st.list()?
                    .into_iter()
                    .map(|s| (s.namespace, s.id))
                    .collect()
            } else {
                ids.into_iter().map(|i| (namespace.clone(), i)).collect()
            };
            let mut failed = 0;
            for (ns, id) in &targets {
                match crate::sidecar::control::request_rotation(&st, ns, id) {
                    Ok(pid) => println!("{ns}/{id}: rotation requested (supervisor pid {pid})"),
                    Err(e) => {
                        failed += 1;
                        eprintln!(
                            "envoy-sidecar: rotate {ns}/{id}: {}",
                            crate::error::render(&e)
                        );
                    }
                }
            }
            if failed > 0 {
                bail!(
                    "rotate: {failed} of {} container(s) not rotated",
                    targets.len()
                );
            }
        }
        Cmd::RecommendMemory {
            connections,
            mtls,
            runtime_class,
        } => {
            let mb = crate::envoy::sizing::recommend_mb(connections, mtls);
            if runtime_class {
                print!("{}", crate::ops::registration::runtime_class(mb));
                return Ok(());
            }
            println!("additional_memory_allocation_mb = {mb}");
            println!(
                "# {connections} concurrent {} connections; measured model (docs/BENCHMARKS.md); \
                 the reference's 10 + 0.03 x N rule gives {}",
                if mtls { "mutual-TLS" } else { "TLS" },
                crate::envoy::sizing::reference_mb(connections)
            );
        }
        Cmd::Doctor {
            containerd,
            containerd_config,
            root,
        } => {
            let cfg = load(args.config.as_deref()).map_err(|e| format!("{e:#}"));
            let checks = crate::ops::doctor::run(
                cfg,
                &crate::ops::doctor::Containerd {
                    bin: containerd,
                    config: containerd_config,
                    drop_in: root.join(crate::ops::install::DROP_IN),
                },
            );
            for c in &checks {
                println!(
                    "{:<5} {:<14} {}",
                    match (c.ok, c.warn) {
                        (false, _) => "FAIL",
                        (true, true) => "warn",
                        (true, false) => "ok",
                    },
                    c.name,
                    c.detail
                );
            }
            let failed = checks.iter().filter(|c| !c.ok).count();
            if failed > 0 {
                bail!("{failed} check(s) failed");
            }
        }
        Cmd::Install {
            dry_run,
            root,
            containerd,
            config_version,
            binary_name,
        } => {
            let exe = std::env::current_exe()?;
            let bins = exe.parent().context("no directory for this executable")?;
            let drop_in =
                crate::ops::install::drop_in_for(&containerd, config_version, binary_name);
            for a in crate::ops::install::install(&root, bins, &drop_in, dry_run)? {
                println!("{}{a}", if dry_run { "[dry-run] " } else { "" });
            }
        }
        Cmd::Uninstall { dry_run, root } => {
            for a in crate::ops::install::uninstall(&root, dry_run)? {
                println!("{}{a}", if dry_run { "[dry-run] " } else { "" });
            }
        }
        Cmd::Metrics {
            ids,
            namespace,
            json,
            address,
        } => {
            for id in &ids {
                store::check_id(id)?;
            }
            store::check_namespace(&namespace)?;
            let cfg = load(args.config.as_deref())?;
            let st = Store::of(&cfg);
            let reports =
                crate::metrics::collect(&st, &address, &namespace, &ids, cfg.metrics_mode()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                println!(
                    "{:<24} {:>14} {:>14} {:>14} {:>12} METHOD",
                    "ID", "MEMORY", "QUOTA", "RAW", "ENVOY"
                );
                for r in &reports {
                    println!(
                        "{:<24} {:>14} {:>14} {:>14} {:>12} {}",
                        r.id,
                        r.memory_bytes,
                        r.memory_bytes_quota,
                        r.raw_working_set_bytes,
                        r.envoy_bytes
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "-".into()),
                        r.method
                    );
                }
            }
        }
        Cmd::ServeMetrics { listen, address } => {
            let cfg = load(args.config.as_deref())?;
            crate::metrics::exporter::serve(&cfg, &listen, &address)?;
        }
        Cmd::Gc {
            dry_run,
            grace_secs,
        } => {
            let cfg = load(args.config.as_deref())?;
            let store = Store::of(&cfg);
            let report = crate::ops::gc::run(
                &store,
                &crate::host::Host::system(&cfg.runtime.runc),
                &crate::ops::gc::Options {
                    dry_run,
                    grace: std::time::Duration::from_secs(grace_secs),
                    pool: cfg.pool(),
                    uid_pool: cfg.envoy_uid_pool(),
                    config: cfg.source.as_deref(),
                },
            )?;
            let verb = if dry_run { "would" } else { "did" };
            for a in &report.actions {
                println!("{}{a}", if dry_run { "[dry-run] " } else { "" });
            }
            for (a, e) in &report.failures {
                eprintln!(
                    "envoy-sidecar: gc: failed: {a}: {}",
                    crate::error::render(e)
                );
            }
            println!("gc: {verb} {} action(s)", report.actions.len());
            if !report.failures.is_empty() {
                bail!("gc: {} action(s) failed", report.failures.len());
            }
        }
        Cmd::Supervise { id, namespace } => {
            store::check_id(&id)?;
            store::check_namespace(&namespace)?;
            let cfg = load(args.config.as_deref())?;
            crate::sidecar::supervisor::run(&cfg, &namespace, &id)
                .with_context(|| format!("supervisor for {namespace}/{id}"))?;
        }
        Cmd::Hook { stage, namespace } => {
            let stage = Stage::parse(&stage)?;
            let state = hook::read_state(std::io::stdin().lock())?;
            // A hook must act even when the configuration has since become invalid
            // (poststop still has to release); only the state directory is needed.
            let cfg = Config::load(args.config.as_deref())
                .with_context(|| format!("hook {stage:?} for {}", state.id))?;
            hook::run(&cfg, stage, &namespace, &state)
                .with_context(|| format!("hook {stage:?} for {}/{}", namespace, state.id))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> anyhow::Result<Args> {
        let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        parse(&v)
    }

    #[test]
    fn argv() {
        assert_eq!(p("").unwrap().cmd, Cmd::Help);
        let a = p("--config /c.toml hook poststop --namespace k8s.io").unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/c.toml")));
        assert_eq!(
            a.cmd,
            Cmd::Hook {
                stage: "poststop".into(),
                namespace: "k8s.io".into()
            }
        );
        let a = p("inspect c1 --namespace=n1").unwrap();
        assert_eq!(
            a.cmd,
            Cmd::Inspect {
                id: "c1".into(),
                namespace: "n1".into()
            }
        );
        assert_eq!(p("check-config").unwrap().cmd, Cmd::CheckConfig);
    }

    #[test]
    fn status_and_rotate_argv() {
        assert_eq!(
            p("status").unwrap().cmd,
            Cmd::Status {
                namespace: None,
                json: false
            }
        );
        assert_eq!(
            p("status --namespace k8s.io --json").unwrap().cmd,
            Cmd::Status {
                namespace: Some("k8s.io".into()),
                json: true
            }
        );
        assert_eq!(
            p("rotate a b -n ns").unwrap().cmd,
            Cmd::Rotate {
                ids: vec!["a".into(), "b".into()],
                all: false,
                namespace: "ns".into()
            }
        );
        assert!(matches!(
            p("rotate --all").unwrap().cmd,
            Cmd::Rotate { all: true, .. }
        ));
        for bad in ["rotate", "rotate a --all"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(
                e.contains("rotate needs container IDs or --all"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn argv_errors() {
        assert!(
            p("inspect")
                .unwrap_err()
                .to_string()
                .contains("container ID")
        );
        assert!(
            p("frob")
                .unwrap_err()
                .to_string()
                .contains("unknown command")
        );
        assert!(
            p("--bogus check-config")
                .unwrap_err()
                .to_string()
                .contains("--bogus")
        );
        assert!(
            p("check-config extra")
                .unwrap_err()
                .to_string()
                .contains("extra")
        );
        assert!(
            p("--config")
                .unwrap_err()
                .to_string()
                .contains("needs a value")
        );
    }
}
