//! The generated Envoy configuration against the real Envoy: every golden bootstrap
//! passes `envoy --mode validate`, and real TLS on loopback (no container) does what
//! the product promises — the app's reply comes through, ALPN, admin on 127.0.0.1
//! only with its path allow-list, certificate rotation without a restart, and mTLS
//! failures that never reach the app.
//!
//! Needs `/usr/local/bin/envoy` and the `openssl` CLI, not root.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Ca, Slot, TempDir, repo, sign_leaf, slots, wait_until_every};

use envoy_sidecar::envoy::bootstrap::{self, Alpn, Inputs, Listener, Mtls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

const ENVOY: &str = "/usr/local/bin/envoy";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The Envoy binary, or `None` (with the reason printed) where it is not installed.
/// Under CI a missing Envoy is a failure, never a skip.
fn envoy(test: &str) -> Option<PathBuf> {
    if Path::new(ENVOY).exists() {
        return Some(ENVOY.into());
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {ENVOY} is missing (scripts/install-deps.sh installs it)");
    }
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: envoy not installed");
    None
}

/// A leaf signed by `ca` in `dir` (server and client usage): `(cert PEM, key PEM)`.
fn leaf(ca: &Ca, dir: &Path, name: &str, serial: u32, sans: &str) -> (String, String) {
    let (crt, key) = sign_leaf(
        dir,
        ca,
        name,
        Some(serial),
        &format!(
            "subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n\
             keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n"
        ),
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    (read(&crt), read(&key))
}

/// The "app": answers `hello <port>\n` to each connection and counts the accepts.
struct App {
    port: u16,
    accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl App {
    fn start(port: u16) -> App {
        let listener = TcpListener::bind((LOOPBACK, port)).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(mut c) = conn {
                    a.fetch_add(1, Ordering::SeqCst);
                    let _ = c.write_all(format!("hello {port}\n").as_bytes());
                }
            }
        });
        App {
            port,
            accepts,
            stop,
            thread: Some(thread),
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect((LOOPBACK, self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running Envoy, killed (by pid) and reaped on drop; its log is shown if the test
/// failed.
struct Envoy {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Envoy {
    fn start(bin: &Path, bootstrap: &Path, log: PathBuf) -> Envoy {
        let out = std::fs::File::create(&log).unwrap();
        let started = Instant::now();
        let child = Command::new(bin)
            .args(bootstrap::args(bootstrap, 1, Duration::from_secs(1)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start envoy");
        Envoy {
            child,
            log,
            started,
        }
    }

    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "envoy exited ({st}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "envoy log {}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// One container's worth of Envoy on loopback: PKI, SDS dir, apps, bootstrap, Envoy.
struct Setup {
    dir: TempDir,
    _slot: Slot,
    ca: Ca,
    serving: (String, String),
    listeners: Vec<Listener>,
    admin_port: u16,
    apps: Vec<App>,
    envoy: Envoy,
}

impl Setup {
    fn start(bin: &Path, name: &str, ports: usize, alpn: Alpn, mtls: Option<&Mtls>) -> Setup {
        Setup::start_with(bin, name, ports, alpn, mtls, 100, Duration::from_secs(5))
    }

    fn start_with(
        bin: &Path,
        name: &str,
        ports: usize,
        alpn: Alpn,
        mtls: Option<&Mtls>,
        max_connections: u32,
        handshake_timeout: Duration,
    ) -> Setup {
        let dir = TempDir::new(&format!("es-envoy-{name}"));
        let ca = Ca::new(dir.path(), "instance-ca");
        let serving = leaf(
            &ca,
            dir.path(),
            "serving1",
            0x1001,
            "DNS:localhost,IP:127.0.0.1",
        );
        let sds_dir = dir.path().join("sds");
        std::fs::create_dir(&sds_dir).unwrap();
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        bootstrap::write_sds(&sds_dir, &serving.0, &serving.1, uid, gid).unwrap();
        if let Some(m) = mtls {
            bootstrap::write_validation_sds(&sds_dir, m, uid, gid).unwrap();
        }

        // Ports of a slot's own, free right now on every address (not in the kernel's
        // ephemeral range, where outgoing connections take their source ports).
        let slot = slots::next();
        let p = slot.tcp_ports(2 * ports + 1);
        let listeners: Vec<Listener> = (0..ports)
            .map(|k| Listener {
                proxy_port: p[k],
                app_port: p[ports + k],
            })
            .collect();
        let admin_port = p[2 * ports];
        let apps = listeners.iter().map(|l| App::start(l.app_port)).collect();
        let node_id = format!("test/{name}");
        let b = bootstrap::bootstrap(&Inputs {
            node_id: &node_id,
            listeners: &listeners,
            admin: bootstrap::AdminAddress::Loopback(admin_port),
            alpn,
            mtls,
            sds_dir: &sds_dir,
            upstream_address: LOOPBACK,
            ipv6: true,
            max_connections,
            heap_budget_bytes: envoy_sidecar::envoy::sizing::heap_budget_bytes(32, mtls.is_some()),
            overload_refresh: Duration::from_millis(envoy_sidecar::envoy::sizing::heap_refresh_ms(
                u64::from(max_connections),
                32,
                mtls.is_some(),
            )),
            handshake_timeout,
        });
        let bootstrap = dir.path().join("bootstrap.json");
        std::fs::write(&bootstrap, bootstrap::render(&b)).unwrap();
        let envoy = Envoy::start(bin, &bootstrap, dir.path().join("envoy.log"));
        Setup {
            dir,
            _slot: slot,
            ca,
            serving,
            listeners,
            admin_port,
            apps,
            envoy,
        }
    }

    fn sds_dir(&self) -> PathBuf {
        self.dir.path().join("sds")
    }

    /// Poll with real TLS handshakes until listener 0 serves; returns the time since
    /// Envoy was spawned. (`/ready` is not readiness: it says LIVE without a cert.)
    fn wait_ready(&mut self, client: Option<&(String, String)>) -> Duration {
        let (port, ca) = (self.listeners[0].proxy_port, self.ca.pem());
        wait_until_every(
            "envoy serving TLS",
            Duration::from_secs(10),
            Duration::from_millis(2),
            || {
                self.envoy.assert_running();
                tls(port, &ca, client, &[])
            },
        );
        self.envoy.started.elapsed()
    }
}

/// What a successful TLS exchange saw.
#[derive(Debug)]
struct Served {
    peer_cert: Vec<u8>,
    alpn: Option<Vec<u8>>,
    reply: String,
}

/// Connect to 127.0.0.1:port as `localhost`, verify the server against `ca_pem`,
/// optionally present a client certificate, then read until the server closes.
fn tls(
    port: u16,
    ca_pem: &str,
    client: Option<&(String, String)>,
    alpn: &[&str],
) -> Result<Served, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((crt, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(crt.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect_timeout(&SocketAddr::from((LOOPBACK, port)), IO_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let mut reply = Vec::new();
    // Under TLS 1.3 a rejected client certificate shows up here, as an alert on the
    // first read. A peer closing without close_notify after sending data is fine.
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !reply.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    Ok(Served {
        peer_cert: s.conn.peer_certificates().unwrap()[0].to_vec(),
        alpn: s.conn.alpn_protocol().map(|p| p.to_vec()),
        reply: String::from_utf8_lossy(&reply).into_owned(),
    })
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// `openssl s_client -alpn ...`: the ALPN line it prints ("ALPN protocol: h2" or
/// "No ALPN negotiated").
fn s_client_alpn(port: u16, ca: &Path, offer: &str) -> String {
    let o = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args([
            "-servername",
            "localhost",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(ca)
        .args(["-alpn", offer])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Verify return code: 0 (ok)"),
        "s_client:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.lines()
        .find(|l| l.contains("ALPN"))
        .unwrap_or_else(|| panic!("no ALPN line in:\n{out}"))
        .trim()
        .to_string()
}

/// Minimal HTTP/1.1 (one request, `Connection: close`) to the admin port: `(status, body)`.
fn admin(addr: IpAddr, port: u16, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    // No half-close: Envoy drops an HTTP connection whose peer shut down its write side
    // before the response. (HTTP/1.0 gets 426 from admin.)
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {resp:?}"));
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// Let Envoy act on whatever it was going to do before counting the app's accepts.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn golden_bootstraps_validate() {
    let Some(bin) = envoy("golden_bootstraps_validate") else {
        return;
    };
    let golden = repo().join("tests/golden/envoy");
    let dir = TempDir::new("es-envoy-validate");
    // Envoy (even in validate mode) refuses a bootstrap whose SDS file does not exist,
    // so point the golden files' SDS paths at a directory that has one. It does not
    // parse the SDS file or the CA in validate mode: that is what the TLS tests are for.
    let sds = dir.path().join("sds");
    std::fs::create_dir(&sds).unwrap();
    std::fs::write(sds.join(bootstrap::SDS_FILE), "{}").unwrap();
    std::fs::write(sds.join(bootstrap::VALIDATION_FILE), "{}").unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut b: Value = serde_json::from_str(&text).unwrap();
        let mut rewired = 0;
        for l in b["static_resources"]["listeners"].as_array_mut().unwrap() {
            let ctx = &mut l["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
                ["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"];
            ctx["path"] = sds.join(bootstrap::SDS_FILE).to_str().unwrap().into();
            ctx["watched_directory"]["path"] = sds.to_str().unwrap().into();
            let common = &mut l["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"];
            if let Some(v) = common.get_mut("validation_context_sds_secret_config") {
                let p = &mut v["sds_config"]["path_config_source"];
                p["path"] = sds
                    .join(bootstrap::VALIDATION_FILE)
                    .to_str()
                    .unwrap()
                    .into();
                p["watched_directory"]["path"] = sds.to_str().unwrap().into();
            }
            rewired += 1;
        }
        assert!(rewired > 0, "{}: no listeners", path.display());
        let file = dir.path().join(path.file_name().unwrap());
        std::fs::write(&file, bootstrap::render(&b)).unwrap();
        let t = Instant::now();
        let o = Command::new(&bin)
            .args(bootstrap::validate_args(&file))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "envoy --mode validate {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        eprintln!("validated {} in {:?}", path.display(), t.elapsed());
        n += 1;
    }
    assert!(n >= 4, "expected at least 4 golden bootstraps, found {n}");
}

#[test]
fn tls_alpn_admin_and_rotation() {
    let Some(bin) = envoy("tls_alpn_admin_and_rotation") else {
        return;
    };
    let mut s = Setup::start(&bin, "tls", 2, Alpn::H2Http11, None);
    let ready = s.wait_ready(None);
    eprintln!("MEASURED envoy spawn -> first TLS handshake served: {ready:?}");

    // Every listener reaches its own app, with the instance identity certificate.
    for (l, app) in s.listeners.iter().zip(&s.apps) {
        let got = tls(l.proxy_port, &s.ca.pem(), None, &["h2", "http/1.1"]).unwrap();
        assert_eq!(got.reply, format!("hello {}\n", app.port));
        assert_eq!(got.peer_cert, der(&s.serving.0));
        assert_eq!(got.alpn.as_deref(), Some(&b"h2"[..]));
    }

    // ALPN as openssl sees it: h2 preferred; http/1.1 when that is all a client offers.
    let ca_file = s.ca.crt.clone();
    let port = s.listeners[0].proxy_port;
    assert_eq!(
        s_client_alpn(port, &ca_file, "h2,http/1.1"),
        "ALPN protocol: h2"
    );
    assert_eq!(
        s_client_alpn(port, &ca_file, "http/1.1"),
        "ALPN protocol: http/1.1"
    );

    // Plain TCP (no TLS at all) to a proxy port never reaches the app.
    let before: Vec<usize> = s.apps.iter().map(App::accepts).collect();
    {
        let mut c = TcpStream::connect((LOOPBACK, port)).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        assert!(!String::from_utf8_lossy(&buf).contains("hello"), "{buf:?}");
    }
    settle();
    assert_eq!(s.apps.iter().map(App::accepts).collect::<Vec<_>>(), before);

    // Admin: on 127.0.0.1 only, and only the allowed paths.
    let (code, body) = admin(LOOPBACK, s.admin_port, "GET", "/ready").unwrap();
    // (The body is chunked: "5\r\nLIVE\n\r\n0".)
    assert_eq!(code, 200);
    assert!(body.contains("LIVE\n"), "{body:?}");
    let other_loopback = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let e = admin(other_loopback, s.admin_port, "GET", "/ready").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    // ... while the TLS listeners are on 0.0.0.0.
    assert!(TcpStream::connect((other_loopback, port)).is_ok());
    for target in [
        "/server_info",
        "/certs",
        "/memory",
        "/stats",
        "/stats?filter=^listener&usedonly",
    ] {
        let (code, _) = admin(LOOPBACK, s.admin_port, "GET", target).unwrap();
        assert_eq!(code, 200, "{target}");
    }
    for target in [
        "/config_dump",
        "/quitquitquit",
        "/healthcheck/fail",
        "/logging",
        "/runtime_modify",
        "/ready?x",
        "/stats/recentlookups/enable",
        "//config_dump",
        "/stats/../config_dump",
        "/%63onfig_dump",
    ] {
        let (code, _) = admin(LOOPBACK, s.admin_port, "POST", target).unwrap();
        assert!(code == 403 || code == 404, "{target}: {code}");
    }
    let (code, _) = admin(LOOPBACK, s.admin_port, "GET", "/ready").unwrap();
    assert_eq!(code, 200, "Envoy still LIVE after the refused requests");

    // Rotation: a new pair by rename; new handshakes present it, same process.
    let pid = s.envoy.child.id();
    let rotated = leaf(
        &s.ca,
        s.dir.path(),
        "serving2",
        0x2002,
        "DNS:localhost,IP:127.0.0.1",
    );
    assert_ne!(der(&rotated.0), der(&s.serving.0));
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let t = Instant::now();
    bootstrap::write_sds(&s.sds_dir(), &rotated.0, &rotated.1, uid, gid).unwrap();
    wait_until_every(
        "rotation seen in handshakes",
        Duration::from_secs(2),
        Duration::from_millis(1),
        || {
            let got = tls(port, &s.ca.pem(), None, &[]).unwrap();
            if got.peer_cert == der(&rotated.0) {
                assert_eq!(got.reply, format!("hello {}\n", s.apps[0].port));
                return true;
            }
            assert_eq!(
                got.peer_cert,
                der(&s.serving.0),
                "neither the old nor the new cert"
            );
            false
        },
    );
    eprintln!(
        "MEASURED write_sds -> new cert in handshakes: {:?}",
        t.elapsed()
    );
    s.envoy.assert_running();
    assert_eq!(s.envoy.child.id(), pid);
    // The second listener shares the secret.
    let got = tls(s.listeners[1].proxy_port, &s.ca.pem(), None, &[]).unwrap();
    assert_eq!(got.peer_cert, der(&rotated.0));

    // Stop, the way the supervisor will: a graceful drain keeps accepting for
    // --drain-time-s (1 s here), then the listeners refuse.
    let (code, _) = admin(LOOPBACK, s.admin_port, "POST", "/drain_listeners?graceful").unwrap();
    assert_eq!(code, 200);
    let t = Instant::now();
    tls(port, &s.ca.pem(), None, &[]).expect("still served while draining");
    wait_until_every(
        "listeners refusing after the drain",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || TcpStream::connect((LOOPBACK, port)).is_err(),
    );
    eprintln!(
        "MEASURED graceful drain -> listeners refuse: {:?}",
        t.elapsed()
    );
    // Envoy 1.40 still reports state LIVE (/server_info, /ready) after a listener
    // drain: the supervisor has to remember that it drained.
    s.envoy.assert_running();
}

/// One counter from admin `/stats` (`name: value` lines), 0 when absent.
fn stat(admin_port: u16, name: &str) -> u64 {
    let (code, body) = admin(
        LOOPBACK,
        admin_port,
        "GET",
        &format!("/stats?filter=^{name}$"),
    )
    .unwrap_or_else(|e| panic!("admin /stats: {e}"));
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Flood ([proxy] handshake_timeout): FLOOD plain TCP connections that never send a
/// ClientHello, more than `max_connections`, all held open by the test; a real TLS
/// request must still complete within 2 s of the flood being in place. Idle
/// pre-handshake connections count against Envoy's downstream-connections monitor
/// from accept (the flood fills the cap: the next connection is refused at once), so
/// what frees the slots is the handshake timeout (`transport_socket_connect_timeout`).
/// `HANDSHAKE_FLOOD_TIMEOUT_MS=10000` (Envoy's default and this product's value before
/// the key existed) makes it fail.
#[test]
fn handshake_flood_does_not_starve_clients() {
    let Some(bin) = envoy("handshake_flood_does_not_starve_clients") else {
        return;
    };
    const FLOOD: usize = 1000;
    const CAP: u32 = 400;
    let timeout = Duration::from_millis(
        std::env::var("HANDSHAKE_FLOOD_TIMEOUT_MS")
            .ok()
            .map_or(1000, |v| v.parse().unwrap()),
    );
    let mut s = Setup::start_with(&bin, "flood", 1, Alpn::H2Http11, None, CAP, timeout);
    s.wait_ready(None);
    let (port, ca, admin_port) = (s.listeners[0].proxy_port, s.ca.pem(), s.admin_port);
    // Let the readiness handshakes' connections close before counting.
    settle();

    let mut flood = Vec::with_capacity(FLOOD);
    for k in 0..FLOOD {
        let c = TcpStream::connect_timeout(&SocketAddr::from((LOOPBACK, port)), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("flood connection {k}: {e}"));
        flood.push(c);
    }
    let flooded = Instant::now();
    // The flood really is past the cap: Envoy counts what it refused at accept.
    let overflow = wait_until_every(
        "Envoy refusing connections over the cap",
        Duration::from_secs(2),
        Duration::from_millis(10),
        || {
            let n = stat(
                admin_port,
                &format!("listener.0.0.0.0_{port}.downstream_global_cx_overflow"),
            );
            if n > 0 {
                Ok(n)
            } else {
                Err(format!("overflow {n}"))
            }
        },
    );
    let refused_at_first = tls(port, &ca, None, &[]).is_err();

    // A client retrying every 20 ms, as a real client's retry would.
    let (served, attempts) = loop {
        match tls(port, &ca, None, &[]) {
            Ok(got) => break (got, flooded.elapsed()),
            Err(e) => {
                assert!(
                    flooded.elapsed() < Duration::from_secs(2),
                    "no TLS request completed within 2 s of {FLOOD} idle connections \
                     (max_connections {CAP}, handshake timeout {timeout:?}); last: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(served.reply, format!("hello {}\n", s.apps[0].port));
    let _ = writeln!(
        std::io::stderr(),
        "flood: {FLOOD} idle connections, cap {CAP}, refused over cap {overflow}, \
         refused right after the flood: {refused_at_first}, TLS served {attempts:?} after \
         the flood (handshake timeout {timeout:?})"
    );
    // The idle ones were closed by Envoy (reads see EOF or reset), not by the test.
    let mut buf = [0u8; 1];
    for c in flood.iter_mut().take(10) {
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    }
    s.envoy.assert_running();
    drop(flood);
}

#[test]
fn alpn_none_and_http11_only() {
    let Some(bin) = envoy("alpn_none_and_http11_only") else {
        return;
    };
    for (alpn, offer_both, offer_h2) in [
        (Alpn::None, "No ALPN negotiated", "No ALPN negotiated"),
        (
            Alpn::Http11,
            "ALPN protocol: http/1.1",
            "No ALPN negotiated",
        ),
    ] {
        let mut s = Setup::start(
            &bin,
            alpn.as_str().replace('/', "_").as_str(),
            1,
            alpn,
            None,
        );
        s.wait_ready(None);
        let ca_file = s.ca.crt.clone();
        let port = s.listeners[0].proxy_port;
        assert_eq!(
            s_client_alpn(port, &ca_file, "h2,http/1.1"),
            offer_both,
            "{alpn:?}"
        );
        assert_eq!(s_client_alpn(port, &ca_file, "h2"), offer_h2, "{alpn:?}");
        let got = tls(port, &s.ca.pem(), None, &["h2", "http/1.1"]).unwrap();
        assert_eq!(got.reply, format!("hello {}\n", s.apps[0].port));
    }
}

#[test]
fn mtls_failures_never_reach_the_app() {
    let Some(bin) = envoy("mtls_failures_never_reach_the_app") else {
        return;
    };
    let pki = TempDir::new("es-envoy-mtls-pki");
    let router_ca = Ca::new(pki.path(), "router-ca");
    let rogue_ca = Ca::new(pki.path(), "rogue-ca");
    let m = Mtls {
        trusted_ca_pem: router_ca.pem(),
        verify_subject_alt_names: vec![
            "gorouter.service.cf.internal".into(),
            "spiffe://cf.internal/gorouter".into(),
        ],
    };
    let good_dns = leaf(
        &router_ca,
        pki.path(),
        "router-dns",
        1,
        "DNS:gorouter.service.cf.internal",
    );
    let good_uri = leaf(
        &router_ca,
        pki.path(),
        "router-uri",
        2,
        "URI:spiffe://cf.internal/gorouter",
    );
    let wrong_san = leaf(
        &router_ca,
        pki.path(),
        "router-other",
        3,
        "DNS:other.service.cf.internal",
    );
    // The right name, but as an e-mail SAN: only DNS and URI SANs authenticate.
    let wrong_type = leaf(
        &router_ca,
        pki.path(),
        "router-email",
        4,
        "email:gorouter.service.cf.internal",
    );
    let untrusted = leaf(
        &rogue_ca,
        pki.path(),
        "rogue",
        5,
        "DNS:gorouter.service.cf.internal",
    );

    let mut s = Setup::start(&bin, "mtls", 1, Alpn::H2Http11, Some(&m));
    let ready = s.wait_ready(Some(&good_dns));
    eprintln!("MEASURED envoy spawn -> first mTLS handshake served: {ready:?}");
    let port = s.listeners[0].proxy_port;
    let ca = s.ca.pem();
    let app = &s.apps[0];

    for (what, client) in [
        ("no client certificate", None),
        ("untrusted CA", Some(&untrusted)),
        ("SAN not in the list", Some(&wrong_san)),
        ("listed name as an e-mail SAN", Some(&wrong_type)),
    ] {
        let before = app.accepts();
        for _ in 0..3 {
            let r = tls(port, &ca, client, &[]);
            assert!(r.is_err(), "{what}: served {r:?}");
        }
        settle();
        assert_eq!(app.accepts(), before, "{what}: the app saw a connection");
    }

    for (what, client) in [("DNS SAN", &good_dns), ("URI SAN", &good_uri)] {
        let before = app.accepts();
        let got = tls(port, &ca, Some(client), &[]).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.reply, format!("hello {}\n", app.port), "{what}");
        assert_eq!(app.accepts(), before + 1, "{what}");
    }
    s.envoy.assert_running();
}
