//! Reports against a large embedded ledger: usage by key, model, tier, day and hour, one key's
//! usage, an invoice's period usage, and the spend and rating totals restored at start, each
//! timed (median of 3) on ledgers of 1M and 10M synthetic records — 1,000 keys, four models,
//! one month — with the ledger's write rate when it builds one and the migration's time when
//! it opens one written before rollups. A ledger is built once under `target/bench-ledgers/`
//! and reused by later runs.
//!
//!   cargo bench --bench reports                 # 1M and 10M rows
//!   cargo bench --bench reports -- 270000       # other sizes
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::config::Config;
use tollgate::limits::BudgetPeriod;
use tollgate::meter::record::MeterEvent;
use tollgate::meter::sink::{Durability, UsageWriter, MAX_BATCH};
use tollgate::rating::ledger::{GroupBy, LedgerReader, LedgerWriter, SqliteLedgerReader};
use tollgate::rating::Rater;

#[path = "support/records.rs"]
mod records;

const KEYS: usize = 1_000;
const MODELS: [&str; 4] = ["gpt-4o-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4.1"];
/// 2026-11-01T00:00:00Z: the month every record falls in.
const MONTH_START_MS: i64 = 1_793_491_200_000;
const MONTH_MS: i64 = 30 * 86_400_000;

/// Writes `rows` records spread evenly over the month, as the usage thread would, unless a
/// complete ledger of that size is already there. Returns the write rate when it wrote: the
/// records written per second of `write_batch` (ledger rows and their rollups), not counting
/// the time spent making and rating them.
fn build(dir: &Path, rows: usize, config: &Config) -> Option<f64> {
    let complete = dir.join("complete");
    if complete.exists() {
        return None;
    }
    let _ = std::fs::remove_dir_all(dir);
    let models: Vec<_> = MODELS
        .iter()
        .map(|name| Arc::clone(config.model(name).unwrap()))
        .collect();
    let rater = Rater::default();
    let mut writer = LedgerWriter::open(dir, Durability::Batched).unwrap();
    let mut writing = Duration::ZERO;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    for i in 0..rows {
        let at = MONTH_START_MS + (i as i64 * MONTH_MS) / rows as i64;
        let model = &models[i % models.len()];
        batch.push(MeterEvent::Usage(records::record(
            i, KEYS, at, model, &rater, config,
        )));
        if batch.len() == MAX_BATCH || i + 1 == rows {
            let started = Instant::now();
            writer.write_batch(&batch).unwrap();
            writing += started.elapsed();
            batch.clear();
        }
    }
    let rate = rows as f64 / writing.as_secs_f64();
    drop(writer);
    std::fs::write(&complete, b"").unwrap();
    Some(rate)
}

/// A report's name and one run of it.
type Report<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn median_of_3(mut run: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..3)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[1]
}

fn main() {
    std::env::set_var("OPENAI_API_KEY", "sk-bench");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::load(&root.join("routes.toml")).unwrap();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000_000, 10_000_000]
    } else {
        sizes
    };
    let month_end = MONTH_START_MS + MONTH_MS;
    let one_key = "key_0042";
    println!("| rows | report | median of 3 |");
    println!("|---|---|---|");
    for rows in sizes {
        let dir = root.join(format!("target/bench-ledgers/{rows}"));
        if let Some(rate) = build(&dir, rows, &config) {
            println!("| {rows} | write, records/s | {rate:.0} |");
        }
        let reader = SqliteLedgerReader::new(&dir);
        // A ledger from before rollups is migrated on its first open.
        let opened = Instant::now();
        reader.record("req_none").unwrap();
        let opened = opened.elapsed();
        if opened > Duration::from_secs(1) {
            println!(
                "| {rows} | migration to rollups | {:.1} s |",
                opened.as_secs_f64()
            );
        }
        let last_day = month_end - 86_400_000;
        let reports: [Report; 10] = [
            (
                "usage by key, month",
                Box::new(|| {
                    let rows = reader
                        .usage(MONTH_START_MS, month_end, GroupBy::Key, None)
                        .unwrap();
                    assert_eq!(rows.len(), KEYS);
                }),
            ),
            (
                "usage by model, month",
                Box::new(|| {
                    let rows = reader
                        .usage(MONTH_START_MS, month_end, GroupBy::Model, None)
                        .unwrap();
                    assert_eq!(rows.len(), MODELS.len());
                }),
            ),
            (
                "usage by day, month",
                Box::new(|| {
                    let rows = reader
                        .usage(MONTH_START_MS, month_end, GroupBy::Day, None)
                        .unwrap();
                    assert_eq!(rows.len(), 30);
                }),
            ),
            (
                "usage by tier, month",
                Box::new(|| {
                    reader
                        .usage(MONTH_START_MS, month_end, GroupBy::Tier, None)
                        .unwrap();
                }),
            ),
            (
                "usage by hour, last day",
                Box::new(|| {
                    let rows = reader
                        .usage(last_day, month_end, GroupBy::Hour, None)
                        .unwrap();
                    assert_eq!(rows.len(), 24);
                }),
            ),
            (
                "usage by key, 30 days to a minute past an hour",
                Box::new(|| {
                    let to = month_end - 86_400_000 + 60_000;
                    reader
                        .usage(to - 30 * 86_400_000, to, GroupBy::Key, None)
                        .unwrap();
                }),
            ),
            (
                "one key's usage by model, month",
                Box::new(|| {
                    reader
                        .usage(MONTH_START_MS, month_end, GroupBy::Model, Some(one_key))
                        .unwrap();
                }),
            ),
            (
                "invoice period usage, one key",
                Box::new(|| {
                    reader
                        .period_usage(one_key, MONTH_START_MS, month_end)
                        .unwrap();
                }),
            ),
            (
                "spend restored at start (month)",
                Box::new(|| {
                    let spend = reader.spend_since(MONTH_START_MS).unwrap();
                    assert_eq!(spend.len(), KEYS);
                }),
            ),
            (
                "rating totals restored at start",
                Box::new(|| {
                    let month = BudgetPeriod::Month.start_ms(MONTH_START_MS);
                    reader.cursors(month).unwrap();
                }),
            ),
        ];
        for (name, report) in reports {
            let took = median_of_3(report);
            println!("| {rows} | {name} | {:.1} ms |", took.as_secs_f64() * 1e3);
        }
    }
}
