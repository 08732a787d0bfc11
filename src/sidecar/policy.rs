//! The supervisor's decisions, without effects: when to start Envoy, how long to back
//! off before a restart, when a starting Envoy has had long enough to become ready,
//! when credentials are due for rotation, and when to stop.
//!
//! The supervisor's loop performs effects (spawn, probe, issue, poll, log) and tells
//! the policy what happened ([`Event`]); the policy answers what to do next
//! ([`Action`]) and how long the loop may sleep before it must ask again
//! ([`Policy::next_wake`]). Time comes in only as arguments (monotonic `now` for
//! intervals, `wall` for certificate validity), so every decision is unit-tested
//! with a fake clock.

use std::time::{Duration, Instant, SystemTime};

/// How long a started Envoy has to complete a TLS handshake on every listener before
/// it is killed and restarted.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The pause between probe rounds while Envoy is not ready.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// The first wait before a restart (or a retried start); it doubles on every one.
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// The longest wait before a restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An Envoy that lived this long resets the backoff.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// The wait before retrying a failed rotation.
pub const RETRY_ISSUE: Duration = Duration::from_secs(60);
/// Once a failed liveness check is seen, the pause before the next one.
pub const LIVENESS_RETRY: Duration = Duration::from_secs(2);
/// Failed liveness checks in a row that make Envoy unresponsive: killed, restarted.
pub const LIVENESS_FAILURES: u32 = 3;
/// "No timer": the wait when only an fd can wake the loop.
pub const FOREVER: Duration = Duration::MAX;

/// What happened, as the supervisor's loop tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The container's init exited.
    InitExited,
    /// SIGTERM (or SIGINT) arrived.
    Terminate,
    /// Envoy's process exited (and was collected).
    EnvoyExited,
    /// The wait [`Policy::next_wake`] allowed passed with nothing else happening.
    Timeout,
    /// Envoy was spawned (the answer to [`Action::Start`]).
    Started,
    /// Envoy could not be spawned (the answer to [`Action::Start`]).
    StartFailed,
    /// A probe round finished (the answer to [`Action::Probe`]): whether every
    /// listener has completed a TLS handshake.
    Probed { ready: bool },
    /// Credentials were issued; they are due for rotation at `rotate_at`.
    Issued { rotate_at: SystemTime },
    /// Issuing credentials failed (the answer to [`Action::Rotate`]).
    IssueFailed,
    /// A liveness check finished (the answer to [`Action::Check`]): whether every
    /// listener completed a TLS handshake.
    Checked { alive: bool },
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing now: wait (up to [`Policy::next_wake`]) for the next event.
    Wait,
    /// Start Envoy; answer with [`Event::Started`] or [`Event::StartFailed`].
    Start,
    /// Probe the listeners not yet ready; answer with [`Event::Probed`].
    Probe,
    /// Envoy became ready `after` its start: record it, then wait.
    Ready { after: Duration },
    /// Envoy was not ready after `not_ready_after`: kill it (its exit comes back as
    /// [`Event::EnvoyExited`], and it is restarted).
    Kill { not_ready_after: Duration },
    /// Envoy exited after running for `ran`: count a restart; it starts again
    /// after `backoff`.
    Restart { ran: Duration, backoff: Duration },
    /// Envoy could not be started: it is tried again after `backoff`.
    RetryStart { backoff: Duration },
    /// A running Envoy is due for a liveness check: a TLS handshake on every
    /// listener; answer with [`Event::Checked`].
    Check,
    /// A running Envoy failed `failures` liveness checks in a row (drained, hung,
    /// stopped): kill it (its exit comes back as [`Event::EnvoyExited`], and it is
    /// restarted).
    Unresponsive { failures: u32 },
    /// Credentials are due: issue new ones; answer with [`Event::Issued`] or
    /// [`Event::IssueFailed`].
    Rotate,
    /// Rotation failed: it is tried again `after` this long.
    RetryRotation { after: Duration },
    /// The container is gone or we were told to go: stop Envoy and leave.
    Stop,
}

