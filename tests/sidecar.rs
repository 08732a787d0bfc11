//! The Envoy sidecar against the real thing: containerd + runc + Envoy, the container
//! in its own network namespace (veth, 198.51.100.0/24), clients connecting from the
//! host over that network with openssl as an independent TLS oracle.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const GUID: &str = "envoy-sidecar/instance-guid";

/// openssl `s_client` as these tests use it: verifying against `ca`, SNI `name`,
/// printing the chain.
fn tls<'a>(ca: &'a Path, name: &'a str) -> Get<'a> {
    Get::new(ca).sni(name).showcerts()
}

/// Retry until the app's page comes back through the proxy (Envoy starts after
/// `ctr run -d` returns); returns the output and how long it took.
fn wait_served(addr: &str, t: &Get) -> (String, Duration) {
    let start = Instant::now();
    let out = t.wait_for(addr, HELLO);
    (out, start.elapsed())
}

fn first_cert_text(s_client_out: &str) -> String {
    common::first_cert_text(s_client_out).expect("a certificate")
}

fn envoy_pid(sb: &Sandbox, id: &str) -> i32 {
    pid_of(&sb.record(id), "envoy").expect("envoy pid recorded")
}

/// `GET /ready` over admin's unix socket: (status code, response).
fn admin_ready(sock: &Path) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (code, out)
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
    let sb = Sandbox::new("tls", "", "");
    let net = sb.slot.netns(0);
    let ca = sb.ca();
    let c = sb.start_cmd(
        "es-tls",
        &[(PORTS, "8080,9999"), (GUID, "inst-1234")],
        &[&net.ctr_opt()],
        &httpd_cmd(),
    );
    let st = sb.inspect("es-tls").unwrap();
    let tls = tls(&ca, "inst-1234").alpn(Some("h2,http/1.1"));
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
    assert_eq!(ns(envoy), ns(i32::try_from(c.pid()).unwrap()));
    // (cgroup v1 or v2: the memory hierarchy's path, or the unified one.)
    let mem = memory_cgroup_dir(u32::try_from(envoy).unwrap());
    assert_eq!(mem, memory_cgroup_dir(c.pid()).join("envoy-sidecar"));
    // containerd's /<namespace>/<id>, or the systemd driver's scope.
    let layout = if systemd_cgroup() {
        "system.slice/es-es-tls.scope/envoy-sidecar".to_string()
    } else {
        format!("{NAMESPACE}/es-tls/envoy-sidecar")
    };
    assert!(mem.ends_with(&layout), "{}", mem.display());
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

    // Admin (the default unix listener): answers root on the host's socket, nothing on
    // its port inside the container, unreachable from outside.
    let admin = st["admin_port"].as_u64().unwrap();
    let sock = st["admin_socket"].as_str().expect("admin_socket recorded");
    let (code, _) = admin_ready(Path::new(sock));
    assert_eq!(code, "200", "admin socket /ready");
    let out = c.exec(
        "admin",
        &format!("wget -qO- http://127.0.0.1:{admin}/ready"),
    );
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "admin port answered inside the container: {}",
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
    let sup = pid_of(&sb.record("es-tls"), "supervisor").unwrap();
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
    let sb = Sandbox::new("noalpn", "enable_http2 = false", "");
    let net = sb.slot.netns(0);
    let ca = sb.ca();
    let _c = sb.start_cmd(
        "es-noalpn",
        &[(PORTS, "8080")],
        &[&net.ctr_opt()],
        &httpd_cmd(),
    );
    let st = sb.inspect("es-noalpn").unwrap();
    let tls = tls(&ca, "es-noalpn").alpn(Some("h2,http/1.1"));
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
    let sb = Sandbox::new("rotate", "", "");
    let net = sb.slot.netns(0);
    // 20 s validity: rotation is due at 7/8 of it.
    sb.add_config_line("[instance_identity]", "validity = \"20s\"");
    let ca = sb.ca();
    let _c = sb.start_cmd(
        "es-rot",
        &[(PORTS, "8080")],
        &[&net.ctr_opt()],
        &httpd_cmd(),
    );
    let st = sb.inspect("es-rot").unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let tls = tls(&ca, "es-rot");
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(envoy),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let (_, took) = wait_served(&addr, &tls);
    let again = envoy_pid(&sb, "es-rot");
    assert_ne!(again, envoy);
    eprintln!("serving again {:?} after SIGKILL", killed.elapsed());
    assert!(took < Duration::from_secs(10));
    assert_eq!(sb.record("es-rot")["envoy_restarts"], 1);

    // Rotation: a new serial is served by the same Envoy process.
    wait_until_every(
        &format!("rotation (a serial other than {first})"),
        Duration::from_secs(40),
        Duration::from_millis(500),
        || {
            let out = tls.fetch(&addr);
            if out.contains(HELLO) && serial(&out) != first {
                Ok(())
            } else {
                Err(out)
            }
        },
    );
    assert_eq!(
        envoy_pid(&sb, "es-rot"),
        again,
        "rotation must not restart Envoy"
    );
    assert!(alive(again));
}

