//! runc's command line, parsed the way runc (Go `flag` via urfave/cli) parses it: `-f`
//! and `--f` are the same, values come as `--flag v` or `--flag=v`, booleans take only
//! the `=` form, `--` ends flags. Only the subcommands the wrapper acts on are parsed
//! past the global flags; the argv itself is always handed to runc unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The runc releases whose command lines this parser knows (read in their sources:
/// docs/ENGINES.md); an argv with anything else is refused only for a container that
/// asks for a proxy.
pub const KNOWN_RUNC: &str = "runc 1.1 to 1.3";

/// (names, takes a value)
type FlagSpec = &'static [(&'static [&'static str], bool)];

const GLOBAL: FlagSpec = &[
    (&["debug"], false),
    (&["log"], true),
    (&["log-format"], true),
    (&["root"], true),
    (&["criu"], true),
    (&["systemd-cgroup"], false),
    (&["rootless"], true),
    (&["help", "h"], false),
    (&["version", "v"], false),
];

// `--criu` is hidden and ignored from runc 1.2 on (gone in 1.4), still parsed.
const CREATE: FlagSpec = &[
    (&["bundle", "b"], true),
    (&["console-socket"], true),
    // runc 1.2+: the container init's pidfd sent to this unix socket.
    (&["pidfd-socket"], true),
    (&["pid-file"], true),
    (&["no-pivot"], false),
    (&["no-new-keyring"], false),
    (&["preserve-fds"], true),
    (&["help", "h"], false),
];

const RUN: FlagSpec = &[
    (&["bundle", "b"], true),
    (&["console-socket"], true),
    (&["pidfd-socket"], true),
    (&["pid-file"], true),
    (&["no-pivot"], false),
    (&["no-new-keyring"], false),
    (&["preserve-fds"], true),
    (&["detach", "d"], false),
    (&["keep"], false),
    (&["no-subreaper"], false),
    (&["help", "h"], false),
];

const EXEC: FlagSpec = &[
    (&["console-socket"], true),
    (&["pidfd-socket"], true),
    (&["cwd"], true),
    (&["env", "e"], true),
    (&["tty", "t"], false),
    (&["user", "u"], true),
    (&["additional-gids", "g"], true),
    (&["process", "p"], true),
    (&["detach", "d"], false),
    (&["pid-file"], true),
    (&["process-label"], true),
    (&["apparmor"], true),
    (&["no-new-privs"], false),
    (&["cap", "c"], true),
    (&["preserve-fds"], true),
    (&["cgroup"], true),
    (&["ignore-paused"], false),
    (&["help", "h"], false),
];

const DELETE: FlagSpec = &[(&["force", "f"], false), (&["help", "h"], false)];
const KILL: FlagSpec = &[(&["all", "a"], false), (&["help", "h"], false)];
const START: FlagSpec = &[(&["help", "h"], false)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Create,
    Run,
    Exec,
    Delete,
    Kill,
    Start,
    /// Anything else (`features`, `state`, `events`, `ps`, `update`, ...): passed through.
    Other,
    /// No subcommand, or `--help`/`--version`: passed through.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Global flags by canonical (first) name; booleans hold "true"/"false".
    pub global: BTreeMap<&'static str, String>,
    pub command: Command,
    pub command_name: Option<String>,
    /// How many leading arguments are global flags (to reuse them for `runc state`).
    pub global_len: usize,
    pub flags: BTreeMap<&'static str, Vec<String>>,
    /// Positional arguments of the subcommand: container id first.
    pub positional: Vec<String>,
}

impl Invocation {
    /// `args` excludes argv[0].
    pub fn parse(args: &[String]) -> Result<Invocation> {
        let mut global = BTreeMap::new();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            if a == "--" {
                i += 1;
                break;
            }
            let Some((spec, inline)) = lookup(GLOBAL, a) else {
                break; // first non-flag: the subcommand
            };
            let (names, takes) = spec.ok_or_else(|| {
                Error::Args(format!(
                    "unknown global flag {a:?} (known: {}, the flags of {KNOWN_RUNC})",
                    known(GLOBAL)
                ))
            })?;
            let v = value(args, &mut i, names[0], takes, inline)?;
            global.insert(names[0], v);
        }
        let mut inv = Invocation {
            global,
            command: Command::None,
            command_name: None,
            global_len: i,
            flags: BTreeMap::new(),
            positional: Vec::new(),
        };
        if inv.bool_global("help") || inv.bool_global("version") || i >= args.len() {
            return Ok(inv);
        }
        let name = args[i].clone();
        i += 1;
        let (command, spec, flags_anywhere) = match name.as_str() {
            "create" => (Command::Create, CREATE, true),
            "run" => (Command::Run, RUN, true),
            // exec's arguments after the id are the process's own: flags end there.
            "exec" => (Command::Exec, EXEC, false),
            "delete" => (Command::Delete, DELETE, true),
            "kill" => (Command::Kill, KILL, true),
            "start" => (Command::Start, START, true),
            _ => {
                inv.command = Command::Other;
                inv.command_name = Some(name);
                return Ok(inv);
            }
        };
        inv.command = command;
        inv.command_name = Some(name.clone());
        let mut only_positional = false;
        while i < args.len() {
            let a = &args[i];
            if only_positional {
                inv.positional.push(a.clone());
                i += 1;
                continue;
            }
            if a == "--" {
                only_positional = true;
                i += 1;
                continue;
            }
            match lookup(spec, a) {
                None => {
                    inv.positional.push(a.clone());
                    i += 1;
                    if !flags_anywhere {
                        only_positional = true;
                    }
                }
                Some((None, _)) => {
                    return Err(Error::Args(format!(
                        "unknown flag {a:?} for `runc {name}` (known: {}, the flags of {KNOWN_RUNC})",
                        known(spec)
                    )));
                }
                Some((Some((names, takes)), inline)) => {
                    let v = value(args, &mut i, names[0], takes, inline)?;
                    inv.flags.entry(names[0]).or_default().push(v);
                }
            }
        }
        if inv.flag_bool("help") {
            inv.command = Command::None;
        }
        Ok(inv)
    }

    /// The bundle of a `create`/`run` argv that did not parse (a flag newer than
    /// [`KNOWN_RUNC`]): the value of `--bundle`/`-b` in any spelling, else the current
    /// directory. `None`: no `create`/`run` in it, or the bundle flag has no value.
    pub fn bundle_of_unparsed(args: &[String]) -> Option<PathBuf> {
        if !args.iter().any(|a| a == "create" || a == "run") {
            return None;
        }
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let body = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
            let Some(body) = body else { continue };
            if let Some(v) = body
                .strip_prefix("bundle=")
                .or_else(|| body.strip_prefix("b="))
            {
                return Some(PathBuf::from(v));
            }
            if body == "bundle" || body == "b" {
                return it.next().map(PathBuf::from);
            }
        }
        std::env::current_dir().ok()
    }

    /// `--version`/`-v` without `--help`: runc prints its version (and the wrapper its
    /// own line first).
    pub fn asks_version(&self) -> bool {
        self.command == Command::None && self.bool_global("version") && !self.bool_global("help")
    }

    fn bool_global(&self, name: &str) -> bool {
        self.global.get(name).is_some_and(|v| v == "true")
    }

    pub fn global(&self, name: &str) -> Option<&str> {
        self.global.get(name).map(String::as_str)
    }

    /// The last value of a value flag (Go's flag package: last one wins).
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    pub fn flag_bool(&self, name: &str) -> bool {
        self.flag(name) == Some("true")
    }

    pub fn id(&self) -> Option<&str> {
        self.positional.first().map(String::as_str)
    }

    /// `--bundle`, defaulting to the current directory as runc does.
    pub fn bundle(&self) -> Result<PathBuf> {
        match self.flag("bundle") {
            Some(b) if !b.is_empty() => Ok(PathBuf::from(b)),
            _ => std::env::current_dir()
                .map_err(|e| Error::Args(format!("no --bundle and no current directory: {e}"))),
        }
    }

    /// containerd's runc shim runs runc with `--root <runc root>/<namespace>`: the
    /// namespace is the last component when its parent is named `runc`. Otherwise
    /// (plain runc users, Garden) everything lives in namespace `default`.
    pub fn namespace(&self) -> String {
        self.global("root")
            .map(std::path::Path::new)
            .and_then(|root| {
                let parent = root.parent()?.file_name()?;
                (parent == "runc").then(|| root.file_name()?.to_str().map(str::to_string))?
            })
            .unwrap_or_else(|| "default".to_string())
    }
}

