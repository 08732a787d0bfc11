//! Host operations: garbage collection, health checks, installation.

pub mod doctor;
pub mod gc;
pub mod install;
pub mod logs;
pub mod registration;
pub mod status;
