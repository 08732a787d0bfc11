//! Per-container instance identity credentials (Diego's `CF_INSTANCE_CERT`/`KEY`): a
//! fresh key and a certificate signed by the operator CA, written so that the container
//! always finds both files.
//!
//! Certificate profile, as Diego's executor issues it: subject
//! `OU=organization:<g>, OU=space:<g>, OU=app:<g>, CN=<instance guid>` (each OU its own
//! RDN, present only when known), SAN DNS = instance guid and IP = container IP, key
//! usage digitalSignature + keyEncipherment, EKU serverAuth + clientAuth, CA:FALSE,
//! authority key id = the CA's. rcgen cannot express several OUs (its distinguished
//! name is a map keyed by attribute type), hence the RustCrypto `x509-cert` builder.

pub mod ca;
pub mod files;

pub use files::{read_credentials, write_credentials};

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p256::elliptic_curve::Generate;
use pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::pkcs1::DecodeRsaPrivateKey;
use x509_cert::Certificate;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::der::asn1::{Ia5String, OctetString, Utf8StringRef};
use x509_cert::der::oid::db::{rfc4519, rfc5280, rfc5912};
use x509_cert::der::oid::{AssociatedOid, ObjectIdentifier};
use x509_cert::der::referenced::OwnedToRef;
use x509_cert::der::{Any, Decode, Encode, EncodePem};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
use x509_cert::time::{Time, Validity};

use crate::error::{Error, Result};

/// NotBefore is set this far in the past so that a peer whose clock is a little behind
/// still accepts a certificate issued a moment ago.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
pub const CERT_FILE: &str = "instance.crt";
pub const KEY_FILE: &str = "instance.key";
/// The symlink swapped on every write; its target is the current generation directory.
pub const DATA_LINK: &str = "..data";

const CERT_MODE: u32 = 0o444;
const KEY_MODE: u32 = 0o400;
const GENERATION_MODE: u32 = 0o550;

const VALID_CA_KEYS: &str = "valid: RSA, ECDSA P-256/P-384 in PKCS#1, SEC1 or PKCS#8 PEM";

fn err(msg: impl Into<String>) -> Error {
    Error::Identity(msg.into())
}

/// A cryptographic failure, its library error kept as the source.
fn crypto(what: &str, e: crate::error::BoxError) -> Error {
    Error::crypto(format!("instance identity: {what}"), e)
}

/// The leaf key algorithm. ECDSA P-256 is the default: generating an RSA key costs
/// orders of magnitude more, which matters when a host starts many containers at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    Rsa2048,
    Rsa3072,
}

impl KeyType {
    pub const VALID: &str = "ecdsa-p256, rsa-2048, rsa-3072";

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    /// A message for `Error::Config`, which adds the key.
    type Err = String;

    fn from_str(s: &str) -> Result<KeyType, String> {
        match s {
            "ecdsa-p256" => Ok(KeyType::EcdsaP256),
            "rsa-2048" => Ok(KeyType::Rsa2048),
            "rsa-3072" => Ok(KeyType::Rsa3072),
            _ => Err(format!(
                "{s:?} is not a key type; valid: {}",
                KeyType::VALID
            )),
        }
    }
}

/// The CA's private key; the signature algorithm follows it.
enum CaKey {
    /// ecdsa-with-SHA256
    P256(p256::ecdsa::SigningKey),
    /// ecdsa-with-SHA384
    P384(p384::ecdsa::SigningKey),
    /// sha256WithRSAEncryption (PKCS#1 v1.5)
    Rsa(Box<rsa::pkcs1v15::SigningKey<rsa::sha2::Sha256>>),
}

impl CaKey {
    fn public_key_info(&self) -> std::result::Result<SubjectPublicKeyInfoOwned, String> {
        let der = match self {
            CaKey::P256(k) => k.verifying_key().to_public_key_der(),
            CaKey::P384(k) => k.verifying_key().to_public_key_der(),
            CaKey::Rsa(k) => k.as_ref().as_ref().to_public_key().to_public_key_der(),
        }
        .map_err(|e| e.to_string())?;
        SubjectPublicKeyInfoOwned::from_der(der.as_bytes()).map_err(|e| e.to_string())
    }

    fn sign<P: BuilderProfile>(
        &self,
        builder: CertificateBuilder<P>,
    ) -> std::result::Result<Certificate, x509_cert::builder::Error> {
        match self {
            CaKey::P256(k) => builder.build::<_, p256::ecdsa::DerSignature>(k),
            CaKey::P384(k) => builder.build::<_, p384::ecdsa::DerSignature>(k),
            CaKey::Rsa(k) => builder.build::<_, rsa::pkcs1v15::Signature>(k.as_ref()),
        }
    }
}

/// The operator CA, loaded once and used for every issuance.
pub struct Ca {
    subject: Name,
    /// Goes into the leaf's authority key identifier.
    key_id: Vec<u8>,
    not_after: SystemTime,
    /// Every certificate of the CA file (the signer first), appended to each leaf.
    chain_pem: String,
    cert_path: PathBuf,
    key: CaKey,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert", &self.cert_path)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

/// Who the certificate is for.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub instance_guid: &'a str,
    pub app_guid: Option<&'a str>,
    pub space_guid: Option<&'a str>,
    pub org_guid: Option<&'a str>,
    /// IP SANs: the container's IPv4 and IPv6 addresses, as it has them.
    pub ips: Vec<IpAddr>,
    pub validity: Duration,
    pub key_type: KeyType,
}

