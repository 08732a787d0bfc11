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

use std::collections::HashMap;
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

#[test]
fn kubelet_style_pod_gets_its_proxy_credentials_and_memory() {
    if !can_run("kubelet_style_pod_gets_its_proxy_credentials_and_memory") {
        return;
    }
    let sb = Sandbox::new("cri", "", "");
    // The handler's binary: the wrapper with this test's configuration.
    write_wrapper_script(Path::new(CRI_RUNTIME), &sb.config, &[], None);
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            // As tests/env/containerd.sh leaves it: plain runc.
            write_exec_script(Path::new(CRI_RUNTIME), &[], &real_runc(), None);
        }
    }
    let _restore = Restore;
    let logs = sb.dir.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let rt = rt();
    let uid = format!("es-cri-{}", std::process::id());
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: uid.clone(),
            namespace: "es-test".into(),
            attempt: 0,
        }),
        hostname: "web".into(),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let pod = rt.block_on(async {
        client()
            .await
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: HANDLER.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {}", e.message()))
            .into_inner()
            .pod_sandbox_id
    });
    struct Pod<'a>(&'a tokio::runtime::Runtime, String);
    impl Drop for Pod<'_> {
        fn drop(&mut self) {
            self.0.block_on(async {
                let mut c = client().await;
                let _ = c
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: self.1.clone(),
                    })
                    .await;
                let _ = c
                    .remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: self.1.clone(),
                    })
                    .await;
            });
        }
    }
    let pod_guard = Pod(&rt, pod.clone());

    let container_config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec![
            "/bin/httpd".into(),
            "-f".into(),
            "-p".into(),
            "8080".into(),
            "-h".into(),
            "/www".into(),
        ],
        annotations: HashMap::from([("envoy-sidecar/ports".to_string(), "8080".to_string())]),
        log_path: "app.log".into(),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 128 * MIB,
                ..Default::default()
            }),
            security_context: None,
        }),
        ..Default::default()
    };
    let cid = rt.block_on(async {
        let mut c = client().await;
        let id = c
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {}", e.message()))
            .into_inner()
            .container_id;
        c.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {}", e.message()));
        id
    });

    // Decided exactly as under ctr: namespace k8s.io (the shim's runc root), ports, memory.
    let st = sb
        .inspect_ns(&cid, "k8s.io")
        .expect("state for the CRI container");
    assert_eq!(st["ports"][0]["internal"], 8080);
    assert_eq!(st["memory"]["requested_bytes"], 128 * MIB);
    assert_eq!(st["memory"]["limit_bytes"], 160 * MIB);
    let pid = u32::try_from(st["init_pid"].as_i64().unwrap()).unwrap();
    assert_eq!(memory_limit_of(pid), (160 * MIB).to_string());

    // The app's environment and credentials, seen through CRI's ExecSync.
    let out = rt.block_on(async {
        client()
            .await
            .exec_sync(ExecSyncRequest {
                container_id: cid.clone(),
                cmd: vec!["/bin/sh".into(), "-c".into(), "echo $CF_INSTANCE_PORTS; test -s /etc/cf-instance-credentials/instance.crt && echo creds".into()],
                timeout: 10,
            })
            .await
            .unwrap()
            .into_inner()
    });
    let exec_out = String::from_utf8_lossy(&out.stdout).to_string();
    let ports: serde_json::Value = serde_json::from_str(exec_out.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {exec_out}"));
    assert_eq!(
        ports[0]["internal_tls_proxy"],
        st["ports"][0]["internal_tls_proxy"]
    );

    // The proxy: TLS from the host to the pod IP, served by the app.
    let ip = rt.block_on(async {
        client()
            .await
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap()
    });
    let addr = format!("{ip}:{}", st["ports"][0]["internal_tls_proxy"]);
    Get::new(&sb.ca()).wait_for(&addr, HELLO);

    // Host NAT: the pod IP mapped (CRI's netns has its address before the container),
    // and TLS through the host's address and the external TLS proxy port.
    let row = wait_until(
        "status ready with NAT",
        std::time::Duration::from_secs(20),
        || {
            let row = status_row(&sb.config, "k8s.io", &cid).ok_or("no row")?;
            if row["status"] == "ready" && row["nat_applied"] == true && row["container_ip"] == ip {
                Ok(row)
            } else {
                Err(row.to_string())
            }
        },
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
    assert!(
        exec_out.contains("creds"),
        "credentials mounted: {exec_out}"
    );

    // Pod deletion as the kubelet does it leaves nothing behind.
    rt.block_on(async {
        let mut c = client().await;
        c.stop_container(StopContainerRequest {
            container_id: cid.clone(),
            timeout: 2,
        })
        .await
        .unwrap();
        c.remove_container(RemoveContainerRequest {
            container_id: cid.clone(),
        })
        .await
        .unwrap();
    });
    drop(pod_guard);
    assert!(
        sb.inspect_ns(&cid, "k8s.io").is_none(),
        "state left after RemoveContainer"
    );
    assert!(!sb.state_dir.join("k8s.io").join(&cid).exists());
    assert_eq!(
        common::footprint::nat_in_pool(&sb.pool()),
        [],
        "NAT left after RemoveContainer"
    );
}
