//! Small file-system helpers shared by the state store and the spec patcher.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// Replace `path` so that readers see either the old or the new content, never a mix:
/// write a temporary file beside it, then rename over it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        fs::rename(&tmp, path).at(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
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
