//! Setting up a child between fork and exec: the supervisor's Envoy joins its cgroups
//! and drops to an unprivileged user, then into its Landlock sandbox, before its first
//! instruction runs.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::sys::{landlock, process};

/// Have `cmd`'s child, before it execs, join the cgroups whose `cgroup.procs` files
/// are `procs` (so every page it touches is charged there), unblock every signal
/// (undoing `process::termination_signalfd`'s mask, which a child inherits), and
/// become `uid:gid` with no supplementary groups, no capabilities and `no_new_privs`,
/// then (with `sandbox`, a `landlock::Ruleset` descriptor that must stay open until the
/// spawn returns) enter that Landlock domain. A failing step fails the spawn with its
/// error.
pub fn confine(
    cmd: &mut Command,
    procs: Vec<CString>,
    uid: u32,
    gid: u32,
    sandbox: Option<RawFd>,
) -> &mut Command {
    let setup = move || {
        for f in &procs {
            process::join_cgroup_raw(f)?;
        }
        process::unblock_all_signals();
        process::ignore_sigpipe();
        process::drop_privileges(uid, gid)?;
        // Last: the domain would deny the cgroup write above.
        if let Some(fd) = sandbox {
            landlock::restrict_self_raw(fd)?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child, where only async-signal-safe
    // work is sound. It allocates nothing and takes no lock: the paths were built
    // before the fork and are only borrowed; join_cgroup_raw is open/write/close on
    // them, unblock_all_signals is sigemptyset + pthread_sigmask, ignore_sigpipe is
    // one signal(2) with SIG_IGN, drop_privileges is
    // setgroups/setresgid/setresuid/prctl (the child has a single thread, so glibc's
    // cross-thread set*id broadcast has no one to signal), and their errors are
    // errno values (`io::Error::last_os_error`, no allocation). The Landlock ruleset
    // was built before the fork; the child only makes the landlock_restrict_self
    // syscall on the inherited descriptor.
    unsafe { cmd.pre_exec(setup) }
}

/// Only `no_new_privs` and the Landlock domain `fd` (tests of the ruleset itself).
#[cfg(test)]
pub fn sandbox_only(cmd: &mut Command, fd: RawFd) -> &mut Command {
    let setup = move || {
        nix::sys::prctl::set_no_new_privs()?;
        landlock::restrict_self_raw(fd)
    };
    // SAFETY: in the forked child: prctl and landlock_restrict_self, two syscalls, no
    // allocation, errors as errno values.
    unsafe { cmd.pre_exec(setup) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    }

    #[test]
    fn a_failing_step_fails_the_spawn() {
        let procs = vec![CString::new("/nonexistent/cgroup.procs").unwrap()];
        let mut cmd = Command::new("/bin/true");
        let e = confine(&mut cmd, procs, 65534, 65534, None)
            .spawn()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn the_child_runs_as_the_given_user_without_groups() {
        if !is_root() {
            eprintln!("skipped: needs root to change user");
            return;
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "id -u; id -g; id -G; grep ^CapEff /proc/self/status"]);
        let out = confine(&mut cmd, Vec::new(), 65534, 65533, None)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..3], ["65534", "65533", "65533"], "{text}");
        assert_eq!(lines[3].split_whitespace().nth(1), Some("0000000000000000"));
    }
}
