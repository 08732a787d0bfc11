//! Small file-system helpers shared by the state store and the spec patcher.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// How `write_atomic_with` creates the file.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    pub mode: u32,
    /// `chown` the file to `(uid, gid)` before it becomes visible.
    pub owner: Option<(u32, u32)>,
}

impl WriteOptions {
    pub fn mode(mode: u32) -> WriteOptions {
        WriteOptions { mode, owner: None }
    }
}

/// Replace `path` so that readers see either the old or the new content, never a mix:
/// write a temporary file beside it, then rename over it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_with(path, bytes, WriteOptions::mode(mode))
}

/// `write_atomic` with an owner; the one atomic writer of the crate.
///
/// Nothing is fsynced: every file the product writes describes this boot's containers
/// (runc's own state is on tmpfs), a power loss ends them all, and the allocation
/// index notices the reboot by its boot id. Rename alone gives readers the atomicity
/// they need, without a disk flush on each container's hot path.
pub fn write_atomic_with(path: &Path, bytes: &[u8], o: WriteOptions) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(o.mode)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        if let Some((uid, gid)) = o.owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).at(&tmp)?;
        }
        // Explicitly: the creation mode was filtered through the umask.
        f.set_permissions(std::fs::Permissions::from_mode(o.mode))
            .at(&tmp)?;
        fs::rename(&tmp, path).at(path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `value` as pretty JSON, written atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T, mode: u32) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("our records serialise");
    write_atomic(path, &bytes, mode)
}

/// The JSON record at `path`, or `None` when there is no file. A file that does not
/// parse is an error naming it and `what` it should have been.
pub fn read_json_or_none<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::State {
                path: path.into(),
                msg: format!("malformed {what}: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            path: path.into(),
            source: e,
        }),
    }
}

/// `r`, with `kind` (the state the caller wanted anyway) counted as success and any
/// other error naming `path`.
pub fn tolerate(path: &Path, kind: std::io::ErrorKind, r: std::io::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() != kind => Err(Error::Io {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Remove a file; one that is not there is fine.
pub fn remove_if_exists(path: &Path) -> Result<()> {
    tolerate(path, std::io::ErrorKind::NotFound, fs::remove_file(path))
}

/// Remove a directory tree; one that is not there is fine.
pub fn remove_dir_all_if_exists(path: &Path) -> Result<()> {
    tolerate(path, std::io::ErrorKind::NotFound, fs::remove_dir_all(path))
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per call: two writers in one process must not share a temp file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Read at most `max` bytes of `path`, refusing anything but a regular file when
/// `regular_only` (opening a FIFO would block, `/dev/zero` would never end). Larger
/// files are an error, not a truncation.
pub fn read_bounded(path: &Path, max: u64, regular_only: bool) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if regular_only && !fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut buf = Vec::new();
    fs::File::open(path)?.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(buf)
}

/// The size limit for the PEM files the product reads (CAs, keys).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

pub fn read_pem_file(path: &Path) -> std::io::Result<String> {
    let bytes = read_bounded(path, MAX_PEM_BYTES, true)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// RFC 3339 UTC timestamp with second precision, as runc's logrus JSON lines carry.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Create `dir` (0700, with parents) and take an exclusive `flock` on `dir/name`
/// (0600), waiting for it; released when the file is dropped. The host-wide locks.
pub fn lock_in(dir: &Path, name: &str) -> Result<fs::File> {
    create_dir_traversable(dir, 0o700)?;
    let path = dir.join(name);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .at(&path)?;
    f.lock().at(&path)?;
    Ok(f)
}

/// Create `dir` (mode `mode`) and any missing parent with mode 0711: searchable by
/// others, so that Envoy's unprivileged uid can reach its files below (a missing
/// parent made 0700 would lock it out), but not listable. Existing directories are
/// left as they are. Modes are set explicitly (the umask does not apply).
pub fn create_dir_traversable(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for (i, d) in missing.iter().rev().enumerate() {
        let m = if i + 1 == missing.len() { mode } else { 0o711 };
        match fs::DirBuilder::new().mode(m).create(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(m)).at(d)?,
            // Made meanwhile by another create: theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(crate::error::Error::Io {
                    path: d.to_path_buf(),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// Make this process's stderr (fd 2) the file `f` (the supervisor's bounded log).
pub fn redirect_stderr(f: &fs::File) -> std::io::Result<()> {
    nix::unistd::dup2_stderr(f).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn missing_parents_are_made_traversable_and_existing_ones_kept() {
        let d = tempdir("traversable");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).unwrap();
        let leaf = d.join("x/y/state");
        create_dir_traversable(&leaf, 0o700).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&d.join("x")), 0o711);
        assert_eq!(mode(&d.join("x/y")), 0o711);
        assert_eq!(mode(&leaf), 0o700);
        assert_eq!(
            mode(&d),
            0o750,
            "an existing parent is not the product's to change"
        );
        create_dir_traversable(&leaf, 0o700).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("es-fs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temp_file() {
        let d = tempdir("w");
        let p = d.join("f.json");
        write_atomic_with(
            &p,
            b"one",
            WriteOptions {
                mode: 0o640,
                owner: None,
            },
        )
        .unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::read_dir(&d).unwrap().count(),
            1,
            "temp file left behind"
        );
        // Into a missing directory: an error naming the temp path, nothing left.
        let e = write_atomic(&d.join("no/such"), b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("no/.such"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn json_or_none_and_remove_if_exists() {
        let d = tempdir("j");
        let p = d.join("r.json");
        assert_eq!(read_json_or_none::<Vec<u32>>(&p, "list").unwrap(), None);
        write_json_atomic(&p, &vec![1u32, 2], 0o600).unwrap();
        assert_eq!(
            read_json_or_none::<Vec<u32>>(&p, "list").unwrap(),
            Some(vec![1, 2])
        );
        fs::write(&p, "{not json").unwrap();
        let e = read_json_or_none::<Vec<u32>>(&p, "list").unwrap_err();
        assert!(e.to_string().contains("malformed list"), "{e}");
        remove_if_exists(&p).unwrap();
        remove_if_exists(&p).unwrap();
        assert!(!p.exists());
        fs::remove_dir_all(d).unwrap();
    }
}
