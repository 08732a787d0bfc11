//! Harness for the integration tests: the private containerd that
//! `tests/env/containerd.sh` runs, a per-test sandbox (config, CA, state directory,
//! wrapper script), container handles that clean up after themselves, networks and
//! ports from one registry, and waiting for states instead of sleeping.
//!
//! | module | what |
//! | --- | --- |
//! | `containerd` | `ctr`, the socket address, `can_run` (root, containerd up) |
//! | `sandbox` | `Sandbox`: config, CA, state dir, wrapper script; supervisor records |
//! | `container` | `Container` handle, `env_map`, memory cgroup, the test app |
//! | `net` | `Netns`, `CniNet`, `Router`, the NAT map |
//! | `slots` | the registry: addresses, names, host port pools, TCP ports |
//! | `tls` | openssl `s_client` requests and openssl-made certificates |
//! | `direct` | `DirectRun`: the wrapper driven as runc, without containerd |
//! | `fake_runc` | a recording stand-in for runc, and the wrapper in front of it |
//! | `footprint` | what a sandbox holds on the host, and guards that take it back |
//! | `wait` | `wait_until` and friends |
//! | `util` | binaries, output, scripts, temporary directories, processes |
//!
//! Test files `use common::*;` (and `common::footprint::*` for the footprint helpers).
#![allow(dead_code, unused_imports)]

pub mod container;
pub mod containerd;
pub mod direct;
pub mod engine;
pub use engine::*;
pub mod fake_runc;
pub mod footprint;
pub mod load;
pub mod net;
pub mod sandbox;
pub mod slots;
pub mod tls;
pub mod util;
pub mod wait;

pub use container::*;
pub use containerd::*;
pub use direct::*;
pub use fake_runc::*;
pub use load::*;
pub use net::*;
pub use sandbox::*;
pub use slots::Slot;
pub use tls::*;
pub use util::*;
pub use wait::*;
