//! Security checks (issue 7, item 4), each asserting what an attacker on the host, in
//! another container or in the app itself — or an operator — would observe: who can read
//! the instance identity, whether keys leak into logs, Envoy's privileges, the admin
//! port, unproxied ports, expired client certificates, and the root-only state and NAT.
//!
//! Mutual TLS with no, an untrusted or a wrong-SAN client certificate is covered by
//! `tests/sidecar.rs` `mutual_tls_refuses_unauthenticated_peers`; here only the expired
//! (and not yet valid) certificate from the trusted CA.
//!
//! Resources: networks and host port pools from each sandbox's slot
//! (tests/common/slots.rs).
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const NOBODY: u32 = 65534;

/// Run `argv` on the host as `uid:gid` with no supplementary groups and (root -> other
/// uid) no capabilities.
fn as_user(uid: u32, gid: u32, argv: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Failed with EACCES ("Permission denied"), and printed nothing on stdout.
fn assert_denied(what: &str, o: &Output) {
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("Permission denied")
            && o.stdout.is_empty(),
        "{what}: must fail with Permission denied: {}",
        text(o)
    );
}

/// A 40-character slice from the middle of a PEM's base64 body.
fn key_slice(pem: &str) -> String {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(body.len() > 60, "PEM body too short: {pem}");
    let mid = body.len() / 2;
    body[mid - 20..mid + 20].to_string()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every regular file under `dir`, not descending into directories `skip` accepts.
fn files_under(dir: &Path, skip: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            if !skip(&p) {
                files_under(&p, skip, out);
            }
        } else if ft.is_file() {
            out.push(p);
        }
    }
}

/// Wait until the proxy at `addr` serves the app (Envoy up, certificate issued).
fn wait_served(addr: &str, ca: &Path, name: &str) {
    openssl_wait_for(addr, ca, name, HELLO);
}

// ---------------------------------------------------------------------------------
// 1. Credentials files are readable only by the container's user.

/// A container run Garden-style (runc bundle through the wrapper) as `uid:gid`.
/// Fields drop in order: container, sandbox, network namespace.
struct Direct {
    c: DirectRun,
    sb: Sandbox,
    net: Netns,
}

fn direct_start(name: &str, id: &str, uid: u32, gid: u32) -> Direct {
    let sb = Sandbox::new(name, "", "");
    let net = sb.slot.netns(0);
    let c = DirectRun::new(name, id, &sb.config);
    c.runc_spec_bundle(&net.path, |spec| {
        spec["process"]["args"] = json!(httpd());
        spec["process"]["user"] = json!({"uid": uid, "gid": gid});
        spec["annotations"] = json!({ PORTS: "8080" });
    });
    let (status, said) = c.run_detached();
    assert!(status.success(), "run --detach: {status}\n{said}");
    Direct { c, sb, net }
}

/// `exec` through the wrapper as `uid:gid` (a process spec as Garden hands over).
fn exec_as(c: &DirectRun, uid: u32, gid: u32, cmd: &str) -> Output {
    let process = c.dir.join(format!("process-{uid}.json"));
    std::fs::write(
        &process,
        json!({
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": ["/bin/sh", "-c", cmd],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/"
        })
        .to_string(),
    )
    .unwrap();
    c.wrapper(&["exec", "--process", &process.display().to_string(), &c.id])
}

#[test]
fn credentials_are_readable_only_by_the_container_user() {
    if !can_run_without_containerd("credentials_are_readable_only_by_the_container_user") {
        return;
    }
    let id = "es-sec-creds";
    let g = direct_start("sec-creds", id, 2000, 2000);
    let creds = g.sb.state_dir.join("default").join(id).join("credentials");
    let key = creds.join("instance.key");
    let addr = format!(
        "{}:{}",
        g.net.ip,
        port_of(&g.c.inspect().unwrap(), 0, "internal_tls_proxy")
    );
    wait_served(&addr, &g.sb.ca(), id);
    let status = std::fs::read_to_string(format!("/proc/{}/status", g.c.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["Uid:", "2000", "2000", "2000", "2000"]),
        "the app runs as uid 2000: {status}"
    );

    // On the host: the files, through `..data`, belong to the container's user.
    assert_eq!(
        std::fs::read_link(&key).unwrap(),
        Path::new("..data/instance.key")
    );
    let data = std::fs::canonicalize(creds.join("..data")).unwrap();
    let mode = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
    };
    assert_eq!(
        mode(&creds.join("..data/instance.key")),
        (2000, 2000, 0o400)
    );
    assert_eq!(
        mode(&creds.join("..data/instance.crt")),
        (2000, 2000, 0o444)
    );
    assert_eq!(mode(&data), (2000, 2000, 0o550), "{}", data.display());
    assert_eq!(mode(&creds), (2000, 2000, 0o500));

    // Any other uid on the host is refused, by every path to the key and the listing.
    let (k, kd, kg) = (
        key.display().to_string(),
        creds.join("..data/instance.key").display().to_string(),
        data.join("instance.key").display().to_string(),
    );
    let c_dir = creds.display().to_string();
    for (uid, gid) in [(NOBODY, NOBODY), (1000, 1000)] {
        for argv in [
            vec!["cat", k.as_str()],
            vec!["cat", kd.as_str()],
            vec!["cat", kg.as_str()],
            vec!["ls", c_dir.as_str()],
        ] {
            assert_denied(
                &format!("host uid {uid}: {argv:?}"),
                &as_user(uid, gid, &argv),
            );
        }
    }
    // ... while the container's uid can (so the refusal above is about the uid).
    let host_pem = std::fs::read_to_string(&key).unwrap();
    let o = as_user(2000, 2000, &["cat", &k]);
    assert!(
        o.status.success(),
        "host uid 2000 reads its key: {}",
        text(&o)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), host_pem);

    // Inside the container: the app's uid reads it, another uid does not.
    let o = exec_as(
        &g.c,
        2000,
        2000,
        "cat /etc/cf-instance-credentials/instance.key",
    );
    assert!(
        o.status.success(),
        "uid 2000 in the container: {}",
        text(&o)
    );
    let inside = String::from_utf8_lossy(&o.stdout);
    assert!(inside.contains("PRIVATE KEY"), "{}", text(&o));
    assert_eq!(inside, host_pem, "the container sees the current key");
    for (uid, gid) in [(1000, 1000), (NOBODY, NOBODY)] {
        let o = exec_as(
            &g.c,
            uid,
            gid,
            "cat /etc/cf-instance-credentials/instance.key; \
             cat /etc/cf-instance-credentials/..data/instance.key",
        );
        assert_denied(&format!("uid {uid} in the container"), &o);
    }
}

