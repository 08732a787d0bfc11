//! containerd's CRI plugin as the kubelet drives it: a pod sandbox and a container
//! with `runtime_handler = "envoy-sidecar"` (the handler `envoy-sidecar install --root`
//! wrote for the stack's containerd — version 3 for 2.x, imported; version 2 for 1.x,
//! appended to config.toml — with its BinaryName pointed at
//! /run/envoy-sidecar-test/cri-runtime, see tests/env/containerd.sh) and the port
//! annotation: sidecar, credentials, memory, TLS to the pod IP and through host NAT.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::path::Path;

use common::*;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

const CRI_RUNTIME: &str = "/run/envoy-sidecar-test/cri-runtime";
const HANDLER: &str = "envoy-sidecar";
const MIB: i64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client() -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(
        containerd_client::connect(address())
            .await
            .expect("CRI socket"),
    )
}

/// One CRI handler binary (CRI_RUNTIME) for the whole file: its tests take turns.
static HANDLER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn handler_turn() -> std::sync::MutexGuard<'static, ()> {
    HANDLER_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn kubelet_style_pod_gets_its_proxy_credentials_and_memory() {
    if !can_run("kubelet_style_pod_gets_its_proxy_credentials_and_memory") {
        return;
    }
    let _turn = handler_turn();
    let sb = Sandbox::new("cri", "", "");
    let (k, _restore) = Kubelet::new(&sb);
    let pod_config = k.pod_config("web", &[]);
    let pod = k.run_pod(&pod_config);
    let pod_guard = PodGuard(&k, pod.clone());
    let cid = k
        .start(
            &pod,
            &pod_config,
            container(
                "app",
                0,
                &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
                &[("envoy-sidecar/ports", "8080")],
                128 * MIB,
                vec![],
            ),
        )
        .unwrap_or_else(|e| panic!("app: {e}"));

    // Decided as under ctr: namespace k8s.io (the shim's runc root), ports. The
    // annotation is the container's own (the pod has none): the pod's proxy is set up
    // by it, keyed by the sandbox, and the container's limit is its own (the
    // RuntimeClass overhead pays for Envoy).
    let st = sb
        .inspect_ns(&pod, "k8s.io")
        .expect("the pod's state, keyed by its sandbox");
    assert!(
        sb.inspect_ns(&cid, "k8s.io").is_none(),
        "no record of its own"
    );
    assert_eq!(st["ports"][0]["internal"], 8080);
    assert_eq!(st["pod"]["members"][0]["id"], cid.as_str());
    assert_eq!(st["pod"]["members"][0]["requested_bytes"], 128 * MIB);
    assert_eq!(st["memory"]["limit_bytes"], serde_json::Value::Null);
    assert_eq!(
        k.exec(
            &cid,
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null"
        ),
        (128 * MIB).to_string(),
        "the container's limit is not raised"
    );

    // The app's environment and credentials, seen through CRI's ExecSync.
    let ports: serde_json::Value = {
        let out = k.exec(&cid, "echo $CF_INSTANCE_PORTS");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    assert_eq!(
        ports[0]["internal_tls_proxy"],
        st["ports"][0]["internal_tls_proxy"]
    );
    assert_eq!(
        k.exec(
            &cid,
            "test -s /etc/cf-instance-credentials/instance.crt && echo creds"
        ),
        "creds",
        "credentials mounted"
    );

    // The proxy: TLS from the host to the pod IP, served by the app; host NAT to the
    // pod IP (CRI's netns has its address before the container), and TLS through the
    // host's address and the external TLS proxy port.
    let ip = k.pod_ip(&pod);
    let row = wait_ready(&sb, &pod);
    assert_eq!(row["container_ip"], ip.as_str(), "{row}");
    Get::new(&sb.ca()).wait_for(
        &format!("{ip}:{}", st["ports"][0]["internal_tls_proxy"]),
        HELLO,
    );
    let tls_port = port_of(&st, 0, "external_tls_proxy");
    let nat = common::footprint::nat_in_pool(&sb.pool());
    assert!(
        nat.contains(&(
            tls_port,
            format!("{ip} . {}", port_of(&st, 0, "internal_tls_proxy"))
        )),
        "{nat:?} ({row})"
    );
    let host = st["host_ip"].as_str().unwrap();
    Get::new(&sb.ca()).wait_for(&format!("{host}:{tls_port}"), HELLO);

    // Pod deletion as the kubelet does it leaves nothing behind.
    k.stop_container(&cid, 2);
    k.remove_container(&cid);
    drop(pod_guard);
    assert!(
        sb.inspect_ns(&pod, "k8s.io").is_none(),
        "state left after RemovePodSandbox"
    );
    assert!(!sb.state_dir.join("k8s.io").join(&pod).exists());
    assert_eq!(
        common::footprint::nat_in_pool(&sb.pool()),
        [],
        "NAT left after RemovePodSandbox"
    );
}

/// The kubelet's calls, for the pod tests below.
struct Kubelet {
    rt: tokio::runtime::Runtime,
    logs: std::path::PathBuf,
}

impl Kubelet {
    /// The handler's binary becomes the wrapper with `sb`'s configuration until the
    /// returned guard goes (then plain runc again, as tests/env/containerd.sh leaves it).
    fn new(sb: &Sandbox) -> (Kubelet, impl Drop) {
        write_wrapper_script(Path::new(CRI_RUNTIME), &sb.config, &[], None);
        struct Restore;
        impl Drop for Restore {
            fn drop(&mut self) {
                write_exec_script(Path::new(CRI_RUNTIME), &[], &real_runc(), None);
            }
        }
        let logs = sb.dir.join("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        (Kubelet { rt: rt(), logs }, Restore)
    }

    fn pod_config(&self, name: &str, annotations: &[(&str, &str)]) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("es-{name}-{}", std::process::id()),
                namespace: "es-test".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.logs.display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }

    fn run_pod(&self, config: &PodSandboxConfig) -> String {
        self.rt.block_on(async {
            client()
                .await
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: HANDLER.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("RunPodSandbox: {}", e.message()))
                .into_inner()
                .pod_sandbox_id
        })
    }

    /// CreateContainer + StartContainer; `Err`: CRI's message.
    fn start(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        c: ContainerConfig,
    ) -> Result<String, String> {
        self.rt.block_on(async {
            let mut cl = client().await;
            let id = cl
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.into(),
                    config: Some(c),
                    sandbox_config: Some(pod_config.clone()),
                })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner()
                .container_id;
            cl.start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|e| e.message().to_string())?;
            Ok(id)
        })
    }

    fn exec(&self, cid: &str, script: &str) -> String {
        self.rt.block_on(async {
            let out = client()
                .await
                .exec_sync(ExecSyncRequest {
                    container_id: cid.into(),
                    cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    timeout: 10,
                })
                .await
                .unwrap()
                .into_inner();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    }

    fn pod_ip(&self, pod: &str) -> String {
        self.rt.block_on(async {
            client()
                .await
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod.into(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap()
        })
    }

    fn stop_container(&self, cid: &str, timeout: i64) {
        self.rt.block_on(async {
            let mut c = client().await;
            c.stop_container(StopContainerRequest {
                container_id: cid.into(),
                timeout,
            })
            .await
            .unwrap_or_else(|e| panic!("StopContainer: {}", e.message()));
        });
    }

    fn remove_container(&self, cid: &str) {
        self.rt.block_on(async {
            client()
                .await
                .remove_container(RemoveContainerRequest {
                    container_id: cid.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("RemoveContainer: {}", e.message()));
        });
    }

    /// StopPodSandbox then RemovePodSandbox; errors ignored (also the clean-up path).
    fn remove_pod(&self, pod: &str) {
        self.rt.block_on(async {
            let mut c = client().await;
            let _ = c
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod.into(),
                })
                .await;
            let _ = c
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.into(),
                })
                .await;
        });
    }
}

