//! The Envoy sidecar against the real thing: containerd + runc + Envoy, the container
//! in its own network namespace (veth, 198.51.100.0/24), clients connecting from the
//! host over that network with openssl as an independent TLS oracle.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PORTS: &str = "envoy-sidecar/ports";
const GUID: &str = "envoy-sidecar/instance-guid";
const HELLO: &str = "hello from envoy-sidecar test app";

struct Tls<'a> {
    ca: &'a Path,
    server_name: &'a str,
    alpn: Option<&'a str>,
    client: Option<(&'a Path, &'a Path)>,
}

/// `GET /` over TLS with openssl s_client; returns its combined output.
fn tls_get(addr: &str, t: &Tls, path: &str) -> String {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "10",
        "openssl",
        "s_client",
        "-connect",
        addr,
        "-servername",
        t.server_name,
    ])
    .arg("-CAfile")
    .arg(t.ca)
    .args(["-verify_return_error", "-showcerts", "-ign_eof"]);
    if let Some(a) = t.alpn {
        cmd.args(["-alpn", a]);
    }
    if let Some((c, k)) = t.client {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let _ = child.stdin.take().unwrap().write_all(req.as_bytes());
    let o = child.wait_with_output().unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Retry until the app's page comes back through the proxy (Envoy starts after
/// `ctr run -d` returns); returns the output and how long it took.
fn wait_served(addr: &str, t: &Tls) -> (String, Duration) {
    let start = Instant::now();
    loop {
        let out = tls_get(addr, t, "/");
        if out.contains(HELLO) {
            return (out, start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never served on {addr}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn first_cert_text(s_client_out: &str) -> String {
    let begin = s_client_out
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = s_client_out[begin..]
        .find("-----END CERTIFICATE-----")
        .unwrap()
        + begin
        + 25;
    let mut c = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(&s_client_out.as_bytes()[begin..end])
        .unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
}

fn record(sb: &Sandbox, id: &str) -> Value {
    let p = sb
        .state_dir
        .join(NAMESPACE)
        .join(id)
        .join("supervisor.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn envoy_pid(sb: &Sandbox, id: &str) -> i32 {
    record(sb, id)["envoy"]["pid"]
        .as_i64()
        .expect("envoy pid recorded") as i32
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(false)
}

fn port_of(st: &Value, i: usize, key: &str) -> u16 {
    st["ports"][i][key].as_u64().unwrap() as u16
}

fn httpd_cmd() -> Vec<&'static str> {
    vec![
        "/bin/sh",
        "-c",
        "httpd -p 9999 -h /www && exec httpd -f -p 8080 -h /www",
    ]
}

#[test]
fn tls_proxy_serves_the_app_with_its_identity() {
    if !can_run("tls_proxy_serves_the_app_with_its_identity") {
        return;
    }
    let net = Netns::new(1);
    let sb = Sandbox::new("tls", "", "");
    let ca = sb.dir.join("ca/ca.crt");
    let c = sb.start_cmd(
        "es-tls",
        &[(PORTS, "8080,9999"), (GUID, "inst-1234")],
        &[&net.ctr_opt()],
        &httpd_cmd(),
    );
    let st = sb.inspect("es-tls").unwrap();
    let tls = Tls {
        ca: &ca,
        server_name: "inst-1234",
        alpn: Some("h2,http/1.1"),
        client: None,
    };
    let (out, took) = wait_served(
        &format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy")),
        &tls,
    );
    eprintln!("first response through the proxy {took:?} after ctr run -d returned");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains("ALPN protocol: h2"),
        "h2 offered by default: {out}"
    );
    let cert = first_cert_text(&out);
    assert!(cert.contains("DNS:inst-1234"), "{cert}");
    assert!(cert.contains(&format!("IP Address:{}", net.ip)), "{cert}");
    assert!(
        cert.contains("CN = inst-1234") || cert.contains("CN=inst-1234"),
        "{cert}"
    );
    // The second port reaches the second app port.
    let (out, _) = wait_served(
        &format!("{}:{}", net.ip, port_of(&st, 1, "internal_tls_proxy")),
        &tls,
    );
    assert!(out.contains(HELLO), "{out}");

    // Envoy: in the container's netns and memory cgroup, not root, no capabilities.
    let envoy = envoy_pid(&sb, "es-tls");
    let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_eq!(ns(envoy), ns(c.pid() as i32));
    let cg = std::fs::read_to_string(format!("/proc/{envoy}/cgroup")).unwrap();
    let mem = cg.lines().find(|l| l.contains(":memory:")).unwrap();
    assert!(
        mem.ends_with(&format!("/{}/es-tls/envoy-sidecar", NAMESPACE)),
        "{mem}"
    );
    let status = std::fs::read_to_string(format!("/proc/{envoy}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_ne!(field("Uid:"), "0", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");

    // Admin: answers on 127.0.0.1 inside the container, unreachable from outside.
    let admin = st["admin_port"].as_u64().unwrap();
    let out = c.exec(
        "admin",
        &format!("wget -qO- http://127.0.0.1:{admin}/ready"),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "LIVE",
        "{}",
        text(&out)
    );
    let reach = std::net::TcpStream::connect_timeout(
        &format!("{}:{admin}", net.ip).parse().unwrap(),
        Duration::from_secs(2),
    );
    assert!(
        reach.is_err(),
        "admin port reachable from outside the container"
    );

    // The app's own credentials match what Envoy serves.
    let out = c.exec("creds", "cat /etc/cf-instance-credentials/instance.crt");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
        "{}",
        text(&out)
    );

    // Removal leaves nothing: no processes, no state, no credentials.
    let sup = record(&sb, "es-tls")["supervisor"]["pid"].as_i64().unwrap() as i32;
    c.remove();
    assert!(
        !alive(envoy) && !alive(sup),
        "Envoy {envoy} or supervisor {sup} survived the container"
    );
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
}

#[test]
fn alpn_off_when_http2_disabled() {
    if !can_run("alpn_off_when_http2_disabled") {
        return;
    }
    let net = Netns::new(2);
    let sb = Sandbox::new("noalpn", "enable_http2 = false", "");
    let ca = sb.dir.join("ca/ca.crt");
    let _c = sb.start_cmd(
        "es-noalpn",
        &[(PORTS, "8080")],
        &[&net.ctr_opt()],
        &httpd_cmd(),
    );
    let st = sb.inspect("es-noalpn").unwrap();
    let tls = Tls {
        ca: &ca,
        server_name: "es-noalpn",
        alpn: Some("h2,http/1.1"),
        client: None,
    };
    let (out, _) = wait_served(
        &format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy")),
        &tls,
    );
    assert!(out.contains("No ALPN negotiated"), "{out}");
}

#[test]
fn envoy_restarts_and_credentials_rotate() {
    if !can_run("envoy_restarts_and_credentials_rotate") {
        return;
    }
    let net = Netns::new(3);
    let sb = Sandbox::new("rotate", "", "");
    // 20 s validity: rotation is due at 7/8 of it.
    let cfg = std::fs::read_to_string(&sb.config).unwrap();
    std::fs::write(
        &sb.config,
        cfg.replace(
            "[instance_identity]\n",
            "[instance_identity]\nvalidity = \"20s\"\n",
        ),
    )
    .unwrap();
    let ca = sb.dir.join("ca/ca.crt");
    let _c = sb.start_cmd(
        "es-rot",
        &[(PORTS, "8080")],
        &[&net.ctr_opt()],
        &httpd_cmd(),
    );
    let st = sb.inspect("es-rot").unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let tls = Tls {
        ca: &ca,
        server_name: "es-rot",
        alpn: None,
        client: None,
    };
    let (out, _) = wait_served(&addr, &tls);
    let serial = |o: &str| {
        first_cert_text(o)
            .lines()
            .find(|l| l.starts_with("serial="))
            .unwrap()
            .to_string()
    };
    let first = serial(&out);

    // SIGKILL Envoy: the supervisor brings it back.
    let envoy = envoy_pid(&sb, "es-rot");
    unsafe { libc::kill(envoy, libc::SIGKILL) };
    let killed = Instant::now();
    let (_, took) = wait_served(&addr, &tls);
    let again = envoy_pid(&sb, "es-rot");
    assert_ne!(again, envoy);
    eprintln!("serving again {:?} after SIGKILL", killed.elapsed());
    assert!(took < Duration::from_secs(10));
    assert_eq!(record(&sb, "es-rot")["envoy_restarts"], 1);

    // Rotation: a new serial is served by the same Envoy process.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let out = tls_get(&addr, &tls, "/");
        if out.contains(HELLO) && serial(&out) != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rotation within 40 s: still {first}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        envoy_pid(&sb, "es-rot"),
        again,
        "rotation must not restart Envoy"
    );
    assert!(alive(again));
}

/// A client certificate for `san`, signed by the CA in `ca_dir`, via openssl.
fn client_cert(dir: &Path, ca_dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let sh = format!(
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={name} \
           -keyout {key} -out {dir}/{name}.csr 2>/dev/null && \
         printf 'subjectAltName=DNS:{san}\\nextendedKeyUsage=clientAuth\\n' > {dir}/{name}.ext && \
         openssl x509 -req -in {dir}/{name}.csr -CA {ca}/ca.crt -CAkey {ca}/ca.key -CAcreateserial \
           -days 1 -extfile {dir}/{name}.ext -out {crt} 2>/dev/null",
        key = key.display(),
        crt = crt.display(),
        dir = dir.display(),
        ca = ca_dir.display()
    );
    let o = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    (crt, key)
}

#[test]
fn mutual_tls_refuses_unauthenticated_peers() {
    if !can_run("mutual_tls_refuses_unauthenticated_peers") {
        return;
    }
    let net = Netns::new(4);
    let dir = std::env::temp_dir().join(format!("es-mtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for ca in ["router-ca", "rogue-ca"] {
        let o = Command::new(cli_bin())
            .args(["generate-ca", "--out"])
            .arg(dir.join(ca))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let good = client_cert(
        &dir,
        &dir.join("router-ca"),
        "router",
        "gorouter.service.cf.internal",
    );
    let wrong_san = client_cert(&dir, &dir.join("router-ca"), "other", "other.example");
    let rogue = client_cert(
        &dir,
        &dir.join("rogue-ca"),
        "rogue",
        "gorouter.service.cf.internal",
    );
    let sb = Sandbox::new(
        "mtls",
        &format!(
            "require_and_verify_client_certificates = true\ntrusted_ca_certificates = [{:?}]\nverify_subject_alt_name = [\"gorouter.service.cf.internal\"]",
            dir.join("router-ca/ca.crt")
        ),
        "",
    );
    // The app counts every connection it accepts.
    let data = sb.dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_script(
        &data.join("count.sh"),
        &format!("#!/bin/sh\necho conn >> /data/conns\nprintf '{HELLO}\\n'\n"),
    );
    let mount = format!(
        "--mount=type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let _c = sb.start_cmd(
        "es-mtls",
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), &mount],
        &["/bin/nc", "-ll", "-p", "8080", "-e", "/data/count.sh"],
    );
    let st = sb.inspect("es-mtls").unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let ca = sb.dir.join("ca/ca.crt");
    let with = |client| Tls {
        ca: &ca,
        server_name: "es-mtls",
        alpn: None,
        client,
    };
    let (out, _) = wait_served(&addr, &with(Some((&good.0, &good.1))));
    assert!(out.contains(HELLO), "{out}");
    let conns = || {
        std::fs::read_to_string(data.join("conns"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let served = conns();
    assert!(served >= 1);
    for (what, client) in [
        ("no client certificate", None),
        ("untrusted CA", Some((&rogue.0, &rogue.1))),
        ("SAN not accepted", Some((&wrong_san.0, &wrong_san.1))),
    ] {
        let out = tls_get(
            &addr,
            &with(client.map(|(c, k): (&PathBuf, &PathBuf)| (c.as_path(), k.as_path()))),
            "/",
        );
        assert!(!out.contains(HELLO), "{what}: served anyway:\n{out}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        conns(),
        served,
        "an unauthenticated peer opened a connection to the app"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_drains_new_connections_but_finishes_open_ones() {
    if !can_run("sigterm_drains_new_connections_but_finishes_open_ones") {
        return;
    }
    let net = Netns::new(5);
    let sb = Sandbox::new("drain", "", "");
    let www = sb.dir.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    std::fs::write(www.join("index.html"), HELLO).unwrap();
    write_script(
        &www.join("cgi-bin/slow"),
        "#!/bin/sh\nsleep 3\nprintf 'Content-Type: text/plain\\r\\n\\r\\nslow-done\\n'\n",
    );
    let mount = format!(
        "--mount=type=bind,src={},dst=/w,options=rbind:ro",
        www.display()
    );
    // httpd as PID 1 ignores SIGTERM, so the app keeps running through the test.
    let c = sb.start_cmd(
        "es-drain",
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), &mount],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/w"],
    );
    let st = sb.inspect("es-drain").unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let ca = sb.dir.join("ca/ca.crt");
    let tls = Tls {
        ca: &ca,
        server_name: "es-drain",
        alpn: None,
        client: None,
    };
    wait_served(&addr, &tls);
    let slow = {
        let (addr, ca) = (addr.clone(), ca.clone());
        std::thread::spawn(move || {
            tls_get(
                &addr,
                &Tls {
                    ca: &ca,
                    server_name: "es-drain",
                    alpn: None,
                    client: None,
                },
                "/cgi-bin/slow",
            )
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let out = ctr(&["task", "kill", "-s", "SIGTERM", &c.id]);
    assert!(out.status.success(), "{}", text(&out));
    let refused =
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2));
    assert!(
        refused.is_err(),
        "new connections must be refused after SIGTERM"
    );
    let out = slow.join().unwrap();
    assert!(
        out.contains("slow-done"),
        "the open request must complete: {out}"
    );
}

#[test]
fn run_rm_leaves_no_sidecar_behind() {
    if !can_run("run_rm_leaves_no_sidecar_behind") {
        return;
    }
    let sb = Sandbox::new("runrm", "", "");
    // The app exits by itself after the proxy had time to come up.
    let out = sb.run_rm(
        "es-runrm",
        &[(PORTS, "8080")],
        &[],
        "sleep 2; test -s /etc/cf-instance-credentials/instance.key && echo creds-ok",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("creds-ok"),
        "{}",
        text(&out)
    );
    assert!(sb.leftovers().is_empty(), "{:?}", sb.leftovers());
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let cfg = sb.config.display().to_string();
    let ours: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&cfg) || l.contains(&sb.state_dir.display().to_string()))
        .map(str::to_string)
        .collect();
    assert!(ours.is_empty(), "processes left: {ours:?}");
}
