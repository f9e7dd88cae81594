//! GCRA (the generic cell rate algorithm) over one atomic: a limit of N units per window (a
//! minute, or an hour for spend) is a theoretical arrival time (TAT) that each admitted unit
//! pushes forward by window/N, and a request is admitted while the TAT stays within one
//! window of now. Unlike a fixed window it
//! has no boundary bursts; unlike `governor` it supports weighted units, refunds (TPM is
//! corrected when the real output is known) and reports remaining capacity for OpenAI's headers.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// The span a per-minute limit looks back over.
pub const WINDOW_US: i64 = 60_000_000;
/// The span a per-hour limit looks back over.
pub const HOUR_US: i64 = 60 * WINDOW_US;

#[derive(Debug)]
pub struct Gcra {
    /// Units per window; changed in place by [`Gcra::resize`], so that requests admitted
    /// under the old limit refund into the same state.
    limit: AtomicU64,
    window_us: i64,
    /// Theoretical arrival time, in microseconds since the Unix epoch.
    tat_us: AtomicI64,
}

/// The state of one limit, for the `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the limit is whole again.
    pub reset: Duration,
}

impl Gcra {
    pub fn per_minute(per_minute: u64) -> Gcra {
        Gcra::per_window(per_minute, WINDOW_US)
    }

