//! Where one container's files live under `<state_dir>/<namespace>/<id>/`.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::state::record::Record;
use crate::state::store::Store;
use crate::sys::fs as fsutil;

pub const RECORD_FILE: &str = "supervisor.json";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
pub const ENVOY_LOG: &str = "envoy.log";
pub const ENVOY_DIR: &str = "envoy";
pub const BOOTSTRAP_FILE: &str = "bootstrap.json";
pub const SDS_DIR: &str = "sds";
pub const NAT_FILE: &str = "nat.json";

/// Under `<state_dir>`: one directory per Envoy uid holding its admin socket.
pub const ADMIN_DIR: &str = ".admin";
pub const ADMIN_SOCKET: &str = "admin.sock";
/// Under `<state_dir>`: `<namespace>/<member id>` files, each naming the pod record
/// that lists that container (see `Store::pod_of_member`).
pub const POD_MARKERS_DIR: &str = ".pods";
/// The longest unix socket path the kernel takes (`sun_path` is 108 bytes with NUL).
pub const SUN_PATH_MAX: usize = 107;

/// Envoy's admin socket: `<state_dir>/.admin/<envoy uid>/admin.sock`. Not under the
/// container's directory, whose path (namespace up to 76 bytes, id up to 255) would
/// not fit `sun_path`; this one is at most `state_dir` + 29 bytes. The uid is unique
/// among live containers, so is the path. The directory is the Envoy uid's, mode
/// 0700: only it and root (the wrapper, the supervisor) reach the socket, and nothing
/// under `<state_dir>` is mounted into a container.
pub fn admin_socket(state_dir: &Path, envoy_uid: u32) -> PathBuf {
    state_dir
        .join(ADMIN_DIR)
        .join(envoy_uid.to_string())
        .join(ADMIN_SOCKET)
}

/// Paths of one container's sidecar.
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(store: &Store, ns: &str, id: &str) -> Paths {
        Paths {
            dir: store.dir(ns, id),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join(SUPERVISOR_LOG)
    }
    pub fn envoy_log(&self) -> PathBuf {
        self.dir.join(ENVOY_LOG)
    }
    pub fn envoy_dir(&self) -> PathBuf {
        self.dir.join(ENVOY_DIR)
    }
    pub fn bootstrap(&self) -> PathBuf {
        self.envoy_dir().join(BOOTSTRAP_FILE)
    }
    pub fn sds_dir(&self) -> PathBuf {
        self.envoy_dir().join(SDS_DIR)
    }
    pub fn nat(&self) -> PathBuf {
        self.dir.join(NAT_FILE)
    }

    pub fn read_record(&self) -> Result<Option<Record>> {
        fsutil::read_json_or_none(&self.record(), "supervisor record")
    }

    pub fn write_record(&self, r: &Record) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(r).expect("record serialises");
        fsutil::write_atomic(&self.record(), &bytes, 0o600)
    }
}
