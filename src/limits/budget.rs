//! Budget caps by reservation. Before a request goes upstream its worst-case cost is reserved
//! against the cap with one compare-and-swap on `committed` (spent plus reserved), so no number
//! of concurrent requests can commit more than the cap. On completion the reservation is
//! replaced by the actual cost — charged in full even when the upstream used more than was
//! reserved, in which case the overshoot is reported so it can be counted.
//!
//! Periods are UTC calendar periods (days, ISO weeks from Monday, months) or `total`. A cost
//! is charged to the period in which its request settles.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::money::Money;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Week,
    Month,
    Total,
}

const PERIODS: [BudgetPeriod; 4] = [
    BudgetPeriod::Day,
    BudgetPeriod::Week,
    BudgetPeriod::Month,
    BudgetPeriod::Total,
];

impl BudgetPeriod {
    fn index(self) -> u8 {
        PERIODS.iter().position(|p| *p == self).unwrap_or(0) as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }

    pub fn parse(name: &str) -> Option<BudgetPeriod> {
        PERIODS.into_iter().find(|period| period.as_str() == name)
    }

    /// Start of the period containing `now_ms` (0 for `total`).
    pub fn start_ms(self, now_ms: i64) -> i64 {
        let Some(now) = Utc.timestamp_millis_opt(now_ms).single() else {
            return 0;
        };
        let day = now.date_naive();
        let start = match self {
            BudgetPeriod::Total => return 0,
            BudgetPeriod::Day => day,
            BudgetPeriod::Week => {
                day - ChronoDuration::days(i64::from(day.weekday().num_days_from_monday()))
            }
            BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
        };
        midnight_ms(start)
    }

    /// When the period containing `now_ms` ends (`None` for `total`).
    pub fn reset_ms(self, now_ms: i64) -> Option<i64> {
        let start = Utc.timestamp_millis_opt(self.start_ms(now_ms)).single()?;
        let start = start.date_naive();
        let next = match self {
            BudgetPeriod::Total => return None,
            BudgetPeriod::Day => start + ChronoDuration::days(1),
            BudgetPeriod::Week => start + ChronoDuration::days(7),
            BudgetPeriod::Month => {
                let (year, month) = if start.month() == 12 {
                    (start.year() + 1, 1)
                } else {
                    (start.year(), start.month() + 1)
                };
                NaiveDate::from_ymd_opt(year, month, 1)?
            }
        };
        Some(midnight_ms(next))
    }
}

fn midnight_ms(day: NaiveDate) -> i64 {
    day.and_hms_opt(0, 0, 0).map_or(0, |t| {
        DateTime::<Utc>::from_naive_utc_and_offset(t, Utc).timestamp_millis()
    })
}

/// The cap of a key without one: its spend is tracked, nothing is reserved or refused.
pub const UNCAPPED: Money = Money(i64::MAX);

/// A key's live budget. All amounts in nano-dollars.
#[derive(Debug)]
pub struct Budget {
    /// Nano-dollars; changed in place when an operator changes the cap.
    cap: AtomicI64,
    /// A [`BudgetPeriod`] as its index in [`PERIODS`]; changed in place by [`Budget::rebase`].
    period: AtomicU8,
    period_start_ms: AtomicI64,
    /// Spent this period plus everything reserved and not yet settled.
    committed: AtomicI64,
    spent: AtomicI64,
    /// Alert thresholds already announced (bit i = threshold i) and the period they belong to.
    alerted: AtomicU64,
    alerted_period_ms: AtomicI64,
    /// Held while `spent` is moved between periods and while a settlement adds to it, so that
    /// a charge landing during a rollover is counted in the new period instead of dropped.
    period_change: Mutex<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetExceeded {
    pub remaining: Money,
    pub needed: Money,
}

/// The budget figures the admin API shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetSnapshot {
    pub budget_usd: Money,
    pub spend_usd: Money,
    pub reserved_usd: Money,
    pub remaining_usd: Money,
    pub period_start_ms: i64,
    pub resets_at_ms: Option<i64>,
}

