//! Every Prometheus family tollgate exports, in one place, all prefixed `tollgate_`. Label
//! values come only from bounded sets — configured model, upstream, tier and rule names, status
//! classes and static reason labels — never from client input.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::ByName;

/// Seconds, from a few milliseconds (a cached refusal) to many minutes (a long reasoning stream).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

pub struct Metrics {
    registry: Registry,
    pub rejections: IntCounterVec,
    /// 1 while the shared state (Redis) answers, 0 while it does not; absent when embedded.
    pub state_backend_up: IntGauge,
    /// Shared-state admissions by where they were decided: `allowance` (here, from this
    /// replica's slice of the key's limits) or `redis` (one script call).
    pub state_admissions: IntCounterVec,
    pub usage_batch_duration: Histogram,
    pub usage_batch_retries: IntCounter,
    /// Client connections open now.
    pub client_connections: IntGauge,
    /// Connections accepted past the bound: served for operations only, or closed at once.
    pub connections_shed: IntCounterVec,
    /// Whole answers whose output could not be counted (the counting task failed): billed on
    /// the provider's usage when it reported one, else with no output tokens.
    pub output_count_failures: IntCounter,
    pub config_reloads: IntCounterVec,
    pub budget_overshoot_usd: prometheus::Counter,
    pub fallbacks: IntCounterVec,
    /// Per-key families, labelled by key name and set at each scrape (see
    /// `server::export_key_gauges`); off with `server.per_key_metrics = false`.
    pub key_spend_usd: GaugeVec,
    pub key_budget_remaining_usd: GaugeVec,
    pub key_budget_used_ratio: GaugeVec,
    pub key_remaining_requests: GaugeVec,
    pub key_remaining_tokens: GaugeVec,
    /// Per team and customer, set at each scrape; off with `server.per_group_metrics = false`.
    pub group_spend_usd: GaugeVec,
    pub group_reserved_usd: GaugeVec,
    pub group_budget_remaining_usd: GaugeVec,
    pub budget_alerts: IntCounterVec,
    pub velocity_alerts: IntCounterVec,
    pub soft_budget_alerts: IntCounterVec,
    /// The families every proxied request touches, one copy per lane (see [`Metrics::hot`]).
    hot: Box<[Hot]>,
}

/// One series of a labelled family, made when first used: a labelled lookup hashes the labels
/// and takes the family's lock on every call, and a series made before it has a figure would
/// show on `/metrics` as an empty one.
pub struct Series<F: Family> {
    family: F,
    labels: Box<[String]>,
    made: OnceLock<F::Metric>,
}

/// A labelled family: the series of some label values.
pub trait Family: Clone {
    type Metric;
    fn series(&self, labels: &[String]) -> Self::Metric;
}

impl<T: MetricVecBuilder> Family for MetricVec<T> {
    type Metric = T::M;
    fn series(&self, labels: &[String]) -> T::M {
        self.with_label_values(labels)
    }
}

impl<F: Family> Series<F> {
    fn new(family: &F, labels: &[&str]) -> Series<F> {
        Series {
            family: family.clone(),
            labels: labels.iter().map(|label| (*label).to_owned()).collect(),
            made: OnceLock::new(),
        }
    }

    pub fn get(&self) -> &F::Metric {
        self.made.get_or_init(|| self.family.series(&self.labels))
    }
}

/// A model's series of the families every request touches.
pub struct ModelSeries {
    pub input_tokens: Series<IntCounterVec>,
    pub output_tokens: Series<IntCounterVec>,
    pub cost_usd: Series<prometheus::CounterVec>,
    /// Indexed by whether the request streamed.
    pub request_duration: [Series<HistogramVec>; 2],
    pub time_to_first_token: Series<HistogramVec>,
    pub drift_input: Series<IntCounterVec>,
    pub drift_output: Series<IntCounterVec>,
}