// ---------------------------------------------------------------------------------
// 2. The private key never appears in logs.

#[test]
fn private_key_never_appears_in_logs_or_state() {
    if !can_run("private_key_never_appears_in_logs_or_state") {
        return;
    }
    let containerd_log = Path::new("/run/envoy-sidecar-test/containerd.log");
    // Only what containerd logs from now on is ours to judge.
    let log_from = std::fs::metadata(containerd_log)
        .map(|m| m.len())
        .unwrap_or(0);
    let sb = Sandbox::new("sec-logs", "", "");
    let net = sb.slot.netns(0);
    sb.add_config_line("[instance_identity]", "validity = \"20s\"");
    let id = "es-sec-logs";
    let (c, _, addr) = sb.start_served(id, &net);
    let ca = sb.ca();
    let dir = sb.state_dir.join(NAMESPACE).join(id);
    let key = dir.join("credentials/instance.key");
    let serial = || {
        sb.try_record(NAMESPACE, id)
            .and_then(|r| r["cert_serial"].as_str().map(str::to_string))
    };
    let first = serial().expect("certificate serial recorded");
    let mut keys = vec![std::fs::read_to_string(&key).unwrap()];

    // Rotation (7/8 of 20 s), then traffic, an exec and the SIGTERM drain path.
    wait_until("rotation", Duration::from_secs(45), || {
        serial().is_some_and(|s| s != first)
    });
    wait_until("rotated key written", Duration::from_secs(10), || {
        std::fs::read_to_string(&key).is_ok_and(|k| k != keys[0])
    });
    keys.push(std::fs::read_to_string(&key).unwrap());
    wait_served(&addr, &ca, id);
    let o = c.exec("env", "env | grep CF_INSTANCE_KEY");
    assert!(o.status.success(), "{}", text(&o));
    // httpd as PID 1 ignores SIGTERM: the container keeps running, Envoy drains.
    let o = ctr(&["task", "kill", "-s", "SIGTERM", id]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until(
        "Envoy drained (new connections refused)",
        Duration::from_secs(10),
        || TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_err(),
    );

    let ca_key = std::fs::read_to_string(sb.dir.join("ca/ca.key")).unwrap();
    let needles: Vec<String> = keys
        .iter()
        .chain([&ca_key])
        .map(|k| key_slice(k))
        .chain(["PRIVATE KEY".to_string()])
        .collect();
    // Positive control: the slices are found where the keys are meant to be.
    let sds: Vec<PathBuf> = std::fs::read_dir(dir.join("envoy/sds"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    assert!(
        sds.iter()
            .any(|p| contains(&std::fs::read(p).unwrap(), &needles[1])),
        "the current key is in Envoy's SDS file ({sds:?})"
    );
    assert!(contains(&std::fs::read(&key).unwrap(), &needles[1]));

    let mut files = Vec::new();
    files_under(
        &sb.state_dir,
        &|p| {
            p.file_name()
                .is_some_and(|n| n == "credentials" || n == "sds")
        },
        &mut files,
    );
    for want in [
        "supervisor.log",
        "envoy.log",
        "state.json",
        "supervisor.json",
        "nat.json",
        "bootstrap.json",
    ] {
        assert!(
            files.iter().any(|f| f.file_name().unwrap() == want),
            "{want} not found among {files:?}"
        );
    }
    let bundle = Path::new("/run/envoy-sidecar-test/containerd/io.containerd.runtime.v2.task")
        .join(NAMESPACE)
        .join(id);
    let runc_log = bundle.join("log.json");
    assert!(runc_log.is_file(), "{}", runc_log.display());
    files.push(runc_log);
    let check = |name: &str, bytes: &[u8]| {
        for n in &needles {
            assert!(!contains(bytes, n), "{name} contains {n:?}");
        }
    };
    for f in &files {
        check(&f.display().to_string(), &std::fs::read(f).unwrap());
    }
    eprintln!("no key material in {} files: {files:?}", files.len());
    // The logs searched did see both issues (they are not empty by accident).
    let sup_log = std::fs::read_to_string(dir.join("supervisor.log")).unwrap();
    for l in sup_log.lines().filter(|l| l.contains("Envoy sandbox")) {
        eprintln!("{l}");
    }
    assert!(
        sup_log.matches("issued certificate").count() >= 2,
        "{sup_log}"
    );

    c.remove();
    let mut log = std::fs::read(containerd_log).unwrap();
    let from = usize::try_from(log_from).unwrap().min(log.len());
    log.drain(..from);
    assert!(!log.is_empty(), "containerd logged nothing during the test");
    check("containerd.log", &log);
}

// ---------------------------------------------------------------------------------
// 3. Envoy runs without root and without capabilities.

#[test]
fn envoy_runs_without_root_or_capabilities() {
    if !can_run("envoy_runs_without_root_or_capabilities") {
        return;
    }
    let sb = Sandbox::new("sec-envoy", "", "");
    let net = sb.slot.netns(0);
    let id = "es-sec-envoy";
    let (_c, st, _) = sb.start_served(id, &net);
    let envoy = sb.try_record(NAMESPACE, id).unwrap()["envoy"]["pid"]
        .as_i64()
        .expect("envoy pid");
    let status = std::fs::read_to_string(format!("/proc/{envoy}/status")).unwrap();
    let field = |k: &str| -> Vec<String> {
        status
            .lines()
            .find(|l| l.starts_with(&format!("{k}:")))
            .unwrap_or_else(|| panic!("{k} not in {status}"))
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    // The container's own Envoy uid (= gid), from proxy.envoy_uid_pool_*: not root.
    let own = st["envoy_uid"].as_u64().expect("envoy_uid in state");
    assert!(own >= 1000, "{own}");
    let own = own.to_string();
    assert_eq!(
        field("Uid"),
        [own.as_str(); 4],
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        field("Gid"),
        [own.as_str(); 4],
        "real, effective, saved, fs gid"
    );
    assert!(
        field("Groups").is_empty(),
        "no supplementary groups: {status}"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(cap), ["0000000000000000"], "{cap}: {status}");
    }
    assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
    eprintln!(
        "Envoy {envoy}: CapBnd {:?} (bounding set; nothing is permitted)",
        field("CapBnd")
    );
}

/// Issue 13: Envoy reads only what `sidecar::sandbox::allow_list` grants. `envoy_path`
/// is a script that, as the Envoy uid inside its Landlock domain, tries a world-readable
/// host file, another container's `supervisor.log` (made world-readable here) and a
/// world-writable directory, prints the outcomes to envoy.log, then execs the real
/// Envoy (through `proxy.sandbox_allow_read`), which must still serve.
#[test]
fn envoy_sandbox_denies_host_files_and_still_serves() {
    if !can_run("envoy_sandbox_denies_host_files_and_still_serves") {
        return;
    }
    let sb = Sandbox::new("sec-sandbox", "", "");
    let probe = sb.dir.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o777)).unwrap();
    let secret = probe.join("host-secret");
    std::fs::write(&secret, "host secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other_log = sb
        .state_dir
        .join(NAMESPACE)
        .join("es-sec-sbx-a/supervisor.log");
    let script = sb.dir.join("envoy-probe.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             for f in {secret} {other_log}; do\n\
             if read -r line < \"$f\"; then echo \"sandbox-probe: READ $f\"; \
             else echo \"sandbox-probe: DENIED $f\"; fi\n\
             done\n\
             if echo x 2>/dev/null > {probe}/written; then echo \"sandbox-probe: WROTE\"; \
             else echo \"sandbox-probe: DENIED write\"; fi\n\
             exec /usr/local/bin/envoy \"$@\"\n",
            secret = secret.display(),
            other_log = other_log.display(),
            probe = probe.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Container a: the real Envoy; its supervisor.log made world-readable (what a
    // hostile review found on hosts with a loose umask).
    let net_a = sb.slot.netns(0);
    let (_a, _, _) = sb.start_served("es-sec-sbx-a", &net_a);
    std::fs::set_permissions(&other_log, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Container b: the probe script as envoy_path.
    let cfg = std::fs::read_to_string(&sb.config).unwrap().replace(
        "envoy_path = \"/usr/local/bin/envoy\"",
        &format!(
            "envoy_path = {:?}\nsandbox_allow_read = [\"/usr/local/bin/envoy\"]",
            script
        ),
    );
    std::fs::write(&sb.config, cfg).unwrap();
    let net_b = sb.slot.netns(1);
    let id = "es-sec-sbx-b";
    let (_b, st, _) = sb.start_served(id, &net_b);

    let dir = sb.state_dir.join(NAMESPACE).join(id);
    let envoy_log = std::fs::read_to_string(dir.join("envoy.log")).unwrap();
    let lines: Vec<&str> = envoy_log
        .lines()
        .filter(|l| l.starts_with("sandbox-probe:"))
        .collect();
    assert_eq!(
        lines,
        [
            format!("sandbox-probe: DENIED {}", secret.display()),
            format!("sandbox-probe: DENIED {}", other_log.display()),
            "sandbox-probe: DENIED write".to_string(),
        ],
        "envoy.log:\n{envoy_log}"
    );
    assert!(!probe.join("written").exists());
    let sup_log = std::fs::read_to_string(dir.join("supervisor.log")).unwrap();
    for l in sup_log.lines().filter(|l| l.contains("Envoy sandbox")) {
        eprintln!("{l}");
    }
    assert!(
        sup_log.contains("Envoy sandbox: Landlock ABI") && sup_log.contains("enforced"),
        "supervisor.log:\n{sup_log}"
    );
    // And the operator sees it without reading logs.
    let row = status_row(&sb.config, NAMESPACE, id).unwrap();
    let level = row["sandbox"].as_str().unwrap_or_default();
    assert!(
        level.starts_with("Landlock ABI") && level.contains("enforced"),
        "{row}"
    );

    // Control: the same uid without the sandbox reads both (the test would pass
    // without Landlock only if the files were not readable anyway).
    let uid = u32::try_from(st["envoy_uid"].as_u64().unwrap()).unwrap();
    for f in [&secret, &other_log] {
        let o = as_user(uid, uid, &["cat", f.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "uid {uid} reads {} unsandboxed: {}",
            f.display(),
            text(&o)
        );
    }
}

// ---------------------------------------------------------------------------------
// 4. The admin port is unreachable from outside the container and refuses dangerous
// paths from inside.

/// Admin paths the allow-list refuses (403): `(is a POST, target)`.
const DANGEROUS_ADMIN: &[(bool, &str)] = &[
    (true, "/quitquitquit"),
    (false, "/config_dump"),
    (false, "/config_dump?include_eds"),
    (true, "/healthcheck/fail"),
    (true, "/logging?level=trace"),
    (true, "/runtime_modify?a=b"),
    (false, "/clusters"),
    (false, "/listeners"),
    (true, "/reset_counters"),
    (false, "/stats/recentlookups/enable"),
    (true, "/cpuprofiler?enable=y"),
    (true, "/heapprofiler?enable=y"),
];

/// One HTTP/1.1 request over a unix socket: `(status, body)`.
fn admin_unix(sock: &Path, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, out))
}

/// The default admin listener: a unix socket under the host-side state directory.
/// Nothing in the container reaches admin — no TCP port in its netns, no socket path in
/// its mount namespace — while root on the host does (drain, and the allow-list still
/// refuses what the product does not use); another host uid is denied.
#[test]
fn default_admin_socket_is_out_of_the_apps_reach() {
    if !can_run("default_admin_socket_is_out_of_the_apps_reach") {
        return;
    }
    let sb = Sandbox::new("sec-adsock", "", "");
    let net = sb.slot.netns(0);
    let a = sb.start_cmd(
        "es-sec-adsock",
        &[(PORTS, "8080")],
        &[&net.ctr_opt()],
        &httpd(),
    );
    let st = sb.inspect("es-sec-adsock").unwrap();
    // Still allocated and reported, as with the loopback listener.
    let admin = u16::try_from(st["admin_port"].as_u64().unwrap()).unwrap();
    let proxy = port_of(&st, 0, "internal_tls_proxy");
    let uid = u32::try_from(st["envoy_uid"].as_u64().unwrap()).unwrap();
    let sock = PathBuf::from(st["admin_socket"].as_str().expect("admin_socket recorded"));
    assert_eq!(
        sock,
        sb.state_dir.join(format!(".admin/{uid}/admin.sock")),
        "{st}"
    );
    let ca = sb.ca();
    wait_served(&format!("{}:{proxy}", net.ip), &ca, "es-sec-adsock");

    // On the host: Envoy's socket in Envoy's own 0700 directory; root reaches it ...
    let dir = std::fs::metadata(sock.parent().unwrap()).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (uid, 0o700));
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o777),
        (uid, 0o600),
        "socket owner/mode"
    );
    let (code, body) = admin_unix(&sock, "GET", "/ready").unwrap();
    assert!(code == 200 && body.contains("LIVE"), "{body}");
    // ... with the same allow-list as on loopback ...
    for (post, path) in DANGEROUS_ADMIN {
        let (code, _) = admin_unix(&sock, if *post { "POST" } else { "GET" }, path).unwrap();
        assert_eq!(code, 403, "{path}");
    }
    // ... and another host uid does not.
    let py = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?})",
        sock.display().to_string()
    );
    assert_denied(
        "nobody connecting",
        &as_user(NOBODY, NOBODY, &["python3", "-c", &py]),
    );

    // In the container: nothing listens on the admin port (or anything but the app and
    // the TLS proxy) ...
    let (_, out) = exec_captured(
        &a,
        "adm",
        &format!("timeout 5 wget -q -O- http://127.0.0.1:{admin}/ready"),
    );
    assert!(
        out.contains("Connection refused"),
        "admin port inside: {out}"
    );
    let (_, tcp) = exec_captured(&a, "tcp", "cat /proc/net/tcp /proc/net/tcp6");
    let listening: std::collections::BTreeSet<u16> = tcp
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A"))
                .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect();
    eprintln!(
        "listening TCP ports in the container: {listening:?}; admin socket {}",
        sock.display()
    );
    assert_eq!(
        listening,
        [8080, proxy].into_iter().collect(),
        "listening TCP ports in the container: {tcp}"
    );
    // ... and the socket's path does not exist in its mount namespace (the name shows
    // in the netns-wide /proc/net/unix, but a path socket is reached through the file
    // system only).
    let (rc, out) = exec_captured(
        &a,
        "path",
        &format!(
            "ls -la {} {} 2>&1; test -e {}",
            sock.display(),
            sb.state_dir.display(),
            sock.display()
        ),
    );
    assert!(
        rc != Some(0),
        "the socket path exists in the container: {out}"
    );

    // Drain goes through the socket: new connections refused after SIGTERM.
    let out = ctr(&["task", "kill", "-s", "SIGTERM", &a.id]);
    assert!(out.status.success(), "{}", text(&out));
    let refused = TcpStream::connect_timeout(
        &format!("{}:{proxy}", net.ip).parse().unwrap(),
        Duration::from_secs(2),
    );
    assert!(refused.is_err(), "drained through the admin socket");
}