/// What a settlement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// Actual cost beyond what was reserved (the upstream used more than the worst case).
    pub overshoot: Money,
    /// Spend as a share of the cap, in percent, after this settlement.
    pub used_pct: u64,
}

impl Budget {
    /// `spent` is what the ledger says was already spent in the current period.
    pub fn new(cap: Money, period: BudgetPeriod, spent: Money, now_ms: i64) -> Budget {
        Budget {
            cap: AtomicI64::new(cap.nanos()),
            period: AtomicU8::new(period.index()),
            period_start_ms: AtomicI64::new(period.start_ms(now_ms)),
            committed: AtomicI64::new(spent.nanos()),
            spent: AtomicI64::new(spent.nanos()),
            alerted: AtomicU64::new(0),
            alerted_period_ms: AtomicI64::new(0),
            period_change: Mutex::new(()),
        }
    }

    fn lock_period(&self) -> MutexGuard<'_, ()> {
        self.period_change
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new cap for the same period: spend and reservations stay, and thresholds are
    /// announced afresh against the new cap.
    pub fn set_cap(&self, cap: Money) {
        if self.cap.swap(cap.nanos(), Ordering::AcqRel) != cap.nanos() {
            self.alerted.store(0, Ordering::Release);
        }
    }

    /// Moves the budget to another period, starting from that period's spend (read from the
    /// ledger). Reservations in flight stay, and their requests settle here as before.
    pub fn rebase(&self, period: BudgetPeriod, spent: Money, now_ms: i64) {
        let _changing = self.lock_period();
        self.period.store(period.index(), Ordering::Release);
        self.period_start_ms
            .store(period.start_ms(now_ms), Ordering::Release);
        let before = self.spent.swap(spent.nanos(), Ordering::AcqRel);
        self.committed
            .fetch_add(spent.nanos() - before, Ordering::AcqRel);
        self.alerted.store(0, Ordering::Release);
    }

    /// Marks thresholds (a bit mask) as announced this period; returns those that were not.
    pub fn first_crossings(&self, crossed: u64, now_ms: i64) -> u64 {
        let period = self.period().start_ms(now_ms);
        if self.alerted_period_ms.swap(period, Ordering::AcqRel) != period {
            self.alerted.store(0, Ordering::Release);
        }
        crossed & !self.alerted.fetch_or(crossed, Ordering::AcqRel)
    }

    pub fn period(&self) -> BudgetPeriod {
        PERIODS[usize::from(self.period.load(Ordering::Acquire)) % PERIODS.len()]
    }

    /// Starts a new period when the clock has passed the reset. Reservations in flight stay
    /// reserved; only the spent part is forgotten.
    fn roll(&self, now_ms: i64) {
        if self.period().start_ms(now_ms) > self.period_start_ms.load(Ordering::Acquire) {
            let _changing = self.lock_period();
            self.roll_locked(now_ms);
        }
    }

    fn roll_locked(&self, now_ms: i64) {
        let start = self.period().start_ms(now_ms);
        if start > self.period_start_ms.load(Ordering::Acquire) {
            self.period_start_ms.store(start, Ordering::Release);
            let spent = self.spent.swap(0, Ordering::AcqRel);
            self.committed.fetch_sub(spent, Ordering::AcqRel);
        }
    }

