//! The syscalls the sidecar lifecycle needs, behind one small seam: process identity
//! (pid + start time, so a recycled pid is never signalled), pidfds to wait on
//! processes we did not fork, namespace entry, and the privilege drop for Envoy.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A process as identified over time: pid plus its start time (clock ticks since boot,
/// field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
        self.alive() && unsafe { libc::kill(self.pid, sig) } == 0
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; true once it is gone.
    pub fn terminate(&self, grace: Duration) -> bool {
        if !self.signal(libc::SIGTERM) {
            return !self.alive();
        }
        if wait_gone(self, grace) {
            return true;
        }
        self.signal(libc::SIGKILL);
        wait_gone(self, Duration::from_secs(2))
    }
}

fn wait_gone(p: &ProcId, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if !p.alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !p.alive()
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
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Wait until one of `fds` is readable or `timeout` passes; returns the indexes ready.
pub fn poll_readable(fds: &[&OwnedFd], timeout: Duration) -> io::Result<Vec<usize>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    Ok(p.iter()
        .enumerate()
        .filter(|(_, x)| x.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

/// Enter the network namespace of `pid` (this thread only: setns is per-thread).
pub fn enter_netns(pid: i32) -> io::Result<()> {
    let f = File::open(format!("/proc/{pid}/ns/net"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }
}

/// The first non-loopback IPv4 address of the current network namespace.
pub fn first_ipv4() -> Option<std::net::Ipv4Addr> {
    let mut found = None;
    unsafe {
        let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifap) != 0 {
            return None;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() {
                    found = Some(ip);
                    break;
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    found
}

/// `first_ipv4` of the network namespace of `pid`, looked up from a short-lived
/// thread so the caller stays in its own namespace.
pub fn ipv4_of(pid: i32) -> io::Result<Option<std::net::Ipv4Addr>> {
    std::thread::spawn(move || {
        enter_netns(pid)?;
        Ok(first_ipv4())
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Whether two processes share a network namespace.
pub fn same_netns(a: i32, b: i32) -> bool {
    let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    matches!((ns(a), ns(b)), (Some(x), Some(y)) if x == y)
}

/// A signalfd for SIGTERM and SIGINT, with both blocked so they arrive only there.
pub fn termination_signalfd() -> io::Result<OwnedFd> {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Undo `termination_signalfd`'s mask in a child before exec.
pub fn unblock_all_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// In a forked child before exec: become `uid:gid` with no supplementary groups and no
/// capabilities (a root -> non-root setuid clears them all), and forbid regaining any.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Write our own pid into a cgroup (from a pre-exec child: raw syscalls only).
pub fn join_cgroup_raw(procs_file: &std::ffi::CStr) -> io::Result<()> {
    unsafe {
        let fd = libc::open(procs_file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let buf = b"0\n";
        let n = libc::write(fd, buf.as_ptr().cast(), buf.len());
        libc::close(fd);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
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
        assert!(ProcId::of(std::process::id() as i32).is_some());
    }

    #[test]
    fn identity_survives_only_while_alive() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
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
        let c = ProcId::of(child.id() as i32).unwrap();
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
