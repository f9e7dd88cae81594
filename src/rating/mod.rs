//! Rating: pricing each request under its key's plan ([`plan`]) as it settles, and the durable
//! ledger the rated records go to ([`ledger`]), from which usage reports, invoices and budget
//! spend are read. Running totals per key and month live here, restored from the ledger at
//! start-up, so that charges that depend on volume are exact (see `plan`'s module docs).

pub mod invoice;
pub mod ledger;
pub mod plan;
pub mod savings;

use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::limits::BudgetPeriod;
use crate::meter::record::TokenUsage;
use crate::money::{ModelPrices, Money};
use plan::{Cursor, Plan, Rated};

/// What rating needs of a served model.
#[derive(Clone, Copy)]
pub struct RatedModel<'a> {
    pub name: &'a str,
    pub tier: &'a str,
    pub prices: &'a ModelPrices,
}

/// Per-key running totals for the current UTC month.
#[derive(Default)]
pub struct Rater {
    cursors: DashMap<String, Arc<Mutex<Months>>>,
}

/// A key's totals for its latest month and the month before: a request that started before
/// midnight on the 1st and settles after it is rated in the month it started, without
/// resetting the new month's totals.
#[derive(Default)]
struct Months {
    current: (i64, Cursor),
    previous: Option<(i64, Cursor)>,
}

impl Months {
    /// `None` for a month older than the previous one (a request open for over a month).
    fn cursor(&mut self, month_start_ms: i64) -> Option<&mut Cursor> {
        if month_start_ms > self.current.0 {
            let ended = std::mem::replace(&mut self.current, (month_start_ms, Cursor::default()));
            self.previous = Some(ended);
        }
        if month_start_ms == self.current.0 {
            return Some(&mut self.current.1);
        }
        match &mut self.previous {
            Some((month, cursor)) if *month == month_start_ms => Some(cursor),
            _ => None,
        }
    }
}

impl Rater {
    /// Seeds a key's month totals (from the ledger at start-up).
    pub fn seed(&self, key_id: &str, month_start_ms: i64, cursor: Cursor) {
        let months = Months {
            current: (month_start_ms, cursor),
            previous: None,
        };
        self.cursors
            .insert(key_id.to_owned(), Arc::new(Mutex::new(months)));
    }

    /// Rates one request and advances the key's totals. The mutex is per key and held only
    /// for this arithmetic: requests of one key rate one after the other, which is what makes
    /// tier and allowance boundaries exact.
    pub fn rate(
        &self,
        key_id: &str,
        plan: &Plan,
        model: RatedModel<'_>,
        usage: TokenUsage,
        seats: u32,
        now_ms: i64,
    ) -> (Rated, Money) {
        let month = BudgetPeriod::Month.start_ms(now_ms);
        let cell = self
            .cursors
            .entry(key_id.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Months::default())))
            .value()
            .clone();
        let mut guard = cell
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut unknown_month = Cursor::default();
        let cursor = guard.cursor(month).unwrap_or(&mut unknown_month);
        let list_cost = usage.cost(model.prices);
        (plan.rate(cursor, model, usage, seats), list_cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_request_of_last_month_leaves_this_months_totals_alone() {
        let (october, november, december) = (100, 200, 300);
        let mut months = Months::default();
        months.cursor(october).unwrap().tokens = 7;
        months.cursor(november).unwrap().tokens = 5;
        months.cursor(october).unwrap().tokens += 1;
        assert_eq!(months.cursor(november).unwrap().tokens, 5);
        assert_eq!(months.cursor(october).unwrap().tokens, 8);
        months.cursor(december).unwrap().tokens = 1;
        assert!(months.cursor(october).is_none());
        assert_eq!(months.cursor(november).unwrap().tokens, 5);
        assert_eq!(months.cursor(december).unwrap().tokens, 1);
    }
}
