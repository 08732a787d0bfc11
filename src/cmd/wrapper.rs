//! `envoy-sidecar-runc`: a drop-in runc. It acts on `create`/`run` (spec mutation),
//! `exec` (environment for later processes) and `delete` (release), and otherwise
//! hands the unchanged argv to the real runc.
//!
//! Policy on a broken configuration: `create`/`run` fail (we cannot apply what the
//! operator asked for), every other command still reaches runc so that existing
//! containers can be inspected, killed and deleted.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Duration;

use crate::config::Config;
use crate::create::spec::JsonFile;
use crate::create::{self, Target};
use crate::error::{Error, Result};
use crate::runc::argv::{Command, Invocation};
use crate::runc::log;
use crate::sidecar::control;
use crate::state::store::{self, Store};

struct Ctx {
    argv: Vec<OsString>,
    inv: Invocation,
    runc: PathBuf,
}

impl Ctx {
    /// Say `msg` on stderr (as a `tracing` event, `[log]` format) and, for containerd,
    /// in runc's `--log` file in runc's own shape (its shim reads the last error there).
    fn log(&self, level: &str, msg: &str) {
        if level == "error" {
            tracing::error!("{msg}");
        } else {
            tracing::warn!("{msg}");
        }
        if let Some(log) = self.inv.global("log") {
            let json = self.inv.global("log-format") == Some("json");
            log::append(
                Path::new(log),
                level,
                &format!("envoy-sidecar: {msg}"),
                json,
            );
        }
    }

    fn runc(&self) -> Process {
        let mut p = Process::new(&self.runc);
        p.args(&self.argv[1..]);
        p
    }

    /// Become runc. Only returns on failure.
    fn exec(&self) -> i32 {
        let e = self.runc().exec();
        self.log(
            "error",
            &format!("cannot execute runtime.runc {}: {e}", self.runc.display()),
        );
        127
    }

    /// Run runc as a child with our stdio, and return its exit code.
    fn spawn(&self) -> i32 {
        match self.runc().status() {
            Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
            Err(e) => {
                self.log(
                    "error",
                    &format!("cannot execute runtime.runc {}: {e}", self.runc.display()),
                );
                127
            }
        }
    }

    /// The init pid of a container runc just created: its `--pid-file` (what
    /// containerd's shim passes), else `runc state`.
    fn init_pid(&self, id: &str) -> Option<i32> {
        let from_file = self.inv.flag("pid-file").and_then(|f| {
            std::fs::read_to_string(f)
                .ok()?
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|p| *p > 0)
        });
        from_file.or_else(|| {
            crate::runc::query::pid_of(&self.runc, &self.argv[1..1 + self.inv.global_len], id)
        })
    }

    /// `runc <global flags> delete --force <id>`, its errors to our stderr; best effort.
    fn force_delete(&self, id: &str) {
        let status = Process::new(&self.runc)
            .args(&self.argv[1..1 + self.inv.global_len])
            .args(["delete", "--force", id])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            self.log(
                "warning",
                &format!("runc delete --force {id} failed: {status:?}"),
            );
        }
    }

    /// Whether runc knows the container (`runc <global flags> state <id>`).
    fn exists_in_runc(&self, id: &str) -> bool {
        crate::runc::query::knows(&self.runc, &self.argv[1..1 + self.inv.global_len], id)
    }
}