#[test]
fn admin_loopback_port_is_unreachable_from_outside_and_restricted_inside() {
    if !can_run("admin_loopback_port_is_unreachable_from_outside_and_restricted_inside") {
        return;
    }
    let sb = Sandbox::new("sec-admin", "admin_listener = \"loopback\"", "");
    let net_a = sb.slot.netns(0);
    let net_b = sb.slot.netns(1);
    let a = sb.start_cmd(
        "es-sec-adm-a",
        &[(PORTS, "8080")],
        &[&net_a.ctr_opt()],
        &httpd(),
    );
    let b = sb.start_cmd(
        "es-sec-adm-b",
        &[(PORTS, "8080")],
        &[&net_b.ctr_opt()],
        &httpd(),
    );
    let st = sb.inspect("es-sec-adm-a").unwrap();
    let admin = u16::try_from(st["admin_port"].as_u64().unwrap()).unwrap();
    let proxy = port_of(&st, 0, "internal_tls_proxy");
    let ca = sb.ca();
    wait_served(&format!("{}:{proxy}", net_a.ip), &ca, "es-sec-adm-a");

    // From the host: refused (Envoy's admin listens on 127.0.0.1 only).
    let to = |port: u16| {
        TcpStream::connect_timeout(
            &format!("{}:{port}", net_a.ip).parse().unwrap(),
            Duration::from_secs(2),
        )
    };
    assert!(to(8080).is_ok(), "the host reaches the container at all");
    let e = to(admin).expect_err("admin port reachable from the host");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // From another container: refused, while its app port is reachable.
    let (_, out) = exec_captured(
        &b,
        "app",
        &format!("timeout 5 wget -qO- http://{}:8080/", net_a.ip),
    );
    assert!(out.contains(HELLO), "container B reaches A at all: {out}");
    let (rc, out) = exec_captured(
        &b,
        "adm",
        &format!("nc -w 2 {} {admin} </dev/null", net_a.ip),
    );
    assert!(
        rc != Some(0) && out.contains("Connection refused"),
        "container B must be refused on A's admin port: {rc:?} {out}"
    );

    // Inside A (the app shares Envoy's netns): /ready answers ...
    let wget = |exec_id: &str, args: &str, path: &str| {
        exec_captured(
            &a,
            exec_id,
            &format!("timeout 5 wget -q -O- {args} http://127.0.0.1:{admin}{path}"),
        )
    };
    let (_, out) = wget("ready", "", "/ready");
    assert_eq!(out.trim(), "LIVE");
    // ... /certs shows public data only ...
    let (_, certs) = wget("certs", "", "/certs");
    assert!(certs.contains("serial_number"), "{certs}");
    let key = std::fs::read_to_string(
        sb.state_dir
            .join(NAMESPACE)
            .join("es-sec-adm-a/credentials/instance.key"),
    )
    .unwrap();
    assert!(
        !certs.contains("PRIVATE KEY") && !certs.contains(&key_slice(&key)),
        "{certs}"
    );
    // ... and every dangerous path is refused with 403.
    let envoy = sb.try_record(NAMESPACE, "es-sec-adm-a").unwrap()["envoy"]["pid"]
        .as_i64()
        .unwrap();
    for (i, (post, path)) in DANGEROUS_ADMIN.iter().enumerate() {
        let args = if *post { "--post-data x" } else { "" };
        let (rc, said) = wget(&format!("bad{i}"), args, path);
        assert!(
            rc != Some(0) && said.contains("403 Forbidden"),
            "{path} must be refused with 403: {rc:?} {said}"
        );
    }
    // Nothing of that took effect: Envoy still runs, is LIVE and serves.
    assert!(alive(envoy), "Envoy {envoy} died");
    assert_eq!(
        sb.try_record(NAMESPACE, "es-sec-adm-a").unwrap()["envoy"]["pid"],
        envoy
    );
    let (_, out) = wget("ready2", "", "/ready");
    assert_eq!(out.trim(), "LIVE");
    wait_served(&format!("{}:{proxy}", net_a.ip), &ca, "es-sec-adm-a");
}