/// A freshly issued credential pair.
#[derive(Clone)]
pub struct Issued {
    /// Leaf, then the CA file's certificates.
    pub cert_chain_pem: String,
    /// PKCS#8 (`PRIVATE KEY`).
    pub key_pem: String,
    /// Lower-case hex, as `openssl x509 -serial` prints it (modulo case).
    pub serial_hex: String,
    /// Exactly as in the certificate (whole seconds).
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for Issued {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial_hex", &self.serial_hex)
            .field(
                "not_before",
                &humantime::format_rfc3339_seconds(self.not_before),
            )
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// CA cert PEM + key PEM; RSA or ECDSA (P-256, P-384) keys, in PKCS#1
    /// (`RSA PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`). The first
    /// certificate of `cert_path` must be a CA whose public key is the key's; any further
    /// certificates (intermediates) are sent along in every chain.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca> {
        let what = format!("CA certificate {}", cert_path.display());
        let text =
            crate::sys::fs::read_pem_file(cert_path).map_err(|e| err(format!("{what}: {e}")))?;
        let blocks =
            pem::parse_many(&text).map_err(|e| err(format!("{what}: not valid PEM: {e}")))?;
        let certs = blocks
            .iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .map(|b| Certificate::from_der(b.contents()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| err(format!("{what}: not a valid X.509 certificate: {e}")))?;
        let cert = certs
            .first()
            .ok_or_else(|| err(format!("{what}: holds no PEM CERTIFICATE block")))?;
        let tbs = cert.tbs_certificate();

        let is_ca = tbs
            .get_extension::<BasicConstraints>()
            .map_err(|e| err(format!("{what}: basicConstraints: {e}")))?
            .is_some_and(|(_, bc)| bc.ca);
        if !is_ca {
            return Err(err(format!(
                "{what}: not a CA certificate (needs basicConstraints CA:TRUE)"
            )));
        }
        if let Some((_, ku)) = tbs
            .get_extension::<KeyUsage>()
            .map_err(|e| err(format!("{what}: keyUsage: {e}")))?
            && !ku.key_cert_sign()
        {
            return Err(err(format!("{what}: its keyUsage lacks keyCertSign")));
        }
        let not_after = tbs.validity().not_after.to_system_time();
        if not_after <= SystemTime::now() {
            return Err(err(format!(
                "{what}: expired at {}",
                humantime::format_rfc3339_seconds(not_after)
            )));
        }

        let key =
            load_key(key_path).map_err(|m| err(format!("CA key {}: {m}", key_path.display())))?;
        let spki = key
            .public_key_info()
            .map_err(|m| err(format!("CA key {}: {m}", key_path.display())))?;
        let cert_spki = tbs.subject_public_key_info();
        if spki.algorithm.oid != cert_spki.algorithm.oid
            || spki.subject_public_key != cert_spki.subject_public_key
        {
            return Err(err(format!(
                "CA key {} does not match the CA certificate {} (their public keys differ)",
                key_path.display(),
                cert_path.display()
            )));
        }

        // Chain building matches the leaf's authority key id against the CA's subject
        // key id, so reuse it verbatim; without one, derive it as RFC 5280 method 1.
        let key_id = match tbs
            .get_extension::<SubjectKeyIdentifier>()
            .map_err(|e| err(format!("{what}: subjectKeyIdentifier: {e}")))?
        {
            Some((_, ski)) => ski.0.as_bytes().to_vec(),
            None => SubjectKeyIdentifier::try_from(cert_spki.owned_to_ref())
                .map_err(|e| err(format!("{what}: {e}")))?
                .0
                .as_bytes()
                .to_vec(),
        };
        let chain_pem = certs
            .iter()
            .map(|c| c.to_pem(LineEnding::LF))
            .collect::<std::result::Result<String, _>>()
            .map_err(|e| err(format!("{what}: {e}")))?;
        Ok(Ca {
            subject: tbs.subject().clone(),
            key_id,
            not_after,
            chain_pem,
            cert_path: cert_path.to_path_buf(),
            key,
        })
    }

    /// The CA's own NotAfter; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issue a fresh key and certificate. NotAfter is `now + validity`, clamped to the
    /// CA's NotAfter: a leaf that outlives its issuer fails verification anyway, and
    /// clamping makes [`rotate_after`] renew it before the CA runs out (the renewal is
    /// clamped again, so an expiring CA shows up as ever shorter leaves, then errors).
    pub fn issue(&self, id: &Identity) -> Result<Issued> {
        for (field, v) in [
            ("instance guid", Some(id.instance_guid)),
            ("app guid", id.app_guid),
            ("space guid", id.space_guid),
            ("org guid", id.org_guid),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(err(format!(
                    "{field} {v:?} is not usable in a certificate; valid: 1-255 printable ASCII characters, no spaces"
                )));
            }
        }
        let now = SystemTime::now();
        if self.not_after <= now {
            return Err(err(format!(
                "CA certificate {} expired at {}",
                self.cert_path.display(),
                humantime::format_rfc3339_seconds(self.not_after)
            )));
        }
        let not_before = whole_seconds(now - BACKDATE);
        let not_after = whole_seconds(now + id.validity).min(self.not_after);
        let (key_pem, leaf_spki) = generate_key(id.key_type)?;
        let serial = random_serial()?;
        // The encoding may carry a 0x00 sign pad; the hex is of the value.
        let serial_hex = serial
            .as_bytes()
            .iter()
            .skip_while(|&&b| b == 0)
            .map(|b| format!("{b:02x}"))
            .collect();
        let what = format!("issuing for {}", id.instance_guid);
        let failed = |e| crypto(&what, e);

        let profile = Names {
            issuer: self.subject.clone(),
            subject: subject_name(id).map_err(|e| failed(e.into()))?,
        };
        let validity = Validity::new(
            Time::try_from(not_before).map_err(|e| failed(e.into()))?,
            Time::try_from(not_after).map_err(|e| failed(e.into()))?,
        );
        let mut builder = CertificateBuilder::new(profile, serial, validity, leaf_spki.clone())
            .map_err(|e| failed(e.into()))?;
        let mut sans = vec![GeneralName::DnsName(
            Ia5String::new(id.instance_guid).map_err(|e| failed(e.into()))?,
        )];
        sans.extend(id.ips.iter().copied().map(GeneralName::from));
        let leaf_key_id = SubjectKeyIdentifier::try_from(leaf_spki.owned_to_ref())
            .map_err(|e| failed(e.into()))?;
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(
                OctetString::new(self.key_id.clone()).map_err(|e| failed(e.into()))?,
            ),
            ..Default::default()
        };
        let b = &mut builder;
        add_extension(
            b,
            true,
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
        )
        .and_then(|()| {
            let ku = KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment;
            add_extension(b, true, &KeyUsage(ku))
        })
        .and_then(|()| {
            let eku = vec![rfc5280::ID_KP_SERVER_AUTH, rfc5280::ID_KP_CLIENT_AUTH];
            add_extension(b, false, &ExtendedKeyUsage(eku))
        })
        .and_then(|()| add_extension(b, false, &SubjectAltName(sans)))
        .and_then(|()| add_extension(b, false, &leaf_key_id))
        .and_then(|()| add_extension(b, false, &aki))
        .map_err(|e| failed(e.into()))?;
        let cert = self.key.sign(builder).map_err(|e| failed(e.into()))?;
        let leaf_pem = cert.to_pem(LineEnding::LF).map_err(|e| failed(e.into()))?;
        Ok(Issued {
            cert_chain_pem: leaf_pem + &self.chain_pem,
            key_pem,
            serial_hex,
            not_before,
            not_after,
        })
    }
}

