//! Where one container's files live under `<state_dir>/<namespace>/<id>/`.

use std::path::PathBuf;

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
