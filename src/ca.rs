//! `envoy-sidecar generate-ca`: a self-signed operator CA for trying the product out
//! and for tests. Production operators bring their own (`[instance_identity]`).

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;

/// Write `ca.crt` (0644) and `ca.key` (0600, PKCS#8) into `dir`; refuses to overwrite.
pub fn generate(dir: &Path, common_name: &str) -> Result<()> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(Error::Io {
                path: p.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists; remove it or choose another --out directory",
                ),
            });
        }
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let kp = KeyPair::generate().map_err(|e| crypto(dir, e))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| crypto(dir, e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&kp).map_err(|e| crypto(dir, e))?;
    write_atomic(&key, kp.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&crt, cert.pem().as_bytes(), 0o644)
}

fn crypto(dir: &Path, e: rcgen::Error) -> Error {
    Error::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(format!("generating the CA: {e}")),
    }
}
