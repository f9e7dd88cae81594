//! Admission per request — authentication (hash and index lookup), throttles (RPM, TPM,
//! concurrency) and the budget reservation, then settlement — with 10 and 100,000 keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tollgate::auth::{hash_secret, KeyIndex, KeyRecord};
use tollgate::limits::{BudgetPeriod, Demand, KeyLimits, Limiter, SpendRate, SystemClock};
use tollgate::money::Money;

fn key(i: usize) -> (String, KeyRecord) {
    let secret = format!("sk-tg-{i:048}");
    let record = KeyRecord {
        id: format!("key_{i:016}"),
        name: format!("team-{i}"),
        prefix: secret[..10].to_owned(),
        secret_hash: hash_secret(&secret),
        owner: None,
        team: None,
        customer: None,
        budget_usd: Some(Money::from_micros(1_000_000_000)),
        budget_period: BudgetPeriod::Month,
        rpm: Some(1_000_000_000),
        tpm: Some(u64::MAX / 4),
        max_concurrency: Some(1_000),
        max_usd_per_minute: None,
        max_usd_per_hour: None,
        soft_budget_usd: None,
        models: None,
        plan: None,
        seats: 1,
        created_at_ms: 0,
        revoked_at_ms: None,
    };
    (secret, record)
}

fn bench_admission(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    // The last case adds spend-rate caps (two more throttles, on dollars) to every key.
    for (keys, spend_rate) in [(10usize, false), (100_000, false), (10, true)] {
        let index = KeyIndex::default();
        let limiter = Limiter::new(Arc::new(SystemClock), vec![50, 80, 100]);
        limiter.set_model("gpt-4o-mini", Some(1_000_000_000), Some(u64::MAX / 4));
        let mut secrets = Vec::with_capacity(keys);
        for i in 0..keys {
            let (secret, record) = key(i);
            let limits = KeyLimits {
                rpm: record.rpm,
                tpm: record.tpm,
                max_concurrency: record.max_concurrency,
                budget: record.budget_usd.map(|cap| (cap, record.budget_period)),
                spend_rate: SpendRate {
                    per_minute: spend_rate.then_some(Money::from_micros(1_000_000_000)),
                    per_hour: spend_rate.then_some(Money::from_micros(10_000_000_000)),
                },
            };
            limiter.upsert_key(&record.id, &limits, None);
            index.put(record);
            secrets.push(secret);
        }
        let demand = Demand {
            tokens: 1_500,
            cost: Money(750_000),
        };
        let mut next = 0usize;
        group.bench_with_input(
            BenchmarkId::new(
                if spend_rate {
                    "auth+admit+settle, spend-rate caps"
                } else {
                    "auth+admit+settle"
                },
                keys,
            ),
            &keys,
            |b, _| {
                b.iter(|| {
                    next = (next + 7_919) % secrets.len();
                    let key = index.authenticate(&secrets[next]).unwrap();
                    let ticket = limiter.admit(&key.id, "gpt-4o-mini", demand).unwrap();
                    limiter.settle(ticket, 1_200, Money(600_000))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_admission);
criterion_main!(benches);
