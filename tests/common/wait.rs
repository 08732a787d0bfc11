//! Waiting for a state instead of sleeping: [`wait_until`] polls an observation with a
//! short interval and, on time-out, fails the test naming what it waited for and the
//! last thing it saw.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often [`wait_until`] looks.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// What a polled closure returns: ready (with a value), or not yet (with what it saw).
pub trait Observation {
    type Ready;
    fn ready(self) -> Result<Self::Ready, String>;
}

impl Observation for bool {
    type Ready = ();
    fn ready(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T> Observation for Option<T> {
    type Ready = T;
    fn ready(self) -> Result<T, String> {
        self.ok_or_else(|| "None".into())
    }
}

/// `Err` carries the observation (e.g. the last output) for the failure message.
impl<T, E: Display> Observation for Result<T, E> {
    type Ready = T;
    fn ready(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Poll `f` every [`INTERVAL`] until it is ready; panics with `what` and the last
/// observation after `timeout`.
pub fn wait_until<O: Observation>(what: &str, timeout: Duration, f: impl FnMut() -> O) -> O::Ready {
    wait_until_every(what, timeout, INTERVAL, f)
}

/// [`wait_until`] with another interval (tight for a measurement, wide for a costly
/// probe).
pub fn wait_until_every<O: Observation>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    f: impl FnMut() -> O,
) -> O::Ready {
    match poll(timeout, interval, f) {
        Ok(v) => v,
        Err(last) => panic!("{what}: not within {timeout:?}; last seen:\n{last}"),
    }
}

/// The same loop without the panic (for clean-up paths and for callers that report
/// many waits at once): `Err` is the last observation.
pub fn poll<O: Observation>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> O,
) -> Result<O::Ready, String> {
    let start = Instant::now();
    loop {
        match f().ready() {
            Ok(v) => return Ok(v),
            Err(seen) if start.elapsed() >= timeout => return Err(seen),
            Err(_) => std::thread::sleep(interval),
        }
    }
}

/// Poll `f` (at most 10 s: asynchronous exits of shims and supervisors) until it
/// returns nothing; returns what is still there (the caller asserts on it).
pub fn settled<T>(f: impl Fn() -> Vec<T>) -> Vec<T> {
    let mut last = Vec::new();
    let _ = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        last = f();
        last.is_empty()
    });
    last
}
