//! The per-container sidecar at run time: its control from outside and its supervisor.

pub mod control;
pub mod supervisor;
