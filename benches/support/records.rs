//! Synthetic usage records as the gateway writes them, rated under the default plan, for the
//! ledger benches.

use tollgate::api::Endpoint;
use tollgate::config::{Config, Model};
use tollgate::meter::record::{Outcome, TokenUsage, UsageRecord};
use tollgate::rating::Rater;

/// The `i`th record: key `key_{i % keys}`, started at `started_at_ms`.
pub fn record(
    i: usize,
    keys: usize,
    started_at_ms: i64,
    model: &Model,
    rater: &Rater,
    config: &Config,
) -> UsageRecord {
    let usage = TokenUsage {
        input: 900 + (i % 200) as u64,
        cached_input: 0,
        output: 300,
        cache_write_input: 0,
    };
    let key_id = format!("key_{:04}", i % keys);
    let (rated, list_cost) = rater.rate(
        &key_id,
        config.plan(None),
        model.rated(),
        usage,
        1,
        started_at_ms,
    );
    UsageRecord {
        request_id: tollgate::api::new_request_id(),
        client_request_id: None,
        started_at_ms,
        key_id: Some(key_id.into()),
        key_name: Some("bench".into()),
        plan: None,
        endpoint: Endpoint::ChatCompletions,
        requested_model: "auto".into(),
        served_model: Some(model.name.as_str().into()),
        upstream: Some("openai".into()),
        tier: Some(model.tier.as_str().into()),
        route_rule: Some("default".into()),
        streamed: i.is_multiple_of(2),
        status: 200,
        outcome: Outcome::Completed,
        finish_reason: Some("stop".into()),
        reported: Some(usage),
        counted: usage,
        attempts: 1,
        answered: true,
        latency_ms: 120,
        ttft_ms: Some(40),
        charge: rated.charge,
        list_cost,
        plan_cost: rated.plan_cost,
        micro_credits: rated.micro_credits,
        response_id: None,
        counted_estimate: false,
    }
}
