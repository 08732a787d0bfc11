//! Envoy's filesystem sandbox (issue 13): Envoy parses untrusted TLS, and runs in the
//! host's mount namespace; as its own uid it could otherwise read every world-readable
//! host file (another container's `supervisor.log`, a CA key left 0644). Landlock
//! confines it, and whatever it execs, to [`allow_list`]: the one place to extend when
//! Envoy needs another path.
//!
//! Best effort: a kernel without Landlock runs Envoy unconfined, and the [`Level`] says
//! so in the supervisor log and in `doctor`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::Proxy;
use crate::error::{Error, Result};
use crate::sys::landlock::{self, Ruleset};

/// What Envoy needs at a path (below it, for a directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read files (and list directories).
    Read,
    /// Read and execute: programs, the dynamic loader, shared libraries.
    ReadExec,
    /// Read, write, create and remove files and sockets below a directory (e.g. a
    /// unix admin socket's directory).
    Write,
}

impl Need {
    fn rights(self) -> u64 {
        use landlock::*;
        match self {
            Need::Read => READ_FILE | READ_DIR,
            Need::ReadExec => READ_FILE | READ_DIR | EXECUTE,
            Need::Write => {
                READ_FILE | READ_DIR | WRITE_FILE | TRUNCATE | MAKE_REG | MAKE_SOCK | REMOVE_FILE
            }
        }
    }
}

/// One entry of the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub path: PathBuf,
    pub need: Need,
    /// Missing: Envoy cannot start, so neither does the sandbox. Optional entries
    /// (library directories a distribution may not have) are skipped when missing.
    pub required: bool,
    pub why: &'static str,
}

/// Where the dynamic loader, libc and the libraries `ldd envoy` lists live (and the
/// loader's cache). Listing directories rather than `ldd`'s output keeps a start free
/// of an extra process; they hold only system package files.
pub const SYSTEM_LIBS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ld.so.cache",
];

/// The host's time zone, for the local times in Envoy's log lines (a symlink into
/// /usr/share/zoneinfo: the rule lands on the zone file it names).
pub const LOCALTIME: &str = "/etc/localtime";

/// CPU topology (`possible`, `online`, cache sharing), read by Envoy's allocator and
/// thread pool at start; not secret.
pub const CPU_TOPOLOGY: &str = "/sys/devices/system/cpu";

/// Everything Envoy may reach. `interpreter` is the `#!` program when `envoy_path` is
/// a script; `envoy_dir` holds the bootstrap and the SDS directory (Envoy watches it
/// with inotify and reads the files renamed into it); `extra` is
/// `proxy.sandbox_allow_read`. Its stdout and stderr (envoy.log) are descriptors it
/// inherits, which Landlock does not restrict.
///
/// Left out on purpose: `/proc` (Envoy reads /proc/self/maps and names its threads
/// through /proc/self/task/*/comm; both fail harmlessly, and /proc would show every
/// host process), the rest of `/etc`, the container's state directory above
/// `envoy_dir` (supervisor.log, state.json, nat.json), everything writable.
pub fn allow_list(
    envoy_path: &Path,
    interpreter: Option<&Path>,
    envoy_dir: &Path,
    admin_dir: Option<&Path>,
    extra: &[PathBuf],
) -> Vec<Allow> {
    let entry = |path: &Path, need, required, why| Allow {
        path: path.to_path_buf(),
        need,
        required,
        why,
    };
    let mut v = vec![entry(envoy_path, Need::ReadExec, true, "proxy.envoy_path")];
    if let Some(i) = interpreter {
        v.push(entry(
            i,
            Need::ReadExec,
            true,
            "interpreter of proxy.envoy_path",
        ));
    }
    for lib in SYSTEM_LIBS {
        v.push(entry(
            Path::new(lib),
            Need::ReadExec,
            false,
            "dynamic loader and shared libraries",
        ));
    }
    v.push(entry(Path::new(LOCALTIME), Need::Read, false, "time zone"));
    v.push(entry(
        Path::new(CPU_TOPOLOGY),
        Need::Read,
        false,
        "CPU topology",
    ));
    v.push(entry(
        envoy_dir,
        Need::Read,
        true,
        "bootstrap and SDS files",
    ));
    if let Some(d) = admin_dir {
        // `admin_listener = "unix"`: Envoy binds (and, after a crash, replaces) its
        // admin socket there; the directory is its own, nothing else is in it.
        v.push(entry(d, Need::Write, true, "admin socket directory"));
    }
    for x in extra {
        v.push(entry(x, Need::ReadExec, true, "proxy.sandbox_allow_read"));
    }
    v
}

