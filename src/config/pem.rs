//! Cheap structural checks of PEM inputs, so a wrong file is caught by `check-config`
//! rather than by Envoy or the certificate issuer much later. Errors are messages for
//! `Error::Config`, which adds the key.

use std::path::Path;

fn read(path: &Path) -> Result<String, String> {
    crate::sys::fs::read_pem_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn blocks(text: &str, what: &str) -> Result<Vec<pem::Pem>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("{what} is not valid PEM: {e}"))?;
    if blocks.is_empty() {
        return Err(format!("{what} is not PEM (no -----BEGIN ...----- block)"));
    }
    Ok(blocks)
}

fn require_certs(text: &str, what: &str) -> Result<usize, String> {
    let n = blocks(text, what)?
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .count();
    if n == 0 {
        return Err(format!("{what} holds no PEM CERTIFICATE block"));
    }
    Ok(n)
}

/// A trusted-CA entry: inline PEM text, or the path of a PEM file.
pub fn certificates(entry: &str) -> Result<usize, String> {
    if entry.trim_start().starts_with("-----BEGIN") {
        require_certs(entry, "inline PEM")
    } else {
        let path = Path::new(entry);
        if !path.is_absolute() {
            return Err(format!(
                "{entry:?} is neither inline PEM nor an absolute file path"
            ));
        }
        require_certs(&read(path)?, &path.display().to_string())
    }
}

pub fn certificate_file(path: &Path) -> Result<usize, String> {
    require_certs(&read(path)?, &path.display().to_string())
}

/// PKCS#8 (`PRIVATE KEY`), PKCS#1 RSA or SEC1 EC keys.
pub fn private_key_file(path: &Path) -> Result<(), String> {
    let what = path.display().to_string();
    let found = blocks(&read(path)?, &what)?.iter().any(|b| {
        matches!(
            b.tag(),
            "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY"
        )
    });
    if !found {
        return Err(format!(
            "{what} holds no PEM private key (valid: PRIVATE KEY, RSA PRIVATE KEY, EC PRIVATE KEY)"
        ));
    }
    Ok(())
}

/// A private key only its owner can read: mode `& 0o077 == 0` (a CA key readable by a
/// group or everyone lets any local user, or a sandbox escape, sign identities).
pub fn private_key_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: readable or writable by group or others; \
             valid: owner-only (fix: chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_readable_by_group_or_others_is_refused() {
        let dir = std::env::temp_dir().join(format!("es-pem-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("ca.key");
        std::fs::write(&key, "x").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o644, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = private_key_mode(&key);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(
                    e.contains(&key.display().to_string())
                        && e.contains(&format!("{mode:04o}"))
                        && e.contains("chmod 600"),
                    "{e}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