pub(crate) fn add_extension<P: BuilderProfile, T: AssociatedOid + Encode>(
    builder: &mut CertificateBuilder<P>,
    critical: bool,
    value: &T,
) -> x509_cert::der::Result<()> {
    builder.add_extension((T::OID, critical, value))
}

/// Fixed issuer and subject; every extension is added explicitly in [`Ca::issue`].
pub(crate) struct Names {
    pub issuer: Name,
    pub subject: Name,
}

impl BuilderProfile for Names {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }
    fn get_subject(&self) -> Name {
        self.subject.clone()
    }
    fn build_extensions(
        &self,
        _spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        Ok(Vec::new())
    }
}

/// Diego's order (Go's `pkix.Name`): the OUs, then CN; one attribute per RDN.
fn subject_name(id: &Identity) -> x509_cert::der::Result<Name> {
    let ous = [
        ("organization", id.org_guid),
        ("space", id.space_guid),
        ("app", id.app_guid),
    ];
    let mut attrs: Vec<(ObjectIdentifier, String)> = ous
        .iter()
        .filter_map(|(k, v)| v.map(|v| (rfc4519::OU, format!("{k}:{v}"))))
        .collect();
    attrs.push((rfc4519::CN, id.instance_guid.to_string()));
    name(&attrs)
}

/// Build a `Name` attribute by attribute (UTF8String values). x509-cert only offers
/// string parsing, which would need escaping, so go through DER.
pub(crate) fn name(attrs: &[(ObjectIdentifier, String)]) -> x509_cert::der::Result<Name> {
    let mut rdns = RdnSequence::default();
    for (oid, value) in attrs {
        let atv = AttributeTypeAndValue {
            oid: *oid,
            value: Any::encode_from(&Utf8StringRef::new(value)?)?,
        };
        rdns.push(RelativeDistinguishedName::try_from(vec![atv])?);
    }
    Name::from_der(&rdns.to_der()?)
}

/// A random positive serial of up to 128 bits (RFC 5280 allows 20 octets).
pub(crate) fn random_serial() -> Result<SerialNumber> {
    loop {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| err(format!("random serial: {e}")))?;
        if bytes.iter().any(|&b| b != 0) {
            // `Uint` takes the bytes as an unsigned magnitude (adds a 0x00 pad if needed).
            return SerialNumber::new(&bytes).map_err(|e| err(format!("random serial: {e}")));
        }
    }
}

/// Certificates carry whole seconds; round down so `Issued` says exactly what they do.
pub(crate) fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A new leaf key: PKCS#8 PEM and its public key info.
fn generate_key(kt: KeyType) -> Result<(String, SubjectPublicKeyInfoOwned)> {
    let what = format!("generating a {kt} key");
    let failed = |e| crypto(&what, e);
    let (pem, spki_der) = match kt {
        KeyType::EcdsaP256 => {
            let k = p256::SecretKey::try_generate().map_err(|e| failed(e.into()))?;
            (
                k.to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| failed(e.into()))?,
                k.public_key()
                    .to_public_key_der()
                    .map_err(|e| failed(e.into()))?,
            )
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 => {
            let bits = if kt == KeyType::Rsa2048 { 2048 } else { 3072 };
            let k =
                rsa::PrivateKey::new(&mut getrandom::SysRng, bits).map_err(|e| failed(e.into()))?;
            (
                k.to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| failed(e.into()))?,
                k.to_public_key()
                    .to_public_key_der()
                    .map_err(|e| failed(e.into()))?,
            )
        }
    };
    let spki =
        SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes()).map_err(|e| failed(e.into()))?;
    Ok((pem.to_string(), spki))
}

