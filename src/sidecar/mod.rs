//! The per-container sidecar at run time: its control from outside, its
//! supervisor, and the supervisor's decisions (policy).

pub mod control;
pub mod ingress_guard;
pub mod logfile;
pub mod policy;
pub mod sandbox;
pub mod status;
pub mod supervisor;