    /// Reserves `amount` and returns what was reserved: nothing under no cap (whose spend is
    /// tracked, not limited), so that an absurd worst case cannot saturate the sum.
    pub fn reserve(&self, amount: Money, now_ms: i64) -> Result<Money, BudgetExceeded> {
        self.roll(now_ms);
        let cap = self.cap.load(Ordering::Acquire);
        if cap == UNCAPPED.nanos() {
            return Ok(Money::ZERO);
        }
        let amount = amount.nanos().max(0);
        let mut committed = self.committed.load(Ordering::Acquire);
        loop {
            let after = committed.saturating_add(amount);
            if after > cap {
                return Err(BudgetExceeded {
                    remaining: Money(cap.saturating_sub(committed)).max(Money::ZERO),
                    needed: Money(amount),
                });
            }
            match self.committed.compare_exchange_weak(
                committed,
                after,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Money(amount)),
                Err(actual) => committed = actual,
            }
        }
    }

    /// Replaces a reservation by the actual cost. A negative cost (a volume tier re-pricing
    /// the month lower) lowers spend, as it lowers the ledger's sum and the invoice.
    /// An uncapped key reserved nothing, so none of its charge is overshoot.
    pub fn settle(&self, reserved: Money, actual: Money, now_ms: i64) -> Settled {
        let spent = {
            let _changing = self.lock_period();
            self.roll_locked(now_ms);
            let actual = actual.nanos();
            self.committed
                .fetch_add(actual - reserved.nanos(), Ordering::AcqRel);
            self.spent.fetch_add(actual, Ordering::AcqRel) + actual
        };
        let cap = self.cap.load(Ordering::Acquire);
        Settled {
            overshoot: match cap == UNCAPPED.nanos() {
                true => Money::ZERO,
                false => (actual - reserved).max(Money::ZERO),
            },
            used_pct: percent(spent, cap),
        }
    }

    /// Gives a reservation back unused (the request was refused later or never went out).
    pub fn release(&self, reserved: Money) {
        self.committed.fetch_sub(reserved.nanos(), Ordering::AcqRel);
    }

    pub fn snapshot(&self, now_ms: i64) -> BudgetSnapshot {
        self.roll(now_ms);
        let cap = self.cap.load(Ordering::Acquire);
        let committed = self.committed.load(Ordering::Acquire);
        let spent = self.spent.load(Ordering::Acquire);
        BudgetSnapshot {
            budget_usd: Money(cap),
            spend_usd: Money(spent),
            reserved_usd: Money(committed - spent),
            remaining_usd: Money(cap.saturating_sub(committed)).max(Money::ZERO),
            period_start_ms: self.period_start_ms.load(Ordering::Acquire),
            resets_at_ms: self.period().reset_ms(now_ms),
        }
    }
}