/// The program named on a script's `#!` line (first word), if `path` is a script.
pub fn interpreter_of(path: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let head = head.get(..n)?.strip_prefix(b"#!")?;
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let prog = line.split_whitespace().next()?;
    Path::new(prog).is_absolute().then(|| PathBuf::from(prog))
}

/// How far Envoy is confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    Enforced {
        abi: u32,
        rules: usize,
    },
    /// The kernel cannot: the reason.
    Unsupported(String),
    /// `proxy.sandbox = false`.
    Off,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Enforced { abi, rules } => {
                write!(f, "Landlock ABI {abi} enforced ({rules} rules)")
            }
            Level::Unsupported(why) => write!(
                f,
                "NOT enforced: {why}; Envoy can read every world-readable host file"
            ),
            Level::Off => write!(
                f,
                "off (proxy.sandbox = false); Envoy can read every world-readable host file"
            ),
        }
    }
}

/// The Landlock ABI this kernel enforces, or why it cannot.
pub fn kernel_support() -> std::result::Result<u32, String> {
    landlock::abi().map_err(|e| unsupported_reason(&e))
}

/// What the error of the ABI probe means for the operator.
fn unsupported_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            "the kernel has no Landlock (needs Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK)"
                .into()
        }
        Some(libc::EOPNOTSUPP) => {
            "Landlock is built in but disabled (add landlock to the kernel's lsm= boot parameter)"
                .into()
        }
        _ => format!("Landlock unavailable: {e}"),
    }
}

/// Envoy's sandbox: the ruleset to apply before exec (none when not enforced), how
/// far it goes, and what each rule granted (for the log).
pub struct Sandbox {
    pub ruleset: Option<Ruleset>,
    pub level: Level,
    pub granted: Vec<landlock::Granted>,
}