    pub fn per_window(limit: u64, window_us: i64) -> Gcra {
        Gcra {
            limit: AtomicU64::new(limit.max(1)),
            window_us,
            tat_us: AtomicI64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    pub fn window_us(&self) -> i64 {
        self.window_us
    }

    /// Microseconds per unit.
    fn interval_us(&self, limit: u64) -> f64 {
        self.window_us as f64 / limit as f64
    }

    /// Changes the limit keeping the last window's use, so that changing a key's limit
    /// neither forgives nor doubles what it already took.
    pub fn resize(&self, limit: u64, now_us: i64) {
        let limit = limit.max(1);
        let before = self.limit.swap(limit, Ordering::AcqRel);
        if before == limit {
            return;
        }
        let used_us = (self.tat_us.load(Ordering::Acquire) - now_us).max(0);
        let used_units = used_us as f64 / self.interval_us(before);
        let carried_us = (used_units * self.interval_us(limit)).ceil() as i64;
        self.tat_us
            .store(now_us.saturating_add(carried_us), Ordering::Release);
    }

    /// Saturates (a float-to-int cast does) rather than wrapping for absurd unit counts.
    fn cost_us(&self, units: u64) -> i64 {
        (self.interval_us(self.limit()) * units as f64).ceil() as i64
    }

    /// Takes `units` now, or says how long until they would fit. A request larger than the
    /// whole limit can never fit; it is refused with a full window as its wait.
    pub fn acquire(&self, units: u64, now_us: i64) -> Result<Snapshot, Duration> {
        if units > self.limit() {
            return Err(Duration::from_micros(self.window_us as u64));
        }
        let cost = self.cost_us(units);
        let mut current = self.tat_us.load(Ordering::Acquire);
        loop {
            let new_tat = current.max(now_us).saturating_add(cost);
            let ahead = new_tat - now_us;
            if ahead > self.window_us {
                return Err(Duration::from_micros((ahead - self.window_us).max(1) as u64));
            }
            match self.tat_us.compare_exchange_weak(
                current,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(self.snapshot_at(new_tat, now_us)),
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives units back (a rolled-back admission, or tokens reserved but not used).
    pub fn release(&self, units: u64) {
        let cost = self.cost_us(units);
        self.tat_us.fetch_sub(cost, Ordering::AcqRel);
    }

    /// Takes units regardless of the limit (tokens used beyond what was reserved).
    pub fn charge(&self, units: u64, now_us: i64) {
        let cost = self.cost_us(units);
        let mut current = self.tat_us.load(Ordering::Acquire);
        loop {
            let new_tat = current.max(now_us).saturating_add(cost);
            match self.tat_us.compare_exchange_weak(
                current,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Replaces units reserved at `admitted_us` by the units used: what was not used is
    /// given back, unless the request outlived the window (its reservation has aged out
    /// already, and a refund would let the current window take more than its limit); what
    /// was used beyond the reservation is charged.
    pub fn settle(&self, reserved: u64, used: u64, admitted_us: i64, now_us: i64) {
        if used < reserved {
            if now_us.saturating_sub(admitted_us) < self.window_us {
                self.release(reserved - used);
            }
        } else if used > reserved {
            self.charge(used - reserved, now_us);
        }
    }

    pub fn snapshot(&self, now_us: i64) -> Snapshot {
        self.snapshot_at(self.tat_us.load(Ordering::Acquire), now_us)
    }

    fn snapshot_at(&self, tat_us: i64, now_us: i64) -> Snapshot {
        let used_us = (tat_us - now_us).clamp(0, self.window_us);
        let limit = self.limit();
        let remaining =
            ((self.window_us - used_us) as f64 / self.interval_us(limit)).floor() as u64;
        Snapshot {
            limit,
            remaining: remaining.min(limit),
            reset: Duration::from_micros(used_us as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn admits_a_minutes_worth_then_paces() {
        let limit = Gcra::per_minute(60);
        let now = 1_000 * SECOND;
        for i in 0..60 {
            let snapshot = limit.acquire(1, now).unwrap();
            assert_eq!(snapshot.remaining, 59 - i);
        }
        let wait = limit.acquire(1, now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(limit.acquire(1, now + SECOND - 1).is_err());
        assert!(limit.acquire(1, now + SECOND).is_ok());
    }

    #[test]
    fn weighted_units_and_refunds() {
        let limit = Gcra::per_minute(1_000);
        let now = 50 * SECOND;
        assert!(limit.acquire(800, now).is_ok());
        assert!(limit.acquire(300, now).is_err());
        limit.release(500);
        let snapshot = limit.acquire(300, now).unwrap();
        assert_eq!(snapshot.remaining, 400);
        assert_eq!(limit.acquire(5_000, now), Err(Duration::from_secs(60)));
    }

    #[test]
    fn an_absurd_demand_is_refused_and_leaves_the_limit_whole() {
        let limit = Gcra::per_minute(1_000);
        let now = 50 * SECOND;
        limit.acquire(900, now).unwrap();
        assert_eq!(limit.acquire(u64::MAX, now), Err(Duration::from_secs(60)));
        assert!(limit.acquire(101, now).is_err());
        limit.charge(u64::MAX, now);
        assert!(limit.acquire(1, now + 3_600 * SECOND).is_err());
    }

    #[test]
    fn a_resized_limit_keeps_what_was_used() {
        let now = 90 * SECOND;
        let limit = Gcra::per_minute(100);
        limit.acquire(50, now).unwrap();
        limit.resize(200, now);
        assert_eq!(limit.snapshot(now).remaining, 150);
        limit.resize(50, now);
        assert_eq!(limit.snapshot(now).remaining, 0);
        assert!(limit.acquire(1, now).is_err());
        // A request admitted before the change refunds what it did not use, in units.
        limit.release(20);
        assert_eq!(limit.snapshot(now).remaining, 20);
    }

    #[test]
    fn snapshot_reports_reset_until_whole() {
        let limit = Gcra::per_minute(10);
        let now = 7 * SECOND;
        limit.acquire(5, now).unwrap();
        let snapshot = limit.snapshot(now);
        assert_eq!(snapshot.remaining, 5);
        assert_eq!(snapshot.reset, Duration::from_secs(30));
    }

    #[test]
    fn an_hourly_limit_paces_over_the_hour() {
        let limit = Gcra::per_window(3_600, HOUR_US);
        let now = 10 * HOUR_US;
        limit.acquire(3_000, now).unwrap();
        assert_eq!(limit.acquire(601, now), Err(Duration::from_secs(1)));
        assert_eq!(limit.snapshot(now).remaining, 600);
        assert!(limit.acquire(601, now + SECOND).is_ok());
        assert_eq!(limit.acquire(4_000, now), Err(Duration::from_secs(3_600)));
    }
}
