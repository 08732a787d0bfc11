//! The harness itself (tests/common): the slot registry hands out disjoint resources
//! and holds a slot against other processes, and `wait_until` waits or fails saying
//! what it saw. No root needed.
// Test code: the [lints] table's cast lints guard the product, not test arithmetic.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::slots::{self, LINKS};
use common::{poll, wait_until};

#[test]
fn slots_in_use_are_distinct_and_disjoint() {
    let (a, b) = (slots::next(), slots::next());
    assert_ne!(a.index(), b.index());
    let (pa, pb) = (a.pool(slots::POOL_MAX), b.pool(slots::POOL_MAX));
    assert!(
        pa.end() < pb.start() || pb.end() < pa.start(),
        "{pa:?} {pb:?}"
    );
    let (ta, tb) = (a.tcp_port(), b.tcp_port());
    assert!(!pa.contains(&ta) && !pb.contains(&ta) && !pb.contains(&tb) && ta != tb);
    assert!(ta < 32768 && tb < 32768, "below the ephemeral range");
    let mut names = Vec::new();
    let mut addrs = Vec::new();
    for s in [&a, &b] {
        for k in 0..LINKS {
            let (ns, veth, host, peer) = s.link(k);
            assert!(veth.len() <= 15, "{veth}: too long for an interface");
            names.extend([ns, veth]);
            addrs.extend([host, peer]);
        }
        names.push(s.bridge().0);
        addrs.push(s.unrouted_address());
    }
    for v in [&names, &addrs] {
        let mut d = v.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), v.len(), "{v:?}");
    }
    assert!(
        addrs.iter().all(|a| !a.starts_with("192.0.2.")),
        "never the host's 192.0.2.0/24: {addrs:?}"
    );
    let index = a.index();
    assert!(slots::try_take(index).is_none(), "held in this process");
    let clone = a.clone();
    drop(a);
    assert!(slots::try_take(index).is_none(), "held while a clone lives");
    drop(clone);
    let again = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        slots::try_take(index)
    });
    assert!(again.is_ok(), "slot {index} free again once dropped");
}

/// Run by `a_slot_is_held_against_other_processes` in a child process: takes a slot,
/// prints its index and holds it until stdin closes.
#[test]
#[ignore = "run by a_slot_is_held_against_other_processes"]
fn slot_holder_child() {
    let s = slots::next();
    println!("holding-slot={}", s.index());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_slot_is_held_against_other_processes() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "slot_holder_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let index: u32 = out
        .by_ref()
        .map_while(Result::ok)
        // (after libtest's "test slot_holder_child ... " on the same line)
        .find_map(|l| l.split_once("holding-slot=")?.1.trim().parse().ok())
        .expect("the child's slot");
    assert!(
        slots::try_take(index).is_none(),
        "slot {index} taken while another process holds it"
    );
    drop(child.stdin.take());
    out.for_each(drop); // the rest of the child's output, to its end
    assert!(child.wait().unwrap().success());
    let again = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        slots::try_take(index)
    });
    assert!(again.is_ok(), "slot {index} free once its holder exited");
}

#[test]
fn wait_until_returns_what_it_waited_for() {
    let start = Instant::now();
    let v = wait_until("three looks", Duration::from_secs(5), || {
        (start.elapsed() > Duration::from_millis(120)).then_some(7)
    });
    assert_eq!(v, 7);
    wait_until("a bool", Duration::from_secs(1), || true);
}

#[test]
#[should_panic(expected = "the answer: not within 200ms; last seen:\nstill 41")]
fn wait_until_fails_with_what_and_the_last_observation() {
    wait_until("the answer", Duration::from_millis(200), || {
        Err::<(), _>("still 41")
    });
}
