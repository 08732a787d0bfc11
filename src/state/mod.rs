//! Per-container state on disk and the host-wide allocation lock.

pub mod store;
