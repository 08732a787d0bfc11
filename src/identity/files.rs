//! The credential files an app and Envoy read: written as a generation directory
//! behind a `..data` symlink, so every file is always whole and the pair always
//! matches (the Kubernetes projected-volume scheme).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{CERT_FILE, CERT_MODE, DATA_LINK, GENERATION_MODE, Issued, KEY_FILE, KEY_MODE};
use crate::error::{IoContext, Result};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

/// Write `instance.crt` and `instance.key` into `dir` (bind-mounted read-only into the
/// container at `/etc/cf-instance-credentials`) the way Kubernetes projected volumes do:
/// both files go into a new generation directory `..<timestamp>`, the `..data` symlink
/// is switched to it with one rename(2), and `instance.crt`/`instance.key` are relative
/// symlinks through `..data` (relative, so they resolve inside the container too); then
/// older generations are removed. Each path is always present, each file always whole,
/// and `..data` always names a matching pair. A reader that opens the two paths one
/// after the other can still straddle a rotation; [`read_credentials`] does not.
///
/// Files are owned by `uid:gid`: the key 0400 (the app's user only), the certificate
/// 0444 (public anyway), the generation directory 0550. No fsync: the credentials live
/// under the state dir (tmpfs `/run`) and are re-issued after a reboot; only atomicity
/// matters. Idempotent; concurrent calls on one `dir` are serialised by a lock on it.
pub fn write_credentials(dir: &Path, issued: &Issued, uid: u32, gid: u32) -> Result<()> {
    let lock = File::open(dir).at(dir)?;
    lock.lock().at(dir)?;

    let (generation, gen_name) = new_generation(dir)?;
    let written = (|| {
        write_file(
            &generation.join(CERT_FILE),
            issued.cert_chain_pem.as_bytes(),
            CERT_MODE,
            uid,
            gid,
        )?;
        write_file(
            &generation.join(KEY_FILE),
            issued.key_pem.as_bytes(),
            KEY_MODE,
            uid,
            gid,
        )?;
        std::os::unix::fs::chown(&generation, Some(uid), Some(gid)).at(&generation)?;
        fs::set_permissions(&generation, fs::Permissions::from_mode(GENERATION_MODE))
            .at(&generation)?;
        replace_symlink(dir, DATA_LINK, Path::new(&gen_name))
    })();
    if let Err(e) = written {
        let _ = remove_generation(&generation);
        return Err(e);
    }
    for file in [CERT_FILE, KEY_FILE] {
        let target = Path::new(DATA_LINK).join(file);
        if fs::read_link(dir.join(file)).ok().as_deref() != Some(target.as_path()) {
            replace_symlink(dir, file, &target)?;
        }
    }
    // Older generations, and leftovers of a writer that died half-way.
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with("..") || (name.starts_with('.') && name.ends_with(".tmp"));
        if !ours || name == DATA_LINK || name == gen_name {
            continue;
        }
        let path = entry.path();
        match entry.file_type().at(&path)?.is_dir() {
            true => remove_generation(&path)?,
            false => fs::remove_file(&path).at(&path)?,
        }
    }
    Ok(())
}

/// Read a matching certificate chain and key: both through one resolution of `..data`,
/// retrying if a rotation removed that generation meanwhile.
pub fn read_credentials(dir: &Path) -> Result<(String, String)> {
    let link = dir.join(DATA_LINK);
    let mut last = None;
    for _ in 0..100 {
        let generation = dir.join(fs::read_link(&link).at(&link)?);
        let read = |f: &str| fs::read_to_string(generation.join(f));
        match (read(CERT_FILE), read(KEY_FILE)) {
            (Ok(c), Ok(k)) => return Ok((c, k)),
            (Err(e), _) | (_, Err(e)) if e.kind() == ErrorKind::NotFound => last = Some(e),
            (Err(e), _) | (_, Err(e)) => return Err(e).at(&generation),
        }
    }
    Err(last.expect("loop ran")).at(&link)
}

fn new_generation(dir: &Path) -> Result<(PathBuf, String)> {
    // `..2024_05_01_12_00_00.123456789`, as Kubernetes names them; sorts by age.
    let stamp = humantime::format_rfc3339_nanos(SystemTime::now())
        .to_string()
        .replace(['-', ':', 'T'], "_")
        .replace('Z', "");
    for n in 0u32.. {
        let name = match n {
            0 => format!("..{stamp}"),
            n => format!("..{stamp}.{n}"),
        };
        let path = dir.join(&name);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok((path, name)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).at(&path),
        }
    }
    unreachable!("u32 range exhausted")
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, uid: u32, gid: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .at(path)?;
    f.write_all(bytes).at(path)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).at(path)?;
    // Set explicitly: the creation mode is subject to the umask.
    f.set_permissions(fs::Permissions::from_mode(mode)).at(path)
}

/// Point `dir/name` at `target` in one rename(2), whatever `dir/name` was before.
fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).at(&tmp)?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).at(&path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// The generation is read-only (0550) even to its owner, which is us when not root.
fn remove_generation(path: &Path) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).at(path)?;
    fs::remove_dir_all(path).at(path)
}
