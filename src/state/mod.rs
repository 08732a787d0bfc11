//! Per-container state on disk: the container record the wrapper writes at create,
//! the supervisor's record, where each file lives, and the host-wide lock.

pub mod index;
pub mod layout;
pub mod leases;
pub mod record;
pub mod store;