/// `ctr task exec`, its output read back from a file in the container: under load,
/// ctr's copy of the stdio of a process that exits at once sometimes comes back empty.
/// Returns the command's exit status and its stdout and stderr.
fn exec_captured(c: &Container, exec_id: &str, cmd: &str) -> (Option<i32>, String) {
    let file = format!("/tmp/.es-sec-{exec_id}");
    let o = c.exec(
        exec_id,
        &format!("( {cmd} ) >{file} 2>&1; echo \"rc=$?\" >>{file}"),
    );
    let host = format!("/proc/{}/root{file}", c.pid());
    let out = std::fs::read_to_string(&host)
        .unwrap_or_else(|e| panic!("{host}: {e}; exec: {}", text(&o)));
    let (body, rc) = out
        .rsplit_once("rc=")
        .unwrap_or_else(|| panic!("{cmd}: no status in {out:?}; exec: {}", text(&o)));
    (rc.trim().parse().ok(), body.to_string())
}

// ---------------------------------------------------------------------------------
// 5. With unproxied mappings disabled, no host address leads to the app.

/// TCP connect (1 s) and, if connected, an HTTP/1.0 request; Ok(reply, maybe empty).
fn tcp_get(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `tcp_get` every target from inside the network namespace at `netns` (threads that
/// join it; the test's own thread stays where it is).
fn probe_from(netns: &str, targets: &[SocketAddr]) -> Vec<(SocketAddr, Result<String, String>)> {
    let chunks: Vec<Vec<SocketAddr>> = targets
        .chunks(targets.len().div_ceil(8).max(1))
        .map(<[_]>::to_vec)
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let netns = netns.to_string();
            std::thread::spawn(move || {
                let f = std::fs::File::open(&netns).unwrap();
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {netns}: {e}"));
                chunk
                    .into_iter()
                    .map(|a| (a, tcp_get(a)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// The host's IPv4 addresses (`ip -4 -o addr`).
fn host_addresses() -> Vec<String> {
    let o = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            Some(f.get(i + 1)?.split('/').next()?.to_string())
        })
        .collect()
}

#[test]
fn unproxied_disabled_no_host_address_reaches_the_app() {
    if !can_run("unproxied_disabled_no_host_address_reaches_the_app") {
        return;
    }
    let slot = slots::next();
    let net = slot.cni();
    let router = slot.router(0);
    let sb = Sandbox::in_slot(
        &slot,
        "sec-unprox",
        "enable_unproxied_port_mappings = false",
        &format!("[host]\naddress = {:?}\n", router.host_ip()),
        POOL,
    );
    let ca = sb.ca();
    let id = "es-sec-unprox";
    let (opt, ip) = net.attach(id);
    let _c = sb.start_cmd(id, &[(PORTS, "8080")], &[&opt], &httpd());
    let st = sb.inspect(id).unwrap();
    assert!(st["ports"][0].get("external").is_none(), "{st}");
    let tls = port_of(&st, 0, "external_tls_proxy");
    let proxy = port_of(&st, 0, "internal_tls_proxy");
    let admin = u16::try_from(st["admin_port"].as_u64().unwrap()).unwrap();
    wait_until("TLS through the host port", Duration::from_secs(20), || {
        router.https(&ca, id, tls).contains(HELLO)
    });

    // Every host address (but loopback, which no other namespace can route to) gets a
    // route from the router via the host, so each one is actually tried through NAT.
    let addrs: Vec<String> = host_addresses()
        .into_iter()
        .filter(|a| !a.starts_with("127.") && a != &ip)
        .collect();
    assert!(addrs.iter().any(|a| a == router.host_ip()), "{addrs:?}");
    for a in addrs.iter().filter(|a| *a != router.host_ip()) {
        // An address that vanished meanwhile (another test's veth) is simply skipped.
        let _ = router.run(&format!(
            "ip route replace {a}/32 via {} dev eth0",
            router.host_ip()
        ));
    }
    let ports: Vec<u16> = [8080, proxy, admin]
        .into_iter()
        .chain(sb.pool().filter(|p| *p != tls))
        .collect();
    let targets: Vec<SocketAddr> = addrs
        .iter()
        .flat_map(|a| {
            ports
                .iter()
                .map(move |p| format!("{a}:{p}").parse().unwrap())
        })
        .collect();
    let started = Instant::now();
    let results = probe_from(&router.ns.path, &targets);
    let connected: Vec<String> = results
        .iter()
        .filter_map(|(a, r)| r.as_ref().ok().map(|reply| format!("{a} -> {reply:?}")))
        .collect();
    assert!(
        connected.is_empty(),
        "non-TLS ports reachable from the router: {connected:?}"
    );
    let mut why = std::collections::BTreeMap::<String, usize>::new();
    for (_, r) in &results {
        *why.entry(r.clone().unwrap_err()).or_default() += 1;
    }
    eprintln!(
        "{} attempts ({addrs:?} x {} ports) all failed in {:?}: {why:?}",
        results.len(),
        ports.len(),
        started.elapsed()
    );
    // The host answered every one (refused): the router did reach each address.
    let present = host_addresses();
    for (a, r) in &results {
        if present.contains(&a.ip().to_string()) {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("refused"), "{a}: {e} (not reached?)");
        }
    }

    // Positive control: through every host address, the TLS port is reached (NAT to
    // Envoy), and HTTPS gets the app; plain HTTP on it does not.
    let still: Vec<String> = host_addresses();
    let tls_targets: Vec<SocketAddr> = addrs
        .iter()
        .filter(|a| still.contains(a))
        .map(|a| format!("{a}:{tls}").parse().unwrap())
        .collect();
    for (a, r) in probe_from(&router.ns.path, &tls_targets) {
        let host = a.ip().to_string();
        let reply = match r {
            Ok(reply) => reply,
            // Another test's veth address that went away during the probe (seen in CI:
            // a timeout to a slot's address torn down meanwhile) proves nothing either way.
            Err(e) if !host_addresses().contains(&host) => {
                eprintln!("{a}: {e}, but the address is gone: skipped");
                continue;
            }
            Err(e) => panic!("TLS port through {a}: {e}"),
        };
        assert!(
            !reply.contains(HELLO),
            "plain HTTP through the TLS port {a}: {reply}"
        );
        let o = router.https_via(&ca, id, tls, &host);
        if still.contains(&host) && host_addresses().contains(&host) {
            assert!(o.contains(HELLO), "HTTPS through {host}:{tls}: {o}");
        }
    }
}

// ---------------------------------------------------------------------------------
// 6. mTLS: an expired (or not yet valid) client certificate from the trusted CA.

/// A client certificate from the CA in `ca_dir` valid from `start` to `end` (openssl
/// `ca` dates, `date -d` syntax, e.g. "-50 min").
fn dated_client_cert(
    dir: &Path,
    ca_dir: &Path,
    name: &str,
    start: &str,
    end: &str,
) -> (PathBuf, PathBuf) {
    let db = dir.join(format!("db-{name}"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("index.txt"), "").unwrap();
    std::fs::write(db.join("serial"), "1000\n").unwrap();
    std::fs::write(
        db.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = c\n[c]\ndatabase = {d}/index.txt\nserial = {d}/serial\n\
             new_certs_dir = {d}\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
             [p]\ncommonName = supplied\n",
            d = db.display()
        ),
    )
    .unwrap();
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let sh = format!(
        "set -e; openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={name} \
           -keyout {key} -out {db}/req.csr 2>/dev/null; \
         printf 'subjectAltName=DNS:gorouter.service.cf.internal\\nextendedKeyUsage=clientAuth\\n' > {db}/ext; \
         openssl ca -batch -notext -config {db}/ca.cnf -cert {ca}/ca.crt -keyfile {ca}/ca.key \
           -startdate $(date -u -d '{start}' +%Y%m%d%H%M%SZ) -enddate $(date -u -d '{end}' +%Y%m%d%H%M%SZ) \
           -extfile {db}/ext -in {db}/req.csr -out {crt}",
        key = key.display(),
        crt = crt.display(),
        db = db.display(),
        ca = ca_dir.display()
    );
    let o = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    (crt, key)
}

#[test]
fn mutual_tls_refuses_expired_client_certificates() {
    if !can_run("mutual_tls_refuses_expired_client_certificates") {
        return;
    }
    let certs = Sandbox::new("sec-mtls-certs", "", ""); // only its CA and directory
    let (dir, router_ca) = (certs.dir.clone(), certs.dir.join("ca"));
    let good = dated_client_cert(&dir, &router_ca, "good", "-50 min", "+1 day");
    let expired = dated_client_cert(&dir, &router_ca, "expired", "-50 min", "-10 min");
    let future = dated_client_cert(&dir, &router_ca, "future", "+1 hour", "+1 day");
    let sb = Sandbox::new(
        "sec-mtls",
        &mtls_proxy_config(&router_ca.join("ca.crt")),
        "",
    );
    let net = sb.slot.netns(0);
    // The app counts every connection it accepts. It reads the whole request before
    // answering: closing a socket with unread data resets the connection (and Envoy
    // passes the reset on, answer or not).
    let app = CountingApp::new(&sb.dir, true);
    let id = "es-sec-mtls";
    let _c = sb.start_cmd(
        id,
        &[(PORTS, "8080")],
        &[&net.ctr_opt(), &app.mount()],
        &app.cmd(),
    );
    let st = sb.inspect(id).unwrap();
    let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
    let ca = sb.ca();
    let tls_get = |client: &(PathBuf, PathBuf)| {
        Get::new(&ca)
            .sni(id)
            .client(Some((&client.0, &client.1)))
            .fetch(&addr)
    };
    wait_until(
        "valid client certificate served",
        Duration::from_secs(20),
        || {
            let out = tls_get(&good);
            if out.contains(HELLO) {
                Ok(())
            } else {
                Err(out)
            }
        },
    );
    let conns = || app.conns();
    let served = conns();
    assert!(served >= 1);
    for (what, client) in [("expired", &expired), ("not yet valid", &future)] {
        let out = tls_get(client);
        assert!(
            !out.contains(HELLO),
            "{what} client certificate: served anyway:\n{out}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        conns(),
        served,
        "a peer with an invalid certificate reached the app"
    );
    // The valid one still works (the refusals were about the dates).
    let out = tls_get(&good);
    assert!(
        out.contains(HELLO),
        "valid certificate after the refusals:\n{out}"
    );
}

// ---------------------------------------------------------------------------------
// 7. The state directory and the NAT table are root-only.

#[test]
fn state_directory_and_nat_table_are_root_only() {
    if !can_run("state_directory_and_nat_table_are_root_only") {
        return;
    }
    let sb = Sandbox::new("sec-state", "", "");
    let net = sb.slot.netns(0);
    let id = "es-sec-state";
    let (_c, st, addr) = sb.start_served(id, &net);
    let ns_dir = sb.state_dir.join(NAMESPACE);
    let dir = ns_dir.join(id);
    wait_until("NAT applied", Duration::from_secs(20), || {
        dir.join("nat.json").is_file()
    });

    // Traversable (Envoy must reach its files), not listable, owned by root.
    for d in [&sb.state_dir, &ns_dir, &dir] {
        let m = std::fs::metadata(d).unwrap();
        assert_eq!(
            (m.uid(), m.permissions().mode() & 0o7777),
            (0, 0o711),
            "{}",
            d.display()
        );
    }
    let p = |p: &Path| p.display().to_string();
    for d in [&sb.state_dir, &ns_dir, &dir] {
        assert_denied(
            &format!("ls {}", d.display()),
            &as_user(NOBODY, NOBODY, &["ls", &p(d)]),
        );
    }
    for f in ["state.json", "supervisor.json", "nat.json"] {
        let f = dir.join(f);
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
        assert_denied(
            &format!("cat {}", f.display()),
            &as_user(NOBODY, NOBODY, &["cat", &p(&f)]),
        );
    }
    // Logs: not secret (see private_key_never_appears_in_logs_or_state); their modes,
    // for the record.
    for f in ["supervisor.log", "envoy.log", "envoy/bootstrap.json"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        let o = as_user(NOBODY, NOBODY, &["cat", &p(&dir.join(f))]);
        eprintln!(
            "{f}: {}:{} {:o}; readable by uid {NOBODY}: {}",
            m.uid(),
            m.gid(),
            m.permissions().mode() & 0o7777,
            o.status.success()
        );
    }
    assert_denied(
        "cat .lock",
        &as_user(NOBODY, NOBODY, &["cat", &p(&sb.state_dir.join(".lock"))]),
    );

    // The NAT table: needs CAP_NET_ADMIN.
    let o = as_user(
        NOBODY,
        NOBODY,
        &["nft", "list", "table", "ip", "envoy_sidecar"],
    );
    assert!(
        !o.status.success()
            && o.stdout.is_empty()
            && out_err(&o).contains("Operation not permitted"),
        "nft as uid {NOBODY}: {}",
        text(&o)
    );
    let tls = port_of(&st, 0, "external_tls_proxy");
    assert!(nft_map().contains(&format!("tcp . {tls} :")));

    // gc as an unprivileged user: a clear error, nothing done.
    let cfg = p(&sb.config);
    let cli = p(&cli_bin());
    let o = as_user(
        NOBODY,
        NOBODY,
        &[&cli, "--config", &cfg, "gc", "--dry-run", "--grace", "0"],
    );
    let said = out_err(&o);
    eprintln!("gc --dry-run as uid {NOBODY}: {said}");
    assert!(
        !o.status.success(),
        "gc as uid {NOBODY} must fail: {}",
        text(&o)
    );
    assert!(
        said.contains("Permission denied") || said.contains("root"),
        "gc must say why: {}",
        text(&o)
    );
    assert!(
        !said.contains("[dry-run]"),
        "gc acted as if it could judge: {said}"
    );
    // Past the configuration (an operator's config without the CA, readable by all),
    // the state directory itself stops it.
    let open_cfg = sb.dir.join("no-proxy.toml");
    std::fs::write(
        &open_cfg,
        format!(
            "[runtime]\nstate_dir = {:?}\n{}",
            sb.state_dir,
            sb.pool_toml()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&open_cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = as_user(
        NOBODY,
        NOBODY,
        &[
            &cli,
            "--config",
            &p(&open_cfg),
            "gc",
            "--dry-run",
            "--grace",
            "0",
        ],
    );
    let said = out_err(&o);
    eprintln!("gc --dry-run as uid {NOBODY}, readable config: {said}");
    assert!(
        !o.status.success()
            && said.contains("Permission denied")
            && said.contains(&p(&sb.state_dir))
            && !said.contains("[dry-run]"),
        "gc must fail naming the state directory: {}",
        text(&o)
    );
    assert!(dir.join("state.json").is_file(), "state kept");
    assert!(nft_map().contains(&format!("tcp . {tls} :")));
    // Positive control: as root, the same dry run succeeds and spares the live container.
    let o = Command::new(cli_bin())
        .args(["--config", &cfg, "gc", "--dry-run", "--grace", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out_err(&o).contains(id), "{}", text(&o));
    wait_served(&addr, &sb.ca(), id);
}

// ---------------------------------------------------------------------------------
// Found while writing the checks above: Envoy's copy of the key.

/// Envoy runs in the host's mount namespace (the supervisor joins only the container's
/// network namespace) and the state directories are traversable (0711), so Envoy's SDS
/// file — the container's private key — is protected by its owner alone: each
/// container's Envoy has a uid of its own (proxy.envoy_uid_pool_*). Another container's
/// Envoy (simulated with the next uid of the pool, no groups, no capabilities) and any
/// `nobody` process can neither read it nor chmod its directory. (Found here when all
/// Envoys shared uid 65534.)
#[test]
fn another_envoy_cannot_read_or_replace_a_containers_key() {
    if !can_run("another_envoy_cannot_read_or_replace_a_containers_key") {
        return;
    }
    let sb = Sandbox::new("sec-sds", "", "");
    let net = sb.slot.netns(0);
    let id = "es-sec-sds";
    let (_c, st, _) = sb.start_served(id, &net);
    let dir = sb.state_dir.join(NAMESPACE).join(id);
    let key = std::fs::read_to_string(dir.join("credentials/instance.key")).unwrap();
    let sds = dir.join("envoy/sds");
    let file = sds.join("tls-certificate.json");
    assert!(contains(&std::fs::read(&file).unwrap(), &key_slice(&key)));

    let own = u32::try_from(st["envoy_uid"].as_u64().unwrap()).unwrap();
    let mut found = Vec::new();
    for other in [own + 1, NOBODY] {
        let o = as_user(other, other, &["cat", &file.display().to_string()]);
        if o.status.success() || contains(&o.stdout, &key_slice(&key)) {
            found.push(format!(
                "uid {other} read {} (this container's private key: {})",
                file.display(),
                contains(&o.stdout, &key_slice(&key))
            ));
        }
        let o = as_user(other, other, &["chmod", "0700", &sds.display().to_string()]);
        if o.status.success() {
            found.push(format!("uid {other} chmod-ed {} to 0700", sds.display()));
        }
    }
    // Its own Envoy can (positive control).
    let o = as_user(own, own, &["cat", &file.display().to_string()]);
    assert!(
        contains(&o.stdout, &key_slice(&key)),
        "its own Envoy uid {own} must read it: {}",
        text(&o)
    );
    std::fs::set_permissions(&sds, std::fs::Permissions::from_mode(0o500)).unwrap();
    assert!(found.is_empty(), "{found:#?}");
}
