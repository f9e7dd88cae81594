//! How a request ends. [`Exchange::settle`] runs exactly once per request and builds one
//! [`Closing`]: what was served, counted and billed, and how it ended. Rating prices it against
//! the key's month totals and admission replaces the reservation by the charge; then metrics,
//! alerts and the ledger each consume the same figures.
//!
//! With embedded state all of it happens here and now. With shared state too, unless rating
//! must read the month's totals in Redis (tiers, allowances, credit packs): the closing is then
//! finished on a tracked task of the main runtime (shutdown waits for it). Either way a shared
//! lease's settlement is queued for Redis without waiting, its alerts announced when Redis
//! answers, and strict durability still holds the answer until its record is committed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Exchange;
use crate::app::App;
use crate::auth::KeyRecord;
use crate::config::{Config, Model};
use crate::limits::{AlertCrossing, Settlement};
use crate::meter::record::{MeterEvent, Name, Outcome, TokenUsage, UsageRecord};
use crate::meter::sink::Durability;
use crate::meter::sink::WrittenAck;
use crate::metrics::status_class;
use crate::money::Money;
use crate::rating::plan::Rated;
use crate::state::{Pass, Priced, Used};

pub(super) struct Ending {
    /// The upstream answered with a success status, so its tokens are billable.
    pub answered: bool,
    pub status: u16,
    pub outcome: Outcome,
    pub reported: Option<TokenUsage>,
    pub finish_reason: Option<Name>,
    pub ttft: Option<Duration>,
    /// The id of the Responses API response served, remembered with its model and key.
    pub response_id: Option<String>,
}

/// One request's end, consumed by rating, admission, metrics, alerts and the ledger.
struct Closing {
    app: Arc<App>,
    config: Arc<Config>,
    key: Option<Arc<KeyRecord>>,
    model: Option<Arc<Model>>,
    pass: Option<Pass>,
    billed: TokenUsage,
    record: UsageRecord,
    /// The served model's metric series.
    series: Option<Arc<crate::metrics::ModelSeries>>,
}

impl Exchange {
    /// Ends the request: metrics and its one usage record. Idempotent by construction.
    /// Returns, in strict durability, the receiver that answers once the record is committed.
    pub(super) fn settle(&mut self, ending: Ending) -> Option<WrittenAck> {
        if self.settled {
            return None;
        }
        self.settled = true;
        let latency = self.accepted.elapsed();
        let model_label = self.model.as_ref().map_or("none", |m| m.name.as_str());
        let tier_label = self.model.as_ref().map_or("none", |m| m.tier.as_str());
        let hot = self.app.metrics.hot();
        hot.requests
            .with_label_values(&[
                model_label,
                tier_label,
                self.endpoint.as_str(),
                status_class(ending.status),
            ])
            .inc();
        // A request refused before a model was chosen makes no per-model series but `none`'s
        // duration.
        let series = self.model.as_ref().map(|model| hot.model(&model.name));
        match &series {
            Some(series) => {
                series.request_duration[usize::from(self.streamed)]
                    .get()
                    .observe(latency.as_secs_f64());
                if let (Some(ttft), true) = (ending.ttft, self.streamed) {
                    series.time_to_first_token.get().observe(ttft.as_secs_f64());
                }
            }
            None => hot
                .request_duration
                .with_label_values(&["none", if self.streamed { "true" } else { "false" }])
                .observe(latency.as_secs_f64()),
        }
        // Only an answered request is billed: providers do not charge for refusals and errors.
        let billed = match ending.answered {
            true => ending.reported.unwrap_or(self.counted),
            false => TokenUsage::default(),
        };
        if let (true, Some(id), Some(key), Some(model)) =
            (ending.answered, &ending.response_id, &self.key, &self.model)
        {
            self.app.response_owners.remember(
                id,
                crate::responses::Owner {
                    model: model.name.clone(),
                    key_id: key.id.clone(),
                    // What a continuation sends the provider again, besides its own input.
                    context_tokens: self.carried_input.saturating_add(billed.total()),
                },
            );
        }
        let header_id = self.request_id.to_str().unwrap_or_default().to_owned();
        let (request_id, client_request_id) = if self.client_chose_id {
            (crate::api::new_request_id(), Some(header_id))
        } else {
            (header_id, None)
        };
        let record = UsageRecord {
            request_id,
            client_request_id,
            started_at_ms: self.accepted_ms,
            key_id: self.key.as_ref().map(|k| Name::from(k.id.as_str())),
            key_name: self.key.as_ref().map(|k| Name::from(k.name.as_str())),
            plan: self
                .key
                .as_ref()
                .and_then(|k| k.plan.as_deref().map(Name::from)),
            endpoint: self.endpoint,
            requested_model: Name::from(std::mem::take(&mut self.requested_model)),
            served_model: self.model.as_ref().map(|m| Name::from(m.name.as_str())),
            upstream: self
                .model
                .as_ref()
                .map(|m| Name::from(m.upstream.name.as_str())),
            tier: self.model.as_ref().map(|m| Name::from(m.tier.as_str())),
            route_rule: Some(Name::from(self.route_rule.as_str())),
            streamed: self.streamed,
            status: ending.status,
            outcome: ending.outcome,
            finish_reason: ending.finish_reason,
            reported: ending.reported,
            counted: self.counted,
            attempts: self.progress.attempts,
            answered: ending.answered,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            ttft_ms: ending
                .ttft
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            charge: Money::ZERO,
            list_cost: Money::ZERO,
            plan_cost: Money::ZERO,
            micro_credits: 0,
            response_id: ending.response_id.clone(),
            counted_estimate: self
                .model
                .as_ref()
                .is_some_and(|model| model.upstream.kind == crate::config::UpstreamKind::Anthropic),
        };
        let closing = Closing {
            app: self.app.clone(),
            config: self.config.clone(),
            key: self.key.clone(),
            model: self.model.clone(),
            pass: self.pass.take(),
            billed,
            record,
            series,
        };
        match closing.finish_now() {
            Ok(committed) => committed,
            Err(closing) => closing.finish_later(),
        }
    }
}

