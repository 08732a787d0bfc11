//! Everything about one Envoy: its configuration, admin API, readiness probe, sizing.

pub mod admin;
pub mod bootstrap;
pub mod probe;
pub mod sizing;
