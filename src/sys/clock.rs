//! Time, behind a seam: decisions take their "now" from a `Clock`, so policies
//! (restart backoff, rotation, grace periods) are unit-tested with a fake one.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime};

pub trait Clock {
    /// Monotonic time, for intervals.
    fn now(&self) -> Instant;
    /// Wall-clock time, for certificate validity and recorded timestamps.
    fn wall(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (`advance`); both readings move together.
#[derive(Debug)]
pub struct FakeClock {
    mono: Cell<Instant>,
    wall: Cell<SystemTime>,
}

impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock {
            mono: Cell::new(Instant::now()),
            wall: Cell::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
        }
    }
    pub fn advance(&self, d: Duration) {
        self.mono.set(self.mono.get() + d);
        self.wall.set(self.wall.get() + d);
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.mono.get()
    }
    fn wall(&self) -> SystemTime {
        self.wall.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_advanced() {
        let c = FakeClock::new();
        let (m, w) = (c.now(), c.wall());
        assert_eq!(c.now(), m);
        c.advance(Duration::from_secs(3));
        assert_eq!(c.now() - m, Duration::from_secs(3));
        assert_eq!(c.wall().duration_since(w).unwrap(), Duration::from_secs(3));
    }
}