/// Where Envoy is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No Envoy; the next one is to be started at `at`.
    Down { at: Instant },
    /// [`Action::Start`] was given; waiting for its answer.
    Starting,
    /// Envoy was started at `since` and is not ready yet.
    Probing { since: Instant },
    /// Envoy (started at `since`) is ready.
    Running { since: Instant },
    /// Envoy (started at `since`) was not ready in time and has been killed.
    Killing { since: Instant },
    /// Told to stop; every further event is answered with [`Action::Stop`].
    Stopped,
}

/// The supervisor's state machine.
#[derive(Debug, Clone)]
pub struct Policy {
    phase: Phase,
    /// The wait before the next restart.
    backoff: Duration,
    /// When the credentials are due for rotation (wall clock); `None` before the first
    /// issue.
    rotate_at: Option<SystemTime>,
    /// The pause between liveness checks of a running Envoy; `None`: none.
    liveness: Option<Duration>,
    /// When the next liveness check is due (while running).
    check_at: Option<Instant>,
    /// Liveness checks failed in a row.
    failures: u32,
    /// State of the jitter's generator (see [`Policy::with_jitter`]).
    jitter: u64,
}

impl Policy {
    /// A policy with no Envoy yet, to be started as soon as asked (at `now`).
    pub fn new(now: Instant) -> Policy {
        Policy {
            phase: Phase::Down { at: now },
            backoff: BACKOFF_START,
            rotate_at: None,
            liveness: None,
            check_at: None,
            failures: 0,
            jitter: 0,
        }
    }

    /// Check a running Envoy every `interval` (`[proxy] liveness_interval`); after a
    /// failure every [`LIVENESS_RETRY`], and after [`LIVENESS_FAILURES`] in a row it is
    /// restarted. So a drained, hung or stopped Envoy is back within about
    /// `interval + 2 × LIVENESS_RETRY` plus the handshakes' timeouts and a restart.
    pub fn with_liveness(mut self, interval: Option<Duration>) -> Policy {
        self.liveness = interval;
        self
    }

    /// Spread the liveness checks: each pause is drawn from 75–125 % of the interval
    /// (a generator seeded with `seed`, e.g. the supervisor's pid), so that the checks
    /// of a host's supervisors, started together after a reboot or a restore, do not
    /// stay aligned on the same second. Without it (seed 0) every pause is the interval.
    pub fn with_jitter(mut self, seed: u64) -> Policy {
        self.jitter = seed;
        self
    }

    /// The pause before the next routine liveness check.
    fn next_check(&mut self, now: Instant) -> Option<Instant> {
        let interval = self.liveness?;
        if self.jitter == 0 {
            return Some(now + interval);
        }
        // splitmix64: one step per check; uniform enough for spreading timers.
        self.jitter = self.jitter.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.jitter;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 750..=1250 per mille of the interval.
        let per_mille = 750 + (z % 501) as u32;
        Some(now + interval * per_mille / 1000)
    }

    /// Where Envoy is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the credentials are due for rotation.
    pub fn rotate_at(&self) -> Option<SystemTime> {
        self.rotate_at
    }

