//! The operating-system seam: processes, namespaces, cgroups, files.

pub mod cgroup;
pub mod clock;
pub mod fs;
pub mod process;
