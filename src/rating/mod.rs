//! Rating: pricing each request under its key's plan ([`plan`]) as it settles, and the durable
//! ledger the rated records go to ([`ledger`]), from which usage reports, invoices and budget
//! spend are read. Running totals per key and month live here, restored from the ledger at
//! start-up, so that charges that depend on volume are exact (see `plan`'s module docs).

pub mod invoice;
pub mod ledger;
pub mod plan;

use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::config::Model;
use crate::limits::BudgetPeriod;
use crate::meter::record::TokenUsage;
use crate::money::Money;
use plan::{Cursor, Plan, Rated};

/// Per-key running totals for the current UTC month.
#[derive(Default)]
pub struct Rater {
    cursors: DashMap<String, Arc<Mutex<(i64, Cursor)>>>,
}

impl Rater {
    /// Seeds a key's month totals (from the ledger at start-up).
    pub fn seed(&self, key_id: &str, month_start_ms: i64, cursor: Cursor) {
        self.cursors.insert(
            key_id.to_owned(),
            Arc::new(Mutex::new((month_start_ms, cursor))),
        );
    }

    /// Rates one request and advances the key's totals. The mutex is per key and held only
    /// for this arithmetic: requests of one key rate one after the other, which is what makes
    /// tier and allowance boundaries exact.
    #[allow(clippy::too_many_arguments)]
    pub fn rate(
        &self,
        key_id: &str,
        plan: &Plan,
        model: &Model,
        usage: TokenUsage,
        seats: u32,
        now_ms: i64,
    ) -> (Rated, Money) {
        let month = BudgetPeriod::Month.start_ms(now_ms);
        let cell = self
            .cursors
            .entry(key_id.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new((month, Cursor::default()))))
            .value()
            .clone();
        let mut guard = cell
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.0 != month {
            *guard = (month, Cursor::default());
        }
        let list_cost = model
            .prices
            .cost(usage.input, usage.cached_input, usage.output);
        let rated = plan.rate(
            &mut guard.1,
            &model.name,
            &model.tier,
            &model.prices,
            usage,
            seats,
        );
        (rated, list_cost)
    }
}