/// The wrapper's whole life; returns the exit code (or never returns, having become runc).
pub fn main(argv: Vec<OsString>) -> i32 {
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let default_runc = crate::config::Runtime::default().runc;
    let inv = match Invocation::parse(&args) {
        Ok(inv) => inv,
        Err(e) => return unparsed(argv, &args, &e, default_runc),
    };
    if inv.asks_version() {
        // The one deliberate difference from plain runc: which wrapper this is, then
        // runc's own lines (callers that parse them look for "runc version").
        use std::io::Write as _;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{} {}", crate::WRAPPER_NAME, crate::version());
        let _ = out.flush();
    }
    let self_exe: Vec<PathBuf> = std::env::current_exe().into_iter().collect();
    // Only create/run use the CA files (spec decisions need a valid proxy config);
    // everything else only needs runtime.runc.
    let full = matches!(inv.command, Command::Create | Command::Run);
    let loaded = Config::load(None).and_then(|c| c.validate_for(&self_exe, full).map(|()| c));
    init_logging(&inv, loaded.as_ref().ok());
    let mut ctx = Ctx {
        argv,
        inv,
        runc: default_runc,
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            if matches!(ctx.inv.command, Command::Create | Command::Run) {
                ctx.log("error", &crate::error::render(&e));
                return 1;
            }
            ctx.log(
                "warning",
                &format!("{e}; passing through to {}", ctx.runc.display()),
            );
            // Best effort: a config that parses but fails validation still names runc.
            if let Ok(c) = Config::load(None) {
                ctx.runc = c.runtime.runc;
            }
            return ctx.exec();
        }
    };
    ctx.runc = cfg.runtime.runc.clone();

    let result = match ctx.inv.command {
        Command::Create | Command::Run => on_create(&ctx, &cfg),
        Command::Exec => on_exec(&mut ctx, &cfg).map(|()| None),
        Command::Delete => return on_delete(&ctx, &cfg),
        Command::Kill => {
            on_kill(&ctx, &cfg);
            Ok(None)
        }
        _ => Ok(None),
    };
    match result {
        Ok(None) => ctx.exec(),
        Ok(Some(code)) => code,
        Err(e) => {
            ctx.log("error", &crate::error::render(&e));
            1
        }
    }
}

/// An argv the wrapper cannot parse (a flag of a runc newer than [`KNOWN_RUNC`]). With
/// nothing to decide it goes to runc unchanged, so runc's own usage text and exit code
/// reach the caller: always with the proxy disabled, and for a `create`/`run` whose
/// spec asks for no proxy (or that runc refuses by itself). Refused: a `create`/`run`
/// of a container that asks for a proxy — handing it on would start it without one.
///
/// [`KNOWN_RUNC`]: crate::runc::argv::KNOWN_RUNC
fn unparsed(argv: Vec<OsString>, args: &[String], e: &Error, default_runc: PathBuf) -> i32 {
    let mut ctx = Ctx {
        argv,
        // Without a parse we still honour --log so containerd shows the reason.
        inv: fallback_invocation(args),
        runc: default_runc,
    };
    let cfg = Config::load(None).ok();
    init_logging(&ctx.inv, cfg.as_ref());
    let proxying = cfg.as_ref().is_some_and(|c| c.proxy.enabled);
    if proxying && may_create(args) {
        let asks = Invocation::bundle_of_unparsed(args).map(|b| create::asks(&b));
        if !matches!(asks, Some(create::Asks::Nothing | create::Asks::Unreadable)) {
            ctx.log(
                "error",
                &format!(
                    "{}; this container asks for a proxy, which cannot be set up for a command line this wrapper does not know (runc's own flags of {} are known)",
                    crate::error::render(e),
                    crate::runc::argv::KNOWN_RUNC
                ),
            );
            return 2;
        }
    }
    if let Some(c) = cfg {
        ctx.runc = c.runtime.runc;
    }
    ctx.exec()
}

/// The wrapper's lines: the configured `[log]` (defaults when the config is broken),
/// with the container the command names.
fn init_logging(inv: &Invocation, cfg: Option<&Config>) {
    crate::logging::init(
        crate::logging::Component::Wrapper,
        cfg.map(|c| c.log.settings()).unwrap_or_default(),
        crate::logging::Container {
            namespace: inv.namespace(),
            id: inv.id().unwrap_or_default().to_string(),
        },
        crate::logging::Sink::Stderr,
    );
}

/// Whether an argv that did not parse could be `create` or `run`: any argument spelled
/// so (the subcommand's position is unknown once a flag is not understood).
fn may_create(args: &[String]) -> bool {
    args.iter().any(|a| a == "create" || a == "run")
}

fn fallback_invocation(args: &[String]) -> Invocation {
    let mut inv = Invocation::parse(&[]).expect("empty argv parses");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let body = a.trim_start_matches('-');
        if let Some(v) = body.strip_prefix("log=") {
            inv.global.insert("log", v.into());
        } else if body == "log" {
            if let Some(v) = it.next() {
                inv.global.insert("log", v.clone());
            }
        } else if let Some(v) = body.strip_prefix("log-format=") {
            inv.global.insert("log-format", v.into());
        } else if body == "log-format"
            && let Some(v) = it.next()
        {
            inv.global.insert("log-format", v.clone());
        }
    }
    inv
}

