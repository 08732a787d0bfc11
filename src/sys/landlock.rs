//! Landlock (Linux 5.13+): a filesystem allow-list the kernel enforces on a process and
//! everything it execs, set up by the unprivileged process itself. Raw syscalls
//! (`landlock_create_ruleset`, `landlock_add_rule`, `landlock_restrict_self`) rather
//! than the `landlock` crate: the ruleset is built in the parent (opening paths and
//! allocating are fine there) and the forked child, where only async-signal-safe work
//! is sound, makes the one `landlock_restrict_self` call on the inherited descriptor.
//!
//! Every access right the running kernel knows is "handled" (denied unless a rule
//! grants it below a path); network rights are not handled (Envoy binds and connects).
//! From ABI 6 the domain is also scoped: no signals to, and no abstract unix sockets
//! of, processes outside it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

// Filesystem access rights (uapi/linux/landlock.h) and the ABI that introduced them.
pub const EXECUTE: u64 = 1 << 0;
pub const WRITE_FILE: u64 = 1 << 1;
pub const READ_FILE: u64 = 1 << 2;
pub const READ_DIR: u64 = 1 << 3;
const REMOVE_DIR: u64 = 1 << 4;
pub const REMOVE_FILE: u64 = 1 << 5;
const MAKE_CHAR: u64 = 1 << 6;
const MAKE_DIR: u64 = 1 << 7;
pub const MAKE_REG: u64 = 1 << 8;
pub const MAKE_SOCK: u64 = 1 << 9;
const MAKE_FIFO: u64 = 1 << 10;
const MAKE_BLOCK: u64 = 1 << 11;
const MAKE_SYM: u64 = 1 << 12;
/// ABI 2: link or rename into another directory.
const REFER: u64 = 1 << 13;
/// ABI 3.
pub const TRUNCATE: u64 = 1 << 14;
/// ABI 5.
const IOCTL_DEV: u64 = 1 << 15;

const ABI1_FS: u64 = EXECUTE
    | WRITE_FILE
    | READ_FILE
    | READ_DIR
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_CHAR
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_BLOCK
    | MAKE_SYM;

/// The rights that apply to a file that is not a directory (others are EINVAL there).
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

// ABI 6 scopes.
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Filesystem rights the kernel of ABI `abi` knows.
pub fn handled_fs(abi: u32) -> u64 {
    let mut fs = ABI1_FS;
    if abi >= 2 {
        fs |= REFER;
    }
    if abi >= 3 {
        fs |= TRUNCATE;
    }
    if abi >= 5 {
        fs |= IOCTL_DEV;
    }
    fs
}

fn scopes(abi: u32) -> u64 {
    if abi >= 6 {
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    } else {
        0
    }
}

/// The Landlock ABI version this kernel supports; the error says why none (ENOSYS:
/// the kernel lacks Landlock; EOPNOTSUPP: built in but not enabled at boot, see
/// `lsm=` on the kernel command line).
pub fn abi() -> io::Result<u32> {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION
    // flag only returns the ABI version; it reads no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(r).map_err(|_| io::Error::other(format!("Landlock ABI {r} out of range")))
}

/// A ruleset ready to be applied; its descriptor is close-on-exec (as the kernel
/// creates it), so the exec'd program does not keep it.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    pub abi: u32,
}

/// A rule the ruleset was built from, with what the kernel was asked to allow there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub path: PathBuf,
    pub access: u64,
}