/// A client certificate for `san`, signed by the CA in `ca_dir`, via openssl.
fn client_cert(dir: &Path, ca_dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    sign_leaf(
        dir,
        &Ca::at(ca_dir, "ca"),
        name,
        None,
        &format!("subjectAltName=DNS:{san}\nextendedKeyUsage=clientAuth\n"),
    )
}

#[test]
fn mutual_tls_refuses_unauthenticated_peers() {
    if !can_run("mutual_tls_refuses_unauthenticated_peers") {
        return;
    }
    let tmp = TempDir::new("es-mtls");
    let dir = tmp.path();
    for ca in ["router-ca", "rogue-ca"] {
        generate_ca(&dir.join(ca));
    }
    let good = client_cert(
        dir,
        &dir.join("router-ca"),
        "router",
        "gorouter.service.cf.internal",
    );
    let wrong_san = client_cert(dir, &dir.join("router-ca"), "other", "other.example");
    let rogue = client_cert(
        dir,
        &dir.join("rogue-ca"),
        "rogue",
        "gorouter.service.cf.internal",
    );
    let sb = Sandbox::new(
        "mtls",
        &mtls_proxy_config(&dir.join("router-ca/ca.crt")),
        "",
    );
    let net = sb.slot.netns(0);
    // The app counts every connection it accepts.
    let app = CountingApp::new(&sb.dir, false);
    let _c = sb.start_cmd(
        "es-mtls",
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), &app.mount()],
        &app.cmd(),
    );
    let st = sb.inspect("es-mtls").unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let ca = sb.ca();
    let with = |client| tls(&ca, "es-mtls").client(client);
    let (out, _) = wait_served(&addr, &with(Some((&good.0, &good.1))));
    assert!(out.contains(HELLO), "{out}");
    let conns = || app.conns();
    let served = conns();
    assert!(served >= 1);
    for (what, client) in [
        ("no client certificate", None),
        ("untrusted CA", Some((&rogue.0, &rogue.1))),
        ("SAN not accepted", Some((&wrong_san.0, &wrong_san.1))),
    ] {
        let out = with(client.map(|(c, k): (&PathBuf, &PathBuf)| (c.as_path(), k.as_path())))
            .fetch(&addr);
        assert!(!out.contains(HELLO), "{what}: served anyway:\n{out}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        conns(),
        served,
        "an unauthenticated peer opened a connection to the app"
    );
}