/// The CA key file: the first PEM private key block (openssl's `EC PARAMETERS` block
/// before a SEC1 key is skipped). Errors are messages; the caller names the file.
fn load_key(path: &Path) -> std::result::Result<CaKey, String> {
    let text = crate::sys::fs::read_pem_file(path).map_err(|e| e.to_string())?;
    let blocks = pem::parse_many(&text).map_err(|e| format!("not valid PEM: {e}"))?;
    let block = blocks
        .iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .ok_or_else(|| format!("holds no PEM private key; {VALID_CA_KEYS}"))?;
    let der = block.contents();
    let unsupported =
        |what: &dyn fmt::Display| format!("unsupported key type {what}; {VALID_CA_KEYS}");
    let rsa_key = |k: rsa::PrivateKey| CaKey::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(k)));
    match block.tag() {
        "RSA PRIVATE KEY" => rsa::PrivateKey::from_pkcs1_der(der)
            .map(rsa_key)
            .map_err(|e| format!("not a valid PKCS#1 RSA key: {e}")),
        "EC PRIVATE KEY" => {
            let bad = |e: &dyn fmt::Display| {
                format!("not a valid SEC1 EC key (only named curves are supported): {e}")
            };
            let curve = sec1::EcPrivateKey::from_der(der)
                .map_err(|e| bad(&e))?
                .parameters
                .and_then(|p| p.named_curve())
                .ok_or_else(|| {
                    "SEC1 EC key without a named curve; valid: P-256, P-384".to_string()
                })?;
            if curve == p256::NistP256::OID {
                p256::SecretKey::from_sec1_der(der)
                    .map(|k| CaKey::P256(k.into()))
                    .map_err(|e| bad(&e))
            } else if curve == p384::NistP384::OID {
                p384::SecretKey::from_sec1_der(der)
                    .map(|k| CaKey::P384(k.into()))
                    .map_err(|e| bad(&e))
            } else {
                Err(unsupported(&format!("EC curve {curve}")))
            }
        }
        "PRIVATE KEY" => {
            let bad = |e: &dyn fmt::Display| format!("not a valid PKCS#8 key: {e}");
            let info = pkcs8::PrivateKeyInfoRef::from_der(der).map_err(|e| bad(&e))?;
            match info.algorithm.oid {
                rfc5912::RSA_ENCRYPTION => rsa::PrivateKey::from_pkcs8_der(der)
                    .map(rsa_key)
                    .map_err(|e| bad(&e)),
                rfc5912::ID_EC_PUBLIC_KEY => match info.algorithm.parameters_oid() {
                    Ok(c) if c == p256::NistP256::OID => p256::SecretKey::from_pkcs8_der(der)
                        .map(|k| CaKey::P256(k.into()))
                        .map_err(|e| bad(&e)),
                    Ok(c) if c == p384::NistP384::OID => p384::SecretKey::from_pkcs8_der(der)
                        .map(|k| CaKey::P384(k.into()))
                        .map_err(|e| bad(&e)),
                    Ok(c) => Err(unsupported(&format!("EC curve {c}"))),
                    Err(e) => Err(unsupported(&format!("EC key without a named curve ({e})"))),
                },
                other => Err(unsupported(&format!("PKCS#8 algorithm {other}"))),
            }
        }
        "ENCRYPTED PRIVATE KEY" => Err(format!(
            "is encrypted (ENCRYPTED PRIVATE KEY); store it unencrypted, readable by root only; {VALID_CA_KEYS}"
        )),
        other => Err(unsupported(&other)),
    }
}

