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
