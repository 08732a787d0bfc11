//! Fault injection for the reliability suite: `ENVOY_SIDECAR_FAULT_KILL=<point>` makes
//! the process SIGKILL itself when it reaches that named point, so a test can prove
//! that a crash between any two writes leaves nothing handed out twice or leaked.
//! Unset in production (the variable is read only at the points).

/// The points, in the order a create and a remove reach them.
pub const POINTS: [&str; 3] = [
    "create:index-written",
    "create:state-written",
    "remove:index-written",
];

pub fn kill_point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    if std::env::var_os("ENVOY_SIDECAR_FAULT_KILL").is_some_and(|v| v == name) {
        super::process::kill(super::process::self_pid(), libc::SIGKILL);
        // SIGKILL to oneself is delivered before kill(2) returns.
        std::process::abort();
    }
}