thread_local! {
    /// The lane this thread serves, counted from 1 (see [`use_lane_shard`]); 0 on every
    /// other thread.
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread, lane `lane`, write its own copy of the hot families.
pub fn use_lane_shard(lane: usize) {
    LANE.with(|this| this.set(lane + 1));
}

/// The families every proxied request touches. A counter or histogram that every lane adds to
/// moves its cache line between the cores at nearly every request (a request's updates took
/// 345 ns from two lanes at once against 110 ns on a copy each, `benches/hot_path.rs`), so
/// each lane has its own copy, and a scrape reads their sum ([`Summed`]).
pub struct Hot {
    pub requests: IntCounterVec,
    input_tokens: IntCounterVec,
    output_tokens: IntCounterVec,
    cost_usd: prometheus::CounterVec,
    pub request_duration: HistogramVec,
    time_to_first_token: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub upstream_attempts: IntCounterVec,
    pub route_decisions: IntCounterVec,
    token_count_drift: IntCounterVec,
    pub usage_events: IntCounterVec,
    /// `usage_events{result="queued"}`, counted for every request.
    pub usage_queued: IntCounter,
    /// Added to where an event is queued and taken from where it is written, so only the sum
    /// over the copies means anything (see [`Metrics::usage_pending`]).
    pub usage_pending: IntGauge,
    /// Each model's series of the families above (see [`Hot::model`]).
    by_model: ByName<ModelSeries>,
}

impl Hot {
    fn new() -> Hot {
        let usage_events = unregistered_counter(
            "usage_events_total",
            "Usage events by fate: queued, written, dropped (channel full) or failed",
            &["result"],
        );
        Hot {
            requests: unregistered_counter(
                "requests_total",
                "Requests by model, tier, endpoint and status class",
                &["model", "tier", "endpoint", "status"],
            ),
            input_tokens: unregistered_counter(
                "input_tokens_total",
                "Billed input tokens by model",
                &["model"],
            ),
            output_tokens: unregistered_counter(
                "output_tokens_total",
                "Billed output tokens by model",
                &["model"],
            ),
            cost_usd: prometheus::CounterVec::new(
                Opts::new(
                    "cost_usd_total",
                    "List cost of served requests in US dollars",
                ),
                &["model"],
            )
            .unwrap_or_else(|_| unreachable_metric("cost_usd_total")),
            request_duration: unregistered_histogram(
                "request_duration_seconds",
                "Time from accepting a request to the end of its response",
                &["model", "streamed"],
            ),
            time_to_first_token: unregistered_histogram(
                "time_to_first_token_seconds",
                "Time from accepting a streamed request to its first chunk",
                &["model"],
            ),
            upstream_duration: unregistered_histogram(
                "upstream_duration_seconds",
                "Time until the upstream's response headers, per attempt",
                &["upstream"],
            ),
            upstream_attempts: unregistered_counter(
                "upstream_attempts_total",
                "Attempts sent upstream by result",
                &["upstream", "result"],
            ),
            route_decisions: unregistered_counter(
                "route_decisions_total",
                "Routing decisions for the virtual model, by rule and tier",
                &["rule", "tier"],
            ),
            token_count_drift: unregistered_counter(
                "token_count_drift_tokens_total",
                "Absolute difference between own token counts and upstream-reported usage",
                &["model", "direction"],
            ),
            usage_queued: usage_events.with_label_values(&["queued"]),
            usage_events,
            usage_pending: IntGauge::new(
                "usage_events_pending",
                "Usage events queued between the hot path and the sink",
            )
            .unwrap_or_else(|_| unreachable_metric("usage_events_pending")),
            by_model: ByName::default(),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.input_tokens.clone()),
            Box::new(self.output_tokens.clone()),
            Box::new(self.cost_usd.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.time_to_first_token.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.upstream_attempts.clone()),
            Box::new(self.route_decisions.clone()),
            Box::new(self.token_count_drift.clone()),
            Box::new(self.usage_events.clone()),
            Box::new(self.usage_pending.clone()),
        ]
    }

    /// `model`'s series of the families above, in this copy.
    pub fn model(&self, model: &str) -> Arc<ModelSeries> {
        found_once(&self.by_model, model, || ModelSeries {
            input_tokens: Series::new(&self.input_tokens, &[model]),
            output_tokens: Series::new(&self.output_tokens, &[model]),
            cost_usd: Series::new(&self.cost_usd, &[model]),
            request_duration: [
                Series::new(&self.request_duration, &[model, "false"]),
                Series::new(&self.request_duration, &[model, "true"]),
            ],
            time_to_first_token: Series::new(&self.time_to_first_token, &[model]),
            drift_input: Series::new(&self.token_count_drift, &[model, "input"]),
            drift_output: Series::new(&self.token_count_drift, &[model, "output"]),
        })
    }
}