/// Build the sandbox for `proxy`'s Envoy reading `envoy_dir` (and binding its admin
/// socket in `admin_dir`, if it has one).
pub fn prepare(proxy: &Proxy, envoy_dir: &Path, admin_dir: Option<&Path>) -> Result<Sandbox> {
    let none = |level| Sandbox {
        ruleset: None,
        level,
        granted: Vec::new(),
    };
    if !proxy.sandbox {
        return Ok(none(Level::Off));
    }
    let abi = match kernel_support() {
        Ok(a) => a,
        Err(why) => return Ok(none(Level::Unsupported(why))),
    };
    let interp = interpreter_of(&proxy.envoy_path);
    let list = allow_list(
        &proxy.envoy_path,
        interp.as_deref(),
        envoy_dir,
        admin_dir,
        &proxy.sandbox_allow_read,
    );
    let mut rs = Ruleset::new(abi)
        .map_err(|e| Error::Sandbox(format!("creating a Landlock ABI {abi} ruleset: {e}")))?;
    let mut granted = Vec::new();
    for a in &list {
        match rs.allow(&a.path, a.need.rights()) {
            Ok(g) => granted.push(g),
            Err(e) if !a.required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Sandbox(format!(
                    "{} ({}, {:?}): {e}",
                    a.path.display(),
                    a.why,
                    a.need
                )));
            }
        }
    }
    Ok(Sandbox {
        ruleset: Some(rs),
        level: Level::Enforced {
            abi,
            rules: granted.len(),
        },
        granted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_is_the_binary_libraries_and_envoy_dir_only() {
        let dir = Path::new("/run/es/default/c1/envoy");
        let list = allow_list(Path::new("/usr/local/bin/envoy"), None, dir, None, &[]);
        let paths: Vec<(&str, Need, bool)> = list
            .iter()
            .map(|a| (a.path.to_str().unwrap(), a.need, a.required))
            .collect();
        assert_eq!(
            paths,
            [
                ("/usr/local/bin/envoy", Need::ReadExec, true),
                ("/lib", Need::ReadExec, false),
                ("/lib64", Need::ReadExec, false),
                ("/usr/lib", Need::ReadExec, false),
                ("/usr/lib64", Need::ReadExec, false),
                ("/etc/ld.so.cache", Need::ReadExec, false),
                ("/etc/localtime", Need::Read, false),
                ("/sys/devices/system/cpu", Need::Read, false),
                ("/run/es/default/c1/envoy", Need::Read, true),
            ]
        );
        // Nothing of the container's directory beyond envoy/ (its supervisor.log,
        // state.json, nat.json), nothing of /etc but the loader cache, nothing
        // writable.
        assert!(list.iter().all(|a| a.need != Need::Write));
        assert!(
            !list
                .iter()
                .any(|a| a.path == Path::new("/run/es/default/c1")
                    || a.path == Path::new("/etc")
                    || a.path == Path::new("/")
                    || a.path == Path::new("/proc"))
        );
        let script = allow_list(
            Path::new("/opt/wrap.sh"),
            Some(Path::new("/bin/sh")),
            dir,
            None,
            &[PathBuf::from("/usr/local/bin/envoy")],
        );
        assert_eq!(script[1].path, Path::new("/bin/sh"));
        assert_eq!(script[1].need, Need::ReadExec);
        let last = script.last().unwrap();
        assert_eq!(
            (last.path.as_path(), last.need, last.required),
            (Path::new("/usr/local/bin/envoy"), Need::ReadExec, true)
        );
    }

    #[test]
    fn a_kernel_without_landlock_is_reported_with_the_reason() {
        let r = |n| unsupported_reason(&std::io::Error::from_raw_os_error(n));
        assert!(r(libc::ENOSYS).contains("5.13"), "{}", r(libc::ENOSYS));
        assert!(
            r(libc::EOPNOTSUPP).contains("lsm="),
            "{}",
            r(libc::EOPNOTSUPP)
        );
        let l = Level::Unsupported(r(libc::ENOSYS)).to_string();
        assert!(
            l.starts_with("NOT enforced: the kernel has no Landlock")
                && l.contains("world-readable"),
            "{l}"
        );
        assert_eq!(
            Level::Enforced { abi: 6, rules: 9 }.to_string(),
            "Landlock ABI 6 enforced (9 rules)"
        );
    }

    #[test]
    fn reads_the_interpreter_of_a_script() {
        let dir = std::env::temp_dir().join(format!("es-interp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = dir.join("s");
        std::fs::write(&s, "#! /bin/sh -e\nexec true\n").unwrap();
        assert_eq!(interpreter_of(&s), Some(PathBuf::from("/bin/sh")));
        std::fs::write(&s, "\x7fELF...").unwrap();
        assert_eq!(interpreter_of(&s), None);
        std::fs::write(&s, "#!sh\n").unwrap();
        assert_eq!(
            interpreter_of(&s),
            None,
            "relative: the kernel would not run it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn off_and_missing_required_paths_are_reported() {
        let mut p = Proxy {
            sandbox: false,
            ..Proxy::default()
        };
        assert_eq!(
            prepare(&p, Path::new("/x"), None).unwrap().level,
            Level::Off
        );
        if kernel_support().is_err() {
            return;
        }
        p.sandbox = true;
        p.envoy_path = "/nonexistent/envoy".into();
        let e = prepare(&p, Path::new("/tmp"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("/nonexistent/envoy") && e.contains("proxy.envoy_path"),
            "{e}"
        );
    }
}
