//! `envoy-sidecar`, the operator command (and the target of runc's hooks).

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::cmd::hook::{self, Stage};
use crate::config::Config;
use crate::state::store::{self, Store};

/// What `--config` falls back to (shown at the end of `--help`).
const CONFIG_HELP: &str = "The configuration is --config PATH, else $ENVOY_SIDECAR_CONFIG, else \
/etc/envoy-sidecar/config.toml (absent: built-in defaults, proxy disabled).";

/// `<version> (<commit>)` for `--version` (a `&'static str`, as clap wants it).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("ENVOY_SIDECAR_COMMIT"),
    ")"
);

/// The operator command line, as clap parses it; [`parse`] turns it into [`Args`].
#[derive(Debug, clap::Parser)]
#[command(
    name = "envoy-sidecar",
    version = VERSION,
    about = "A TLS-terminating Envoy in front of every container: the operator command and the target of runc's hooks",
    after_help = CONFIG_HELP,
    disable_help_subcommand = false,
    infer_subcommands = false
)]
pub struct Cli {
    /// The configuration file.
    #[arg(short = 'c', long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Sub>,
}

#[derive(Debug, clap::Args)]
struct Ns {
    /// The containerd namespace.
    #[arg(short = 'n', long, value_name = "NS", default_value = "default")]
    namespace: String,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Validate the configuration; non-zero exit on error.
    CheckConfig,
    /// One row per proxied container, with its status and faults.
    ///
    /// Status (waiting-for-network, starting, ready, degraded + why, stopping, gone),
    /// ports, IP, NAT, Envoy, restarts, OOM kills, certificate expiry, last error.
    /// Never refuses to run: a configuration error is printed above the table.
    Status {
        /// Only this containerd namespace.
        #[arg(short = 'n', long, value_name = "NS")]
        namespace: Option<String>,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print a container's decided state and status as JSON.
    Inspect {
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        ns: Ns,
    },
    /// A container's supervisor log, or with --envoy Envoy's output.
    ///
    /// The rotated copy (`.1`) first, then the current file ([log] max_file_kb each).
    Logs {
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        ns: Ns,
        /// Envoy's stdout and stderr instead of the supervisor's log.
        #[arg(long)]
        envoy: bool,
        /// Keep printing new lines (across rotations) until the container is removed.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Re-issue instance identity now (re-reading the CA).
    Rotate {
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        /// Every proxied container.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        ns: Ns,
    },
    /// Run an OCI hook stage, the OCI state JSON on stdin.
    ///
    /// STAGE: createRuntime, poststart or poststop (runc runs these, as the wrapper or
    /// the hooks.d files registered them).
    Hook {
        #[arg(value_name = "STAGE")]
        stage: String,
        #[command(flatten)]
        ns: Ns,
    },
    /// Memory of proxied containers, rescaled to the quota the user asked for.
    ///
    /// From containerd's task metrics.
    Metrics {
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        #[command(flatten)]
        ns: Ns,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// containerd's socket.
        #[arg(short = 'a', long, value_name = "SOCK", default_value = crate::metrics::DEFAULT_ADDRESS)]
        address: PathBuf,
    },
    /// Serve the metrics of every proxied container as Prometheus text.
    ///
    /// Memory rescaled to the requested quota, Envoy restarts, OOM kills, credential
    /// expiry, status.
    ServeMetrics {
        /// Where to serve, e.g. 127.0.0.1:9535.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// containerd's socket.
        #[arg(short = 'a', long, value_name = "SOCK", default_value = crate::metrics::DEFAULT_ADDRESS)]
        address: PathBuf,
    },
    /// additional_memory_allocation_mb for N concurrent connections.
    ///
    /// From Envoy's measured cost (docs/BENCHMARKS.md).
    RecommendMemory {
        /// Concurrent connections.
        #[arg(long, value_name = "N", value_parser = parse_connections)]
        connections: u64,
        /// Mutual TLS.
        #[arg(long)]
        mtls: bool,
        /// Print the Kubernetes RuntimeClass whose overhead.podFixed.memory pays for it.
        #[arg(long)]
        runtime_class: bool,
    },
    /// Check this host before enabling the product.
    Doctor {
        /// containerd (a path, or a name in PATH).
        #[arg(long, value_name = "BIN", default_value = "containerd")]
        containerd: PathBuf,
        /// containerd's config.toml.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/etc/containerd/config.toml"
        )]
        containerd_config: PathBuf,
        /// Where install put the drop-in.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Install the product on this host.
    ///
    /// Binaries (from beside this one), default config (kept if present), containerd
    /// drop-in, gc timer, OCI hooks.d files, shell completions and man pages.
    Install {
        /// Print what would be done; do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Install below this directory.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// The containerd whose config version the drop-in is written in.
        #[arg(long, value_name = "BIN", default_value = "containerd")]
        containerd: PathBuf,
        /// The drop-in's config version: 2 (containerd 1.6/1.7) or 3 (containerd 2.x).
        #[arg(long = "containerd-config-version", value_name = "2|3", value_parser = parse_config_version)]
        config_version: Option<u32>,
        /// The runc shim's BinaryName (default /usr/local/bin/envoy-sidecar-runc).
        #[arg(long, value_name = "PATH", value_parser = parse_binary_name)]
        binary_name: Option<String>,
    },
    /// Remove exactly what install added.
    Uninstall {
        /// Print what would be done; do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Installed below this directory.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Remove what containers that no longer exist left.
    ///
    /// Their state, NAT mappings, processes and cgroups.
    Gc {
        /// Print what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave containers younger than this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = parse_grace)]
        grace: u64,
    },
    /// Run a container's sidecar supervisor.
    ///
    /// Started by the poststart hook; runs until the container's init exits.
    Supervise {
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        ns: Ns,
    },
    /// Write a self-signed CA (ca.crt, ca.key) for trials.
    GenerateCa {
        /// The directory to write to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The CA's common name.
        #[arg(
            long,
            value_name = "NAME",
            default_value = "envoy-sidecar instance identity CA"
        )]
        cn: String,
    },
    /// Shell completions, on stdout (install writes them too).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

fn parse_connections(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|n| *n <= 10_000_000)
        .ok_or_else(|| format!("--connections {v:?}: valid: a whole number from 0 to 10000000"))
}