fn container(inv: &Invocation) -> Result<Option<(String, String)>> {
    let Some(id) = inv.id() else {
        return Ok(None); // runc prints its own usage error
    };
    store::check_id(id)?;
    let ns = inv.namespace();
    store::check_namespace(&ns)?;
    Ok(Some((ns, id.to_string())))
}

fn cli_path(cfg: &Config) -> Result<PathBuf> {
    let path = match &cfg.runtime.cli {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join(crate::CLI_NAME)))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin").join(crate::CLI_NAME)),
    };
    if !path.is_file() {
        return Err(Error::Config {
            path: cfg
                .source
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            key: "runtime.cli".into(),
            msg: format!(
                "{} does not exist; runc hooks need the envoy-sidecar CLI (install it next to the wrapper or set runtime.cli)",
                path.display()
            ),
        });
    }
    Ok(path)
}

/// `Ok(None)`: become runc. `Ok(Some(code))`: runc already ran as our child.
fn on_create(ctx: &Ctx, cfg: &Config) -> Result<Option<i32>> {
    if !cfg.proxy.enabled {
        return Ok(None);
    }
    let Some((ns, id)) = container(&ctx.inv)? else {
        return Ok(None);
    };
    let bundle = ctx.inv.bundle()?;
    let cli = cli_path(cfg)?;
    let target = Target {
        namespace: &ns,
        id: &id,
        bundle: &bundle,
        cli: &cli,
        runc_root: ctx.inv.global("root").map(Path::new),
        mutate_spec: true,
        hooks_in_spec: ctx.inv.command == Command::Run,
    };
    match create::prepare(cfg, &target, || ctx.exists_in_runc(&id))? {
        create::Prepared::Nothing => Ok(None),
        create::Prepared::Proxy(_) => {
            let foreground = ctx.inv.command == Command::Run && !ctx.inv.flag_bool("detach");
            if foreground {
                // `runc run` in the foreground forwards signals to the container: it
                // must be runc itself, not our child. poststop releases the state.
                return Ok(None);
            }
            let code = ctx.spawn();
            if code != 0 {
                // (Under `run`, runc may already have run our poststop hook: release
                // is idempotent.)
                let _ = Store::of(cfg).remove(&ns, &id);
                return Ok(Some(code));
            }
            if !target.hooks_in_spec
                && let Err(e) = created(ctx, cfg, &ns, &id, &cli)
            {
                // Nothing half-applied: the container goes with its proxy.
                let store = Store::of(cfg);
                let host = crate::host::Host::system(&cfg.runtime.runc);
                let _ = control::teardown(&store, &host, &ns, &id);
                ctx.force_delete(&id);
                let _ = store.remove(&ns, &id);
                return Err(e);
            }
            Ok(Some(code))
        }
        create::Prepared::Member { pod, adopted } => {
            let store = Store::of(cfg);
            let pod_id = pod.id.clone();
            if adopted && let Err(e) = start_pod_sidecar(ctx, cfg, &store, pod) {
                // Nothing half-applied: the pod's proxy goes with the refused create.
                let host = crate::host::Host::system(&cfg.runtime.runc);
                let _ = control::teardown(&store, &host, &ns, &pod_id);
                let _ = store.remove(&ns, &pod_id);
                return Err(e);
            }
            let code = ctx.spawn();
            if code != 0 {
                let _ = store.leave_pod(&ns, &id);
            }
            Ok(Some(code))
        }
    }
}

/// After `runc create` returned: what the createRuntime and poststart hooks do when
/// runc runs them — the init pid recorded, the ingress filter, NAT if the netns is
/// already addressed, the supervisor launched — done here, without two more processes
/// on runc's path. The app still waits for `runc start`, so the filter is in place
/// before its first instruction, as createRuntime's would be.
fn created(ctx: &Ctx, cfg: &Config, ns: &str, id: &str, cli: &Path) -> Result<()> {
    let store = Store::of(cfg);
    let state = store.read(ns, id)?.ok_or_else(|| {
        Error::Hook(format!(
            "the record of {ns}/{id} is gone after runc create (removed by gc or a concurrent delete?)"
        ))
    })?;
    let pid = ctx.init_pid(id).ok_or_else(|| {
        Error::Hook(format!(
            "runc created {id} but neither its --pid-file nor `runc state` gives its init pid"
        ))
    })?;
    let host = crate::host::Host::system(&cfg.runtime.runc);
    control::start_for_running(&store, &host, (cli, cfg.source.as_deref()), state, pid)
}