fn percent(part: i64, whole: i64) -> u64 {
    if whole <= 0 {
        return 100;
    }
    u64::try_from(i128::from(part) * 100 / i128::from(whole)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn calendar_periods_in_utc() {
        let now = ms("2024-02-29T13:45:00Z"); // a Thursday in a leap year
        assert_eq!(BudgetPeriod::Day.start_ms(now), ms("2024-02-29T00:00:00Z"));
        assert_eq!(
            BudgetPeriod::Day.reset_ms(now),
            Some(ms("2024-03-01T00:00:00Z"))
        );
        assert_eq!(BudgetPeriod::Week.start_ms(now), ms("2024-02-26T00:00:00Z"));
        assert_eq!(
            BudgetPeriod::Week.reset_ms(now),
            Some(ms("2024-03-04T00:00:00Z"))
        );
        assert_eq!(
            BudgetPeriod::Month.start_ms(now),
            ms("2024-02-01T00:00:00Z")
        );
        assert_eq!(
            BudgetPeriod::Month.reset_ms(now),
            Some(ms("2024-03-01T00:00:00Z"))
        );
        let december = ms("2026-12-31T23:59:59Z");
        assert_eq!(
            BudgetPeriod::Month.reset_ms(december),
            Some(ms("2027-01-01T00:00:00Z"))
        );
        assert_eq!(BudgetPeriod::Total.start_ms(now), 0);
        assert_eq!(BudgetPeriod::Total.reset_ms(now), None);
    }

    #[test]
    fn reservations_never_pass_the_cap() {
        let now = ms("2026-11-25T10:00:00Z");
        let budget = Budget::new(Money(1_000), BudgetPeriod::Day, Money(100), now);
        assert!(budget.reserve(Money(600), now).is_ok());
        let refused = budget.reserve(Money(301), now).unwrap_err();
        assert_eq!(refused.remaining, Money(300));
        assert!(budget.reserve(Money(300), now).is_ok());
        budget.settle(Money(600), Money(200), now);
        let snapshot = budget.snapshot(now);
        assert_eq!(snapshot.spend_usd, Money(300));
        assert_eq!(snapshot.reserved_usd, Money(300));
        assert_eq!(snapshot.remaining_usd, Money(400));
    }

    #[test]
    fn overshoot_is_charged_and_reported() {
        let now = 0;
        let budget = Budget::new(Money(1_000), BudgetPeriod::Total, Money::ZERO, now);
        budget.reserve(Money(500), now).unwrap();
        let settled = budget.settle(Money(500), Money(1_200), now);
        assert_eq!(settled.overshoot, Money(700));
        assert_eq!(settled.used_pct, 120);
        assert!(budget.reserve(Money(1), now).is_err());
    }

    #[test]
    fn no_cap_reserves_nothing_so_a_cap_set_later_starts_true() {
        let budget = Budget::new(UNCAPPED, BudgetPeriod::Total, Money(5), 0);
        assert_eq!(budget.reserve(Money(i64::MAX), 0), Ok(Money::ZERO));
        let settled = budget.settle(Money::ZERO, Money(7), 0);
        assert_eq!(
            settled.overshoot,
            Money::ZERO,
            "no cap, nothing to overshoot"
        );
        assert_eq!(budget.reserve(Money(10), 0), Ok(Money::ZERO));
        budget.set_cap(Money(100));
        assert_eq!(budget.reserve(Money(88), 0), Ok(Money(88)));
        assert!(budget.reserve(Money(1), 0).is_err());
    }

    #[test]
    fn a_negative_charge_lowers_spend() {
        let budget = Budget::new(Money(1_000), BudgetPeriod::Total, Money(500), 0);
        budget.reserve(Money(100), 0).unwrap();
        budget.settle(Money(100), Money(-40), 0);
        let snapshot = budget.snapshot(0);
        assert_eq!(snapshot.spend_usd, Money(460));
        assert_eq!(snapshot.reserved_usd, Money::ZERO);
        assert_eq!(snapshot.remaining_usd, Money(540));
    }

    #[test]
    fn rollover_forgets_spend_but_keeps_reservations() {
        let day_one = ms("2026-11-25T23:59:00Z");
        let budget = Budget::new(Money(1_000), BudgetPeriod::Day, Money(900), day_one);
        budget.reserve(Money(100), day_one).unwrap();
        assert!(budget.reserve(Money(1), day_one).is_err());
        let day_two = ms("2026-11-26T00:00:01Z");
        assert!(budget.reserve(Money(800), day_two).is_ok());
        assert!(budget.reserve(Money(101), day_two).is_err());
        let snapshot = budget.snapshot(day_two);
        assert_eq!(snapshot.spend_usd, Money::ZERO);
        assert_eq!(snapshot.reserved_usd, Money(900));
        assert_eq!(snapshot.period_start_ms, ms("2026-11-26T00:00:00Z"));
    }

    #[test]
    fn a_charge_settled_during_a_rollover_counts_in_the_new_period() {
        let day_one = ms("2026-11-25T23:59:00Z");
        let day_two = ms("2026-11-26T00:00:01Z");
        for _ in 0..300 {
            let budget = std::sync::Arc::new(Budget::new(
                Money(1_000_000),
                BudgetPeriod::Day,
                Money(900),
                day_one,
            ));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let budget = budget.clone();
                    std::thread::spawn(move || {
                        for _ in 0..50 {
                            budget.settle(Money::ZERO, Money(1), day_two);
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            let snapshot = budget.snapshot(day_two);
            assert_eq!(snapshot.spend_usd, Money(200));
            assert_eq!(snapshot.reserved_usd, Money::ZERO);
        }
    }

    #[test]
    fn concurrent_reservations_stay_under_the_cap() {
        let budget = std::sync::Arc::new(Budget::new(
            Money(20_000),
            BudgetPeriod::Total,
            Money::ZERO,
            0,
        ));
        let admitted = std::sync::Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..200)
            .map(|_| {
                let budget = budget.clone();
                let admitted = admitted.clone();
                std::thread::spawn(move || {
                    if budget.reserve(Money(1_500), 0).is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        budget.settle(Money(1_500), Money(1_000), 0);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let snapshot = budget.snapshot(0);
        assert!(snapshot.spend_usd <= Money(20_000));
        assert!(admitted.load(Ordering::Relaxed) >= 13);
    }
}