    /// Decide what to do about `event`, which happened at `now` (`wall`).
    pub fn on(&mut self, event: Event, now: Instant, wall: SystemTime) -> Action {
        if self.phase == Phase::Stopped {
            return Action::Stop;
        }
        match event {
            Event::InitExited | Event::Terminate => {
                self.phase = Phase::Stopped;
                Action::Stop
            }
            Event::Issued { rotate_at } => {
                self.rotate_at = Some(rotate_at);
                Action::Wait
            }
            Event::IssueFailed => {
                self.rotate_at = Some(wall + RETRY_ISSUE);
                Action::RetryRotation { after: RETRY_ISSUE }
            }
            Event::Started => {
                self.phase = Phase::Probing { since: now };
                Action::Probe
            }
            Event::StartFailed => {
                let backoff = self.take_backoff();
                self.phase = Phase::Down { at: now + backoff };
                Action::RetryStart { backoff }
            }
            Event::Probed { ready } => match self.phase {
                Phase::Probing { since } if ready => {
                    self.phase = Phase::Running { since };
                    self.failures = 0;
                    self.check_at = self.next_check(now);
                    Action::Ready {
                        after: now.saturating_duration_since(since),
                    }
                }
                Phase::Probing { since } => self.check_deadline(since, now, Action::Wait),
                _ => Action::Wait,
            },
            Event::Checked { alive } => match self.phase {
                Phase::Running { .. } if alive => {
                    self.failures = 0;
                    self.check_at = self.next_check(now);
                    Action::Wait
                }
                Phase::Running { since } => {
                    self.failures += 1;
                    if self.failures >= LIVENESS_FAILURES {
                        self.phase = Phase::Killing { since };
                        self.check_at = None;
                        Action::Unresponsive {
                            failures: self.failures,
                        }
                    } else {
                        self.check_at = Some(now + LIVENESS_RETRY);
                        Action::Wait
                    }
                }
                _ => Action::Wait,
            },
            Event::EnvoyExited => match self.phase {
                Phase::Probing { since } | Phase::Running { since } | Phase::Killing { since } => {
                    let ran = now.saturating_duration_since(since);
                    if ran >= HEALTHY_RUN {
                        self.backoff = BACKOFF_START;
                    }
                    let backoff = self.take_backoff();
                    self.phase = Phase::Down { at: now + backoff };
                    Action::Restart { ran, backoff }
                }
                // No Envoy of ours was running: nothing to restart.
                _ => Action::Wait,
            },
            Event::Timeout => match self.phase {
                Phase::Down { at } if now >= at => {
                    self.phase = Phase::Starting;
                    Action::Start
                }
                Phase::Starting => Action::Start,
                Phase::Probing { since } => self.check_deadline(since, now, Action::Probe),
                Phase::Running { .. } if self.rotation_due(wall) => Action::Rotate,
                Phase::Running { .. } if self.check_at.is_some_and(|t| now >= t) => Action::Check,
                _ => Action::Wait,
            },
        }
    }

    /// Liveness checks failed in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The longest the loop may wait for an event before asking again: never past the
    /// next thing due (a start, a probe round, the readiness deadline, a rotation).
    pub fn next_wake(&self, now: Instant, wall: SystemTime) -> Duration {
        match self.phase {
            Phase::Down { at } => at.saturating_duration_since(now),
            Phase::Starting | Phase::Stopped => Duration::ZERO,
            Phase::Probing { since } => {
                PROBE_INTERVAL.min((since + READY_TIMEOUT).saturating_duration_since(now))
            }
            Phase::Running { .. } => {
                let rotate = match self.rotate_at {
                    Some(at) => at.duration_since(wall).unwrap_or(Duration::ZERO),
                    None => FOREVER,
                };
                let check = self
                    .check_at
                    .map_or(FOREVER, |t| t.saturating_duration_since(now));
                rotate.min(check)
            }
            // Only its exit (or ours) is awaited.
            Phase::Killing { .. } => FOREVER,
        }
    }

    /// Past the readiness deadline of an Envoy started at `since`: kill it; else `or`.
    fn check_deadline(&mut self, since: Instant, now: Instant, or: Action) -> Action {
        if now.saturating_duration_since(since) >= READY_TIMEOUT {
            self.phase = Phase::Killing { since };
            Action::Kill {
                not_ready_after: READY_TIMEOUT,
            }
        } else {
            or
        }
    }

    fn rotation_due(&self, wall: SystemTime) -> bool {
        self.rotate_at.is_some_and(|at| wall >= at)
    }

