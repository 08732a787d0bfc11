//! The syscalls the sidecar lifecycle needs, behind one small seam: process identity
//! (pid + start time, so a recycled pid is never signalled), pidfds to wait on
//! processes we did not fork, namespace entry, and the privilege drop for Envoy.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::signal::{SigSet, Signal};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A process as identified over time: pid plus its start time (clock ticks since boot,
/// field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|start_time| ProcId { pid, start_time })
    }

    /// Still the same process (not exited, pid not reused).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// Signal it only if it is still the process we recorded.
    pub fn signal(&self, sig: i32) -> bool {
        self.alive() && kill(self.pid, sig)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; true once it is gone.
    pub fn terminate(&self, grace: Duration) -> bool {
        // The pidfd pins the process: once it is open and the start time still
        // matches, the pid cannot be recycled under us, and its exit wakes the poll
        // at once (no sleep-and-look loop on the delete path).
        let fd = pidfd_open(self.pid).ok();
        if !self.signal(libc::SIGTERM) {
            return !self.alive();
        }
        if wait_gone(self, fd.as_ref(), grace) {
            return true;
        }
        self.signal(libc::SIGKILL);
        wait_gone(self, fd.as_ref(), Duration::from_secs(2))
    }
}

fn wait_gone(p: &ProcId, fd: Option<&OwnedFd>, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if !p.alive() {
            return true;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match fd {
            // Readable at exit; EINTR or a spurious wake-up just looks again.
            Some(fd) => {
                let _ = poll_readable(&[fd], left);
            }
            None => std::thread::sleep(left.min(Duration::from_millis(10))),
        }
    }
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

pub fn start_time(pid: i32) -> Option<u64> {
    // After ')': field 3 (state) is index 0, so field 22 (starttime) is index 19.
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z" || s == "X"))
}

/// A pidfd: becomes readable when the process exits, even if it is not our child.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Wait until one of `fds` is readable or `timeout` passes; returns the indexes ready.
pub fn poll_readable(fds: &[&OwnedFd], timeout: Duration) -> io::Result<Vec<usize>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut p: Vec<PollFd> = fds
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(&mut p, ms) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    }
    Ok(p.iter()
        .enumerate()
        .filter(|(_, x)| x.revents().is_some_and(|r| !r.is_empty()))
        .map(|(i, _)| i)
        .collect())
}

/// Enter the network namespace of `pid` (see `sys::netns`).
pub fn enter_netns(pid: i32) -> io::Result<()> {
    crate::sys::netns::enter(pid)
}

/// Drop this process's resident *executable* file pages (binary and shared libraries).
/// They stay in the page cache and fault back in on use, so a supervisor that idles in
/// `poll` for hours holds only the few pages it touches. Only `r-xp` mappings: text is
/// never written, whereas read-only data may be relocated (RELRO) and must be kept.
pub fn trim_text_pages() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("");
        if perms != "r-xp" || !path.starts_with('/') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        let Some(addr) = std::ptr::NonNull::new(a as *mut std::ffi::c_void) else {
            continue;
        };
        // SAFETY: [a, b) is a whole mapping the kernel listed for this process, and it
        // is private, read-only, file-backed text: MADV_DONTNEED only drops its resident
        // pages, which fault back in unchanged from the file on the next access, so no
        // memory any Rust value lives in is affected.
        let _ = unsafe {
            nix::sys::mman::madvise(addr, b - a, nix::sys::mman::MmapAdvise::MADV_DONTNEED)
        };
    }
}

fn termination_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// A signalfd for SIGTERM, SIGINT and SIGHUP (the supervisor's "rotate now"), all
/// blocked so they arrive only there.
pub fn termination_signalfd() -> io::Result<OwnedFd> {
    let set = termination_set();
    set.thread_block()?;
    let fd =
        nix::sys::signalfd::SignalFd::with_flags(&set, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)?;
    Ok(fd.into())
}

