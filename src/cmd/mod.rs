//! The executables' front ends: the only modules that print or exit.

pub mod cli;
pub mod hook;
pub mod wrapper;
