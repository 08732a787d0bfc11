//! `envoy-sidecar generate-ca`: a self-signed operator CA for trying the product out
//! and for tests. Production operators bring their own (`[instance_identity]`).

use std::fmt::Display;
use std::path::Path;
use std::time::{Duration, SystemTime};

use p256::elliptic_curve::Generate;
use pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::der::oid::db::rfc4519;
use x509_cert::der::referenced::OwnedToRef;
use x509_cert::der::{Decode, EncodePem};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier};
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

use crate::error::{Error, IoContext, Result};
use crate::identity::{Names, add_extension, name, random_serial, whole_seconds};
use crate::sys::fs::write_atomic;

const VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Back-dated so that hosts with a slightly slow clock accept it at once.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Write `ca.crt` (0644) and `ca.key` (0600, PKCS#8) into `dir`; refuses to overwrite.
/// ECDSA P-256, CA:TRUE, keyCertSign + cRLSign + digitalSignature, valid for 10 years.
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
    let failed = |e: &dyn Display| crypto(dir, e);
    let secret = p256::SecretKey::try_generate().map_err(|e| failed(&e))?;
    let signer = p256::ecdsa::SigningKey::from(&secret);
    let spki_der = secret
        .public_key()
        .to_public_key_der()
        .map_err(|e| failed(&e))?;
    let spki = SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes()).map_err(|e| failed(&e))?;
    let subject = name(&[(rfc4519::CN, common_name.to_string())]).map_err(|e| failed(&e))?;
    let now = SystemTime::now();
    let validity = Validity::new(
        Time::try_from(whole_seconds(now - BACKDATE)).map_err(|e| failed(&e))?,
        Time::try_from(whole_seconds(now + VALIDITY)).map_err(|e| failed(&e))?,
    );
    let profile = Names {
        issuer: subject.clone(),
        subject,
    };
    let ski = SubjectKeyIdentifier::try_from(spki.owned_to_ref()).map_err(|e| failed(&e))?;
    let mut builder = CertificateBuilder::new(profile, random_serial()?, validity, spki)
        .map_err(|e| failed(&e))?;
    let b = &mut builder;
    add_extension(
        b,
        true,
        &BasicConstraints {
            ca: true,
            path_len_constraint: None,
        },
    )
    .and_then(|()| {
        let ku = KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature;
        add_extension(b, true, &KeyUsage(ku))
    })
    .and_then(|()| add_extension(b, false, &ski))
    .map_err(|e| failed(&e))?;
    let cert = builder
        .build::<_, p256::ecdsa::DerSignature>(&signer)
        .map_err(|e| failed(&e))?;
    let key_pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| failed(&e))?;
    let cert_pem = cert.to_pem(LineEnding::LF).map_err(|e| failed(&e))?;
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&crt, cert_pem.as_bytes(), 0o644)
}

fn crypto(dir: &Path, e: &dyn Display) -> Error {
    Error::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(format!("generating the CA: {e}")),
    }
}
