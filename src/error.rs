//! The library's one error type. Every variant names the file, key or annotation at
//! fault so the message can go straight to the operator (or, through runc's log file,
//! to the `ctr`/`nerdctl` user) without more context.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operator configuration is unusable: `key` is the dotted TOML key.
    #[error("config {path}: {key}: {msg}")]
    Config {
        path: String,
        key: String,
        msg: String,
    },

    /// The TOML itself does not parse (or has unknown keys).
    #[error("config {path}: {msg}")]
    ConfigSyntax { path: String, msg: String },

    /// A container annotation carries a value we cannot use.
    #[error("annotation {key}={value:?}: {msg}")]
    Annotation {
        key: String,
        value: String,
        msg: String,
    },

    /// The OCI spec (`config.json` or an exec `process.json`) is not what runc accepts.
    #[error("OCI spec {path}: {msg}")]
    Spec { path: PathBuf, msg: String },

    /// runc's command line as given to the wrapper.
    #[error("runc arguments: {0}")]
    Args(String),

    /// Not enough proxy or host ports to satisfy a container.
    #[error("ports: {0}")]
    Ports(String),

    /// Creating the container would overcommit `[host] memory_capacity_mb`.
    #[error("memory: {0}")]
    Memory(String),

    /// A per-container state file is unreadable or malformed.
    #[error("state {path}: {msg}")]
    State { path: PathBuf, msg: String },

    /// nftables / conntrack: host port NAT could not be applied or removed.
    #[error("NAT: {0}")]
    Nat(String),

    /// Reading or reporting container metrics (containerd's task metrics API).
    #[error("metrics: {0}")]
    Metrics(String),

    /// The OCI state JSON a hook receives on stdin.
    #[error("hook: {0}")]
    Hook(String),

    /// Instance identity: the operator CA, issuing a certificate, or writing it out.
    /// The message names the file at fault.
    #[error("instance identity: {0}")]
    Identity(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach the path to an `io::Error`, the context operators need most.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
