//! The openssl CLI as an independent TLS oracle: `s_client` requests ([`Get`]) and
//! certificates made with `req`/`x509` ([`Ca`], [`sign_leaf`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::wait::wait_until;

/// `GET <path>` over TLS with `openssl s_client` (HTTP/1.0), verifying the chain
/// against `ca`.
pub struct Get<'a> {
    ca: &'a Path,
    server_name: Option<&'a str>,
    alpn: Option<&'a str>,
    client: Option<(&'a Path, &'a Path)>,
    path: &'a str,
    showcerts: bool,
}

impl<'a> Get<'a> {
    /// No SNI, no ALPN, no client certificate, `/`.
    pub fn new(ca: &'a Path) -> Get<'a> {
        Get {
            ca,
            server_name: None,
            alpn: None,
            client: None,
            path: "/",
            showcerts: false,
        }
    }

    /// Send `name` as SNI.
    pub fn sni(mut self, name: &'a str) -> Self {
        self.server_name = Some(name);
        self
    }

    /// Offer these protocols (`-alpn`).
    pub fn alpn(mut self, alpn: Option<&'a str>) -> Self {
        self.alpn = alpn;
        self
    }

    /// Present this client certificate and key.
    pub fn client(mut self, client: Option<(&'a Path, &'a Path)>) -> Self {
        self.client = client;
        self
    }

    pub fn path(mut self, path: &'a str) -> Self {
        self.path = path;
        self
    }

    /// Print the server's chain (`-showcerts`).
    pub fn showcerts(mut self) -> Self {
        self.showcerts = true;
        self
    }

    /// One request to `addr`; s_client's stdout and stderr.
    pub fn fetch(&self, addr: &str) -> String {
        use std::io::Write;
        let mut cmd = Command::new("timeout");
        cmd.args(["10", "openssl", "s_client", "-connect", addr])
            .arg("-CAfile")
            .arg(self.ca)
            .args(["-verify_return_error", "-ign_eof"]);
        if let Some(n) = self.server_name {
            cmd.args(["-servername", n]);
        }
        if self.showcerts {
            cmd.arg("-showcerts");
        }
        if let Some(a) = self.alpn {
            cmd.args(["-alpn", a]);
        }
        if let Some((c, k)) = self.client {
            cmd.arg("-cert").arg(c).arg("-key").arg(k);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let req = format!("GET {} HTTP/1.0\r\nHost: x\r\n\r\n", self.path);
        let _ = child.stdin.take().unwrap().write_all(req.as_bytes());
        let o = child.wait_with_output().unwrap();
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Retry until the response contains `want` (Envoy starts after the container
    /// does); panics with the last output after 20 s.
    pub fn wait_for(&self, addr: &str, want: &str) -> String {
        wait_until(
            &format!("{want:?} served on {addr}"),
            Duration::from_secs(20),
            || {
                let out = self.fetch(addr);
                if out.contains(want) {
                    Ok(out)
                } else {
                    Err(out)
                }
            },
        )
    }
}

/// `GET /` over TLS to `addr`, verifying the chain against `ca` and sending
/// `server_name`; returns stdout and stderr.
pub fn openssl_get(addr: &str, ca: &Path, server_name: &str) -> String {
    Get::new(ca).sni(server_name).fetch(addr)
}

/// Retry `openssl_get` until the response contains `want`; panics with the last
/// output after 20 s.
pub fn openssl_wait_for(addr: &str, ca: &Path, server_name: &str, want: &str) -> String {
    Get::new(ca).sni(server_name).wait_for(addr, want)
}

/// `openssl <words>` in `dir` (the words are split on whitespace: no spaces in names).
pub fn openssl(dir: &Path, words: &str) {
    let args: Vec<&str> = words.split_whitespace().collect();
    let o = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        o.status.success(),
        "openssl {words}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A new P-256 key, unencrypted.
pub const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A leaf for `/CN=<name>` signed by `ca` with the openssl extension lines `ext`:
/// `<dir>/<name>.{key,csr,ext,crt}`; returns the certificate and key paths. `serial`
/// `None`: a random one (`-CAcreateserial`).
pub fn sign_leaf(
    dir: &Path,
    ca: &Ca,
    name: &str,
    serial: Option<u32>,
    ext: &str,
) -> (PathBuf, PathBuf) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &format!("req -new {EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
    );
    let serial = serial.map_or("-CAcreateserial".to_string(), |s| {
        format!("-set_serial {s}")
    });
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {} -CAkey {} {serial} -days 1 -out {name}.crt \
             -extfile {name}.ext",
            ca.crt.display(),
            ca.key.display()
        ),
    );
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// A CA: its certificate and key files.
pub struct Ca {
    pub crt: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A self-signed CA made with the openssl CLI: `<dir>/<name>.crt` and `.key`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        openssl(
            dir,
            &format!(
                "req -x509 {EC_KEY} -keyout {name}.key -out {name}.crt -days 2 -subj /CN={name}"
            ),
        );
        Ca::at(dir, name)
    }

    /// The CA in `<dir>/<name>.crt` and `.key` (e.g. `generate-ca`'s `ca`).
    pub fn at(dir: &Path, name: &str) -> Ca {
        Ca {
            crt: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }

    pub fn pem(&self) -> String {
        std::fs::read_to_string(&self.crt).unwrap()
    }
}

/// The `[proxy]` keys for mutual TLS: client certificates from `trusted_ca` with the
/// gorouter's SAN.
pub fn mtls_proxy_config(trusted_ca: &Path) -> String {
    format!(
        "require_and_verify_client_certificates = true\ntrusted_ca_certificates = [{trusted_ca:?}]\n\
         verify_subject_alt_name = [\"gorouter.service.cf.internal\"]"
    )
}
