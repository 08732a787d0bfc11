//! Envoy uids are unique host-wide: two configurations with separate state
//! directories (each with its own allocation index) never give two containers' Envoys
//! the same uid — an Envoy uid can read its container's private key. Real containers,
//! real Envoys; the uids are read from the running processes.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;

/// The real uid of a running process.
fn uid_of(pid: i64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn two_configs_with_separate_state_dirs_never_share_an_envoy_uid() {
    if !can_run("two_configs_with_separate_state_dirs_never_share_an_envoy_uid") {
        return;
    }
    // Same (default) uid pool, separate state dirs: each index starts empty.
    let a = Sandbox::new("uids-a", "", "");
    let b = Sandbox::new("uids-b", "", "");
    assert_ne!(a.state_dir, b.state_dir);
    let (na, nb) = (a.slot.netns(0), b.slot.netns(0));
    let (_ca, sa, _) = a.start_served("es-uids-a", &na);
    let (_cb, sb_state, _) = b.start_served("es-uids-b", &nb);
    let (ua, ub) = (
        sa["envoy_uid"].as_u64().unwrap() as u32,
        sb_state["envoy_uid"].as_u64().unwrap() as u32,
    );
    assert_ne!(ua, ub, "both configurations handed out Envoy uid {ua}");
    let pa = a.record("es-uids-a")["envoy"]["pid"].as_i64().unwrap();
    let pb = b.record("es-uids-b")["envoy"]["pid"].as_i64().unwrap();
    assert_eq!(uid_of(pa), ua);
    assert_eq!(uid_of(pb), ub);
}
