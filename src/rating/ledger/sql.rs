//! The ledger's rows and queries, written once for both stores (SQLite on one machine,
//! PostgreSQL for a fleet): how a usage record or an outcome becomes a row and back, and the
//! reader's queries with what their rows mean. A store only runs them, so the two cannot
//! drift apart in what a report sums or how a record reads back.

use std::collections::HashMap;

use super::rollup::Totals;
use super::PeriodUsage;
use crate::meter::record::{OutcomeEvent, TokenUsage, UsageRecord};
use crate::money::Money;
use crate::rating::plan::Cursor;
use crate::store::row::{Column, Dialect, Kind, RowSource};

/// The UTC calendar day of a timestamp, as the ledger's `day` column stores it.
pub(crate) fn day_of(ms: i64) -> String {
    use chrono::Datelike;
    thread_local! {
        /// The day last written and its text: a writer's records mostly share their day.
        static LAST: std::cell::RefCell<(i64, String)> =
            const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let day = ms.div_euclid(86_400_000);
    LAST.with_borrow_mut(|(last, text)| {
        if *last != day {
            // Written by hand: chrono's `format` parses its pattern again for every call.
            *text = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
                .map(|t| {
                    let day = t.date_naive();
                    format!("{:04}-{:02}-{:02}", day.year(), day.month(), day.day())
                })
                .unwrap_or_default();
            *last = day;
        }
        text.clone()
    })
}

/// The `usage` table's columns and their kinds, in the order of [`usage_values`].
pub(crate) const USAGE_COLUMNS: [(&str, Kind); 38] = [
    ("request_id", Kind::Text),
    ("at_ms", Kind::Int),
    ("day", Kind::Text),
    ("key_id", Kind::Text),
    ("key_name", Kind::Text),
    ("plan", Kind::Text),
    ("endpoint", Kind::Text),
    ("requested_model", Kind::Text),
    ("served_model", Kind::Text),
    ("upstream", Kind::Text),
    ("tier", Kind::Text),
    ("route_rule", Kind::Text),
    ("streamed", Kind::Bool),
    ("status", Kind::Int),
    ("outcome", Kind::Text),
    ("input_tokens", Kind::Int),
    ("cached_input_tokens", Kind::Int),
    ("output_tokens", Kind::Int),
    ("counted_input_tokens", Kind::Int),
    ("counted_output_tokens", Kind::Int),
    ("charge_nanos", Kind::Int),
    ("list_cost_nanos", Kind::Int),
    ("micro_credits", Kind::Int),
    ("finish_reason", Kind::Text),
    ("reported_input_tokens", Kind::Int),
    ("reported_cached_input_tokens", Kind::Int),
    ("reported_output_tokens", Kind::Int),
    ("counted_cached_input_tokens", Kind::Int),
    ("attempts", Kind::Int),
    ("latency_ms", Kind::Int),
    ("ttft_ms", Kind::Int),
    ("client_request_id", Kind::Text),
    ("answered", Kind::Bool),
    ("plan_cost_nanos", Kind::Int),
    ("response_id", Kind::Text),
    ("counted_estimate", Kind::Bool),
    ("cache_write_input_tokens", Kind::Int),
    ("reported_cache_write_input_tokens", Kind::Int),
];

/// A usage record as the ledger stores it, in the order of [`USAGE_COLUMNS`]. The billed token
/// columns and the day are derived here, once for every store.
pub(crate) fn usage_values(record: &UsageRecord) -> [Column<'_>; 38] {
    let billed = record.billed();
    let reported = record.reported;
    let optional = |value: Option<u64>| Column::Int(value.map(|v| v as i64));
    [
        Column::text(&record.request_id),
        Column::int(record.started_at_ms),
        Column::from(day_of(record.started_at_ms)),
        Column::optional_text(record.key_id.as_deref()),
        Column::optional_text(record.key_name.as_deref()),
        Column::optional_text(record.plan.as_deref()),
        Column::text(record.endpoint.as_str()),
        Column::text(&record.requested_model),
        Column::optional_text(record.served_model.as_deref()),
        Column::optional_text(record.upstream.as_deref()),
        Column::optional_text(record.tier.as_deref()),
        Column::optional_text(record.route_rule.as_deref()),
        Column::Bool(record.streamed),
        Column::int(i64::from(record.status)),
        Column::text(record.outcome.as_str()),
        Column::int(billed.input as i64),
        Column::int(billed.cached_input as i64),
        Column::int(billed.output as i64),
        Column::int(record.counted.input as i64),
        Column::int(record.counted.output as i64),
        Column::int(record.charge.nanos()),
        Column::int(record.list_cost.nanos()),
        Column::int(record.micro_credits as i64),
        Column::optional_text(record.finish_reason.as_deref()),
        optional(reported.map(|r| r.input)),
        optional(reported.map(|r| r.cached_input)),
        optional(reported.map(|r| r.output)),
        Column::int(record.counted.cached_input as i64),
        Column::int(i64::from(record.attempts)),
        Column::int(record.latency_ms as i64),
        optional(record.ttft_ms),
        Column::optional_text(record.client_request_id.as_deref()),
        Column::Bool(record.answered),
        Column::int(record.plan_cost.nanos()),
        Column::optional_text(record.response_id.as_deref()),
        Column::Bool(record.counted_estimate),
        Column::int(billed.cache_write_input as i64),
        optional(reported.map(|r| r.cache_write_input)),
    ]
}

/// The `outcomes` table's columns and their kinds, in the order of [`outcome_values`].
pub(crate) const OUTCOME_COLUMNS: [(&str, Kind); 9] = [
    ("idempotency_key", Kind::Text),
    ("at_ms", Kind::Int),
    ("day", Kind::Text),
    ("key_id", Kind::Text),
    ("plan", Kind::Text),
    ("outcome_type", Kind::Text),
    ("quantity", Kind::Int),
    ("request_id", Kind::Text),
    ("charge_nanos", Kind::Int),
];

pub(crate) fn outcome_values(outcome: &OutcomeEvent) -> [Column<'_>; 9] {
    [
        Column::text(&outcome.idempotency_key),
        Column::int(outcome.at_ms),
        Column::from(day_of(outcome.at_ms)),
        Column::text(&outcome.key_id),
        Column::optional_text(outcome.plan.as_deref()),
        Column::text(&outcome.outcome_type),
        Column::int(outcome.quantity as i64),
        Column::optional_text(outcome.request_id.as_deref()),
        Column::int(outcome.charge.nanos()),
    ]
}

/// The `usage` columns [`usage_record`] reads, in its order.
pub(crate) const RECORD_COLUMNS: &str =
    "request_id, at_ms, key_id, key_name, plan, endpoint, requested_model,
    served_model, upstream, tier, route_rule, streamed, status, outcome, finish_reason,
    reported_input_tokens, reported_cached_input_tokens, reported_output_tokens,
    counted_input_tokens, counted_cached_input_tokens, counted_output_tokens, attempts,
    latency_ms, ttft_ms, charge_nanos, list_cost_nanos, micro_credits, client_request_id, answered,
    plan_cost_nanos, response_id, counted_estimate, reported_cache_write_input_tokens";

/// Rebuilds a usage record from a row selected as [`RECORD_COLUMNS`], in either store.
pub(crate) fn usage_record<R: RowSource>(row: &R) -> Result<UsageRecord, R::Error> {
    let reported = match row.int(15)? {
        Some(input) => Some(TokenUsage {
            input: input as u64,
            cached_input: row.required_int(16)? as u64,
            output: row.required_int(17)? as u64,
            cache_write_input: row.int(32)?.unwrap_or(0) as u64,
        }),
        None => None,
    };
    Ok(UsageRecord {
        request_id: row.required_text(0)?,
        client_request_id: row.text(27)?,
        started_at_ms: row.required_int(1)?,
        key_id: row.name(2)?,
        key_name: row.name(3)?,
        plan: row.name(4)?,
        endpoint: row.named(5)?,
        requested_model: row.required_text(6)?.into(),
        served_model: row.name(7)?,
        upstream: row.name(8)?,
        tier: row.name(9)?,
        route_rule: row.name(10)?,
        streamed: row.boolean(11)?,
        status: row.number(12)?,
        outcome: row.named(13)?,
        finish_reason: row.name(14)?,
        reported,
        counted: TokenUsage {
            input: row.required_int(18)? as u64,
            cached_input: row.required_int(19)? as u64,
            output: row.required_int(20)? as u64,
            cache_write_input: 0,
        },
        attempts: row.number(21)?,
        answered: row.boolean(28)?,
        latency_ms: row.required_int(22)? as u64,
        ttft_ms: row.int(23)?.map(|ms| ms as u64),
        charge: Money(row.required_int(24)?),
        list_cost: Money(row.required_int(25)?),
        plan_cost: Money(row.required_int(29)?),
        micro_credits: row.required_int(26)? as u64,
        response_id: row.text(30)?,
        counted_estimate: row.boolean(31)?,
    })
}

/// Rebuilds an outcome from a row selected as [`OUTCOME_COLUMNS`] (its `day` is derived).
pub(crate) fn outcome_event<R: RowSource>(row: &R) -> Result<OutcomeEvent, R::Error> {
    Ok(OutcomeEvent {
        idempotency_key: row.required_text(0)?,
        at_ms: row.required_int(1)?,
        key_id: row.required_text(3)?,
        plan: row.text(4)?,
        outcome_type: row.required_text(5)?,
        quantity: row.required_int(6)? as u64,
        request_id: row.text(7)?,
        charge: Money(row.required_int(8)?),
    })
}

/// Each key's charges for outcomes since a time; parameter: from. (Its usage charges are
/// read from the rollups.)
pub(crate) fn outcome_spend_sql(dialect: Dialect) -> String {
    format!(
        "SELECT key_id, {} FROM outcomes WHERE at_ms >= {} GROUP BY key_id",
        dialect.sum("charge_nanos"),
        dialect.param(1)
    )
}

pub(crate) fn spend_row<R: RowSource>(row: &R) -> Result<(String, Money), R::Error> {
    Ok((row.required_text(0)?, Money(row.required_int(1)?)))
}

/// One key's outcomes in a period by type; parameters: key id, from, to.
pub(crate) fn period_outcomes_sql(dialect: Dialect) -> String {
    format!(
        "SELECT outcome_type, {}, {} FROM outcomes
         WHERE key_id = {} AND at_ms >= {} AND at_ms < {} GROUP BY 1 ORDER BY 1",
        dialect.sum("quantity"),
        dialect.sum("charge_nanos"),
        dialect.param(1),
        dialect.param(2),
        dialect.param(3)
    )
}

pub(crate) fn outcome_line<R: RowSource>(row: &R) -> Result<(String, u64, Money), R::Error> {
    Ok((
        row.required_text(0)?,
        row.required_int(1)? as u64,
        Money(row.required_int(2)?),
    ))
}

/// A period's usage from its models' totals and its outcome lines.
pub(crate) fn period_usage(
    models: impl IntoIterator<Item = (String, Totals)>,
    outcomes: Vec<(String, u64, Money)>,
) -> PeriodUsage {
    let mut usage = PeriodUsage {
        outcomes,
        ..PeriodUsage::default()
    };
    for (model, totals) in models {
        let (input, output) = (totals.input_tokens as u64, totals.output_tokens as u64);
        usage.tokens += input + output;
        usage.charge += Money(totals.charge_nanos);
        usage.micro_credits += totals.micro_credits as u64;
        usage.by_model.push((
            model,
            totals.requests as u64,
            input,
            output,
            Money(totals.charge_nanos),
        ));
    }
    usage
}

/// Spend by key: usage charges from the rollups plus outcome charges.
pub(crate) fn spend_by_key(
    usage: impl IntoIterator<Item = (String, Totals)>,
    outcomes: impl IntoIterator<Item = (String, Money)>,
) -> HashMap<String, Money> {
    let mut spend: HashMap<String, Money> = usage
        .into_iter()
        .map(|(key, totals)| (key, Money(totals.charge_nanos)))
        .collect();
    for (key, charge) in outcomes {
        *spend.entry(key).or_insert(Money::ZERO) += charge;
    }
    spend
}

/// Each key's running totals for rating from its usage totals since the month's start.
pub(crate) fn cursors(
    usage: impl IntoIterator<Item = (String, Totals)>,
) -> HashMap<String, Cursor> {
    usage
        .into_iter()
        .map(|(key, totals)| {
            let cursor = Cursor {
                tokens: (totals.input_tokens + totals.output_tokens) as u64,
                plan_cost: Money(totals.plan_cost_nanos),
                micro_credits: totals.micro_credits as u64,
            };
            (key, cursor)
        })
        .collect()
}

/// One outcome by its idempotency key (already prefixed with its key id).
pub(crate) fn outcome_sql(dialect: Dialect) -> String {
    format!(
        "SELECT {} FROM outcomes WHERE idempotency_key = {}",
        crate::store::row::names(&OUTCOME_COLUMNS),
        dialect.param(1)
    )
}

/// One usage record by request id; parameter: the id.
pub(crate) fn record_sql(dialect: Dialect) -> String {
    format!(
        "SELECT {RECORD_COLUMNS} FROM usage WHERE request_id = {}",
        dialect.param(1)
    )
}

/// The record of the request served a Responses API response; parameter: its id.
pub(crate) fn response_sql(dialect: Dialect) -> String {
    format!(
        "SELECT {RECORD_COLUMNS} FROM usage WHERE response_id = {}",
        dialect.param(1)
    )
}

/// Every usage record in time order.
pub(crate) fn records_sql() -> String {
    format!("SELECT {RECORD_COLUMNS} FROM usage ORDER BY at_ms, request_id")
}

/// Deletes a chunk of the raw usage rows before a time; parameter: the time.
pub(crate) fn prune_sql(dialect: Dialect) -> String {
    format!(
        "DELETE FROM usage WHERE request_id IN
         (SELECT request_id FROM usage WHERE at_ms < {} LIMIT {})",
        dialect.param(1),
        super::Pruner::CHUNK
    )
}

/// A page of usage records in `[from, to)` after a record, in time order; parameters: from,
/// to, the last record's time and request id (the range's start and `''` for the first page),
/// and the page's size.
pub(crate) fn records_page_sql(dialect: Dialect) -> String {
    format!(
        "SELECT {RECORD_COLUMNS} FROM usage
         WHERE at_ms >= {from} AND at_ms < {} AND (at_ms, request_id) > ({}, {})
         ORDER BY at_ms, request_id LIMIT {}",
        dialect.param(2),
        dialect.param(3),
        dialect.param(4),
        dialect.param(5),
        from = dialect.param(1),
    )
}

#[cfg(test)]
mod tests {
    use super::day_of;

    #[test]
    fn the_day_is_the_utc_calendar_day_whichever_day_came_before() {
        let day = 86_400_000;
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(day - 1), "1970-01-01");
        assert_eq!(day_of(day), "1970-01-02");
        assert_eq!(day_of(1_795_000_000_000), "2026-11-18");
        assert_eq!(day_of(day + 1), "1970-01-02");
        assert_eq!(day_of(-1), "1969-12-31");
    }
}