/// The next signal pending on a signalfd (non-blocking read of one
/// `signalfd_siginfo`), or `None`.
pub fn take_signal(fd: &OwnedFd) -> Option<i32> {
    // struct signalfd_siginfo is 128 bytes; ssi_signo (u32) comes first.
    let mut buf = [0u8; 128];
    let mut p = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO).ok()? == 0 {
        return None;
    }
    match nix::unistd::read(fd, &mut buf) {
        Ok(128) => i32::try_from(u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]])).ok(),
        _ => None,
    }
}

/// Undo `termination_signalfd`'s mask in a child before exec.
pub fn unblock_all_signals() {
    let _ = SigSet::empty().thread_set_mask();
}

/// A pipe for a child's output: `(read end, write end)`, both close-on-exec (the
/// child gets the write end as its stdout/stderr, which clears that) and non-blocking
/// — the child never stalls on a full pipe when its reader is busy or gone: the write
/// fails (EAGAIN, or EPIPE with SIGPIPE ignored, see [`ignore_sigpipe`]) and the line
/// is lost, not the service.
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // pipe2's O_NONBLOCK is on both descriptions already; said again for the write
    // end, the one the child shares.
    fcntl(&w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((r, w))
}

/// Read what is in the (non-blocking) pipe `fd` now, at most `max` bytes; `Ok(None)`
/// at end of file (every writer closed it).
pub fn read_available(fd: &OwnedFd, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    match nix::unistd::read(fd, &mut buf) {
        Ok(0) => Ok(None),
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(nix::errno::Errno::EAGAIN) => Ok(Some(Vec::new())),
        Err(e) => Err(e.into()),
    }
}

/// In a forked child before exec: ignore SIGPIPE (std resets it to the default in
/// children), so a child writing to a pipe whose reader died gets EPIPE instead of
/// dying: Envoy must outlive a killed supervisor.
pub fn ignore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal context;
    // signal(2) is async-signal-safe and allocates nothing (called between fork and
    // exec).
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

/// In a forked child before exec: become `uid:gid` with no supplementary groups and no
/// capabilities (a root -> non-root setuid clears them all), and forbid regaining any.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[])?;
    setresgid(gid, gid, gid)?;
    setresuid(uid, uid, uid)?;
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

/// Write our own pid into a cgroup (from a pre-exec child: no allocation, plain
/// syscalls only).
pub fn join_cgroup_raw(procs_file: &std::ffi::CStr) -> io::Result<()> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::open(
        procs_file,
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::write(&fd, b"0\n")?;
    Ok(())
}

/// Send `sig` to `pid` (callers that hold a `ProcId` use `ProcId::signal`, which
/// checks the pid was not reused). False if the signal could not be sent.
pub fn kill(pid: i32, sig: i32) -> bool {
    match Signal::try_from(sig) {
        Ok(s) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s).is_ok(),
        Err(_) => false,
    }
}

/// Make a spawned command the leader of a new session (no controlling terminal, no
/// process group shared with its parent): what a detached daemon needs.
pub fn new_session_before_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
}

/// The effective uid and gid of this process.
pub fn effective_ids() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

/// The real uid and gid of this process.
pub fn real_ids() -> (u32, u32) {
    (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    )
}

/// An anonymous in-memory file holding `bytes`, its offset back at 0: a way to hand
/// data to a child as a path (`/proc/self/fd/N`) without touching the disk.
pub fn memfd_with(name: &std::ffi::CStr, bytes: &[u8]) -> io::Result<File> {
    use std::io::{Seek, Write};
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::empty())?;
    let mut f = File::from(fd);
    f.write_all(bytes)?;
    f.rewind()?;
    Ok(f)
}

/// This process's pid as the kernel's signed type.
pub fn self_pid() -> i32 {
    nix::unistd::getpid().as_raw()
}