    /// The current backoff, doubling the next one (up to the cap).
    fn take_backoff(&mut self) -> Duration {
        let b = self.backoff;
        self.backoff = (b * 2).min(BACKOFF_MAX);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::clock::{Clock, FakeClock};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A policy driven by a fake clock, the way the supervisor's loop drives it.
    struct Sim {
        clock: FakeClock,
        p: Policy,
    }

    impl Sim {
        /// Credentials issued (rotation due in `rotate_in`), nothing started yet.
        fn new(rotate_in: Duration) -> Sim {
            let clock = FakeClock::new();
            let mut p = Policy::new(clock.now());
            let rotate_at = clock.wall() + rotate_in;
            assert_eq!(
                p.on(Event::Issued { rotate_at }, clock.now(), clock.wall()),
                Action::Wait
            );
            Sim { clock, p }
        }
        fn on(&mut self, e: Event) -> Action {
            self.p.on(e, self.clock.now(), self.clock.wall())
        }
        fn wake(&self) -> Duration {
            self.p.next_wake(self.clock.now(), self.clock.wall())
        }
        fn advance(&self, d: Duration) {
            self.clock.advance(d);
        }
        /// Sleep the whole wait the policy allows, then report the timeout.
        fn sleep(&mut self) -> Action {
            let w = self.wake();
            assert!(w < FOREVER, "nothing due in {:?}", self.p.phase());
            self.advance(w);
            self.on(Event::Timeout)
        }
        /// From Down: wait out the backoff, start Envoy successfully.
        fn start(&mut self) {
            assert_eq!(self.sleep(), Action::Start);
            assert_eq!(self.on(Event::Started), Action::Probe);
        }
        /// From Down: start Envoy and have it ready at once.
        fn start_ready(&mut self) {
            self.start();
            assert_eq!(
                self.on(Event::Probed { ready: true }),
                Action::Ready { after: ms(0) }
            );
        }
        /// Envoy runs for `ran`, then exits; returns the backoff given.
        fn crash_after(&mut self, ran: Duration) -> Duration {
            self.advance(ran);
            match self.on(Event::EnvoyExited) {
                Action::Restart { ran: r, backoff } => {
                    assert_eq!(r, ran);
                    backoff
                }
                a => panic!("EnvoyExited -> {a:?}"),
            }
        }
    }

    #[test]
    fn first_start_is_immediate_and_probing_begins_at_once() {
        let mut s = Sim::new(secs(3600));
        assert_eq!(s.wake(), Duration::ZERO);
        assert_eq!(s.on(Event::Timeout), Action::Start);
        assert_eq!(s.p.phase(), Phase::Starting);
        assert_eq!(s.on(Event::Started), Action::Probe);
        assert_eq!(
            s.p.phase(),
            Phase::Probing {
                since: s.clock.now()
            }
        );
    }

    #[test]
    fn backoff_doubles_from_half_a_second_up_to_the_cap() {
        let mut s = Sim::new(secs(24 * 3600));
        let mut waits = Vec::new();
        for _ in 0..10 {
            s.start_ready();
            let b = s.crash_after(secs(1));
            assert_eq!(s.wake(), b, "the loop waits exactly the backoff");
            waits.push(b);
        }
        let want: Vec<Duration> = [
            500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000,
        ]
        .into_iter()
        .map(ms)
        .collect();
        assert_eq!(waits, want);
    }

    #[test]
    fn restart_waits_out_the_backoff_before_starting() {
        let mut s = Sim::new(secs(3600));
        s.start_ready();
        assert_eq!(s.crash_after(secs(1)), ms(500));
        s.advance(ms(499));
        assert_eq!(
            s.on(Event::Timeout),
            Action::Wait,
            "an early wake-up starts nothing"
        );
        assert_eq!(s.wake(), ms(1));
        s.advance(ms(1));
        assert_eq!(s.on(Event::Timeout), Action::Start);
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let mut s = Sim::new(secs(24 * 3600));
        s.start_ready();
        assert_eq!(s.crash_after(secs(1)), ms(500));
        s.start_ready();
        assert_eq!(s.crash_after(secs(1)), secs(1));
        s.start_ready();
        assert_eq!(s.crash_after(HEALTHY_RUN), ms(500), "a 60 s run resets");
        s.start_ready();
        assert_eq!(s.crash_after(secs(1)), secs(1), "and doubling starts over");
    }

    #[test]
    fn a_run_just_short_of_healthy_keeps_the_backoff() {
        let mut s = Sim::new(secs(24 * 3600));
        s.start_ready();
        assert_eq!(s.crash_after(secs(1)), ms(500));
        s.start_ready();
        assert_eq!(s.crash_after(HEALTHY_RUN - ms(1)), secs(1));
        s.start_ready();
        assert_eq!(s.crash_after(HEALTHY_RUN - ms(1)), secs(2));
    }

    #[test]
    fn a_failed_start_is_retried_with_growing_backoff() {
        let mut s = Sim::new(secs(3600));
        let mut waits = Vec::new();
        for _ in 0..4 {
            assert_eq!(s.sleep(), Action::Start);
            match s.on(Event::StartFailed) {
                Action::RetryStart { backoff } => waits.push(backoff),
                a => panic!("StartFailed -> {a:?}"),
            }
            assert_eq!(s.wake(), *waits.last().unwrap());
        }
        assert_eq!(waits, [ms(500), secs(1), secs(2), secs(4)]);
        // Start failures and crashes share one backoff.
        s.start_ready();
        assert_eq!(s.crash_after(secs(1)), secs(8));
    }

    #[test]
    fn not_ready_after_the_timeout_is_killed_and_restarted() {
        let mut s = Sim::new(secs(3600));
        s.start();
        let started = s.clock.now();
        let mut probes = 0;
        let kill = loop {
            assert!(probes < 1000, "still probing after {probes} rounds");
            assert!(s.wake() <= PROBE_INTERVAL);
            match s.on(Event::Probed { ready: false }) {
                Action::Wait => {}
                a => break a,
            }
            match s.sleep() {
                Action::Probe => probes += 1,
                a => break a,
            }
        };
        assert_eq!(
            kill,
            Action::Kill {
                not_ready_after: READY_TIMEOUT
            }
        );
        assert_eq!(s.clock.now() - started, READY_TIMEOUT, "not a moment early");
        // A round every 20 ms after the first, up to the deadline.
        assert_eq!(
            probes,
            READY_TIMEOUT.as_millis() / PROBE_INTERVAL.as_millis() - 1
        );
        // Killed: only its exit is awaited (a timeout does not kill or probe again) ...
        assert_eq!(s.wake(), FOREVER);
        assert_eq!(s.on(Event::Timeout), Action::Wait);
        // ... and then it is restarted like any Envoy that exited.
        s.advance(ms(5));
        assert_eq!(
            s.on(Event::EnvoyExited),
            Action::Restart {
                ran: READY_TIMEOUT + ms(5),
                backoff: ms(500)
            }
        );
    }

    #[test]
    fn a_slow_probe_round_past_the_deadline_kills_at_once() {
        let mut s = Sim::new(secs(3600));
        s.start();
        s.advance(READY_TIMEOUT + ms(400));
        assert_eq!(
            s.on(Event::Probed { ready: false }),
            Action::Kill {
                not_ready_after: READY_TIMEOUT
            }
        );
    }

    #[test]
    fn ready_before_the_timeout_stops_probing() {
        let mut s = Sim::new(secs(3600));
        s.start();
        assert_eq!(s.on(Event::Probed { ready: false }), Action::Wait);
        assert_eq!(s.sleep(), Action::Probe);
        s.advance(READY_TIMEOUT - ms(21));
        assert_eq!(
            s.on(Event::Probed { ready: true }),
            Action::Ready {
                after: READY_TIMEOUT - ms(1)
            }
        );
        // Past the deadline now, but ready: no probe, no kill; next is the rotation.
        s.advance(secs(1));
        assert_eq!(s.on(Event::Timeout), Action::Wait);
        assert!(s.wake() > secs(3500));
    }

    #[test]
    fn rotation_is_due_at_the_issued_time_and_success_re_arms() {
        let mut s = Sim::new(secs(600));
        s.start_ready();
        assert_eq!(s.wake(), secs(600));
        s.advance(secs(599));
        assert_eq!(s.on(Event::Timeout), Action::Wait, "not due yet");
        assert_eq!(s.wake(), secs(1));
        s.advance(secs(1));
        assert_eq!(s.on(Event::Timeout), Action::Rotate);
        let rotate_at = s.clock.wall() + secs(900);
        assert_eq!(s.on(Event::Issued { rotate_at }), Action::Wait);
        assert_eq!(
            s.p.phase(),
            Phase::Running {
                since: s.clock.now() - secs(600)
            }
        );
        assert_eq!(s.wake(), secs(900));
        assert_eq!(s.on(Event::Timeout), Action::Wait);
    }

    #[test]
    fn liveness_checks_a_running_envoy_and_restarts_an_unresponsive_one() {
        let mut s = Sim::new(secs(86_400));
        s.p = s.p.clone().with_liveness(Some(secs(10)));
        s.start_ready();
        // Due every 10 s while it answers.
        assert_eq!(s.wake(), secs(10));
        assert_eq!(s.sleep(), Action::Check);
        assert_eq!(s.on(Event::Checked { alive: true }), Action::Wait);
        assert_eq!(s.wake(), secs(10));
        // One failure: checked again sooner; an answer resets the count.
        assert_eq!(s.sleep(), Action::Check);
        assert_eq!(s.on(Event::Checked { alive: false }), Action::Wait);
        assert_eq!(s.wake(), LIVENESS_RETRY);
        assert_eq!(s.sleep(), Action::Check);
        assert_eq!(s.on(Event::Checked { alive: true }), Action::Wait);
        assert_eq!(s.p.failures(), 0);
        // Three in a row: killed (status: Killing = degraded), restarted with backoff.
        for n in 1..LIVENESS_FAILURES {
            assert_eq!(s.sleep(), Action::Check);
            assert_eq!(s.on(Event::Checked { alive: false }), Action::Wait, "{n}");
        }
        assert_eq!(s.sleep(), Action::Check);
        assert_eq!(
            s.on(Event::Checked { alive: false }),
            Action::Unresponsive {
                failures: LIVENESS_FAILURES
            }
        );
        assert!(matches!(s.p.phase(), Phase::Killing { .. }));
        assert_eq!(s.wake(), FOREVER, "only Envoy's exit is awaited");
        assert!(matches!(s.on(Event::EnvoyExited), Action::Restart { .. }));
        s.start_ready();
        assert_eq!(s.p.failures(), 0);
        assert_eq!(s.wake(), secs(10));
    }

    #[test]
    fn jittered_checks_stay_within_a_quarter_of_the_interval_and_spread() {
        let mut waits = Vec::new();
        for seed in 1..=50u64 {
            let mut s = Sim::new(secs(86_400));
            s.p = s.p.clone().with_liveness(Some(secs(30))).with_jitter(seed);
            s.start_ready();
            for _ in 0..4 {
                let w = s.wake();
                assert!((ms(22_500)..=ms(37_500)).contains(&w), "seed {seed}: {w:?}");
                waits.push(w);
                assert_eq!(s.sleep(), Action::Check);
                assert_eq!(s.on(Event::Checked { alive: true }), Action::Wait);
            }
            // A failure is retried after LIVENESS_RETRY, not jittered.
            assert_eq!(s.sleep(), Action::Check);
            assert_eq!(s.on(Event::Checked { alive: false }), Action::Wait);
            assert_eq!(s.wake(), LIVENESS_RETRY);
        }
        // Spread over the range (not all on one value), mean near the interval.
        let (lo, hi) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*lo < ms(25_000) && *hi > ms(35_000), "{lo:?} {hi:?}");
        let mean = waits.iter().sum::<Duration>() / u32::try_from(waits.len()).unwrap();
        assert!((ms(28_500)..=ms(31_500)).contains(&mean), "{mean:?}");
    }