fn parse_grace(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .map_err(|_| format!("--grace {v:?}: valid: a whole number of seconds"))
}

fn parse_config_version(v: &str) -> Result<u32, String> {
    match v {
        "2" => Ok(2),
        "3" => Ok(3),
        _ => Err(format!(
            "--containerd-config-version {v:?}: valid: 2 (containerd 1.6/1.7) or 3 (containerd 2.x)"
        )),
    }
}

fn parse_binary_name(v: &str) -> Result<String, String> {
    if v.starts_with('/') {
        Ok(v.to_string())
    } else {
        Err(format!(
            "--binary-name {v:?}: valid: an absolute path to envoy-sidecar-runc"
        ))
    }
}

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
    Completions {
        shell: clap_complete::Shell,
    },
    Logs {
        id: String,
        namespace: String,
        envoy: bool,
        follow: bool,
    },
    Help,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub cmd: Cmd,
}

/// The clap command (for help, completions and man pages).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// What `--help` or `--version` printed (exit 0), or the parsed command line.
pub enum Parsed {
    Shown(String),
    Run(Args),
}

/// `args` excludes argv[0]. `Err`: a usage error, the message as clap renders it
/// (with what is valid, and a suggestion for a near-miss).
pub fn parse(args: &[String]) -> anyhow::Result<Args> {
    match parse_or_show(args)? {
        Parsed::Run(a) => Ok(a),
        Parsed::Shown(_) => Ok(Args {
            config: None,
            cmd: Cmd::Help,
        }),
    }
}