pub fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Process inspection and control as gc and the sidecar's control need it: the seam
/// that lets their decisions run against a fake process table.
pub trait Processes {
    /// Whether `p` is still the same live process.
    fn alive(&self, p: &ProcId) -> bool;
    /// Whether any process has pid `pid`.
    fn exists(&self, pid: i32) -> bool;
    /// SIGTERM, wait up to `grace`, SIGKILL; true once gone.
    fn terminate(&self, p: &ProcId, grace: Duration) -> bool;
    /// Every process with its command line, for recognising ours.
    fn scan(&self) -> Vec<(ProcId, Vec<String>)>;
    /// Start `program args` fully detached: a session of its own, stdin from
    /// /dev/null, stdout and stderr appended to `log`, nothing inherited (runc waits
    /// for its hooks' pipes to close).
    fn spawn_detached(&self, program: &Path, args: &[String], log: &Path) -> io::Result<()>;
}

/// The real process table (`/proc`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Procfs;

impl Processes for Procfs {
    fn alive(&self, p: &ProcId) -> bool {
        p.alive()
    }
    fn exists(&self, pid: i32) -> bool {
        exists(pid)
    }
    fn terminate(&self, p: &ProcId, grace: Duration) -> bool {
        p.terminate(grace)
    }
    fn scan(&self) -> Vec<(ProcId, Vec<String>)> {
        let me = self_pid();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let (Ok(raw), Some(id)) = (
                std::fs::read(format!("/proc/{pid}/cmdline")),
                ProcId::of(pid),
            ) else {
                continue;
            };
            let args = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push((id, args));
        }
        out
    }
    fn spawn_detached(&self, program: &Path, args: &[String], log: &Path) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        new_session_before_exec(&mut cmd);
        cmd.spawn().map(drop)
    }
}

/// An in-memory process table for unit tests: `terminate` removes the process.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeProcesses {
    pub table: std::cell::RefCell<Vec<(ProcId, Vec<String>)>>,
    pub terminated: std::cell::RefCell<Vec<ProcId>>,
    pub spawned: std::cell::RefCell<Vec<Vec<String>>>,
}

#[cfg(test)]
impl FakeProcesses {
    pub fn add(&self, pid: i32, argv: &[&str]) -> ProcId {
        let p = ProcId {
            pid,
            start_time: 1000 + u64::from(pid.unsigned_abs()),
        };
        self.table
            .borrow_mut()
            .push((p, argv.iter().map(|s| s.to_string()).collect()));
        p
    }
}

#[cfg(test)]
impl Processes for FakeProcesses {
    fn alive(&self, p: &ProcId) -> bool {
        self.table.borrow().iter().any(|(q, _)| q == p)
    }
    fn exists(&self, pid: i32) -> bool {
        self.table.borrow().iter().any(|(q, _)| q.pid == pid)
    }
    fn terminate(&self, p: &ProcId, _grace: Duration) -> bool {
        self.table.borrow_mut().retain(|(q, _)| q != p);
        self.terminated.borrow_mut().push(*p);
        true
    }
    fn scan(&self) -> Vec<(ProcId, Vec<String>)> {
        self.table.borrow().clone()
    }
    fn spawn_detached(&self, _program: &Path, args: &[String], _log: &Path) -> io::Result<()> {
        self.spawned.borrow_mut().push(args.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_text_pages_is_harmless() {
        trim_text_pages();
        // Code keeps running (pages fault back in) and data is intact.
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499500);
        assert!(ProcId::of(self_pid()).is_some());
    }

    #[test]
    fn identity_survives_only_while_alive() {
        let me = ProcId::of(self_pid()).unwrap();
        assert!(me.alive());
        let stale = ProcId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !stale.alive(),
            "a different start time is a different process"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let c = ProcId::of(i32::try_from(child.id()).unwrap()).unwrap();
        let fd = pidfd_open(c.pid).unwrap();
        assert!(
            poll_readable(&[&fd], Duration::from_millis(10))
                .unwrap()
                .is_empty()
        );
        assert!(c.terminate(Duration::from_secs(2)) || child.try_wait().unwrap().is_some());
        child.wait().unwrap();
        assert_eq!(
            poll_readable(&[&fd], Duration::from_secs(1)).unwrap(),
            vec![0]
        );
        assert!(!c.alive());
    }
}