impl Closing {
    /// Finishes here when rating needs no I/O (embedded state, or shared totals the plan does
    /// not read); otherwise hands the closing back.
    fn finish_now(mut self) -> Result<Option<WrittenAck>, Box<Closing>> {
        let priced = match (&self.key, &self.model) {
            (Some(key), Some(model)) => {
                let plan = self.config.plan(key.plan.as_deref());
                match self.app.totals.rate_now(
                    &key.id,
                    plan,
                    model,
                    self.billed,
                    key.seats,
                    self.record.started_at_ms,
                ) {
                    Some(priced) => priced,
                    None => return Err(Box::new(self)),
                }
            }
            _ => Priced {
                rated: Rated::default(),
                list_cost: Money::ZERO,
                month: None,
            },
        };
        let settlement = self.settle_pass(&priced);
        Ok(self.conclude(priced, settlement))
    }

    /// Finishes on a tracked task, once rating has the shared totals; the receiver stands for
    /// the record's commit.
    fn finish_later(self: Box<Self>) -> Option<WrittenAck> {
        let strict = self.config.durability == Durability::Strict;
        let app = self.app.clone();
        let (committed_tx, committed_rx) = oneshot::channel();
        let task = async move {
            if let Some(committed) = self.finish().await {
                if committed.await.is_ok() {
                    let _ = committed_tx.send(());
                }
            }
        };
        app.settling.spawn_on(task, &app.runtime);
        strict.then_some(committed_rx)
    }

    async fn finish(mut self: Box<Self>) -> Option<WrittenAck> {
        let priced = match (&self.key, &self.model) {
            (Some(key), Some(model)) => {
                let plan = self.config.plan(key.plan.as_deref());
                self.app
                    .totals
                    .rate(
                        &key.id,
                        plan,
                        model,
                        self.billed,
                        key.seats,
                        self.record.started_at_ms,
                    )
                    .await
            }
            _ => Priced {
                rated: Rated::default(),
                list_cost: Money::ZERO,
                month: None,
            },
        };
        let settlement = self.settle_pass(&priced);
        (*self).conclude(priced, settlement)
    }

