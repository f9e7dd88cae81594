//! Admission latency with Redis: p50 / p99 of one admission (then its settlement, not
//! timed: it does not hold the request), one at a time and 64 at once, for a key far from its
//! limits — admitted from this replica's allowance — and for a key with a concurrency limit,
//! which gets no allowance, so every admission is a script call (batched with whatever else
//! its thread has queued). The second is what every admission cost before allowances. The
//! third is a key in a team and a customer: three leases, asked for together.
//!
//! Starts its own throwaway `redis-server` on a free loopback port; prints a Markdown table.
//!   cargo bench --bench admission_shared
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::limits::{Above, BudgetPeriod, Demand, KeyLimits, Level, LevelRef};
use tollgate::money::Money;
use tollgate::state::redis::{owner_of, Admitted, OnUnavailable, RedisState, Seed};
use tollgate::state::Used;

const ROUNDS_ALONE: usize = 4_000;
const TASKS: usize = 64;
const ROUNDS_EACH: usize = 150;

struct Server(std::process::Child, std::path::PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn start_redis() -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("tollgate-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian's redis-server package) must be installed");
    let server = Server(child, dir);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, format!("redis://127.0.0.1:{port}/0"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server did not start");
}

/// One admission, timed, then its settlement.
async fn admit_once(
    redis: &Arc<RedisState>,
    key: &str,
    limits: &KeyLimits,
    above: Above<'_>,
) -> Duration {
    let demand = Demand {
        tokens: 300,
        cost: Money(90_000),
    };
    let started = Instant::now();
    let admitted = redis
        .admit(key, limits, above, "gpt-4o-mini", (0, 0), demand)
        .await
        .unwrap();
    let took = started.elapsed();
    let lease = match admitted {
        Admitted::Lease(lease) => lease,
        Admitted::NeedsSeed(level) => {
            let owner = match (level, above.team, above.customer) {
                (Level::Team, Some(team), _) => owner_of(level, team.name),
                (Level::Customer, _, Some(customer)) => owner_of(level, customer.name),
                _ => key.to_owned(),
            };
            redis
                .seed_spend(&owner, BudgetPeriod::Month, Money::ZERO, Seed::IfMissing)
                .await
                .unwrap();
            return took;
        }
        Admitted::Refused(refusal, _) => panic!("refused: {refusal:?}"),
    };
    let used = Used {
        tokens: 250,
        cost: Money(60_000),
        period: BudgetPeriod::Month,
    };
    redis.settle(lease, used, None, Box::new(|_| {}));
    took
}

fn quantiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.50), at(0.99))
}

fn main() {
    let (_server, url) = start_redis();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = runtime.block_on(async {
        let admissions = prometheus::IntCounterVec::new(
            prometheus::Opts::new("admissions", "bench"),
            &["decided_by"],
        )
        .unwrap();
        RedisState::connect(
            &url,
            Duration::from_secs(30),
            OnUnavailable::FailClosed,
            3,
            vec![50, 80, 100],
            prometheus::IntGauge::new("up", "bench").unwrap(),
            admissions,
        )
        .await
        .unwrap()
    });
    let far = KeyLimits {
        rpm: Some(1_000_000_000),
        tpm: Some(1_000_000_000_000),
        max_concurrency: None,
        budget: Some((Money::from_micros(1_000_000_000_000), BudgetPeriod::Month)),
        ..KeyLimits::default()
    };
    let exact = KeyLimits {
        max_concurrency: Some(1_000_000),
        ..far.clone()
    };
    let group = KeyLimits {
        rpm: Some(1_000_000_000),
        tpm: Some(1_000_000_000_000),
        budget: Some((Money::from_micros(1_000_000_000_000), BudgetPeriod::Month)),
        ..KeyLimits::default()
    };
    let in_groups = Above {
        team: Some(LevelRef {
            name: "bench-team",
            limits: &group,
            shared_id: "team:bench-team",
        }),
        customer: Some(LevelRef {
            name: "bench-customer",
            limits: &group,
            shared_id: "customer:bench-customer",
        }),
    };
    println!("| key | concurrent | admissions | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    for (label, key, limits, above) in [
        (
            "far from its limits (allowance)",
            "bench-far",
            &far,
            Above::NONE,
        ),
        (
            "concurrency-limited (a script each)",
            "bench-exact",
            &exact,
            Above::NONE,
        ),
        (
            "in a team and a customer (three leases)",
            "bench-levels",
            &far,
            in_groups,
        ),
    ] {
        let alone = runtime.block_on(async {
            // Warm-up: seeds the period's spend, makes the connection, takes the allowance.
            for _ in 0..50 {
                admit_once(&redis, key, limits, above).await;
            }
            let mut samples = Vec::with_capacity(ROUNDS_ALONE);
            for _ in 0..ROUNDS_ALONE {
                samples.push(admit_once(&redis, key, limits, above).await);
            }
            samples
        });
        let (p50, p99) = quantiles(alone);
        println!("| {label} | 1 | {ROUNDS_ALONE} | {p50:.1} | {p99:.1} |");
        let together = runtime.block_on(async {
            let tasks = (0..TASKS).map(|_| {
                let redis = redis.clone();
                let limits = limits.clone();
                let group = group.clone();
                let grouped = above != Above::NONE;
                tokio::spawn(async move {
                    let above = match grouped {
                        true => Above {
                            team: Some(LevelRef {
                                name: "bench-team",
                                limits: &group,
                                shared_id: "team:bench-team",
                            }),
                            customer: Some(LevelRef {
                                name: "bench-customer",
                                limits: &group,
                                shared_id: "customer:bench-customer",
                            }),
                        },
                        false => Above::NONE,
                    };
                    let mut samples = Vec::with_capacity(ROUNDS_EACH);
                    for _ in 0..ROUNDS_EACH {
                        samples.push(admit_once(&redis, key, &limits, above).await);
                    }
                    samples
                })
            });
            let mut samples = Vec::with_capacity(TASKS * ROUNDS_EACH);
            for task in tasks.collect::<Vec<_>>() {
                samples.extend(task.await.unwrap());
            }
            samples
        });
        let (p50, p99) = quantiles(together);
        println!(
            "| {label} | {TASKS} | {} | {p50:.1} | {p99:.1} |",
            TASKS * ROUNDS_EACH
        );
    }
}
