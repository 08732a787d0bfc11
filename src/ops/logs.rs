//! `envoy-sidecar logs ID [--envoy] [--follow]`: a container's supervisor log (or
//! Envoy's output), the rotated copy first, then the current file; with `follow`, new
//! lines as they come, across rotations, until the container's directory is gone.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::sidecar::logfile::BoundedLog;

/// How often `--follow` looks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Copy `path` (and before it its rotated copy) to `out`; with `follow`, keep going.
/// `dir`: the container's directory (its removal ends a follow).
pub fn show(dir: &Path, path: &Path, follow: bool, out: &mut dyn Write) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such container directory (not proxied, or removed)",
            ),
        });
    }
    let rotated = BoundedLog::rotated(path);
    if let Ok(mut f) = File::open(&rotated) {
        copy(&mut f, out).at(&rotated)?;
    }
    let mut cur = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).at(path),
    };
    if let Some(f) = cur.as_mut() {
        copy(f, out).at(path)?;
    }
    while follow && dir.is_dir() {
        std::thread::sleep(FOLLOW_EVERY);
        // Rotated meanwhile: the rest of the old file (now `.1`), then the new one.
        let now = std::fs::metadata(path).ok().map(|m| m.ino());
        let ours = cur
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino());
        if let Some(f) = cur.as_mut() {
            copy(f, out).at(path)?;
        }
        if now.is_some() && now != ours {
            cur = File::open(path).ok();
            if let Some(f) = cur.as_mut() {
                copy(f, out).at(path)?;
            }
        }
    }
    Ok(())
}

fn copy(f: &mut File, out: &mut dyn Write) -> std::io::Result<()> {
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    out.write_all(&buf)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_copy_first_then_the_current_file() {
        let dir = crate::state::store::tests::tempdir("logs");
        let path = dir.join("supervisor.log");
        let mut log = BoundedLog::open(&path, 40, false).unwrap();
        for i in 0..6 {
            log.write(format!("line {i} of the log\n").as_bytes())
                .unwrap();
        }
        let mut out = Vec::new();
        show(&dir, &path, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        // 20 bytes a line, 40 per file: lines 2-5 survive, in order.
        assert_eq!(
            text,
            "line 2 of the log\nline 3 of the log\nline 4 of the log\nline 5 of the log\n"
        );
        let e = show(&dir.join("gone"), &path, false, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("not proxied, or removed"), "{e}");
    }
}