pub fn parse_or_show(args: &[String]) -> anyhow::Result<Parsed> {
    use clap::Parser as _;
    let argv = std::iter::once("envoy-sidecar".to_string()).chain(args.iter().cloned());
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    Ok(Parsed::Shown(e.render().to_string()))
                }
                _ => bail!("{}", e.render().to_string().trim_end()),
            };
        }
    };
    let cmd = match cli.cmd {
        None => Cmd::Help,
        Some(Sub::CheckConfig) => Cmd::CheckConfig,
        Some(Sub::Status { namespace, json }) => Cmd::Status { namespace, json },
        Some(Sub::Inspect { id, ns }) => Cmd::Inspect {
            id,
            namespace: ns.namespace,
        },
        Some(Sub::Logs {
            id,
            ns,
            envoy,
            follow,
        }) => Cmd::Logs {
            id,
            namespace: ns.namespace,
            envoy,
            follow,
        },
        Some(Sub::Rotate { ids, all, ns }) => {
            if all != ids.is_empty() {
                bail!(
                    "rotate needs container IDs or --all (not both); see `envoy-sidecar rotate --help`"
                );
            }
            Cmd::Rotate {
                ids,
                all,
                namespace: ns.namespace,
            }
        }
        Some(Sub::Hook { stage, ns }) => Cmd::Hook {
            stage,
            namespace: ns.namespace,
        },
        Some(Sub::Metrics {
            ids,
            ns,
            json,
            address,
        }) => Cmd::Metrics {
            ids,
            namespace: ns.namespace,
            json,
            address,
        },
        Some(Sub::ServeMetrics { listen, address }) => Cmd::ServeMetrics { listen, address },
        Some(Sub::RecommendMemory {
            connections,
            mtls,
            runtime_class,
        }) => Cmd::RecommendMemory {
            connections,
            mtls,
            runtime_class,
        },
        Some(Sub::Doctor {
            containerd,
            containerd_config,
            root,
        }) => Cmd::Doctor {
            containerd,
            containerd_config,
            root,
        },
        Some(Sub::Install {
            dry_run,
            root,
            containerd,
            config_version,
            binary_name,
        }) => Cmd::Install {
            dry_run,
            root,
            containerd,
            config_version,
            binary_name,
        },
        Some(Sub::Uninstall { dry_run, root }) => Cmd::Uninstall { dry_run, root },
        Some(Sub::Gc { dry_run, grace }) => Cmd::Gc {
            dry_run,
            grace_secs: grace,
        },
        Some(Sub::Supervise { id, ns }) => Cmd::Supervise {
            id,
            namespace: ns.namespace,
        },
        Some(Sub::GenerateCa { out, cn }) => Cmd::GenerateCa { out, cn },
        Some(Sub::Completions { shell }) => Cmd::Completions { shell },
    };
    Ok(Parsed::Run(Args {
        config: cli.config,
        cmd,
    }))
}

/// Shell completions for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), crate::CLI_NAME, &mut out);
    out
}

/// What install writes besides the binaries: completions for bash, zsh and fish, and
/// a man page for the command and each subcommand (`envoy-sidecar-status.1`, ...).
pub fn docs() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use clap_complete::Shell;
    let mut out = vec![
        (
            "usr/share/bash-completion/completions/envoy-sidecar".to_string(),
            completions(Shell::Bash),
        ),
        (
            "usr/share/zsh/vendor-completions/_envoy-sidecar".to_string(),
            completions(Shell::Zsh),
        ),
        (
            "usr/share/fish/vendor_completions.d/envoy-sidecar.fish".to_string(),
            completions(Shell::Fish),
        ),
    ];
    let root = command();
    let mut page = |cmd: clap::Command, name: String| -> anyhow::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.name(name.clone())).render(&mut buf)?;
        out.push((format!("usr/share/man/man1/{name}.1"), buf));
        Ok(())
    };
    page(root.clone(), crate::CLI_NAME.to_string())?;
    for sub in root.get_subcommands() {
        let name = format!("{}-{}", crate::CLI_NAME, sub.get_name());
        page(sub.clone(), name)?;
    }
    Ok(out)
}

