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
    /// `ca_pem`: the operator CA; `server_name`: the DNS SAN to expect.
    pub fn new(ca_pem: &str, server_name: &str) -> Result<Probe, String> {
        let mut roots = RootCertStore::empty();
        for block in pem::parse_many(ca_pem).map_err(|e| format!("CA PEM: {e}"))? {
            if block.tag() == "CERTIFICATE" {
                roots
                    .add(CertificateDer::from(block.contents().to_vec()))
                    .map_err(|e| format!("CA certificate: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("{server_name:?} is not usable as a TLS server name: {e}"))?;
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