/// `None`: not a flag (positional). `Some((None, _))`: a flag we do not know.
#[allow(clippy::type_complexity)]
fn lookup(
    spec: FlagSpec,
    arg: &str,
) -> Option<(Option<(&'static [&'static str], bool)>, Option<String>)> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    if body.is_empty() || body.starts_with('-') {
        return None;
    }
    let (name, inline) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (body, None),
    };
    let found = spec
        .iter()
        .find(|(names, _)| names.contains(&name))
        .copied();
    Some((found, inline))
}

fn value(
    args: &[String],
    i: &mut usize,
    name: &str,
    takes: bool,
    inline: Option<String>,
) -> Result<String> {
    let flag = &args[*i];
    *i += 1;
    if takes {
        if let Some(v) = inline {
            return Ok(v);
        }
        let v = args
            .get(*i)
            .ok_or_else(|| Error::Args(format!("flag {flag:?} needs a value")))?;
        *i += 1;
        return Ok(v.clone());
    }
    match inline.as_deref() {
        None => Ok("true".into()),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok("true".into()),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok("false".into()),
        Some(v) => Err(Error::Args(format!(
            "flag --{name} is boolean; {v:?} is not true or false"
        ))),
    }
}

fn known(spec: FlagSpec) -> String {
    spec.iter()
        .map(|(names, _)| format!("--{}", names[0]))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Invocation> {
        let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        Invocation::parse(&v)
    }

    #[test]
    fn containerd_shim_create() {
        let i = p("--root /run/containerd/runc/k8s.io --log /b/log.json --log-format json create --bundle /b --pid-file /b/init.pid c1").unwrap();
        assert_eq!(i.command, Command::Create);
        assert_eq!(i.global("log"), Some("/b/log.json"));
        assert_eq!(i.global("log-format"), Some("json"));
        assert_eq!(i.namespace(), "k8s.io");
        assert_eq!(i.bundle().unwrap(), PathBuf::from("/b"));
        assert_eq!(i.flag("pid-file"), Some("/b/init.pid"));
        assert_eq!(i.id(), Some("c1"));
    }

    #[test]
    fn flag_forms() {
        let i = p("-root=/x/runc/ns1 --debug --systemd-cgroup=false create -b=/b c1 --no-pivot")
            .unwrap();
        assert_eq!(i.global("debug"), Some("true"));
        assert_eq!(i.global("systemd-cgroup"), Some("false"));
        assert_eq!(i.namespace(), "ns1");
        assert_eq!(i.bundle().unwrap(), PathBuf::from("/b"));
        assert!(i.flag_bool("no-pivot"));
        assert_eq!(i.id(), Some("c1"));
        let i = p("create c2").unwrap();
        assert_eq!(i.bundle().unwrap(), std::env::current_dir().unwrap());
        assert_eq!(i.namespace(), "default");
        let i = p("--root /run/runc create c3").unwrap();
        assert_eq!(i.namespace(), "default");
    }

    #[test]
    fn garden_run_detach() {
        let i = p("run --detach --bundle /b --pid-file /p c1").unwrap();
        assert_eq!(i.command, Command::Run);
        assert!(i.flag_bool("detach"));
        assert_eq!(i.id(), Some("c1"));
    }

    #[test]
    fn exec_stops_at_the_id() {
        let i = p("exec --process /tmp/p.json --detach c1").unwrap();
        assert_eq!(i.flag("process"), Some("/tmp/p.json"));
        let i = p("exec -t c1 sh -c --x").unwrap();
        assert_eq!(i.positional, ["c1", "sh", "-c", "--x"]);
        assert!(i.flag_bool("tty"));
        let i = p("exec --env A=1 -e B=2 c1 true").unwrap();
        assert_eq!(i.flags["env"], ["A=1", "B=2"]);
    }

    #[test]
    fn passthrough_commands() {
        assert_eq!(p("features").unwrap().command, Command::Other);
        assert_eq!(
            p("--root /r state c1 --weird").unwrap().command,
            Command::Other
        );
        assert_eq!(p("--version").unwrap().command, Command::None);
        assert!(p("--version").unwrap().asks_version());
        assert!(p("--root /r -v").unwrap().asks_version());
        assert!(!p("--version --help").unwrap().asks_version());
        assert!(!p("state x").unwrap().asks_version());
        assert_eq!(p("").unwrap().command, Command::None);
        assert_eq!(p("create --help").unwrap().command, Command::None);
        let i = p("delete --force c1").unwrap();
        assert_eq!((i.command, i.flag_bool("force")), (Command::Delete, true));
        let i = p("kill c1 TERM").unwrap();
        assert_eq!(i.positional, ["c1", "TERM"]);
    }

    /// Every flag runc 1.3 (and 1.1, 1.2) has on the commands the wrapper parses, in
    /// both spellings: it parses, a value flag keeps its value, and the container id
    /// after it is still the id.
    #[test]
    fn every_runc_1_3_flag() {
        let value_flags: &[(&str, &[&str])] = &[
            (
                "create",
                &[
                    "bundle",
                    "b",
                    "console-socket",
                    "pidfd-socket",
                    "pid-file",
                    "preserve-fds",
                ],
            ),
            (
                "run",
                &[
                    "bundle",
                    "b",
                    "console-socket",
                    "pidfd-socket",
                    "pid-file",
                    "preserve-fds",
                ],
            ),
            (
                "exec",
                &[
                    "console-socket",
                    "pidfd-socket",
                    "cwd",
                    "env",
                    "e",
                    "user",
                    "u",
                    "additional-gids",
                    "g",
                    "process",
                    "p",
                    "pid-file",
                    "process-label",
                    "apparmor",
                    "cap",
                    "c",
                    "preserve-fds",
                    "cgroup",
                ],
            ),
        ];
        let bool_flags: &[(&str, &[&str])] = &[
            ("create", &["no-pivot", "no-new-keyring"]),
            (
                "run",
                &[
                    "no-pivot",
                    "no-new-keyring",
                    "detach",
                    "d",
                    "keep",
                    "no-subreaper",
                ],
            ),
            (
                "exec",
                &["tty", "t", "detach", "d", "no-new-privs", "ignore-paused"],
            ),
            ("delete", &["force", "f"]),
            ("kill", &["all", "a"]),
        ];
        for (cmd, flags) in value_flags {
            for f in *flags {
                for form in [format!("--{f} /v"), format!("-{f}=/v")] {
                    let i = p(&format!("{cmd} {form} c1"))
                        .unwrap_or_else(|e| panic!("{cmd} {form}: {e}"));
                    assert_eq!(i.id(), Some("c1"), "{cmd} {form}");
                    let canonical = i.flags.keys().next().copied().unwrap();
                    assert_eq!(i.flag(canonical), Some("/v"), "{cmd} {form}");
                }
            }
        }
        for (cmd, flags) in bool_flags {
            for f in *flags {
                for form in [format!("--{f}"), format!("-{f}=true")] {
                    let i = p(&format!("{cmd} {form} c1"))
                        .unwrap_or_else(|e| panic!("{cmd} {form}: {e}"));
                    assert_eq!(i.id(), Some("c1"), "{cmd} {form}");
                    assert!(i.flags.values().all(|v| v == &["true"]), "{cmd} {form}");
                }
            }
        }
        for g in [
            "--debug",
            "--log /l",
            "--log-format json",
            "--root /r",
            "--criu /c",
            "--systemd-cgroup",
            "--rootless=auto",
            "--rootless true",
        ] {
            let i = p(&format!("{g} create c1")).unwrap_or_else(|e| panic!("{g}: {e}"));
            assert_eq!((i.command, i.id()), (Command::Create, Some("c1")), "{g}");
        }
        // runc 1.2's pidfd socket as the containerd shim would pass it.
        let i = p("--root /run/containerd/runc/k8s.io create --bundle /b --pidfd-socket /s.sock --pid-file /b/init.pid c1").unwrap();
        assert_eq!(i.flag("pidfd-socket"), Some("/s.sock"));
        assert_eq!(i.bundle().unwrap(), PathBuf::from("/b"));
        // start and features take no flags besides --help.
        assert_eq!(p("start c1").unwrap().id(), Some("c1"));
        assert_eq!(p("features").unwrap().command, Command::Other);
    }

    #[test]
    fn bundle_of_an_unparsed_create() {
        let v = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_string).collect() };
        let b = Invocation::bundle_of_unparsed;
        assert_eq!(
            b(&v("--root /r create --frob x --bundle /b c1")),
            Some(PathBuf::from("/b"))
        );
        assert_eq!(b(&v("run -b=/b2 --frob c1")), Some(PathBuf::from("/b2")));
        assert_eq!(
            b(&v("create --frob c1")),
            Some(std::env::current_dir().unwrap())
        );
        assert_eq!(b(&v("create --frob c1 --bundle")), None);
        assert_eq!(b(&v("--frob state c1")), None);
    }

    #[test]
    fn errors_name_the_flag() {
        let e = p("--bogus create c1").unwrap_err().to_string();
        assert!(e.contains("--bogus") && e.contains("--root"), "{e}");
        let e = p("create --frobnicate c1").unwrap_err().to_string();
        assert!(e.contains("--frobnicate") && e.contains("--bundle"), "{e}");
        assert!(e.contains("runc 1.1 to 1.3"), "{e}");
        let e = p("create --bundle").unwrap_err().to_string();
        assert!(e.contains("needs a value"), "{e}");
        let e = p("delete --force=maybe c1").unwrap_err().to_string();
        assert!(e.contains("boolean"), "{e}");
    }
}