    /// Replaces the request's reservation by its charge. A shared lease settles without
    /// waiting; the alerts its settlement crosses are announced when Redis answers.
    fn settle_pass(&mut self, priced: &Priced) -> Option<Settlement> {
        let pass = self.pass.take()?;
        let tokens = self.billed.total();
        let charge = priced.rated.charge;
        match self.app.admission.settle_now(pass, tokens, charge) {
            Ok(settlement) => Some(settlement),
            Err(lease) => {
                let key = self.key.clone()?;
                let used = Used {
                    tokens,
                    cost: charge,
                    period: self.app.budget_period(&key),
                };
                let (app, config) = (self.app.clone(), self.config.clone());
                let alerts = Box::new(move |alerts: Vec<AlertCrossing>| {
                    for alert in alerts {
                        announce(&app, &config, &key, alert);
                    }
                });
                Some(
                    self.app
                        .admission
                        .settle_shared(*lease, used, priced.month, alerts),
                )
            }
        }
    }

    /// What every consumer takes from the settled request: metrics, alerts, the record.
    fn conclude(self, priced: Priced, settlement: Option<Settlement>) -> Option<WrittenAck> {
        let Priced {
            rated, list_cost, ..
        } = priced;
        let metrics = &self.app.metrics;
        if let Some(settlement) = settlement {
            if settlement.overshoot > Money::ZERO {
                metrics
                    .budget_overshoot_usd
                    .inc_by(settlement.overshoot.as_f64_usd());
            }
            if let Some(key) = &self.key {
                for alert in settlement.alerts {
                    announce(&self.app, &self.config, key, alert);
                }
            }
        }
        if let Some(series) = &self.series {
            series.input_tokens.get().inc_by(self.billed.input);
            series.output_tokens.get().inc_by(self.billed.output);
            // List cost, not the charge: a counter cannot fall, and a volume tier's charge can.
            series.cost_usd.get().inc_by(list_cost.as_f64_usd());
            if let Some(reported) = self.record.reported {
                let counted = self.record.counted;
                series
                    .drift_input
                    .get()
                    .inc_by(counted.input.abs_diff(reported.input));
                series
                    .drift_output
                    .get()
                    .inc_by(counted.output.abs_diff(reported.output));
            }
        }
        let mut record = self.record;
        record.charge = rated.charge;
        record.list_cost = list_cost;
        record.plan_cost = rated.plan_cost;
        record.micro_credits = rated.micro_credits;
        tracing::info!(
            request_id = %record.request_id,
            key = record.key_name.as_deref().unwrap_or("-"),
            model = record.served_model.as_deref().unwrap_or("-"),
            status = record.status,
            outcome = record.outcome.as_str(),
            input_tokens = self.billed.input,
            output_tokens = self.billed.output,
            latency_ms = record.latency_ms,
            "request"
        );
        // A request that never authenticated is not anyone's usage: counting it would let
        // anonymous traffic fill the ledger.
        record.key_id.as_ref()?;
        let event = MeterEvent::Usage(record);
        match self.config.durability {
            Durability::Strict => Some(self.app.usage.submit_acked(event)),
            Durability::Batched => {
                self.app.usage.submit(event);
                None
            }
        }
    }
}

/// A budget threshold was crossed: log it, count it, and tell the webhook if configured.
/// With shared state only the replica whose settlement crossed it first gets here.
pub(crate) fn announce(
    app: &Arc<App>,
    config: &Config,
    key: &Arc<KeyRecord>,
    alert: AlertCrossing,
) {
    let threshold = alert.threshold_pct.to_string();
    app.metrics
        .budget_alerts
        .with_label_values(&[threshold.as_str()])
        .inc();
    tracing::warn!(
        key = %key.name,
        threshold_pct = alert.threshold_pct,
        used_pct = alert.used_pct,
        "budget alert"
    );
    app.post_alert(
        config,
        key.clone(),
        serde_json::json!({
            "event": "budget_threshold_crossed",
            "threshold_pct": alert.threshold_pct,
            "used_pct": alert.used_pct,
        }),
    );
}