/// A pod's proxy set up by one of its containers: its sandbox already runs, so the
/// sidecar starts now, in the sandbox's netns and cgroup (what the sandbox's hooks
/// would have done had the pod carried the annotation).
fn start_pod_sidecar(
    ctx: &Ctx,
    cfg: &Config,
    store: &Store,
    pod: crate::state::store::ContainerState,
) -> Result<()> {
    let global = &ctx.argv[1..1 + ctx.inv.global_len];
    let pid = crate::runc::query::pid_of(&ctx.runc, global, &pod.id).ok_or_else(|| {
        Error::Pod(format!(
            "the sandbox {} of this container is not running under runc (runc state), so its \
             proxy cannot start",
            pod.id
        ))
    })?;
    let host = crate::host::Host::system(&cfg.runtime.runc);
    control::start_for_running(
        store,
        &host,
        (&cli_path(cfg)?, cfg.source.as_deref()),
        pod,
        pid,
    )
}

/// containerd builds exec processes from its own copy of the spec, without what we
/// added to `config.json`: add our variables to the process file it hands runc.
///
/// Garden's dadoo hands the process spec over on a pipe (`-p /proc/<pid>/fd/0`): that
/// cannot be rewritten in place, and reading it drains it. Then the patched spec goes
/// to runc through an anonymous memfd (`/proc/self/fd/N`, inherited by runc), and
/// only that argument of the argv changes.
fn on_exec(ctx: &mut Ctx, cfg: &Config) -> Result<()> {
    let Some(process) = ctx.inv.flag("process").map(str::to_string) else {
        return Ok(()); // runc reads the (patched) config.json itself
    };
    // An id or namespace runc refuses has no state of ours: runc answers it.
    let Ok(Some((ns, id))) = container(&ctx.inv) else {
        return Ok(());
    };
    let store = Store::of(cfg);
    // A pod's container execs with the pod's environment.
    let state = match store.read(&ns, &id)? {
        Some(s) => s,
        None => match store.pod_of_member(&ns, &id)? {
            Some(pod) => pod,
            None => return Ok(()),
        },
    };
    let path = Path::new(&process);
    let mut f = JsonFile::load_stream(path)?;
    f.merge_env(false, &create::env_vars(&state), &[], true)?;
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return f.save();
    }
    // Left open (and inherited across exec) for runc to read as /proc/self/fd/N.
    let fd = crate::sys::process::memfd_with(c"envoy-sidecar-process", &f.to_bytes())
        .map(std::os::fd::IntoRawFd::into_raw_fd)
        .map_err(|e| Error::Spec {
            path: path.to_path_buf(),
            msg: format!("passing the patched process spec on: {e}"),
        })?;
    replace_flag_value(
        &mut ctx.argv,
        &["p", "process"],
        &format!("/proc/self/fd/{fd}"),
    );
    Ok(())
}

/// Replace the value of the (subcommand) flag named in `names`, in either form.
fn replace_flag_value(argv: &mut [OsString], names: &[&str], value: &str) {
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy().into_owned();
        let body = a.trim_start_matches('-');
        if a.starts_with('-') {
            if names.contains(&body) && i + 1 < argv.len() {
                argv[i + 1] = value.into();
                return;
            }
            if let Some((n, _)) = body.split_once('=')
                && names.contains(&n)
            {
                argv[i] = format!("{}{n}={value}", &a[..a.len() - body.len()]).into();
                return;
            }
        }
        i += 1;
    }
}

/// The signals a container is stopped with (runc's spelling: a number, or a name with
/// or without `SIG`, any case). SIGINT and SIGQUIT stop most apps as SIGTERM does
/// (QUIT is nginx's graceful stop), so they drain too; SIGKILL is never delayed.
fn stops(sig: &str) -> bool {
    let up = sig.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    matches!(name, "TERM" | "15" | "INT" | "2" | "QUIT" | "3")
}

