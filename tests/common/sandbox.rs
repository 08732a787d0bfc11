//! A test's private world: its own directory, CA, config, state directory, wrapper
//! script and host port pool (from its [`Slot`]), so tests run in parallel without
//! sharing port pools or memory accounting.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::container::{Container, HELLO, PORTS, httpd};
use super::containerd::{NAMESPACE, address, ctr, ctr_at, owned, run_args, strs};
use super::net::Netns;
use super::slots::{self, Slot};
use super::tls::openssl_wait_for;
use super::util::{TempDir, cli, cli_bin, text, write_wrapper_script};

/// The default size of a sandbox's host port pool.
pub const POOL: u16 = 32;

/// `envoy-sidecar generate-ca --out dir`: `dir/ca.crt` and `dir/ca.key`.
pub fn generate_ca(dir: &Path) {
    let out = Command::new(cli_bin())
        .args(["generate-ca", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "generate-ca: {}", text(&out));
}

/// Removed on drop (its directory), the slot released with its last holder.
pub struct Sandbox {
    _tmp: TempDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    /// `--runc-binary` for ctr: a script that runs the wrapper with this config.
    pub runtime: PathBuf,
    /// Set to run the next containers with another runtime (e.g. plain runc).
    pub runtime_override: std::sync::Mutex<Option<PathBuf>>,
    pool: RangeInclusive<u16>,
    /// Its network resources and host port pool come from here.
    pub slot: Slot,
}

impl Sandbox {
    /// A sandbox in a slot of its own, with a pool of [`POOL`] host ports. `extra` is
    /// appended to a config with the proxy enabled; it may not repeat the `[proxy]`,
    /// `[instance_identity]`, `[runtime]` or `[ports]` tables' keys set here.
    pub fn new(name: &str, proxy_extra: &str, extra: &str) -> Sandbox {
        Sandbox::in_slot(&slots::next(), name, proxy_extra, extra, POOL)
    }

    /// A sandbox whose host port pool has `pool` ports.
    pub fn with_pool(name: &str, proxy_extra: &str, extra: &str, pool: u16) -> Sandbox {
        Sandbox::in_slot(&slots::next(), name, proxy_extra, extra, pool)
    }

    /// A sandbox in a slot the test already holds (for networks made before it).
    pub fn in_slot(slot: &Slot, name: &str, proxy_extra: &str, extra: &str, pool: u16) -> Sandbox {
        let tmp = TempDir::new(&format!("es-it-{name}"));
        let dir = tmp.path().to_path_buf();
        let ca = dir.join("ca");
        generate_ca(&ca);
        let state_dir = dir.join("state");
        let config = dir.join("config.toml");
        let pool = slot.pool(pool);
        std::fs::write(
            &config,
            format!(
                "[proxy]\nenabled = true\nenvoy_path = \"/usr/local/bin/envoy\"\n{proxy_extra}\n\
                 [instance_identity]\nca_cert = {:?}\nca_key = {:?}\n\
                 [runtime]\nstate_dir = {:?}\nrunc = {:?}\n{extra}\n{}",
                ca.join("ca.crt"),
                ca.join("ca.key"),
                state_dir,
                super::containerd::real_runc(),
                pool_toml(&pool)
            ),
        )
        .unwrap();
        let runtime = dir.join("runc-wrapper");
        write_wrapper_script(&runtime, &config, &[], None);
        Sandbox {
            slot: slot.clone(),
            _tmp: tmp,
            dir,
            config,
            state_dir,
            runtime,
            runtime_override: Default::default(),
            pool,
        }
    }

    /// The host port pool in the config.
    pub fn pool(&self) -> RangeInclusive<u16> {
        self.pool.clone()
    }

    /// The `[ports]` table of the config.
    pub fn pool_toml(&self) -> String {
        pool_toml(&self.pool)
    }

    /// The sandbox CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca/ca.crt")
    }

    fn runtime_now(&self) -> PathBuf {
        self.runtime_override
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| self.runtime.clone())
    }

    /// `ctr run --rm` in the foreground; returns its output. `opts` go before the image
    /// (e.g. `--memory-limit`).
    pub fn run_rm(
        &self,
        id: &str,
        annotations: &[(&str, &str)],
        opts: &[&str],
        cmd: &str,
    ) -> Output {
        // The command's output goes to files in a bind-mounted host directory: ctr's
        // own copy of a short-lived task's output is sometimes empty under load.
        let outdir = self.dir.join(format!("out-{id}"));
        let _ = std::fs::remove_dir_all(&outdir);
        std::fs::create_dir_all(&outdir).unwrap();
        let mut opts = owned(opts);
        opts.push(format!(
            "--mount=type=bind,src={},dst=/.es-out,options=rbind:rw",
            outdir.display()
        ));
        let wrapped = format!(
            "( {cmd} ) >/.es-out/out 2>/.es-out/err; rc=$?; echo $rc >/.es-out/rc; exit $rc"
        );
        let cmd = owned(&["/bin/sh", "-c", &wrapped]);
        let a = run_args("--rm", &self.runtime_now(), id, annotations, &opts, &cmd);
        let mut out = ctr(&strs(&a));
        // A failed create can leave the container record behind.
        ctr(&["containers", "rm", id]);
        if outdir.join("rc").exists() {
            // The task ran: its own output (ctr's report of a failed create stays).
            out.stdout = std::fs::read(outdir.join("out")).unwrap_or_default();
            out.stderr = std::fs::read(outdir.join("err")).unwrap_or_default();
        }
        let _ = std::fs::remove_dir_all(&outdir);
        out
    }

    /// `ctr run --rm ... CMD` as it is (no output capture), killed after 120 s.
    pub fn run_rm_plain(&self, id: &str, annotations: &[(&str, &str)], cmd: &[&str]) -> Output {
        let a = run_args(
            "--rm",
            &self.runtime_now(),
            id,
            annotations,
            &[],
            &owned(cmd),
        );
        ctr_at(&address(), NAMESPACE, 120, &strs(&a))
    }

    /// `ctr run -d ... sleep`: a running container removed when the handle drops.
    pub fn start(&self, id: &str, annotations: &[(&str, &str)], opts: &[&str]) -> Container {
        self.start_cmd(id, annotations, opts, &["/bin/sleep", "3600"])
    }

    /// `ctr run -d ... <cmd>`: a running container removed when the handle drops.
    pub fn start_cmd(
        &self,
        id: &str,
        annotations: &[(&str, &str)],
        opts: &[&str],
        cmd: &[&str],
    ) -> Container {
        let a = run_args(
            "-d",
            &self.runtime_now(),
            id,
            annotations,
            &owned(opts),
            &owned(cmd),
        );
        let out = ctr(&strs(&a));
        let c = Container { id: id.into() };
        assert!(out.status.success(), "ctr run -d {id}: {}", text(&out));
        c
    }

    /// The test app ([`httpd`]) as `id` with the port annotation in `net`, once the
    /// proxy serves it: the container, its state and the proxy's address.
    pub fn start_served(&self, id: &str, net: &Netns) -> (Container, Value, String) {
        let c = self.start_cmd(id, &[(PORTS, "8080")], &[&net.ctr_opt()], &httpd());
        let st = self.inspect(id).unwrap();
        let addr = format!("{}:{}", net.ip, port_of(&st, 0, "internal_tls_proxy"));
        openssl_wait_for(&addr, &self.ca(), id, HELLO);
        (c, st, addr)
    }

    pub fn inspect(&self, id: &str) -> Option<Value> {
        self.inspect_ns(id, NAMESPACE)
    }

    pub fn inspect_ns(&self, id: &str, namespace: &str) -> Option<Value> {
        inspect(&self.config, id, namespace)
    }

    /// `<state_dir>/<namespace>/<id>`.
    pub fn container_dir(&self, namespace: &str, id: &str) -> PathBuf {
        self.state_dir.join(namespace).join(id)
    }

    /// The supervisor's record (`supervisor.json`) of `namespace/id`, if readable.
    pub fn try_record(&self, namespace: &str, id: &str) -> Option<Value> {
        let p = self.container_dir(namespace, id).join("supervisor.json");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    /// The supervisor's record of `namespace/id`; fails the test if there is none.
    pub fn record_ns(&self, namespace: &str, id: &str) -> Value {
        let p = self.container_dir(namespace, id).join("supervisor.json");
        serde_json::from_slice(
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The supervisor's record of `id` in [`NAMESPACE`].
    pub fn record(&self, id: &str) -> Value {
        self.record_ns(NAMESPACE, id)
    }

    /// The supervisor's log of `id` in [`NAMESPACE`] (empty if none).
    pub fn supervisor_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.container_dir(NAMESPACE, id).join("supervisor.log"))
            .unwrap_or_default()
    }

    /// Container directories left in the state store (there should be none at rest).
    pub fn leftovers(&self) -> Vec<String> {
        self.state_entries(NAMESPACE)
    }

    /// Container directories under `<state_dir>/<namespace>`.
    pub fn state_entries(&self, namespace: &str) -> Vec<String> {
        std::fs::read_dir(self.state_dir.join(namespace))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replace the config line starting with `prefix` by `line`.
    pub fn set_config_line(&self, prefix: &str, line: &str) {
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        let new: Vec<String> = cfg
            .lines()
            .map(|l| {
                if l.starts_with(prefix) {
                    line.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert!(new.iter().any(|l| l == line), "{prefix} not in {cfg}");
        std::fs::write(&self.config, new.join("\n") + "\n").unwrap();
    }

    /// Add `line` at the top of the config's table `table` (e.g. `[instance_identity]`).
    /// `line` (`key = value`) at the top of `table`, replacing that key's line there.
    pub fn add_config_line(&self, table: &str, line: &str) {
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        let head = format!("{table}\n");
        assert!(cfg.contains(&head), "{table} not in {cfg}");
        let key = line.split('=').next().unwrap().trim();
        let mut out = Vec::new();
        let mut in_table = false;
        for l in cfg.lines() {
            if l.starts_with('[') {
                in_table = l == table;
            }
            let same_key = l.split('=').next().is_some_and(|k| k.trim() == key);
            if in_table && l.contains('=') && same_key {
                continue;
            }
            out.push(l.to_string());
            if l == table {
                out.push(line.to_string());
            }
        }
        std::fs::write(&self.config, out.join("\n") + "\n").unwrap();
    }
}

/// `[ports]` for `pool`.
pub fn pool_toml(pool: &RangeInclusive<u16>) -> String {
    format!(
        "[ports]\npool_start = {}\npool_end = {}\n",
        pool.start(),
        pool.end()
    )
}

/// `envoy-sidecar --config C inspect ID --namespace NS` (None: no state).
pub fn inspect(config: &Path, id: &str, namespace: &str) -> Option<Value> {
    let out = cli(config)
        .args(["inspect", id, "--namespace", namespace])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("inspect prints JSON"))
}

/// `rec[what].pid` of a supervisor record (`what`: `supervisor` or `envoy`).
pub fn pid_of(rec: &Value, what: &str) -> Option<i32> {
    rec[what]["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
}

/// `st.ports[i][key]` of a container state.
pub fn port_of(st: &Value, i: usize, key: &str) -> u16 {
    st["ports"][i][key]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("{key} missing: {st}"))
}