/// Removes the pod whatever the test's outcome.
struct PodGuard<'a>(&'a Kubelet, String);
impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        self.0.remove_pod(&self.1);
    }
}

fn container(
    name: &str,
    attempt: u32,
    cmd: &[&str],
    annotations: &[(&str, &str)],
    limit: i64,
    mounts: Vec<Mount>,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| (*s).to_string()).collect(),
        annotations: annotations
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        log_path: format!("{name}-{attempt}.log"),
        mounts,
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: limit,
                ..Default::default()
            }),
            security_context: None,
        }),
        ..Default::default()
    }
}

/// Wait for the pod's row to say ready; on time-out the row and the supervisor's log.
fn wait_ready(sb: &Sandbox, pod: &str) -> serde_json::Value {
    let r = common::wait::poll(
        std::time::Duration::from_secs(30),
        common::wait::INTERVAL,
        || {
            let row = status_row(&sb.config, "k8s.io", pod).ok_or("no row")?;
            if row["status"] == "ready" && row["nat_applied"] == true {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        },
    );
    r.unwrap_or_else(|last| {
        let log = std::fs::read_to_string(sb.container_dir("k8s.io", pod).join("supervisor.log"))
            .unwrap_or_default();
        panic!("pod {pod} not ready: {last}\nsupervisor.log:\n{log}")
    })
}

/// Envoy processes serving `sb`'s containers (their bootstrap is under its state dir).
fn envoys_of(sb: &Sandbox) -> Vec<(i32, String)> {
    common::footprint::processes_mentioning(&format!("{}/", sb.state_dir.display()))
        .into_iter()
        .filter(|(_, c)| c.contains("bootstrap.json"))
        .collect()
}

/// The pod as a kubelet user writes it: the port annotation on the pod, an app and a
/// log shipper with none of their own. One Envoy, one record, one NAT set; both
/// containers see the same `CF_INSTANCE_PORTS`; a restarted app keeps the pod's
/// proxy; stopping the pod the kubelet's way (StopContainer with a grace period, then
/// StopPodSandbox) drains Envoy first, so a client under load sees no error; removing
/// it leaves nothing.
#[test]
fn a_pod_runs_one_envoy_for_all_its_containers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    if !can_run("a_pod_runs_one_envoy_for_all_its_containers") {
        return;
    }
    let _turn = handler_turn();
    let sb = Sandbox::new("cripod", "drain_timeout = \"10s\"", "");
    let (k, _restore) = Kubelet::new(&sb);
    let pod_config = k.pod_config("shop", &[("envoy-sidecar/ports", "8080")]);
    let pod = k.run_pod(&pod_config);
    let _guard = PodGuard(&k, pod.clone());

    let www = sb.dir.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    std::fs::write(www.join("index.html"), HELLO).unwrap();
    std::fs::write(
        www.join("cgi-bin/slow"),
        "#!/bin/sh\nsleep 3\nprintf 'Content-Type: text/plain\\r\\n\\r\\nslow-done\\n'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        www.join("cgi-bin/slow"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let app = |attempt| {
        container(
            "app",
            attempt,
            // Exits at once on SIGTERM, taking httpd and its CGIs with it.
            &[
                "/bin/sh",
                "-c",
                "trap 'exit 0' TERM; httpd -f -p 8080 -h /w & wait",
            ],
            &[],
            64 * MIB,
            vec![Mount {
                container_path: "/w".into(),
                host_path: www.display().to_string(),
                readonly: true,
                ..Default::default()
            }],
        )
    };
    let app_id = k
        .start(&pod, &pod_config, app(0))
        .unwrap_or_else(|e| panic!("app: {e}"));
    let shipper = k
        .start(
            &pod,
            &pod_config,
            container("shipper", 0, &["sleep", "3600"], &[], 32 * MIB, vec![]),
        )
        .unwrap_or_else(|e| panic!("shipper: {e}"));

    // One record, keyed by the sandbox; no record for either container.
    assert_eq!(sb.state_entries("k8s.io"), std::slice::from_ref(&pod));
    let st = sb.inspect_ns(&pod, "k8s.io").expect("the pod's record");
    let ip = k.pod_ip(&pod);
    let proxy = port_of(&st, 0, "internal_tls_proxy");
    Get::new(&sb.ca()).wait_for(&format!("{ip}:{proxy}"), HELLO);
    let row = wait_until(
        "the pod ready, NAT applied",
        Duration::from_secs(20),
        || {
            let row = status_row(&sb.config, "k8s.io", &pod).ok_or("no row")?;
            if row["status"] == "ready" && row["nat_applied"] == true {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        },
    );
    assert_eq!(
        row["pod"]["containers"],
        serde_json::json!(["app", "shipper"]),
        "{row}"
    );
    assert_eq!(status_rows(&sb.config, "k8s.io").len(), 1);
    let table = common::engine::status_line(&sb.config, "k8s.io", &pod).unwrap_or_default();
    assert!(
        table.contains("app,shipper") && table.contains("ready"),
        "{table}"
    );
    assert_eq!(envoys_of(&sb).len(), 1, "one Envoy: {:?}", envoys_of(&sb));
    let ports = k.exec(&app_id, "echo $CF_INSTANCE_PORTS");
    assert_eq!(ports, k.exec(&shipper, "echo $CF_INSTANCE_PORTS"));
    let parsed: serde_json::Value =
        serde_json::from_str(&ports).unwrap_or_else(|e| panic!("{e}: {ports}"));
    assert_eq!(parsed, st["ports"]);
    assert_eq!(
        k.exec(
            &shipper,
            "test -s /etc/cf-instance-credentials/instance.crt && echo creds"
        ),
        "creds"
    );
    let host = st["host_ip"].as_str().unwrap().to_string();
    let tls_port = port_of(&st, 0, "external_tls_proxy");
    let nat = common::footprint::nat_in_pool(&sb.pool());
    let host_ports: usize = st["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| 1 + usize::from(!p["external"].is_null()))
        .sum();
    assert_eq!(nat.len(), host_ports, "one NAT set: {nat:?}");
    assert!(
        nat.iter().all(|(_, to)| to.starts_with(&format!("{ip} "))),
        "{nat:?}"
    );
    Get::new(&sb.ca()).wait_for(&format!("{host}:{tls_port}"), HELLO);

    // A restart of the app (a new attempt, a new container id): the pod's proxy stays.
    let envoy_before = envoys_of(&sb);
    k.stop_container(&app_id, 0);
    k.remove_container(&app_id);
    let app_id = k
        .start(&pod, &pod_config, app(1))
        .unwrap_or_else(|e| panic!("app attempt 1: {e}"));
    Get::new(&sb.ca()).wait_for(&format!("{ip}:{proxy}"), HELLO);
    let st2 = sb.inspect_ns(&pod, "k8s.io").unwrap();
    assert_eq!(st2["ports"], st["ports"], "the same proxy and host ports");
    assert_eq!(envoys_of(&sb), envoy_before, "the same Envoy");
    let members: Vec<String> = st2["pod"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        members.contains(&app_id) && members.contains(&shipper),
        "{members:?}"
    );
    assert_eq!(members.len(), 2, "the removed attempt left: {members:?}");

    // Stop under load, the kubelet's order: the app gets SIGTERM with a grace period
    // (the wrapper drains the pod's Envoy first), then StopPodSandbox.
    let addr = format!("{ip}:{proxy}");
    let ca = sb.ca();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (addr, ca) = (addr.clone(), ca.clone());
            std::thread::spawn(move || Get::new(&ca).path("/cgi-bin/slow").fetch(&addr))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (addr, ca, stop) = (addr.clone(), ca.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut served, mut refused, mut errors) = (0, 0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let out = Get::new(&ca).fetch(&addr);
                // Refused: connect refused, or reset before the handshake read a byte —
                // a connection the kernel had queued when Envoy closed the listener
                // (no request was sent: as safe to retry as a refusal).
                let reset_unanswered = out.contains("SSL handshake has read 0 bytes")
                    && (out.contains("errno=104") || out.contains("Connection reset"));
                if out.contains(HELLO) {
                    served += 1;
                } else if out.contains("Connection refused")
                    || out.contains("errno=111")
                    || reset_unanswered
                {
                    refused += 1;
                } else {
                    errors.push(out.chars().take(400).collect::<String>());
                }
            }
            (served, refused, errors)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    k.stop_container(&app_id, 10);
    let stop_took = t.elapsed();
    let slow: Vec<String> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    // The app is gone; what follows (the sandbox's stop) takes the pod's IP away.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (served, refused, errors) = stream.join().unwrap();
    k.stop_container(&shipper, 0);
    k.rt.block_on(async {
        client()
            .await
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox: {}", e.message()));
    });
    eprintln!(
        "MEASURED pod stop under load: served {served}, refused {refused}, errors {}, slow done {}/3, StopContainer took {stop_took:?}",
        errors.len(),
        slow.iter().filter(|o| o.contains("slow-done")).count()
    );
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    assert_eq!(
        slow.iter().filter(|o| o.contains("slow-done")).count(),
        3,
        "{slow:?}"
    );
    assert!(
        served > 0 && refused > 0,
        "the stream saw the stop: {served} {refused}"
    );

    // Removal leaves nothing: record, Envoy, NAT, cgroups.
    k.remove_pod(&pod);
    assert!(
        sb.state_entries("k8s.io").is_empty(),
        "{:?}",
        sb.state_entries("k8s.io")
    );
    assert!(envoys_of(&sb).is_empty(), "{:?}", envoys_of(&sb));
    assert_eq!(common::footprint::nat_in_pool(&sb.pool()), []);
    assert_eq!(
        common::footprint::cgroup_leftovers("k8s.io", &[pod.clone(), app_id, shipper]),
        Vec::<std::path::PathBuf>::new()
    );
}

/// No annotation on the pod: its first annotated container sets up the pod's proxy
/// (ports that collide with the proxy range included), later containers share it, and
/// one declaring a port the pod's Envoy does not cover is refused with a clear error —
/// never left unproxied.
#[test]
fn per_container_annotations_give_the_pod_one_proxy_and_uncovered_ports_are_refused() {
    if !can_run("per_container_annotations_give_the_pod_one_proxy_and_uncovered_ports_are_refused")
    {
        return;
    }
    let _turn = handler_turn();
    let sb = Sandbox::new("cripodc", "", "");
    let (k, _restore) = Kubelet::new(&sb);
    let pod_config = k.pod_config("shopc", &[]);
    let pod = k.run_pod(&pod_config);
    let _guard = PodGuard(&k, pod.clone());
    assert!(
        sb.state_entries("k8s.io").is_empty(),
        "no proxy for a pod that asks none"
    );

    let first = k
        .start(
            &pod,
            &pod_config,
            container(
                "app",
                0,
                &[
                    "/bin/sh",
                    "-c",
                    "httpd -p 61001 -h /www; exec httpd -f -p 8080 -h /www",
                ],
                &[("envoy-sidecar/ports", "61001,8080")],
                64 * MIB,
                vec![],
            ),
        )
        .unwrap_or_else(|e| panic!("app: {e}"));
    let st = sb
        .inspect_ns(&pod, "k8s.io")
        .expect("the pod's record, by its sandbox");
    wait_ready(&sb, &pod);
    let ip = k.pod_ip(&pod);
    for i in 0..2 {
        let p = port_of(&st, i, "internal_tls_proxy");
        assert!(p != 61001 && p != 8080, "{st}");
        Get::new(&sb.ca()).wait_for(&format!("{ip}:{p}"), HELLO);
    }

    // A second container with a covered port shares the proxy.
    let second = k
        .start(
            &pod,
            &pod_config,
            container(
                "side",
                0,
                &["sleep", "3600"],
                &[("envoy-sidecar/ports", "8080")],
                0,
                vec![],
            ),
        )
        .unwrap_or_else(|e| panic!("side: {e}"));
    assert_eq!(
        k.exec(&second, "echo $CF_INSTANCE_PORTS"),
        k.exec(&first, "echo $CF_INSTANCE_PORTS")
    );
    // One declaring another port: refused at create, named.
    let e = k
        .start(
            &pod,
            &pod_config,
            container(
                "other",
                0,
                &["sleep", "3600"],
                &[("envoy-sidecar/ports", "9090")],
                0,
                vec![],
            ),
        )
        .expect_err("a port the pod's Envoy does not cover");
    assert!(e.contains("9090") && e.contains("does not cover"), "{e}");
    assert_eq!(envoys_of(&sb).len(), 1, "{:?}", envoys_of(&sb));
    let rec = sb.inspect_ns(&pod, "k8s.io").unwrap();
    assert_eq!(rec["pod"]["members"].as_array().unwrap().len(), 2, "{rec}");

    k.remove_pod(&pod);
    assert!(
        sb.state_entries("k8s.io").is_empty(),
        "{:?}",
        sb.state_entries("k8s.io")
    );
    assert!(envoys_of(&sb).is_empty());
    assert_eq!(common::footprint::nat_in_pool(&sb.pool()), []);
}