/// The copies of the hot families as the families they stand for: each series is the sum of
/// its copies (a histogram's count, sum and buckets alike), read at a scrape.
struct Summed(Vec<Vec<Box<dyn Collector>>>);

impl Collector for Summed {
    fn desc(&self) -> Vec<&Desc> {
        self.0
            .first()
            .into_iter()
            .flatten()
            .flat_map(|family| family.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families: Vec<MetricFamily> = Vec::new();
        for family in self.0.iter().flatten().flat_map(|family| family.collect()) {
            match families.iter_mut().find(|sum| sum.name() == family.name()) {
                Some(sum) => add_family(sum, family),
                None => families.push(family),
            }
        }
        families
    }
}

fn add_family(sum: &mut MetricFamily, mut family: MetricFamily) {
    let kind = family.get_field_type();
    for metric in family.take_metric() {
        let same = sum
            .mut_metric()
            .iter_mut()
            .find(|total| total.get_label() == metric.get_label());
        match same {
            Some(total) => add_metric(kind, total, &metric),
            None => sum.mut_metric().push(metric),
        }
    }
}

fn add_metric(kind: MetricType, total: &mut Metric, more: &Metric) {
    match kind {
        MetricType::COUNTER => {
            let mut counter = Counter::default();
            counter.set_value(total.get_counter().get_value() + more.get_counter().get_value());
            total.set_counter(counter);
        }
        MetricType::GAUGE => {
            let mut gauge = Gauge::default();
            gauge.set_value(total.get_gauge().get_value() + more.get_gauge().get_value());
            total.set_gauge(gauge);
        }
        MetricType::HISTOGRAM => {
            let (sum, more) = (total.get_histogram(), more.get_histogram());
            let mut histogram = sum.clone();
            histogram.set_sample_count(sum.get_sample_count() + more.get_sample_count());
            histogram.set_sample_sum(sum.get_sample_sum() + more.get_sample_sum());
            let buckets = sum
                .get_bucket()
                .iter()
                .zip(more.get_bucket())
                .map(|(bucket, more)| {
                    let mut bucket = bucket.clone();
                    bucket
                        .set_cumulative_count(bucket.cumulative_count() + more.cumulative_count());
                    bucket
                })
                .collect();
            histogram.set_bucket(buckets);
            total.set_histogram(histogram);
        }
        MetricType::SUMMARY | MetricType::UNTYPED => {}
    }
}

/// The entry for `name`, made by `make` the first time.
fn found_once<T>(entries: &ByName<T>, name: &str, make: impl FnOnce() -> T) -> Arc<T> {
    if let Some(entry) = entries.get(name) {
        return entry.clone();
    }
    entries
        .entry(name.to_owned())
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let family = unregistered_counter(name, help, labels);
    register(registry, Box::new(family.clone()));
    family
}

fn unregistered_counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric(name))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let family =
        GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric(name));
    register(registry, Box::new(family.clone()));
    family
}

fn unregistered_histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .unwrap_or_else(|_| unreachable_metric(name))
}

fn register(registry: &Registry, collector: Box<dyn prometheus::core::Collector>) {
    // Names are static and distinct, so registration cannot collide; a failure would only
    // drop one family from /metrics, never stop the gateway.
    if let Err(error) = registry.register(collector) {
        tracing::error!(%error, "metric registration failed");
    }
}

