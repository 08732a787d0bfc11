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

    /// A Kubernetes pod's containers and the one proxy of the pod disagree.
    #[error("pod: {0}")]
    Pod(String),

    /// Creating the container would overcommit `[host] memory_capacity_mb`.
    #[error("memory: {0}")]
    Memory(String),

    /// A per-container state file is unreadable or malformed.
    #[error("state {path}: {msg}")]
    State { path: PathBuf, msg: String },

    /// nf_tables / conntrack: host port NAT could not be applied or removed.
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

    /// A cryptographic operation (key generation, signing, encoding) failed; `what`
    /// says which and for whom.
    #[error("{what}: {source}")]
    Crypto {
        what: String,
        #[source]
        source: BoxError,
    },

    /// The pool of Envoy uids (`proxy.envoy_uid_pool_*`) has none free.
    #[error("Envoy uid pool: {0}")]
    UidPool(String),

    /// Envoy's Landlock sandbox could not be built: the message names the path of the
    /// rule at fault (or the kernel's reason) and what is needed there.
    #[error("Envoy sandbox: {0}")]
    Sandbox(String),

    /// The per-container supervisor cannot set up or run the proxy.
    #[error("supervisor of {container}: {msg}")]
    Supervisor { container: String, msg: String },

    /// A process could not be started, entered or signalled; `what` names it.
    #[error("{what}: {source}")]
    Process {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A library's own error, kept as the source of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    pub fn crypto(what: impl Into<String>, source: impl Into<BoxError>) -> Error {
        Error::Crypto {
            what: what.into(),
            source: source.into(),
        }
    }

    pub fn process(what: impl Into<String>, source: io::Error) -> Error {
        Error::Process {
            what: what.into(),
            source,
        }
    }
}

/// The whole chain of an error on one line, `outer: cause: root cause`, with a cause
/// left out where the outer message already ends with it (our variants print their
/// source). The one rendering used for runc's log and the CLI's stderr.
pub fn render(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_chained_and_rendered_once() {
        let e = Error::process(
            "starting proxy.envoy_path /x",
            io::Error::from(io::ErrorKind::NotFound),
        );
        let src = std::error::Error::source(&e).expect("a source");
        assert_eq!(src.to_string(), "entity not found");
        assert_eq!(render(&e), "starting proxy.envoy_path /x: entity not found");

        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Error);
        let o = Outer(e);
        assert_eq!(
            render(&o),
            "outer: starting proxy.envoy_path /x: entity not found"
        );
    }

    #[test]
    fn crypto_keeps_the_library_error() {
        let e = Error::crypto("generating a p256 key", "rng failed");
        assert_eq!(render(&e), "generating a p256 key: rng failed");
        assert!(std::error::Error::source(&e).is_some());
    }
}