impl Ruleset {
    /// A ruleset for ABI `abi` handling every filesystem right that ABI knows.
    pub fn new(abi: u32) -> io::Result<Ruleset> {
        let attr = RulesetAttr {
            handled_access_fs: handled_fs(abi),
            handled_access_net: 0,
            scoped: scopes(abi),
        };
        // Older kernels take the prefix they know (an ABI 1 kernel reads 8 bytes).
        let size = if abi >= 6 {
            size_of::<RulesetAttr>()
        } else if abi >= 4 {
            16
        } else {
            8
        };
        // SAFETY: attr is a live, initialised RulesetAttr and `size` is at most its
        // size; the kernel only reads it. The result is a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &raw const attr,
                size,
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ruleset { fd, abi })
    }

    /// Allow `access` (masked to what this ABI handles, and to the file rights when
    /// `path` is not a directory) beneath `path`; returns what was granted.
    pub fn allow(&mut self, path: &Path, access: u64) -> io::Result<Granted> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let f = nix::fcntl::open(
            c.as_c_str(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let is_dir = nix::sys::stat::fstat(&f)?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let mut allowed = access & handled_fs(self.abi);
        if !is_dir {
            allowed &= FILE_RIGHTS;
        }
        let attr = PathBeneathAttr {
            allowed_access: allowed,
            parent_fd: f.as_raw_fd(),
        };
        // SAFETY: attr is a live PathBeneathAttr (packed, as the uapi struct); both
        // descriptors are open for the duration of the call; the kernel only reads.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &raw const attr,
                0u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Granted {
            path: path.to_path_buf(),
            access: allowed,
        })
    }

    /// The descriptor for [`restrict_self_raw`] in a pre-exec child; the ruleset must
    /// outlive the spawn.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Confine the calling thread (and what it execs) to ruleset `fd`. Needs
/// `no_new_privs` (or CAP_SYS_ADMIN). Async-signal-safe: one syscall, errno on failure.
pub fn restrict_self_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: landlock_restrict_self takes a descriptor and flags, no memory; a bad
    // descriptor is reported as EBADF.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `READ_FILE|EXECUTE` as `read+exec` and so on, for logs.
pub fn describe(access: u64) -> String {
    let names = [
        (READ_FILE, "read"),
        (READ_DIR, "list"),
        (EXECUTE, "exec"),
        (WRITE_FILE, "write"),
        (TRUNCATE, "truncate"),
        (MAKE_REG, "create"),
        (MAKE_SOCK, "mksock"),
        (REMOVE_FILE, "remove"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| access & b != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join("+")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_rights_grow_with_the_abi() {
        assert_eq!(handled_fs(1), (1 << 13) - 1);
        assert_eq!(handled_fs(2) & REFER, REFER);
        assert_eq!(handled_fs(2) & TRUNCATE, 0);
        assert_eq!(handled_fs(3) & TRUNCATE, TRUNCATE);
        assert_eq!(handled_fs(5), (1 << 16) - 1);
        assert_eq!(scopes(5), 0);
        assert_eq!(scopes(6), 3);
        assert_eq!(size_of::<PathBeneathAttr>(), 12);
    }

    #[test]
    fn a_child_sees_only_what_it_was_allowed() {
        let Ok(abi) = abi() else {
            eprintln!("skipped: no Landlock on this kernel");
            return;
        };
        let dir = std::env::temp_dir().join(format!("es-landlock-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ok")).unwrap();
        std::fs::write(dir.join("ok/f"), "yes").unwrap();
        std::fs::write(dir.join("secret"), "no").unwrap();
        let mut rs = Ruleset::new(abi).unwrap();
        for p in ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"] {
            if Path::new(p).exists() {
                rs.allow(Path::new(p), READ_FILE | READ_DIR | EXECUTE)
                    .unwrap();
            }
        }
        let g = rs.allow(&dir.join("ok/f"), READ_FILE | READ_DIR).unwrap();
        assert_eq!(g.access, READ_FILE, "a file gets file rights only");
        let fd = rs.raw_fd();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(format!(
            "cat {0}/ok/f; cat {0}/secret && echo LEAK; : > {0}/ok/new && echo WROTE; true",
            dir.display()
        ));
        crate::sys::exec::sandbox_only(&mut cmd, fd);
        let out = cmd.output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text, "yes", "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{out:?}"
        );
    }
}
