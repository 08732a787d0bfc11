//! envoy-sidecar: a runc-compatible runtime wrapper (and OCI hooks) that gives every
//! container a TLS-terminating Envoy, the way a Cloud Foundry Diego cell does.
//! `docs/ARCHITECTURE.md` explains the layout; this is the map, one line a module.

pub mod cmd; // the executables' front ends (cli, wrapper, hook): the only modules that print
pub mod config; // the operator's TOML configuration and its validation
pub mod create; // create-time decisions: annotations, ports, memory, env, spec patching
pub mod envoy; // one Envoy: bootstrap and SDS, admin API, TLS readiness probe, sizing model
pub mod error; // the crate's one error enum
pub mod host; // the host handle: every side effect behind one bundle of traits (faked in tests)
pub mod identity; // the operator CA and per-container instance identity credentials
pub mod logging; // the product's own log lines (tracing): text or JSON, file, stderr, journal
pub mod metrics; // memory metrics rescaled to the requested quota; Prometheus exporter
pub mod nat; // host port NAT in one nftables verdict map
pub mod ops; // host operations: gc, doctor, install
pub mod runc; // the real runc: argv parsing, its log file, state queries
pub mod sidecar; // the per-container sidecar at run time: control and supervisor
pub mod state; // per-container state on disk and the host-wide lock
pub mod sys; // the OS seam: processes, netns, cgroups, files (the only home of raw syscalls)

pub use error::{Error, Result};

/// File names of the two executables (the wrapper finds the CLI beside itself).
pub const WRAPPER_NAME: &str = "envoy-sidecar-runc";

/// `<crate version> (<git commit>)`, as both binaries' `--version` print it after
/// their name (the commit from `build.rs`: `unknown` outside a git checkout).
pub fn version() -> String {
    format!(
        "{} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("ENVOY_SIDECAR_COMMIT")
    )
}
pub const CLI_NAME: &str = "envoy-sidecar";