/// When to rotate: `validity - 30 min` for validities of 4h or more, else at 7/8 of the
/// validity; measured from issuance (`not_before + BACKDATE`), with the validity as
/// issued (i.e. after clamping to the CA's NotAfter).
pub fn rotate_after(issued: &Issued) -> SystemTime {
    let start = issued.not_before + BACKDATE;
    let life = issued
        .not_after
        .duration_since(start)
        .unwrap_or(Duration::ZERO);
    if life >= Duration::from_secs(4 * 3600) {
        issued.not_after - Duration::from_secs(30 * 60)
    } else {
        start + life / 8 * 7
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;
    use std::io::ErrorKind;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("es-id-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            // Generation directories are 0550: make every directory writable so that a
            // non-root run can delete them.
            fn writable(dir: &Path) {
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
                for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        writable(&e.path());
                    }
                }
            }
            writable(&self.0);
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The openssl CLI is the independent oracle (and makes the CA fixtures).
    fn openssl(args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl CLI is needed by these tests (scripts/install-deps.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A CA certificate + key made by openssl; `kind` picks key algorithm and encoding.
    fn openssl_ca(dir: &Path, kind: &str, days: u32, with_ski: bool) -> (PathBuf, PathBuf) {
        let (crt, key) = (
            dir.join(format!("{kind}.crt")),
            dir.join(format!("{kind}.key")),
        );
        let k = s(&key);
        let genpkey = |alg: &str, opt: &str| {
            openssl(&["genpkey", "-algorithm", alg, "-pkeyopt", opt, "-out", k])
        };
        match kind {
            "rsa-pkcs1" => openssl(&["genrsa", "-traditional", "-out", k, "2048"]),
            "rsa-pkcs8" => genpkey("RSA", "rsa_keygen_bits:2048"),
            // With the `EC PARAMETERS` block openssl puts before the key.
            "ec-sec1-p256" => openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-out", k]),
            "ec-sec1-p384" => openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-out", k]),
            "ec-pkcs8-p256" => genpkey("EC", "ec_paramgen_curve:P-256"),
            "ec-pkcs8-p384" => genpkey("EC", "ec_paramgen_curve:P-384"),
            "ec-pkcs8-p521" => genpkey("EC", "ec_paramgen_curve:P-521"),
            "ed25519" => openssl(&["genpkey", "-algorithm", "ed25519", "-out", k]),
            other => panic!("{other}"),
        };
        let cnf = dir.join(format!("{kind}.cnf"));
        let ski = if with_ski {
            "subjectKeyIdentifier = hash\n"
        } else {
            ""
        };
        fs::write(
            &cnf,
            format!(
                "[req]\ndistinguished_name = dn\nx509_extensions = v3\nprompt = no\n\
                 [dn]\nCN = test CA {kind}\nO = envoy-sidecar tests\n\
                 [v3]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n{ski}"
            ),
        )
        .unwrap();
        let days = days.to_string();
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            k,
            "-config",
            s(&cnf),
            "-days",
            &days,
            "-out",
            s(&crt),
        ]);
        (crt, key)
    }

    fn id(kt: KeyType) -> Identity<'static> {
        Identity {
            instance_guid: "5c1b6ac4-1c1f-4a5e-6b7d-2f1e",
            app_guid: Some("app-guid-1"),
            space_guid: Some("space-guid-2"),
            org_guid: Some("org-guid-3"),
            ips: vec!["10.255.1.7".parse().unwrap()],
            validity: Duration::from_secs(24 * 3600),
            key_type: kt,
        }
    }

    fn secs(t: SystemTime) -> i64 {
        i64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
    }

    fn iso(t: SystemTime) -> String {
        humantime::format_rfc3339_seconds(t)
            .to_string()
            .replace('T', " ")
    }

    /// Everything the certificate must say, read back by openssl.
    fn check_leaf(dir: &Path, ca_crt: &Path, id: &Identity, ca: &Ca, sig_alg: &str) -> Issued {
        let issued_at = SystemTime::now();
        let issued = ca.issue(id).unwrap();
        let issued = &issued;
        let now = SystemTime::now();
        let blocks = pem::parse_many(&issued.cert_chain_pem).unwrap();
        let ca_blocks = pem::parse_many(fs::read_to_string(ca_crt).unwrap()).unwrap();
        assert_eq!(blocks.len(), 2, "leaf + CA");
        assert_eq!(
            blocks[1].contents(),
            ca_blocks[0].contents(),
            "chain ends with the CA"
        );
        let (leaf, key) = (dir.join("leaf.crt"), dir.join("leaf.key"));
        fs::write(&leaf, pem::encode(&blocks[0])).unwrap();
        fs::write(&key, &issued.key_pem).unwrap();
        assert!(
            issued.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "PKCS#8"
        );

        let mut subject = format!("subject=CN={}", id.instance_guid);
        for (k, v) in [
            ("app", id.app_guid),
            ("space", id.space_guid),
            ("organization", id.org_guid),
        ] {
            if let Some(v) = v {
                subject += &format!(",OU={k}:{v}");
            }
        }
        // RFC 2253 prints the last RDN first and joins multi-valued RDNs with '+': the
        // commas show the OUs are separate RDNs.
        let got = openssl(&[
            "x509",
            "-in",
            s(&leaf),
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
        ]);
        assert_eq!(got.trim(), subject);

        let ext = openssl(&[
            "x509",
            "-in",
            s(&leaf),
            "-noout",
            "-ext",
            "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints,authorityKeyIdentifier",
        ]);
        let mut san = format!("DNS:{}", id.instance_guid);
        for ip in &id.ips {
            san += &format!(", IP Address:{ip}");
        }
        for want in [
            "X509v3 Key Usage: critical\n    Digital Signature, Key Encipherment\n",
            "X509v3 Extended Key Usage: \n    TLS Web Server Authentication, TLS Web Client Authentication\n",
            "X509v3 Basic Constraints: critical\n    CA:FALSE\n",
            &format!("X509v3 Subject Alternative Name: \n    {san}\n"),
        ] {
            assert!(ext.contains(want), "missing {want:?} in:\n{ext}");
        }
        let ca_ski = openssl(&[
            "x509",
            "-in",
            s(ca_crt),
            "-noout",
            "-ext",
            "subjectKeyIdentifier",
        ]);
        let ca_ski = ca_ski.lines().nth(1).map(str::trim).unwrap_or("");
        let aki = ext
            .split("X509v3 Authority Key Identifier: \n")
            .nth(1)
            .unwrap();
        let aki = aki.lines().next().unwrap().trim();
        if ca_ski.is_empty() {
            assert_eq!(aki.len(), 59, "SHA-1 key id: {aki}");
        } else {
            assert_eq!(aki, ca_ski);
        }

        let text = openssl(&["x509", "-in", s(&leaf), "-noout", "-text"]);
        assert!(
            text.contains(&format!("Signature Algorithm: {sig_alg}")),
            "{text}"
        );
        let key_size = match id.key_type {
            KeyType::EcdsaP256 => "Public-Key: (256 bit)",
            KeyType::Rsa2048 => "Public-Key: (2048 bit)",
            KeyType::Rsa3072 => "Public-Key: (3072 bit)",
        };
        assert!(text.contains(key_size), "{text}");

        let serial = openssl(&["x509", "-in", s(&leaf), "-noout", "-serial"]);
        assert_eq!(
            serial.trim(),
            format!("serial={}", issued.serial_hex.to_uppercase())
        );
        assert!(issued.serial_hex.len() <= 32 && issued.serial_hex.len() >= 16);

        let dates = openssl(&[
            "x509",
            "-in",
            s(&leaf),
            "-noout",
            "-dates",
            "-dateopt",
            "iso_8601",
        ]);
        assert_eq!(
            dates,
            format!(
                "notBefore={}\nnotAfter={}\n",
                iso(issued.not_before),
                iso(issued.not_after)
            )
        );
        // Back-dated 5 minutes from the moment of issuance (within this check).
        let nb = secs(issued.not_before);
        assert!(
            secs(issued_at) - 301 <= nb && nb <= secs(now) - 300,
            "{dates}"
        );

        for purpose in ["sslserver", "sslclient"] {
            let v = openssl(&[
                "verify",
                "-CAfile",
                s(ca_crt),
                "-purpose",
                purpose,
                s(&leaf),
            ]);
            assert_eq!(v.trim(), format!("{}: OK", leaf.display()));
        }
        assert_eq!(
            openssl(&["pkey", "-in", s(&key), "-pubout"]),
            openssl(&["x509", "-in", s(&leaf), "-noout", "-pubkey"]),
            "the key matches the certificate"
        );
        issued.clone()
    }

    #[test]
    fn issues_with_every_ca_key_kind() {
        let dir = TempDir::new("kinds");
        for (kind, sig_alg) in [
            ("rsa-pkcs1", "sha256WithRSAEncryption"),
            ("rsa-pkcs8", "sha256WithRSAEncryption"),
            ("ec-sec1-p256", "ecdsa-with-SHA256"),
            ("ec-sec1-p384", "ecdsa-with-SHA384"),
            ("ec-pkcs8-p256", "ecdsa-with-SHA256"),
            ("ec-pkcs8-p384", "ecdsa-with-SHA384"),
        ] {
            let (crt, key) = openssl_ca(&dir.0, kind, 30, true);
            let ca = Ca::load(&crt, &key).unwrap_or_else(|e| panic!("{kind}: {e}"));
            let id = id(KeyType::EcdsaP256);
            let issued = check_leaf(&dir.0, &crt, &id, &ca, sig_alg);
            assert_eq!(
                secs(issued.not_after),
                secs(issued.not_before) + 300 + 24 * 3600,
                "{kind}"
            );
        }
    }

    /// RSA leaves are slow to generate in a debug build: one CA of each family.
    #[test]
    fn issues_every_leaf_key_type() {
        let dir = TempDir::new("leaves");
        let (rsa_crt, rsa_key) = openssl_ca(&dir.0, "rsa-pkcs8", 30, true);
        let rsa_ca = Ca::load(&rsa_crt, &rsa_key).unwrap();
        crate::identity::ca::generate(&dir.0, "generated CA").unwrap();
        let ec_crt = dir.0.join("ca.crt");
        let ec_ca = Ca::load(&ec_crt, &dir.0.join("ca.key")).unwrap();
        for (ca, crt, sig) in [
            (&rsa_ca, &rsa_crt, "sha256WithRSAEncryption"),
            (&ec_ca, &ec_crt, "ecdsa-with-SHA256"),
        ] {
            for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
                let id = id(kt);
                check_leaf(&dir.0, crt, &id, ca, sig);
            }
        }
        let id = id(KeyType::Rsa3072);
        check_leaf(&dir.0, &ec_crt, &id, &ec_ca, "ecdsa-with-SHA256");
    }

    #[test]
    fn optional_fields_and_ski_less_ca() {
        let dir = TempDir::new("optional");
        let (crt, key) = openssl_ca(&dir.0, "ec-pkcs8-p256", 30, false);
        let ca = Ca::load(&crt, &key).unwrap();
        let mut id = id(KeyType::EcdsaP256);
        (id.space_guid, id.org_guid, id.ips) = (None, None, Vec::new());
        check_leaf(&dir.0, &crt, &id, &ca, "ecdsa-with-SHA256");
        id.app_guid = None;
        // A dual-stack container: both addresses.
        id.ips = vec!["10.255.1.7".parse().unwrap(), "fd00::17".parse().unwrap()];
        let issued = ca.issue(&id).unwrap();
        fs::write(dir.0.join("v6.crt"), &issued.cert_chain_pem).unwrap();
        let ext = openssl(&[
            "x509",
            "-in",
            s(&dir.0.join("v6.crt")),
            "-noout",
            "-ext",
            "subjectAltName",
            "-subject",
        ]);
        assert!(
            ext.contains("IP Address:10.255.1.7, IP Address:FD00:0:0:0:0:0:0:17"),
            "{ext}"
        );
        assert!(
            ext.contains(&format!("subject=CN = {}\n", id.instance_guid)),
            "{ext}"
        );
    }

    #[test]
    fn not_after_is_clamped_to_the_ca() {
        let dir = TempDir::new("clamp");
        let (crt, key) = openssl_ca(&dir.0, "ec-sec1-p256", 1, true);
        let ca = Ca::load(&crt, &key).unwrap();
        let mut id = id(KeyType::EcdsaP256);
        id.validity = Duration::from_secs(48 * 3600);
        let issued = check_leaf(&dir.0, &crt, &id, &ca, "ecdsa-with-SHA256");
        assert_eq!(issued.not_after, ca.not_after());
        // About a day of life left: rotate 30 minutes before the CA's end.
        assert_eq!(
            rotate_after(&issued),
            ca.not_after() - Duration::from_secs(1800)
        );
    }

    #[test]
    fn rotation_schedule() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let issued = |validity: u64| Issued {
            cert_chain_pem: String::new(),
            key_pem: String::new(),
            serial_hex: String::new(),
            not_before: t0 - BACKDATE,
            not_after: t0 + Duration::from_secs(validity),
        };
        let at = |v| {
            rotate_after(&issued(v))
                .duration_since(t0)
                .unwrap()
                .as_secs()
        };
        assert_eq!(at(24 * 3600), 24 * 3600 - 1800);
        assert_eq!(at(4 * 3600), 4 * 3600 - 1800);
        assert_eq!(at(4 * 3600 - 8), (4 * 3600 - 8) / 8 * 7);
        assert_eq!(at(3600), 3150);
        assert_eq!(at(60), 52);
    }

    #[test]
    fn bad_ca_files_are_named() {
        let dir = TempDir::new("bad");
        let (crt, key) = openssl_ca(&dir.0, "ec-pkcs8-p256", 30, true);
        let (other_crt, _) = openssl_ca(&dir.0, "ec-sec1-p384", 30, true);
        let e = Ca::load(&other_crt, &key).unwrap_err().to_string();
        assert!(
            e.contains("does not match") && e.contains(s(&key)) && e.contains(s(&other_crt)),
            "{e}"
        );
        for kind in ["ed25519", "ec-pkcs8-p521"] {
            let (_, bad_key) = openssl_ca(&dir.0, kind, 30, true);
            let e = Ca::load(&crt, &bad_key).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "CA key {}: unsupported key type",
                    bad_key.display()
                )) && e.contains("valid: RSA, ECDSA P-256/P-384 in PKCS#1, SEC1 or PKCS#8 PEM"),
                "{e}"
            );
        }
        let enc = dir.0.join("enc.key");
        openssl(&[
            "pkey",
            "-in",
            s(&key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            s(&enc),
        ]);
        let e = Ca::load(&crt, &enc).unwrap_err().to_string();
        assert!(e.contains("encrypted"), "{e}");
        let e = Ca::load(&crt, &crt).unwrap_err().to_string();
        assert!(e.contains("holds no PEM private key"), "{e}");

        // A leaf is not a CA.
        let ca = Ca::load(&crt, &key).unwrap();
        let issued = ca.issue(&id(KeyType::EcdsaP256)).unwrap();
        let (leaf, leaf_key) = (dir.0.join("leaf.crt"), dir.0.join("leaf.key"));
        fs::write(&leaf, &issued.cert_chain_pem).unwrap();
        fs::write(&leaf_key, &issued.key_pem).unwrap();
        let e = Ca::load(&leaf, &leaf_key).unwrap_err().to_string();
        assert!(
            e.contains("not a CA certificate") && e.contains(s(&leaf)),
            "{e}"
        );

        let bad_guid = Identity {
            instance_guid: "has space",
            ..id(KeyType::EcdsaP256)
        };
        let e = ca.issue(&bad_guid).unwrap_err().to_string();
        assert!(e.contains("instance guid"), "{e}");
    }

    #[test]
    fn key_type_names() {
        for kt in [KeyType::EcdsaP256, KeyType::Rsa2048, KeyType::Rsa3072] {
            assert_eq!(kt.as_str().parse::<KeyType>().unwrap(), kt);
        }
        assert_eq!(KeyType::default(), KeyType::EcdsaP256);
        let e = "rsa-1024".parse::<KeyType>().unwrap_err();
        assert!(e.contains("ecdsa-p256, rsa-2048, rsa-3072"), "{e}");
    }

    fn owner() -> (u32, u32) {
        match crate::sys::process::effective_ids() {
            (0, _) => (2000, 2000),
            ids => ids,
        }
    }

    fn generations(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != DATA_LINK)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn credentials_are_written_and_rotated() {
        let dir = TempDir::new("write");
        crate::identity::ca::generate(&dir.0.join("ca"), "CA").unwrap();
        let ca = Ca::load(&dir.0.join("ca/ca.crt"), &dir.0.join("ca/ca.key")).unwrap();
        let creds = dir.0.join("credentials");
        fs::create_dir(&creds).unwrap();
        let (uid, gid) = owner();
        let mut last = Vec::new();
        for _ in 0..3 {
            let issued = ca.issue(&id(KeyType::EcdsaP256)).unwrap();
            write_credentials(&creds, &issued, uid, gid).unwrap();
            let crt = fs::read_to_string(creds.join(CERT_FILE)).unwrap();
            let key = fs::read_to_string(creds.join(KEY_FILE)).unwrap();
            assert_eq!(
                (crt, key),
                (issued.cert_chain_pem.clone(), issued.key_pem.clone())
            );
            assert_eq!(
                read_credentials(&creds).unwrap(),
                (issued.cert_chain_pem, issued.key_pem)
            );

            for (f, mode) in [(CERT_FILE, 0o444), (KEY_FILE, 0o400)] {
                assert_eq!(
                    fs::read_link(creds.join(f)).unwrap(),
                    Path::new("..data").join(f),
                    "relative link through ..data"
                );
                let m = fs::metadata(creds.join(f)).unwrap();
                assert_eq!(
                    (m.mode() & 0o7777, m.uid(), m.gid()),
                    (mode, uid, gid),
                    "{f}"
                );
            }
            let gens = generations(&creds);
            assert_eq!(gens.len(), 1, "exactly one generation: {gens:?}");
            assert_eq!(
                fs::read_link(creds.join(DATA_LINK)).unwrap(),
                Path::new(&gens[0])
            );
            let m = fs::metadata(creds.join(&gens[0])).unwrap();
            assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o550, uid, gid));
            assert_ne!(gens, last, "a new generation each time");
            last = gens;
        }
        // Nothing else is left behind (temporary links, old generations).
        let mut names: Vec<String> = fs::read_dir(&creds)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [last[0].as_str(), DATA_LINK, CERT_FILE, KEY_FILE]);

        // A plain file where a link belongs (an older writer) is replaced.
        fs::remove_file(creds.join(KEY_FILE)).unwrap();
        fs::write(creds.join(KEY_FILE), "stale").unwrap();
        let issued = ca.issue(&id(KeyType::EcdsaP256)).unwrap();
        write_credentials(&creds, &issued, uid, gid).unwrap();
        assert_eq!(
            fs::read_to_string(creds.join(KEY_FILE)).unwrap(),
            issued.key_pem
        );
    }

    /// Readers run while the writer rotates 200 times. Each generation is one of a few
    /// pre-issued pairs, so a cert/key mismatch shows as two different indexes.
    #[test]
    fn readers_never_see_a_torn_pair() {
        let dir = TempDir::new("race");
        crate::identity::ca::generate(&dir.0.join("ca"), "CA").unwrap();
        let ca = Ca::load(&dir.0.join("ca/ca.crt"), &dir.0.join("ca/ca.key")).unwrap();
        let pairs: Vec<Issued> = (0..4)
            .map(|_| ca.issue(&id(KeyType::EcdsaP256)).unwrap())
            .collect();
        let by_cert: HashMap<&str, usize> = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| (p.cert_chain_pem.as_str(), i))
            .collect();
        let by_key: HashMap<&str, usize> = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key_pem.as_str(), i))
            .collect();
        let creds = dir.0.join("credentials");
        fs::create_dir(&creds).unwrap();
        let (uid, gid) = owner();
        write_credentials(&creds, &pairs[0], uid, gid).unwrap();

        let done = AtomicBool::new(false);
        let (naive_reads, naive_torn, naive_missing) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        std::thread::scope(|sc| {
            // The documented reader: never torn, never failing.
            let safe = sc.spawn(|| {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    let (c, k) = read_credentials(&creds).unwrap();
                    assert_eq!(by_cert[c.as_str()], by_key[k.as_str()], "torn pair");
                    n += 1;
                }
                n
            });
            // An app opening the two paths one after the other: every file it gets is
            // whole; only the pair can straddle a rotation (counted, not asserted).
            sc.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let c = fs::read_to_string(creds.join(CERT_FILE));
                    let k = fs::read_to_string(creds.join(KEY_FILE));
                    match (c, k) {
                        (Ok(c), Ok(k)) => {
                            let (ci, ki) = (by_cert[c.as_str()], by_key[k.as_str()]);
                            if ci != ki {
                                naive_torn.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
                            naive_missing.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    naive_reads.fetch_add(1, Ordering::Relaxed);
                }
            });
            for i in 1..=200 {
                write_credentials(&creds, &pairs[i % pairs.len()], uid, gid).unwrap();
            }
            done.store(true, Ordering::Relaxed);
            let n = safe.join().unwrap();
            assert!(n > 0);
            println!(
                "read_credentials: {n} consistent reads; naive two-open reader: {} reads, {} torn, {} transient ENOENT",
                naive_reads.load(Ordering::Relaxed),
                naive_torn.load(Ordering::Relaxed),
                naive_missing.load(Ordering::Relaxed)
            );
        });
        assert_eq!(generations(&creds).len(), 1);
    }

    /// `cargo test --release --lib -- --ignored --nocapture issuance_timings`
    #[test]
    #[ignore]
    fn issuance_timings() {
        let dir = TempDir::new("timing");
        crate::identity::ca::generate(&dir.0, "timing CA").unwrap();
        let (rsa_crt, rsa_key) = openssl_ca(&dir.0, "rsa-pkcs1", 30, true);
        let t = std::time::Instant::now();
        let rsa_ca = Ca::load(&rsa_crt, &rsa_key).unwrap();
        println!("Ca::load RSA-2048 PKCS#1: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let ec_ca = Ca::load(&dir.0.join("ca.crt"), &dir.0.join("ca.key")).unwrap();
        println!("Ca::load ECDSA P-256 PKCS#8: {:?}", t.elapsed());
        for (ca_name, ca) in [("P-256 CA", &ec_ca), ("RSA-2048 CA", &rsa_ca)] {
            for (kt, n) in [
                (KeyType::EcdsaP256, 200),
                (KeyType::Rsa2048, 20),
                (KeyType::Rsa3072, 5),
            ] {
                let id = id(kt);
                let mut times: Vec<Duration> = (0..n)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        ca.issue(&id).unwrap();
                        t.elapsed()
                    })
                    .collect();
                times.sort();
                println!(
                    "{ca_name}, {kt} leaf: n={n} median {:?} max {:?}",
                    times[n / 2],
                    times[n - 1]
                );
            }
        }
    }
}