    #[test]
    fn without_liveness_a_running_envoy_is_left_alone() {
        let mut s = Sim::new(secs(86_400));
        s.start_ready();
        assert_eq!(s.wake(), secs(86_400));
        // A stray answer changes nothing.
        assert_eq!(s.on(Event::Checked { alive: false }), Action::Wait);
        assert!(matches!(s.p.phase(), Phase::Running { .. }));
    }

    #[test]
    fn a_failed_rotation_is_retried_after_a_minute() {
        let mut s = Sim::new(secs(10));
        s.start_ready();
        assert_eq!(s.sleep(), Action::Rotate);
        assert_eq!(
            s.on(Event::IssueFailed),
            Action::RetryRotation { after: RETRY_ISSUE }
        );
        assert_eq!(s.wake(), RETRY_ISSUE);
        s.advance(RETRY_ISSUE - ms(1));
        assert_eq!(s.on(Event::Timeout), Action::Wait);
        s.advance(ms(1));
        assert_eq!(s.on(Event::Timeout), Action::Rotate);
    }

    #[test]
    fn rotation_waits_for_a_ready_envoy() {
        // Due while Envoy is still starting: the rotation comes once it is ready.
        let mut s = Sim::new(ms(10));
        s.start();
        s.advance(ms(30));
        assert_eq!(s.on(Event::Probed { ready: false }), Action::Wait);
        assert_eq!(s.sleep(), Action::Probe);
        assert!(matches!(
            s.on(Event::Probed { ready: true }),
            Action::Ready { .. }
        ));
        assert_eq!(s.wake(), Duration::ZERO, "overdue");
        assert_eq!(s.on(Event::Timeout), Action::Rotate);
    }