pub fn main(argv: Vec<String>) -> i32 {
    let args = match parse_or_show(&argv[1.min(argv.len())..]) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Shown(text)) => {
            // Not print!: a closed pipe (`| head`) is no reason to panic.
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(text.as_bytes());
            return 0;
        }
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
        Cmd::Help => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stdout(), "{}", command().render_help());
        }
        Cmd::Logs {
            id,
            namespace,
            envoy,
            follow,
        } => {
            store::check_id(&id)?;
            store::check_namespace(&namespace)?;
            // Like status: the files are read even with a configuration that does not
            // validate (its state_dir is still known).
            let (cfg, problem) = status_config(args.config.as_deref());
            if let Some(p) = problem {
                eprintln!("envoy-sidecar: {p}");
            }
            let st = Store::of(&cfg);
            let paths = crate::state::layout::Paths::new(&st, &namespace, &id);
            let file = if envoy {
                paths.envoy_log()
            } else {
                paths.supervisor_log()
            };
            crate::ops::logs::show(&paths.dir, &file, follow, &mut std::io::stdout().lock())?;
        }
        Cmd::Completions { shell } => {
            use std::io::Write as _;
            std::io::stdout().write_all(&completions(shell))?;
        }
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
            let docs = docs()?;
            for a in crate::ops::install::install(&root, bins, &drop_in, &docs, dry_run)? {
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
            crate::logging::init(
                crate::logging::Component::Metrics,
                cfg.log.settings(),
                crate::logging::Container::default(),
                crate::logging::Sink::Stderr,
            );
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
            crate::logging::init(
                crate::logging::Component::Supervisor,
                cfg.log.settings(),
                crate::logging::Container {
                    namespace: namespace.clone(),
                    id: id.clone(),
                },
                crate::logging::Sink::File,
            );
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
            crate::logging::init(
                crate::logging::Component::Hook,
                cfg.log.settings(),
                crate::logging::Container {
                    namespace: namespace.clone(),
                    id: state.id.clone(),
                },
                crate::logging::Sink::Stderr,
            );
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

    fn shown(s: &str) -> String {
        let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        match parse_or_show(&v).unwrap() {
            Parsed::Shown(t) => t,
            Parsed::Run(a) => panic!("{s}: parsed as {a:?}"),
        }
    }

    #[test]
    fn help_version_and_suggestions() {
        for sub in [
            "check-config",
            "status",
            "inspect",
            "rotate",
            "hook",
            "metrics",
            "serve-metrics",
            "recommend-memory",
            "doctor",
            "install",
            "uninstall",
            "gc",
            "supervise",
            "generate-ca",
            "completions",
        ] {
            for h in ["--help", "-h"] {
                let t = shown(&format!("{sub} {h}"));
                assert!(
                    t.contains(&format!("Usage: envoy-sidecar {sub}")),
                    "{sub} {h}: {t}"
                );
            }
        }
        let t = shown("inspect -h");
        assert!(
            t.contains("--namespace <NS>") && t.contains("[default: default]"),
            "{t}"
        );
        assert!(shown("--help").contains("Commands:"));
        assert!(shown("help status").contains("Usage: envoy-sidecar status"));
        let v = shown("--version");
        assert_eq!(v.trim(), format!("envoy-sidecar {}", crate::version()));
        assert_eq!(shown("-V"), v);
        let e = p("stauts").unwrap_err().to_string();
        assert!(e.contains("'status'"), "a suggestion: {e}");
        let e = p("status --jsno").unwrap_err().to_string();
        assert!(e.contains("--json"), "a suggestion: {e}");
    }

    #[test]
    fn values_are_checked_with_what_is_valid() {
        for (args, says) in [
            (
                "recommend-memory --connections x",
                "--connections \"x\": valid: a whole number from 0 to 10000000",
            ),
            (
                "recommend-memory --connections 10000001",
                "valid: a whole number from 0 to 10000000",
            ),
            (
                "gc --grace soon",
                "--grace \"soon\": valid: a whole number of seconds",
            ),
            (
                "install --containerd-config-version 4",
                "valid: 2 (containerd 1.6/1.7) or 3 (containerd 2.x)",
            ),
            (
                "install --binary-name envoy-sidecar-runc",
                "valid: an absolute path to envoy-sidecar-runc",
            ),
            ("completions tcsh", "tcsh"),
        ] {
            let e = p(args).unwrap_err().to_string();
            assert!(e.contains(says), "{args}: {e}");
        }
        assert_eq!(
            p("recommend-memory --connections 1000 --mtls").unwrap().cmd,
            Cmd::RecommendMemory {
                connections: 1000,
                mtls: true,
                runtime_class: false
            }
        );
        assert_eq!(
            p("gc --dry-run").unwrap().cmd,
            Cmd::Gc {
                dry_run: true,
                grace_secs: 60
            }
        );
        assert!(matches!(
            p("install --containerd-config-version 3 --binary-name /opt/w").unwrap().cmd,
            Cmd::Install { config_version: Some(3), binary_name: Some(ref b), .. } if b == "/opt/w"
        ));
    }

    #[test]
    fn completions_and_man_pages_are_generated() {
        let d = docs().unwrap();
        let names: Vec<&str> = d.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "usr/share/bash-completion/completions/envoy-sidecar",
            "usr/share/zsh/vendor-completions/_envoy-sidecar",
            "usr/share/fish/vendor_completions.d/envoy-sidecar.fish",
            "usr/share/man/man1/envoy-sidecar.1",
            "usr/share/man/man1/envoy-sidecar-status.1",
            "usr/share/man/man1/envoy-sidecar-install.1",
        ] {
            assert!(names.contains(&want), "{want}: {names:?}");
        }
        let bash = String::from_utf8(d[0].1.clone()).unwrap();
        assert!(
            bash.contains("check-config") && bash.contains("--namespace"),
            "{bash:.300}"
        );
        let man = d
            .iter()
            .find(|(n, _)| n.ends_with("envoy-sidecar-status.1"))
            .unwrap();
        let man = String::from_utf8_lossy(&man.1);
        assert!(man.contains(".TH") && man.contains("json"), "{man:.300}");
    }

    #[test]
    fn argv_errors() {
        assert!(p("inspect").unwrap_err().to_string().contains("<ID>"));
        assert!(p("frob").unwrap_err().to_string().contains("'frob'"));
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
                .contains("a value is required for '--config <PATH>'")
        );
    }
}