/// A stopping signal for the container (to its init, or with `--all` to every
/// process): first stop Envoy accepting new connections, so a router gets a clean
/// refusal (and retries elsewhere) instead of a reset mid-request, then wait up to
/// `[proxy] drain_timeout` for the open connections to finish, so an app that exits at
/// once on the signal cuts none. Failures never block the kill.
fn on_kill(ctx: &Ctx, cfg: &Config) {
    let sig = ctx
        .inv
        .positional
        .get(1)
        .map(String::as_str)
        .unwrap_or("TERM");
    if !stops(sig) {
        return;
    }
    let Ok(Some((ns, id))) = container(&ctx.inv) else {
        return;
    };
    // Validated with the rest of the config; a bad value cannot reach here.
    let wait = cfg.drain_timeout().unwrap_or(Duration::from_secs(5));
    let store = Store::of(cfg);
    // A pod's app container going away drains the pod's Envoy (the kubelet stops the
    // containers before the sandbox; containerd's StopPodSandbox SIGKILLs them). Its
    // liveness check restarts a drained Envoy, so a restarted container is served again.
    let target = match store.read(&ns, &id) {
        Ok(Some(_)) => id.clone(),
        _ => match store.pod_of_member(&ns, &id) {
            Ok(Some(pod))
                if pod
                    .pod
                    .as_ref()
                    .is_some_and(|p| p.members.iter().any(|m| m.id == id && m.declares_ports)) =>
            {
                pod.id
            }
            _ => return,
        },
    };
    match control::drain(&store, &ns, &target, wait) {
        Ok(Some(d)) if d.open > 0 => ctx.log(
            "warning",
            &format!(
                "{id}: {} downstream connection(s) still open after proxy.drain_timeout {}; signalling the app",
                d.open,
                humantime::format_duration(wait)
            ),
        ),
        Ok(_) => {}
        Err(e) => ctx.log("warning", &format!("draining the proxy of {id}: {e}")),
    }
}

fn on_delete(ctx: &Ctx, cfg: &Config) -> i32 {
    let ids = match container(&ctx.inv) {
        Ok(Some(c)) => c,
        // No id, or one runc refuses (nothing of ours can exist): runc answers it.
        Ok(None) | Err(_) => return ctx.exec(),
    };
    // Nothing of ours (no proxy, or already released): become runc, no extra fork.
    let store = Store::of(cfg);
    if !matches!(store.read(&ids.0, &ids.1), Ok(Some(_))) {
        if !matches!(store.pod_of_member(&ids.0, &ids.1), Ok(Some(_))) {
            return ctx.exec();
        }
        // A pod's container: the pod keeps its proxy; only the membership goes.
        let code = ctx.spawn();
        if (code == 0 || !ctx.exists_in_runc(&ids.1))
            && let Err(e) = store.leave_pod(&ids.0, &ids.1)
        {
            ctx.log("warning", &format!("taking {} out of its pod: {e}", ids.1));
        }
        return code;
    }
    // runc cannot remove a cgroup that still holds Envoy: stop the sidecar first.
    let host = crate::host::Host::system(&cfg.runtime.runc);
    if let Err(e) = control::teardown(&store, &host, &ids.0, &ids.1) {
        ctx.log(
            "warning",
            &format!("stopping the sidecar of {}: {e}", ids.1),
        );
    }
    let code = ctx.spawn();
    // A refused delete (running container without --force) keeps its state.
    if (code == 0 || !ctx.exists_in_runc(&ids.1))
        && let Err(e) = store.remove(&ids.0, &ids.1)
    {
        ctx.log("warning", &format!("releasing {}: {e}", ids.1));
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopping_signals_in_runcs_spellings() {
        for s in [
            "TERM", "SIGTERM", "term", "15", "INT", "SIGINT", "2", "QUIT", "sigquit", "3",
        ] {
            assert!(stops(s), "{s}");
        }
        for s in ["KILL", "9", "HUP", "SIGUSR1", "USR2", "1", "150", ""] {
            assert!(!stops(s), "{s}");
        }
    }

    #[test]
    fn replaces_only_the_process_value() {
        let mut a: Vec<OsString> = [
            "runc",
            "--root",
            "/r",
            "exec",
            "-d",
            "-p",
            "/proc/9/fd/0",
            "c1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        replace_flag_value(&mut a, &["p", "process"], "/proc/self/fd/5");
        assert_eq!(a[6], "/proc/self/fd/5");
        assert_eq!(a[2], "/r");
        let mut b: Vec<OsString> = ["runc", "exec", "--process=/x", "c1"]
            .iter()
            .map(OsString::from)
            .collect();
        replace_flag_value(&mut b, &["p", "process"], "/proc/self/fd/5");
        assert_eq!(b[2], "--process=/proc/self/fd/5");
    }
}
