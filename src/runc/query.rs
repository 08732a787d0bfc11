//! The real runc, run as a child for the questions the product asks it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Whether runc knows container `id` (`runc <global flags> state <id>` succeeds).
/// `global` are runc's global flags as the caller was given them (`--root R`, ...).
pub fn knows<S: AsRef<OsStr>>(runc: &Path, global: &[S], id: &str) -> bool {
    Command::new(runc)
        .args(global)
        .args(["state", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
