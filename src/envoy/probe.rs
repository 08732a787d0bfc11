//! Readiness is a real TLS handshake: Envoy reports `/ready` LIVE even when its
//! certificate is unusable and it resets every handshake. The probe verifies the served
//! chain against the operator CA and the instance guid, so "ready" also means "serving
//! the right identity". TLS 1.3 only: the client side completes before the server asks
//! for a client certificate, so the probe works with mutual TLS on as well.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

pub struct Probe {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Probe {
    /// `ca_pem`: the operator CA; `server_name`: the DNS SAN to expect, else
    /// `fallback_ip` (the IP SAN). An instance guid that is no DNS name (podman's
    /// 64-character ids exceed a DNS label) and no IP: the chain alone is verified.
    pub fn new(
        ca_pem: &str,
        server_name: &str,
        fallback_ip: Option<std::net::IpAddr>,
    ) -> Result<Probe, String> {
        let mut roots = RootCertStore::empty();
        for block in pem::parse_many(ca_pem).map_err(|e| format!("CA PEM: {e}"))? {
            if block.tag() == "CERTIFICATE" {
                roots
                    .add(CertificateDer::from(block.contents().to_vec()))
                    .map_err(|e| format!("CA certificate: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?;
        let (name, chain_only) = match ServerName::try_from(server_name.to_string()) {
            Ok(n) => (n, false),
            Err(_) => match fallback_ip {
                Some(ip) => (ServerName::IpAddress(ip.into()), false),
                None => (
                    ServerName::try_from("instance.invalid").expect("valid"),
                    true,
                ),
            },
        };
        let config = if chain_only {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| e.to_string())?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Probe {
            config: Arc::new(config),
            name,
        })
    }

    /// One handshake against `addr`; Err says why it failed.
    pub fn handshake(&self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        let mut sock = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        sock.set_read_timeout(Some(timeout)).ok();
        sock.set_write_timeout(Some(timeout)).ok();
        let mut conn = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        }
        // Close politely so Envoy does not log a reset; the app sees no bytes.
        conn.send_close_notify();
        let _ = conn.write_tls(&mut sock);
        let _ = sock.flush();
        let _ = sock.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}

/// Verifies the chain to the operator CA but not the name (see `Probe::new`).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