/// Metric construction fails only for invalid static names, which the unit test below covers.
#[allow(clippy::panic)]
fn unreachable_metric(name: &str) -> ! {
    panic!("invalid metric definition {name}")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("tollgate".to_owned()), None)
            .unwrap_or_else(|_| Registry::new());
        // One copy for each lane of the default count (one per core), and the first for every
        // other thread; lanes past them share copies.
        let lanes = std::thread::available_parallelism().map_or(1, usize::from);
        let hot: Box<[Hot]> = (0..=lanes).map(|_| Hot::new()).collect();
        register(
            &registry,
            Box::new(Summed(hot.iter().map(Hot::collectors).collect())),
        );
        let state_backend_up = IntGauge::new(
            "state_backend_up",
            "Whether the shared state backend (Redis) answered its last call: 1 or 0",
        )
        .unwrap_or_else(|_| unreachable_metric("state_backend_up"));
        register(&registry, Box::new(state_backend_up.clone()));
        let usage_batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "usage_batch_write_seconds",
                "Time to write and commit one batch of usage events",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|_| unreachable_metric("usage_batch_write_seconds"));
        register(&registry, Box::new(usage_batch_duration.clone()));
        let usage_batch_retries = IntCounter::new(
            "usage_batch_retries_total",
            "Retries of usage batch writes that failed in the storage",
        )
        .unwrap_or_else(|_| unreachable_metric("usage_batch_retries_total"));
        register(&registry, Box::new(usage_batch_retries.clone()));
        let client_connections = IntGauge::new("client_connections", "Client connections open now")
            .unwrap_or_else(|_| unreachable_metric("client_connections"));
        register(&registry, Box::new(client_connections.clone()));
        let output_count_failures = IntCounter::new(
            "output_count_failures_total",
            "Answers whose output tokens could not be counted (billed on provider usage alone)",
        )
        .unwrap_or_else(|_| unreachable_metric("output_count_failures_total"));
        register(&registry, Box::new(output_count_failures.clone()));
        let budget_overshoot_usd = prometheus::Counter::new(
            "budget_overshoot_usd_total",
            "Cost charged beyond what requests had reserved (upstream used more than the worst case)",
        )
        .unwrap_or_else(|_| unreachable_metric("budget_overshoot_usd_total"));
        register(&registry, Box::new(budget_overshoot_usd.clone()));
        Metrics {
            key_spend_usd: gauge(
                &registry,
                "key_spend_usd",
                "Spend of the key in its current budget period",
                &["key"],
            ),
            key_budget_remaining_usd: gauge(
                &registry,
                "key_budget_remaining_usd",
                "Budget left in the key's current period (capped keys)",
                &["key"],
            ),
            key_budget_used_ratio: gauge(
                &registry,
                "key_budget_used_ratio",
                "Share of the key's budget spent this period (capped keys)",
                &["key"],
            ),
            key_remaining_requests: gauge(
                &registry,
                "key_remaining_requests",
                "Requests left in the key's tightest request-rate window",
                &["key"],
            ),
            key_remaining_tokens: gauge(
                &registry,
                "key_remaining_tokens",
                "Tokens left in the key's tightest token-rate window",
                &["key"],
            ),
            group_spend_usd: gauge(
                &registry,
                "group_spend_usd",
                "Spend of a team's or customer's keys in its current budget period",
                &["level", "name"],
            ),
            group_reserved_usd: gauge(
                &registry,
                "group_reserved_usd",
                "What requests in flight have reserved of a team's or customer's budget",
                &["level", "name"],
            ),
            group_budget_remaining_usd: gauge(
                &registry,
                "group_budget_remaining_usd",
                "Budget left in a team's or customer's current period (capped ones)",
                &["level", "name"],
            ),
            fallbacks: counter(
                &registry,
                "fallbacks_total",
                "Requests that fell back to another model, by the model fallen back to",
                &["model"],
            ),
            budget_overshoot_usd,
            budget_alerts: counter(
                &registry,
                "budget_alerts_total",
                "Budget alert thresholds crossed, by threshold percent",
                &["threshold"],
            ),
            soft_budget_alerts: counter(
                &registry,
                "soft_budget_alerts_total",
                "Soft budgets reached (once per key and period)",
                &[],
            ),
            velocity_alerts: counter(
                &registry,
                "velocity_alerts_total",
                "Spend spikes announced (once per episode), by what tripped them",
                &["trigger"],
            ),
            rejections: counter(
                &registry,
                "rejections_total",
                "Requests the gateway refused, by reason",
                &["reason"],
            ),
            state_backend_up,
            state_admissions: counter(
                &registry,
                "state_admissions_total",
                "Shared-state admissions by where they were decided: allowance or redis",
                &["decided_by"],
            ),
            usage_batch_duration,
            usage_batch_retries,
            output_count_failures,
            client_connections,
            connections_shed: counter(
                &registry,
                "connections_shed_total",
                "Connections accepted past the connection bound, by what was done: ops_only or closed",
                &["action"],
            ),
            config_reloads: counter(
                &registry,
                "config_reloads_total",
                "Configuration reloads by result",
                &["result"],
            ),
            hot,
            registry,
        }
    }

    /// This thread's copy of the families every request touches: a lane's own, so that its
    /// counters and histograms are not written from the other cores too.
    pub fn hot(&self) -> &Hot {
        match LANE.with(Cell::get) {
            0 => &self.hot[0],
            lane => &self.hot[1 + (lane - 1) % (self.hot.len() - 1)],
        }
    }

    /// Every copy of the hot families, for totals across them.
    pub fn shards(&self) -> impl Iterator<Item = &Hot> {
        self.hot.iter()
    }

    /// `model`'s series of the families every request touches, in this thread's copy.
    pub fn model(&self, model: &str) -> Arc<ModelSeries> {
        self.hot().model(model)
    }

    /// Usage events queued between the hot path and the ledger, summed over the copies.
    pub fn usage_pending(&self) -> i64 {
        self.hot.iter().map(|hot| hot.usage_pending.get()).sum()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every family this gateway can export (with its prefix), whether or not it has samples
    /// yet; dashboards and alert rules are checked against this list.
    pub fn family_names(&self) -> Vec<String> {
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.rejections.clone()),
            Box::new(self.state_backend_up.clone()),
            Box::new(self.usage_batch_duration.clone()),
            Box::new(self.usage_batch_retries.clone()),
            Box::new(self.output_count_failures.clone()),
            Box::new(self.client_connections.clone()),
            Box::new(self.connections_shed.clone()),
            Box::new(self.state_admissions.clone()),
            Box::new(self.config_reloads.clone()),
            Box::new(self.budget_overshoot_usd.clone()),
            Box::new(self.budget_alerts.clone()),
            Box::new(self.velocity_alerts.clone()),
            Box::new(self.soft_budget_alerts.clone()),
            Box::new(self.fallbacks.clone()),
            Box::new(self.key_spend_usd.clone()),
            Box::new(self.key_budget_remaining_usd.clone()),
            Box::new(self.key_budget_used_ratio.clone()),
            Box::new(self.key_remaining_requests.clone()),
            Box::new(self.key_remaining_tokens.clone()),
        ];
        collectors.extend(self.hot[0].collectors());
        collectors
            .iter()
            .flat_map(|c| {
                c.desc()
                    .into_iter()
                    .map(|d| format!("tollgate_{}", d.fq_name))
            })
            .collect()
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "metrics encoding failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `2xx`, `4xx`… — a bounded label for any status code.
/// A counter family's values summed by one label, over the series whose `only` label (when
/// given) has the given value: what the admin API's health summary reads.
pub fn totals_by<'a>(
    families: impl IntoIterator<Item = &'a IntCounterVec>,
    label: &str,
    only: Option<(&str, &str)>,
) -> std::collections::BTreeMap<String, u64> {
    let mut totals = std::collections::BTreeMap::new();
    let collected = families.into_iter().flat_map(|family| family.collect());
    for metric in collected
        .collect::<Vec<_>>()
        .iter()
        .flat_map(|f| f.get_metric())
    {
        let value_of = |name: &str| {
            metric
                .get_label()
                .iter()
                .find(|pair| pair.name() == name)
                .map(|pair| pair.value())
        };
        if only.is_some_and(|(name, wanted)| value_of(name) != Some(wanted)) {
            continue;
        }
        let value = metric.get_counter().get_value() as u64;
        *totals
            .entry(value_of(label).unwrap_or_default().to_owned())
            .or_insert(0) += value;
    }
    totals
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_shows_only_once_it_has_a_figure() {
        let metrics = Metrics::new();
        let series = metrics.model("m");
        series.input_tokens.get().inc_by(3);
        let text = metrics.render();
        assert!(text.contains("tollgate_input_tokens_total{model=\"m\"} 3"));
        assert!(!text.contains("tollgate_output_tokens_total{"), "{text}");
        assert!(!text.contains("time_to_first_token"), "{text}");
        assert!(Arc::ptr_eq(&series, &metrics.model("m")));
    }

    #[test]
    fn families_are_prefixed_and_render() {
        let metrics = Metrics::new();
        metrics
            .hot()
            .requests
            .with_label_values(&["m", "cheap", "chat_completions", "2xx"])
            .inc();
        let text = metrics.render();
        assert!(text.contains("tollgate_requests_total{endpoint=\"chat_completions\",model=\"m\",status=\"2xx\",tier=\"cheap\"} 1"));
    }

    /// Each lane writes its own copy of the hot families; a scrape and the health totals read
    /// their sums, histograms bucket by bucket.
    #[test]
    fn the_lanes_copies_are_summed() {
        let metrics = Arc::new(Metrics::new());
        let lanes: Vec<_> = (0..2)
            .map(|lane| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    use_lane_shard(lane);
                    let hot = metrics.hot();
                    hot.requests
                        .with_label_values(&["m", "cheap", "chat_completions", "5xx"])
                        .inc_by(lane as u64 + 1);
                    let series = metrics.model("m");
                    series.input_tokens.get().inc_by(100);
                    series.request_duration[0]
                        .get()
                        .observe(0.25 * (lane as f64 + 1.0));
                    hot.usage_pending.inc();
                })
            })
            .collect();
        for lane in lanes {
            lane.join().unwrap();
        }
        // The writer's side: every other thread writes the first copy.
        metrics.hot().usage_pending.sub(1);
        metrics
            .hot()
            .requests
            .with_label_values(&["m", "cheap", "chat_completions", "5xx"])
            .inc();

        let text = metrics.render();
        let line = |start: &str| {
            text.lines()
                .find(|line| line.starts_with(start))
                .unwrap_or_else(|| panic!("no {start} in {text}"))
                .to_owned()
        };
        assert_eq!(
            line("tollgate_requests_total{"),
            "tollgate_requests_total{endpoint=\"chat_completions\",model=\"m\",status=\"5xx\",tier=\"cheap\"} 4"
        );
        assert_eq!(
            line("tollgate_input_tokens_total{"),
            "tollgate_input_tokens_total{model=\"m\"} 200"
        );
        assert_eq!(
            line("tollgate_request_duration_seconds_count{"),
            "tollgate_request_duration_seconds_count{model=\"m\",streamed=\"false\"} 2"
        );
        assert_eq!(
            line("tollgate_request_duration_seconds_sum{"),
            "tollgate_request_duration_seconds_sum{model=\"m\",streamed=\"false\"} 0.75"
        );
        let bucket = |le: &str| {
            line(&format!(
                "tollgate_request_duration_seconds_bucket{{model=\"m\",streamed=\"false\",le=\"{le}\"}}"
            ))
        };
        assert!(bucket("0.1").ends_with(" 0"), "{text}");
        assert!(bucket("0.25").ends_with(" 1"), "{text}");
        assert!(bucket("0.5").ends_with(" 2"), "{text}");
        assert_eq!(
            line("tollgate_usage_events_pending "),
            "tollgate_usage_events_pending 1"
        );
        assert_eq!(metrics.usage_pending(), 1);
        let errors = totals_by(
            metrics.shards().map(|hot| &hot.requests),
            "model",
            Some(("status", "5xx")),
        );
        assert_eq!(errors.get("m"), Some(&4));
    }
}