#[test]
fn sigterm_drains_new_connections_but_finishes_open_ones() {
    if !can_run("sigterm_drains_new_connections_but_finishes_open_ones") {
        return;
    }
    let sb = Sandbox::new("drain", "", "");
    let net = sb.slot.netns(0);
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
    let ca = sb.ca();
    wait_served(&addr, &tls(&ca, "es-drain"));
    let slow = {
        let (addr, ca) = (addr.clone(), ca.clone());
        std::thread::spawn(move || tls(&ca, "es-drain").path("/cgi-bin/slow").fetch(&addr))
    };
    // The open request is at the app: its CGI runs (a process of the container's
    // network namespace running `slow`).
    let app_net = std::fs::read_link(format!("/proc/{}/ns/net", c.pid())).unwrap();
    wait_until(
        "the slow request at the app",
        Duration::from_secs(10),
        || {
            footprint::processes_mentioning("slow")
                .iter()
                .any(|(p, _)| {
                    std::fs::read_link(format!("/proc/{p}/ns/net")).ok() == Some(app_net.clone())
                })
        },
    );
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

/// What the clients of a stop saw ([`stop_under_load`]).
#[derive(Debug)]
struct StopSeen {
    /// Slow requests in flight at the kill that completed, of `slow_total`.
    slow_done: usize,
    slow_total: usize,
    /// The steady stream: served, cleanly refused (connection refused), anything else.
    served: usize,
    refused: usize,
    errors: Vec<String>,
    /// How long `ctr task kill` took (the wrapper's drain wait is in it).
    kill_took: Duration,
}

/// A naive app — `sh` as PID 1 that exits at once on SIGTERM, taking its httpd and
/// every running CGI with it — with `slow_total` requests of a CGI answering after 3 s
/// in flight through the TLS port and a steady stream of `GET /` (one after another),
/// stopped with `ctr task kill -s SIGTERM`.
fn stop_under_load(name: &str, drain_timeout: &str, slow_total: usize) -> StopSeen {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let sb = Sandbox::new(name, &format!("drain_timeout = {drain_timeout:?}"), "");
    let id = format!("es-{name}");
    let net = sb.slot.netns(0);
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
    let c = sb.start_cmd(
        &id,
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), &mount],
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; httpd -f -p 8080 -h /w & wait",
        ],
    );
    let st = sb.inspect(&id).unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let ca = sb.ca();
    wait_served(&addr, &tls(&ca, &id));
    let app_net = std::fs::read_link(format!("/proc/{}/ns/net", c.pid())).unwrap();
    let slow: Vec<_> = (0..slow_total)
        .map(|_| {
            let (addr, ca, id) = (addr.clone(), ca.clone(), id.clone());
            std::thread::spawn(move || tls(&ca, &id).path("/cgi-bin/slow").fetch(&addr))
        })
        .collect();
    wait_until(
        "the slow requests at the app",
        Duration::from_secs(10),
        || {
            footprint::processes_mentioning("slow")
                .iter()
                .filter(|(p, _)| {
                    std::fs::read_link(format!("/proc/{p}/ns/net")).ok() == Some(app_net.clone())
                })
                .count()
                >= slow_total
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (addr, ca, id, stop) = (addr.clone(), ca.clone(), id.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut served, mut refused, mut errors) = (0, 0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let out = tls(&ca, &id).fetch(&addr);
                if out.contains(HELLO) {
                    served += 1;
                } else if out.contains("Connection refused") || out.contains("errno=111") {
                    refused += 1;
                } else {
                    errors.push(out.chars().take(600).collect::<String>());
                }
            }
            (served, refused, errors)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let out = ctr(&["task", "kill", "-s", "SIGTERM", &c.id]);
    let kill_took = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    let slow: Vec<String> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    wait_until("the app exited", Duration::from_secs(10), || {
        std::fs::metadata(format!("/proc/{}", c.pid())).is_err()
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (served, refused, errors) = stream.join().unwrap();
    StopSeen {
        slow_done: slow.iter().filter(|o| o.contains("slow-done")).count(),
        slow_total,
        served,
        refused,
        errors,
        kill_took,
    }
}

/// Stop that loses nothing: the wrapper drains the listeners and waits (up to
/// `drain_timeout`) for the open connections before runc signals the app. The control
/// (`drain_timeout = "0"`, the old behaviour) shows the same load does cut requests.
#[test]
fn naive_app_stop_under_load_loses_nothing_when_drain_timeout_covers_it() {
    if !can_run("naive_app_stop_under_load_loses_nothing_when_drain_timeout_covers_it") {
        return;
    }
    let seen = stop_under_load("drainwait", "10s", 4);
    eprintln!("MEASURED drain_timeout=10s: {seen:?}");
    assert_eq!(seen.slow_done, seen.slow_total, "{seen:?}");
    assert!(seen.errors.is_empty(), "client-visible errors: {seen:?}");
    assert!(
        seen.served > 0 && seen.refused > 0,
        "the stream saw the stop: {seen:?}"
    );
    assert!(
        seen.kill_took < Duration::from_secs(10),
        "the wait ends when the connections do, not at the timeout: {seen:?}"
    );

    let seen = stop_under_load("drainoff", "0", 4);
    eprintln!("MEASURED drain_timeout=0: {seen:?}");
    assert!(
        seen.slow_done < seen.slow_total,
        "without the wait the app's exit cuts open requests: {seen:?}"
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

#[test]
fn json_logs_carry_the_container_level_and_fields() {
    if !can_run("json_logs_carry_the_container_level_and_fields") {
        return;
    }
    let sb = Sandbox::new(
        "jsonlog",
        "",
        "[log]\nformat = \"json\"\nlevel = \"debug\"\n",
    );
    let net = sb.slot.netns(0);
    let id = "es-jsonlog";
    let (_c, _st, _addr) = sb.start_served(id, &net);
    let envoy = envoy_pid(&sb, id);
    // `ready` is logged right after the first handshake the supervisor makes itself.
    let log = wait_until("status ready logged", Duration::from_secs(20), || {
        let l = sb.supervisor_log(id);
        if l.contains("\"status\":\"ready\"") {
            Ok(l)
        } else {
            Err(l)
        }
    });
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 4, "{log}");
    for v in &lines {
        assert_eq!(v["namespace"], NAMESPACE, "{v}");
        assert_eq!(v["id"], id, "{v}");
        assert_eq!(v["component"], "supervisor", "{v}");
        assert!(
            ["error", "warn", "info", "debug", "trace"]
                .contains(&v["level"].as_str().unwrap_or("")),
            "{v}"
        );
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let started = lines
        .iter()
        .find(|v| v["msg"].as_str().unwrap().starts_with("started Envoy pid"))
        .expect(&log);
    assert_eq!(started["envoy_pid"], envoy, "{started}");
    assert_eq!(started["level"], "info", "{started}");
    // The operator's view of the same lines.
    let o = cli(&sb.config)
        .args(["logs", id, "--namespace", NAMESPACE])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains(&format!("\"envoy_pid\":{envoy}")), "{shown}");
}

/// The systemd journal's native socket (`/run/systemd/journal/socket`).
const JOURNAL: &str = "/run/systemd/journal/socket";

/// The entries a journal received: each a map of its fields (the native protocol:
/// `KEY=value` lines, or `KEY\n<u64 LE length><bytes>\n` for values with newlines).
fn journal_entries(datagrams: &[Vec<u8>]) -> Vec<std::collections::BTreeMap<String, String>> {
    datagrams
        .iter()
        .map(|d| {
            let mut m = std::collections::BTreeMap::new();
            let mut rest = &d[..];
            while !rest.is_empty() {
                let nl = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                let line = &rest[..nl];
                if let Some(eq) = line.iter().position(|b| *b == b'=') {
                    m.insert(
                        String::from_utf8_lossy(&line[..eq]).into_owned(),
                        String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
                    );
                    rest = &rest[(nl + 1).min(rest.len())..];
                } else {
                    let key = String::from_utf8_lossy(line).into_owned();
                    let body = &rest[nl + 1..];
                    let len =
                        usize::try_from(u64::from_le_bytes(body[..8].try_into().unwrap())).unwrap();
                    m.insert(key, String::from_utf8_lossy(&body[8..8 + len]).into_owned());
                    rest = &body[(8 + len + 1).min(body.len())..];
                }
            }
            m
        })
        .collect()
}

/// Entries of the host's own journald for `CONTAINER_ID=id` (`journalctl -o json`).
fn journalctl_entries(id: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let o = Command::new("journalctl")
        .args(["-o", "json", "--no-pager", &format!("CONTAINER_ID={id}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .collect()
}

/// Stands in for journald where the host has none (this lab's machines): a datagram
/// socket at the journal's path, removed (with the directory it made) on drop.
struct FakeJournal {
    sock: std::os::unix::net::UnixDatagram,
    made: Vec<PathBuf>,
}

impl FakeJournal {
    fn bind() -> FakeJournal {
        // The directories this makes, deepest first (removed on drop).
        let made: Vec<PathBuf> = Path::new(JOURNAL)
            .ancestors()
            .skip(1)
            .take_while(|d| !d.exists())
            .map(Path::to_path_buf)
            .collect();
        if let Some(d) = made.first() {
            std::fs::create_dir_all(d).unwrap();
        }
        let sock = std::os::unix::net::UnixDatagram::bind(JOURNAL).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        FakeJournal { sock, made }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }
}

impl Drop for FakeJournal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(JOURNAL);
        for d in &self.made {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Whether a journal entry is container `id`'s "started Envoy pid `envoy`" line.
fn started_this(m: &std::collections::BTreeMap<String, String>, id: &str, envoy: i32) -> bool {
    m.get("CONTAINER_ID").map(String::as_str) == Some(id)
        && m.get("MESSAGE")
            .is_some_and(|s| s.starts_with("started Envoy pid"))
        && m.get("ENVOY_PID") == Some(&envoy.to_string())
}

#[test]
fn journal_gets_the_supervisors_lines_with_the_container_id() {
    if !can_run("journal_gets_the_supervisors_lines_with_the_container_id") {
        return;
    }
    // The real journald where there is one (the cgroup v2 guest); else our receiver.
    let real = Path::new(JOURNAL).exists();
    let fake = (!real).then(FakeJournal::bind);
    let sb = Sandbox::new("journal", "", "[log]\njournal = true\n");
    let net = sb.slot.netns(0);
    let id = "es-journal";
    let (c, _st, _addr) = sb.start_served(id, &net);
    let envoy = envoy_pid(&sb, id);
    let mut got = Vec::new();
    let entries = wait_until(
        "the journal has `started Envoy`",
        Duration::from_secs(20),
        || {
            let e = match &fake {
                Some(f) => {
                    got.extend(f.received());
                    journal_entries(&got)
                }
                None => journalctl_entries(id),
            };
            if e.iter().any(|m| started_this(m, id, envoy)) {
                Ok(e)
            } else {
                Err(format!("{e:?}"))
            }
        },
    );
    // (A real journal may hold an earlier run's entries too: this Envoy's line.)
    let started = entries
        .iter()
        .find(|m| started_this(m, id, envoy))
        .unwrap_or_else(|| panic!("{entries:?}"));
    assert_eq!(started["CONTAINER_NAMESPACE"], NAMESPACE, "{started:?}");
    assert_eq!(started["COMPONENT"], "supervisor", "{started:?}");
    assert_eq!(started["SYSLOG_IDENTIFIER"], "envoy-sidecar", "{started:?}");
    assert_eq!(started["ENVOY_PID"], envoy.to_string(), "{started:?}");
    // journald's PRIORITY for info (tracing-journald maps INFO to 5, notice).
    assert_eq!(started["PRIORITY"], "5", "{started:?}");
    // The file keeps its lines too.
    assert!(sb.supervisor_log(id).contains("started Envoy pid"));
    c.remove();
}
