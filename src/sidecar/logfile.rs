//! The per-container log files (`supervisor.log`, `envoy.log`), bounded: the state
//! directory is usually a tmpfs, i.e. RAM, and a crash-looping Envoy restarts 2,880
//! times a day. At `[log] max_file_kb` the file becomes `<name>.1` (replacing the one
//! before) and a new one is started: at most twice the cap per file, whatever runs.
//!
//! Envoy's stdout and stderr are a pipe the supervisor drains into one of these (an
//! inherited file descriptor could not be bounded); the supervisor's own log is one,
//! and its stderr follows the current file, so a stray message lands there too.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct BoundedLog {
    path: PathBuf,
    cap: u64,
    file: File,
    /// Point this process's stderr at the current file (the supervisor's own log).
    stderr: bool,
}

impl BoundedLog {
    pub fn open(path: &Path, cap: u64, stderr: bool) -> io::Result<BoundedLog> {
        let mut log = BoundedLog {
            path: path.to_path_buf(),
            cap: cap.max(1),
            file: open_append(path)?,
            stderr,
        };
        if log.size()? >= log.cap {
            log.rotate()?;
        } else if stderr {
            crate::sys::fs::redirect_stderr(&log.file)?;
        }
        Ok(log)
    }

    /// The rotated copy of `path`.
    pub fn rotated(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    fn size(&self) -> io::Result<u64> {
        // The file's own size: stray writes to a redirected stderr count too.
        self.file.metadata().map(|m| m.len())
    }

    /// Append `bytes`, rotating first if they would take the file past the cap. A
    /// chunk larger than the cap keeps only its end.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let cap = usize::try_from(self.cap).unwrap_or(usize::MAX);
        let bytes = &bytes[bytes.len().saturating_sub(cap)..];
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if self.size()?.saturating_add(len) > self.cap {
            self.rotate()?;
        }
        self.file.write_all(bytes)
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, Self::rotated(&self.path))?;
        self.file = open_append(&self.path)?;
        if self.stderr {
            crate::sys::fs::redirect_stderr(&self.file)?;
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_more_than_the_cap_per_file_and_one_rotated_copy() {
        let dir = crate::state::store::tests::tempdir("boundedlog");
        let path = dir.join("envoy.log");
        let mut log = BoundedLog::open(&path, 1000, false).unwrap();
        let line = b"[critical] cannot bind 0.0.0.0:61001: Address already in use\n";
        for _ in 0..10_000 {
            log.write(line).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        }
        let rotated = BoundedLog::rotated(&path);
        assert!(std::fs::metadata(&rotated).unwrap().len() <= 1000);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // The newest lines are kept, whole ones at that.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(std::str::from_utf8(line).unwrap()), "{text}");
        // A chunk over the cap keeps its end.
        log.write(&vec![b'x'; 5000]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000);
        // Reopened over the cap (a supervisor that replaces one): rotated at once.
        std::fs::write(&path, vec![b'y'; 1500]).unwrap();
        let _log = BoundedLog::open(&path, 1000, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 1500);
    }
}
