//! envoy-sidecar: a runc-compatible runtime wrapper (and OCI hooks) that gives every
//! container a TLS-terminating Envoy, the way a Cloud Foundry Diego cell does.
//!
//! Modules by concern: `config` (operator TOML), `annotations` (what a container asks
//! for), `ports` (port selection), `store` (per-container state and allocation),
//! `spec` (JSON-tree patching of OCI files), `create` (the create-time decisions),
//! `envoy_config` (the per-container Envoy bootstrap, SDS file and command line),
//! `runc_args`/`runc_log`/`wrapper` (the drop-in runc), `hook` (OCI hook stages),
//! `ca`/`identity` (the operator CA and per-container certificates), `cli` (the
//! operator command).

pub mod admin;
pub mod annotations;
pub mod ca;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod create;
pub mod doctor;
pub mod envoy_config;
pub mod error;
pub mod exporter;
pub mod fsutil;
pub mod gc;
pub mod hook;
pub mod identity;
pub mod install;
pub mod metrics;
pub mod nat;
pub mod pem_check;
pub mod ports;
pub mod probe;
pub mod process;
pub mod runc;
pub mod runc_args;
pub mod runc_log;
pub mod sidecar;
pub mod sizing;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod wrapper;

pub use error::{Error, Result};

/// File names of the two executables (the wrapper finds the CLI beside itself).
pub const WRAPPER_NAME: &str = "envoy-sidecar-runc";
pub const CLI_NAME: &str = "envoy-sidecar";
