//! The real runc: its command line, its log file, and the questions we ask it.

pub mod argv;
pub mod log;
pub mod query;