    #[test]
    fn init_exit_or_sigterm_stops_in_every_phase() {
        type Setup = fn(&mut Sim);
        let phases: [(&str, Setup); 6] = [
            ("before the first start", |_| {}),
            ("starting", |s| assert_eq!(s.sleep(), Action::Start)),
            ("probing", |s| s.start()),
            ("running", |s| s.start_ready()),
            ("backing off", |s| {
                s.start_ready();
                s.crash_after(secs(1));
            }),
            ("killing", |s| {
                s.start();
                s.advance(READY_TIMEOUT);
                assert!(matches!(s.on(Event::Timeout), Action::Kill { .. }));
            }),
        ];
        for (name, setup) in phases {
            for stop in [Event::InitExited, Event::Terminate] {
                let mut s = Sim::new(secs(3600));
                setup(&mut s);
                assert_eq!(s.on(stop), Action::Stop, "{stop:?} while {name}");
                assert_eq!(s.p.phase(), Phase::Stopped);
                // Nothing afterwards starts anything again.
                for e in [Event::Timeout, Event::EnvoyExited, Event::Started] {
                    assert_eq!(s.on(e), Action::Stop, "{e:?} after {stop:?} while {name}");
                }
                assert_eq!(s.wake(), Duration::ZERO);
            }
        }
    }

