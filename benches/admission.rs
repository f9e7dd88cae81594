//! Admission per request — authentication (hash and index lookup), throttles (RPM, TPM,
//! concurrency) and the budget reservation, then settlement — with 10 and 100,000 keys, with
//! spend-rate caps, and for keys in a team and a customer (three levels, each capped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tollgate::auth::group::{GroupIndex, GroupRecord};
use tollgate::auth::{hash_secret, KeyIndex, KeyRecord};
use tollgate::limits::{BudgetPeriod, Demand, KeyLimits, Level, Limiter, SpendRate, SystemClock};
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

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Bare,
    SpendRate,
    /// Every key in one team and one customer, each with RPM, TPM, a budget and spend caps.
    ThreeLevels,
}

fn group(level: Level, name: &str) -> GroupRecord {
    GroupRecord {
        budget_usd: Some(Money::from_micros(1_000_000_000_000)),
        rpm: Some(1_000_000_000),
        tpm: Some(u64::MAX / 4),
        max_usd_per_minute: Some(Money::from_micros(1_000_000_000_000)),
        max_usd_per_hour: Some(Money::from_micros(10_000_000_000_000)),
        ..GroupRecord::new(level, name)
    }
}

fn bench_admission(c: &mut Criterion) {
    let mut bench = c.benchmark_group("admission");
    for (keys, case) in [
        (10usize, Case::Bare),
        (100_000, Case::Bare),
        (10, Case::SpendRate),
        (10, Case::ThreeLevels),
    ] {
        let index = KeyIndex::default();
        let groups = GroupIndex::default();
        let limiter = Limiter::new(Arc::new(SystemClock), vec![50, 80, 100]);
        limiter.set_model("gpt-4o-mini", Some(1_000_000_000), Some(u64::MAX / 4));
        if case == Case::ThreeLevels {
            for record in [group(Level::Team, "search"), group(Level::Customer, "acme")] {
                limiter.upsert(record.level, &record.name, &record.limits(), None);
                groups.put(record);
            }
        }
        let mut secrets = Vec::with_capacity(keys);
        for i in 0..keys {
            let (secret, mut record) = key(i);
            if case == Case::ThreeLevels {
                record.team = Some("search".to_owned());
                record.customer = Some("acme".to_owned());
            }
            let spend_rate = case != Case::Bare;
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
            limiter.upsert(Level::Key, &record.id, &limits, None);
            index.put(record);
            secrets.push(secret);
        }
        let demand = Demand {
            tokens: 1_500,
            cost: Money(750_000),
        };
        let name = match case {
            Case::Bare => "auth+admit+settle",
            Case::SpendRate => "auth+admit+settle, spend-rate caps",
            Case::ThreeLevels => "auth+admit+settle, key+team+customer",
        };
        let mut next = 0usize;
        bench.bench_with_input(BenchmarkId::new(name, keys), &keys, |b, _| {
            b.iter(|| {
                next = (next + 7_919) % secrets.len();
                let key = index.authenticate(&secrets[next]).unwrap();
                let levels = groups.above(key.team.as_deref(), key.customer.as_deref());
                let ticket = limiter
                    .admit(&key.id, levels.above(), "gpt-4o-mini", demand)
                    .unwrap();
                limiter.settle(ticket, 1_200, Money(600_000))
            })
        });
    }
    bench.finish();
}

criterion_group!(benches, bench_admission);
criterion_main!(benches);
