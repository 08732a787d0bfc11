//! The operating-system seam: processes, namespaces, cgroups, files.

pub mod cgroup;
pub mod clock;
pub mod exec;
pub mod fault;
pub mod fs;
pub mod landlock;
pub mod listeners;
pub mod netns;
pub mod nfnetlink;
pub mod pagecache;
pub mod process;