    #[test]
    fn an_exit_with_no_envoy_running_is_ignored() {
        let mut s = Sim::new(secs(3600));
        assert_eq!(s.on(Event::EnvoyExited), Action::Wait);
        s.start_ready();
        s.crash_after(secs(1));
        assert_eq!(s.on(Event::EnvoyExited), Action::Wait, "while backing off");
        assert_eq!(s.wake(), ms(500));
    }

    #[test]
    fn next_wake_is_never_past_what_is_due() {
        // Backing off: the rest of the backoff.
        let mut s = Sim::new(secs(100));
        s.start_ready();
        s.crash_after(secs(1));
        s.advance(ms(200));
        assert_eq!(s.wake(), ms(300));
        s.advance(secs(5));
        assert_eq!(s.wake(), Duration::ZERO, "overdue start");
        // Starting: the answer is awaited at once.
        assert_eq!(s.on(Event::Timeout), Action::Start);
        assert_eq!(s.wake(), Duration::ZERO);
        // Probing: the next round, but never past the readiness deadline.
        assert_eq!(s.on(Event::Started), Action::Probe);
        assert_eq!(s.wake(), PROBE_INTERVAL);
        s.advance(READY_TIMEOUT - ms(7));
        assert_eq!(s.wake(), ms(7));
        // Running: the rotation (wall clock), whether far, near or overdue.
        assert!(matches!(
            s.on(Event::Probed { ready: true }),
            Action::Ready { .. }
        ));
        let rotate_at = s.p.rotate_at().unwrap();
        assert_eq!(s.wake(), rotate_at.duration_since(s.clock.wall()).unwrap());
        s.advance(s.wake() - ms(1));
        assert_eq!(s.wake(), ms(1));
        s.advance(secs(1));
        assert_eq!(s.wake(), Duration::ZERO, "overdue rotation");
        // Killed: nothing is due but its exit.
        let mut k = Sim::new(secs(100));
        k.start();
        k.advance(READY_TIMEOUT);
        assert!(matches!(k.on(Event::Timeout), Action::Kill { .. }));
        assert_eq!(k.wake(), FOREVER);
    }
}
