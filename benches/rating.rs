//! Rating plus ledger write throughput: records priced under a plan and written to SQLite in
//! batched transactions, as the usage thread does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tollgate::api::Endpoint;
use tollgate::config::{Config, Model};
use tollgate::meter::record::{MeterEvent, Outcome, TokenUsage, UsageRecord};
use tollgate::meter::sink::Durability;
use tollgate::meter::sink::UsageWriter;
use tollgate::rating::ledger::LedgerWriter;
use tollgate::rating::Rater;

use tollgate::meter::sink::MAX_BATCH as BATCH;

fn record(i: usize, model: &Model, rater: &Rater, config: &Config) -> UsageRecord {
    let usage = TokenUsage {
        input: 900 + (i % 200) as u64,
        cached_input: 0,
        output: 300,
        cache_write_input: 0,
    };
    let key_id = format!("key_{:04}", i % 100);
    let (rated, list_cost) = rater.rate(
        &key_id,
        config.plan(None),
        model.rated(),
        usage,
        1,
        1_795_000_000_000,
    );
    UsageRecord {
        request_id: tollgate::api::new_request_id(),
        client_request_id: None,
        started_at_ms: 1_795_000_000_000 + i as i64,
        key_id: Some(key_id),
        key_name: Some("bench".to_owned()),
        plan: None,
        endpoint: Endpoint::ChatCompletions,
        requested_model: "auto".to_owned(),
        served_model: Some(model.name.clone()),
        upstream: Some("openai".to_owned()),
        tier: Some(model.tier.clone()),
        route_rule: Some("default".to_owned()),
        streamed: i.is_multiple_of(2),
        status: 200,
        outcome: Outcome::Completed,
        finish_reason: Some("stop".to_owned()),
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

fn bench_rating(c: &mut Criterion) {
    std::env::set_var("OPENAI_API_KEY", "sk-bench");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::load(&root.join("routes.toml")).unwrap();
    let model = Arc::clone(config.model("gpt-4o-mini").unwrap());
    let dir = std::env::temp_dir().join(format!("tollgate-bench-rating-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut writer = LedgerWriter::open(&dir, Durability::Batched).unwrap();
    let rater = Rater::default();
    let mut next = 0usize;
    let mut group = c.benchmark_group("rating");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("rate+write/batched/full-batch", |b| {
        b.iter_batched(
            || {
                let start = next;
                next += BATCH;
                start
            },
            |start| {
                let events: Vec<MeterEvent> = (start..start + BATCH)
                    .map(|i| MeterEvent::Usage(record(i, &model, &rater, &config)))
                    .collect();
                writer.write_batch(&events).unwrap();
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_rating);
criterion_main!(benches);
