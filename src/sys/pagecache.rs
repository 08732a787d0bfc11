//! The page cache, as seen from here: whether a file is fully cached, and pulling it
//! in when it is not.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Pull `binary` into the page cache from this process (a no-op when every page is
/// cached already). Page cache is charged to the cgroup that first reads it: the
/// supervisor preloads Envoy's binary outside the container's cgroup so the first
/// sidecar on a host does not pay ~90 MiB of it against its container's memory limit.
pub fn preload(binary: &Path) {
    let Ok(mut f) = File::open(binary) else {
        return;
    };
    if fully_cached(&f) {
        return;
    }
    // A plain read, synchronously: readahead(2) may return before the pages exist.
    let mut buf = vec![0u8; 1 << 20];
    while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
}

/// Whether every page of `f` is in the page cache (mincore on a read-only mapping).
/// False when that cannot be told.
pub fn fully_cached(f: &File) -> bool {
    let len = f
        .metadata()
        .ok()
        .and_then(|m| usize::try_from(m.len()).ok())
        .unwrap_or(0);
    if len == 0 {
        return true;
    }
    let Ok(Some(page)) = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) else {
        // mincore writes one byte per (real) page: without the size, no buffer is
        // known to be large enough.
        return false;
    };
    let Ok(page) = usize::try_from(page) else {
        return false;
    };
    let Some(map) = Mapping::new(f, len) else {
        return false;
    };
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `map` is a live mapping of `len` bytes (page-aligned, as mmap returns
    // it); `vec` holds ceil(len / page size) bytes, the number mincore writes.
    // mincore only reports residency: it does not touch the mapped pages, so a file
    // shrunk meanwhile cannot fault here.
    let ok = unsafe { libc::mincore(map.addr, len, vec.as_mut_ptr()) } == 0;
    ok && vec.iter().all(|b| b & 1 == 1)
}

/// A shared read-only mapping of a file, unmapped on drop; never dereferenced.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(f: &File, len: usize) -> Option<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED)
        // cannot overlap memory Rust owns; the fd is valid for the call (borrowed
        // from `f`) and the mapping outlives it independently of the fd.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        (addr != libc::MAP_FAILED).then_some(Mapping { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned and was given; no
        // reference into the mapping exists (it is never read), and it is unmapped
        // only once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "envoy-sidecar-pagecache-{}-{name}",
            std::process::id()
        ))
    }

    #[test]
    fn an_empty_file_is_cached() {
        let p = temp("empty");
        File::create(&p).unwrap();
        assert!(fully_cached(&File::open(&p).unwrap()));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_file_just_written_and_read_is_cached() {
        let p = temp("written");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; 3 * 4096 + 100]).unwrap();
        drop(f);
        preload(&p);
        assert!(fully_cached(&File::open(&p).unwrap()));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn preloading_a_missing_file_does_nothing() {
        preload(Path::new("/nonexistent/envoy"));
    }
}
