//! Rating plus ledger write throughput: records priced under a plan and written to SQLite in
//! batched transactions, as the usage thread does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tollgate::config::Config;
use tollgate::meter::record::MeterEvent;
use tollgate::meter::sink::Durability;
use tollgate::meter::sink::UsageWriter;
use tollgate::rating::ledger::LedgerWriter;
use tollgate::rating::Rater;

use tollgate::meter::sink::MAX_BATCH as BATCH;

#[path = "support/records.rs"]
mod records;

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
                    .map(|i| {
                        let at = 1_795_000_000_000 + i as i64;
                        MeterEvent::Usage(records::record(i, 100, at, &model, &rater, &config))
                    })
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
