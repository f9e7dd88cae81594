//! `GET /admin/health`: this replica's refusals by reason, server errors by model, upstream
//! attempts by result and the ledger's queue, counted since it started, with a minute-by-minute
//! history of refusals and errors over the last day. The history is sampled in the background
//! ([`sample`]) so that the console charts it whenever it is opened, not only while it is.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::metrics::{totals_by, Metrics};

const SAMPLE_EVERY: Duration = Duration::from_secs(60);
const KEPT: usize = 24 * 60;

type Counts = BTreeMap<String, u64>;

/// What the history follows, as totals since start.
#[derive(Default, Clone)]
struct Totals {
    refusals: Counts,
    errors_by_model: Counts,
}

impl Totals {
    fn read(metrics: &Metrics) -> Totals {
        Totals {
            refusals: totals_by([&metrics.rejections], "reason", None),
            errors_by_model: totals_by(
                metrics.shards().map(|hot| &hot.requests),
                "model",
                Some(("status", "5xx")),
            ),
        }
    }

    /// What grew since `before`, leaving out what did not.
    fn since(&self, before: &Totals) -> Totals {
        let grown = |now: &Counts, then: &Counts| -> Counts {
            now.iter()
                .filter_map(|(name, n)| {
                    let added = n.saturating_sub(then.get(name).copied().unwrap_or(0));
                    (added > 0).then(|| (name.clone(), added))
                })
                .collect()
        };
        Totals {
            refusals: grown(&self.refusals, &before.refusals),
            errors_by_model: grown(&self.errors_by_model, &before.errors_by_model),
        }
    }

    fn is_empty(&self) -> bool {
        self.refusals.is_empty() && self.errors_by_model.is_empty()
    }
}

/// The last day, one entry per sampled minute in which something was refused or failed.
#[derive(Default)]
pub struct History(Mutex<Recorded>);

#[derive(Default)]
struct Recorded {
    last: Totals,
    minutes: VecDeque<(i64, Totals)>,
}

impl History {
    fn record(&self, now: Totals, at_ms: i64) {
        let Ok(mut recorded) = self.0.lock() else {
            return;
        };
        let added = now.since(&recorded.last);
        recorded.last = now;
        if !added.is_empty() {
            recorded.minutes.push_back((at_ms, added));
        }
        let oldest = at_ms - KEPT as i64 * SAMPLE_EVERY.as_millis() as i64;
        while recorded.minutes.front().is_some_and(|(at, _)| *at < oldest) {
            recorded.minutes.pop_front();
        }
    }

    /// The recorded minutes, and what was added since the last sample as a last entry.
    fn view(&self, now: &Totals, at_ms: i64) -> Vec<Value> {
        let Ok(recorded) = self.0.lock() else {
            return Vec::new();
        };
        let current = now.since(&recorded.last);
        recorded
            .minutes
            .iter()
            .chain((!current.is_empty()).then_some((at_ms, current)).as_ref())
            .map(|(at, added)| {
                json!({
                    "at": crate::rfc3339(*at),
                    "refusals": added.refusals,
                    "errors_by_model": added.errors_by_model,
                })
            })
            .collect()
    }
}

/// Samples the counters every minute while the gateway runs.
pub async fn sample(app: Weak<App>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        app.health
            .record(Totals::read(&app.metrics), crate::unix_ms());
    }
}

pub async fn summary(State(app): State<Arc<App>>) -> Response {
    let metrics = &app.metrics;
    let upstreams: Map<String, Value> = app
        .config()
        .upstreams
        .keys()
        .map(|name| {
            let by_result = totals_by(
                metrics.shards().map(|hot| &hot.upstream_attempts),
                "result",
                Some(("upstream", name)),
            );
            (name.clone(), json!(by_result))
        })
        .collect();
    let events = totals_by(
        metrics.shards().map(|hot| &hot.usage_events),
        "result",
        None,
    );
    let event = |result: &str| events.get(result).copied().unwrap_or(0);
    let now = crate::unix_ms();
    let totals = Totals::read(metrics);
    axum::Json(json!({
        "object": "health",
        "at": crate::rfc3339(now),
        "refusals": totals.refusals,
        "errors_by_model": totals.errors_by_model,
        "history": app.health.view(&totals, now),
        "history_interval_secs": SAMPLE_EVERY.as_secs(),
        "upstream_attempts": upstreams,
        "ledger": {
            "pending": metrics.usage_pending(),
            "written": event("written"),
            "dropped": event("dropped"),
            "failed": event("failed"),
        },
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(refusals: &[(&str, u64)]) -> Totals {
        Totals {
            refusals: refusals.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
            errors_by_model: Counts::new(),
        }
    }

    #[test]
    fn the_history_keeps_what_each_minute_added_for_a_day() {
        let history = History::default();
        let minute = SAMPLE_EVERY.as_millis() as i64;
        history.record(totals(&[("budget", 2)]), minute);
        history.record(totals(&[("budget", 2)]), 2 * minute);
        history.record(totals(&[("budget", 5), ("key_rpm", 1)]), 3 * minute);
        let view = history.view(&totals(&[("budget", 6), ("key_rpm", 1)]), 3 * minute + 10);
        let added: Vec<&Value> = view.iter().map(|entry| &entry["refusals"]).collect();
        assert_eq!(
            added,
            [
                &json!({"budget": 2}),
                &json!({"budget": 3, "key_rpm": 1}),
                &json!({"budget": 1})
            ],
            "quiet minutes are left out; the last entry is the minute so far"
        );
        history.record(
            totals(&[("budget", 7), ("key_rpm", 1)]),
            (KEPT as i64 + 3) * minute,
        );
        let view = history.view(
            &totals(&[("budget", 7), ("key_rpm", 1)]),
            (KEPT as i64 + 3) * minute,
        );
        assert_eq!(
            view.len(),
            2,
            "minutes older than a day are dropped: {view:?}"
        );
    }
}
