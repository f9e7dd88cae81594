//! Shared state behind seams chosen once at start-up (`Gateway::start`): [`Admission`]
//! (throttles, concurrency slots, budget reservations and settlement, alert once-per-period
//! flags) and [`RatingTotals`] (each key's month so far). Each is `Embedded` — atomics and maps
//! in this process, exact for one replica — or `Shared` through Redis ([`redis`]), exact for
//! any number of replicas. The request path calls the seam and never names a backend.
//!
//! The shared backend may need I/O, so admission and rating are `async`; settlement never
//! waits (a shared one is queued for Redis), and the embedded backend never waits at all (see
//! `proxy::settle`).

pub mod redis;

use std::sync::Arc;

use crate::config::Model;
use crate::limits::{
    AlertCrossing, BudgetPeriod, BudgetSnapshot, Demand, KeyLimits, Limiter, RateLimitHeaders,
    Refusal, Settlement, SpendRate, Ticket,
};
use crate::money::Money;
use crate::rating::ledger::{LedgerError, LedgerReader};
use crate::rating::plan::{Cursor, Plan, Rated};
use crate::rating::Rater;
pub use redis::Once;
use redis::{Admitted, Charged, OnUnavailable, RedisState};
pub use redis::{Lease, MonthDelta, Used};

/// What an admitted request holds until it settles. Dropping it unsettled gives everything
/// back without any I/O in `Drop`.
pub enum Pass {
    Local(Ticket),
    Shared(Lease),
}

impl Pass {
    pub fn headers(&self) -> RateLimitHeaders {
        match self {
            Pass::Local(ticket) => ticket.headers(),
            Pass::Shared(lease) => lease.headers(),
        }
    }
}

/// A refusal with the throttle headers as they stood, which OpenAI sends on its 429s too.
pub struct Refused {
    pub refusal: Refusal,
    pub headers: RateLimitHeaders,
}

pub enum Admission {
    Embedded(Limiter),
    Shared {
        redis: Arc<RedisState>,
        /// Each replica's share of every limit, enforced here only while Redis is out of
        /// reach under `fail_open`.
        local_share: Limiter,
        share: f64,
        ledger: Arc<dyn LedgerReader>,
    },
}

/// A limit scaled to one replica's share, never below one unit.
fn share_of(limit: u64, share: f64) -> u64 {
    ((limit as f64 * share).floor() as u64).max(1)
}

/// An amount scaled to one replica's share.
fn money_share(amount: Money, share: f64) -> Money {
    Money((amount.nanos() as f64 * share).floor() as i64)
}

fn shared_limits(limits: &KeyLimits, share: f64) -> KeyLimits {
    KeyLimits {
        rpm: limits.rpm.map(|v| share_of(u64::from(v), share) as u32),
        tpm: limits.tpm.map(|v| share_of(v, share)),
        max_concurrency: limits
            .max_concurrency
            .map(|v| share_of(u64::from(v), share) as u32),
        budget: limits.budget.map(|(cap, period)| match cap {
            crate::limits::UNCAPPED => (cap, period),
            cap => (money_share(cap, share), period),
        }),
        spend_rate: SpendRate {
            per_minute: limits
                .spend_rate
                .per_minute
                .map(|cap| money_share(cap, share)),
            per_hour: limits
                .spend_rate
                .per_hour
                .map(|cap| money_share(cap, share)),
        },
    }
}

fn model_limits(model: &Model) -> (u64, u64) {
    (model.rpm.map_or(0, u64::from), model.tpm.unwrap_or(0))
}

impl Admission {
    pub fn is_shared(&self) -> bool {
        matches!(self, Admission::Shared { .. })
    }

    /// Whether admission can decide: false only while Redis is unreachable under
    /// `fail_closed`, for `/readyz`.
    pub fn available(&self) -> bool {
        match self {
            Admission::Embedded(_) => true,
            Admission::Shared { redis, .. } => {
                redis.is_up() || redis.on_unavailable == OnUnavailable::FailOpen
            }
        }
    }

    pub fn upsert_key(&self, id: &str, limits: &KeyLimits, spent: Option<Money>) {
        match self {
            Admission::Embedded(limiter) => limiter.upsert_key(id, limits, spent),
            Admission::Shared {
                redis,
                local_share,
                share,
                ..
            } => {
                redis.retire_allowance(id);
                local_share.upsert_key(
                    id,
                    &shared_limits(limits, *share),
                    spent.map(|s| money_share(s, *share)),
                )
            }
        }
    }

    pub fn remove_key(&self, id: &str) {
        match self {
            Admission::Embedded(limiter) => limiter.remove_key(id),
            Admission::Shared {
                redis, local_share, ..
            } => {
                redis.retire_allowance(id);
                local_share.remove_key(id)
            }
        }
    }

    pub fn set_model(&self, name: &str, rpm: Option<u32>, tpm: Option<u64>) {
        match self {
            Admission::Embedded(limiter) => limiter.set_model(name, rpm, tpm),
            Admission::Shared {
                local_share, share, ..
            } => local_share.set_model(
                name,
                rpm.map(|v| share_of(u64::from(v), *share) as u32),
                tpm.map(|v| share_of(v, *share)),
            ),
        }
    }

    /// The period of a key's live budget, to tell whether a change needs the ledger's spend.
    /// Shared budgets are kept per period, so they never need it.
    pub fn budget_period(&self, key_id: &str) -> Option<BudgetPeriod> {
        match self {
            Admission::Embedded(limiter) => limiter.budget_period(key_id),
            Admission::Shared { .. } => None,
        }
    }

    /// Every limit of the request at once, all or nothing.
    pub async fn admit(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        model: &Model,
        demand: Demand,
    ) -> Result<Pass, Refused> {
        let (redis, local_share, ledger) = match self {
            Admission::Embedded(limiter) => {
                return match limiter.admit(key_id, &model.name, demand) {
                    Ok(ticket) => Ok(Pass::Local(ticket)),
                    Err(refusal) => Err(Refused {
                        refusal,
                        headers: limiter.headers(key_id, &model.name),
                    }),
                }
            }
            Admission::Shared {
                redis,
                local_share,
                ledger,
                ..
            } => (redis, local_share, ledger),
        };
        let unavailable = |error: redis::StateError| {
            if redis.on_unavailable == OnUnavailable::FailOpen {
                return local_share
                    .admit(key_id, &model.name, demand)
                    .map(Pass::Local)
                    .map_err(|refusal| Refused {
                        refusal,
                        headers: local_share.headers(key_id, &model.name),
                    });
            }
            tracing::debug!(%error, "admission refused: shared state unreachable");
            Err(Refused {
                refusal: Refusal::Unavailable,
                headers: RateLimitHeaders::default(),
            })
        };
        for _ in 0..2 {
            match redis
                .admit(key_id, limits, &model.name, model_limits(model), demand)
                .await
            {
                Ok(Admitted::Lease(lease)) => return Ok(Pass::Shared(lease)),
                Ok(Admitted::Refused(refusal, headers)) => {
                    return Err(Refused { refusal, headers })
                }
                Ok(Admitted::NeedsSeed) => match seed_spend(redis, ledger, key_id, limits).await {
                    Ok(()) => {}
                    Err(Unseeded::Ledger) => {
                        return Err(Refused {
                            refusal: Refusal::Unavailable,
                            headers: RateLimitHeaders::default(),
                        })
                    }
                    Err(Unseeded::Redis(error)) => return unavailable(error),
                },
                Err(error) => return unavailable(error),
            }
        }
        Err(Refused {
            refusal: Refusal::Unavailable,
            headers: RateLimitHeaders::default(),
        })
    }

    /// Moves a pass's model throttles to a fallback model before it is tried.
    pub async fn fall_back_to(&self, pass: &mut Pass, model: &Model) -> Result<(), Refusal> {
        match (self, pass) {
            (Admission::Embedded(limiter), Pass::Local(ticket)) => {
                limiter.fall_back_to(ticket, &model.name)
            }
            (Admission::Shared { local_share, .. }, Pass::Local(ticket)) => {
                local_share.fall_back_to(ticket, &model.name)
            }
            (Admission::Shared { redis, .. }, Pass::Shared(lease)) => {
                match redis
                    .fall_back_to(lease, &model.name, model_limits(model))
                    .await
                {
                    Ok(moved) => moved,
                    // The model's own throttle cannot be checked: trying it is what a
                    // replica without Redis would do too.
                    Err(_) => Ok(()),
                }
            }
            (Admission::Embedded(_), Pass::Shared(_)) => Ok(()),
        }
    }

    /// Settles synchronously; only the embedded backend (and a fail-open local pass) can.
    /// A shared lease is handed back for [`Admission::settle`].
    pub fn settle_now(
        &self,
        pass: Pass,
        tokens: u64,
        cost: Money,
    ) -> Result<Settlement, Box<Lease>> {
        match (self, pass) {
            (Admission::Embedded(limiter), Pass::Local(ticket)) => {
                Ok(limiter.settle(ticket, tokens, cost))
            }
            (Admission::Shared { local_share, .. }, Pass::Local(ticket)) => {
                Ok(local_share.settle(ticket, tokens, cost))
            }
            (_, Pass::Shared(lease)) => Err(Box::new(lease)),
        }
    }

    /// Settles a shared lease without waiting for Redis (see [`RedisState::settle`]); alerts
    /// come later, through `alerts`. A settlement Redis did not take is left to the lease's
    /// expiry: the reservation ends then, and the cost stays in the ledger.
    pub fn settle_shared(
        &self,
        lease: Lease,
        used: Used,
        month: Option<MonthDelta>,
        alerts: Box<dyn FnOnce(Vec<AlertCrossing>) + Send>,
    ) -> Settlement {
        let Admission::Shared { redis, .. } = self else {
            return Settlement::default();
        };
        Settlement {
            overshoot: redis.settle(lease, used, month, alerts),
            alerts: Vec::new(),
        }
    }

    /// Sends what is still queued for Redis and gives back this replica's allowances: at
    /// shutdown, after the last settlement.
    pub async fn stop(&self) {
        if let Admission::Shared { redis, .. } = self {
            redis.flush().await;
            redis.return_allowances(false).await;
        }
    }

    /// Charges an amount known before it is spent (a reported outcome) to the key's budget,
    /// whole or not at all, once per `once.id`: across replicas by Redis, in one process by
    /// the caller (and, for good, by the ledger's unique key).
    pub async fn charge(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        amount: Money,
        once: Once<'_>,
    ) -> Result<Charge, Refusal> {
        let (redis, local_share, ledger) = match self {
            Admission::Embedded(limiter) => {
                return limiter
                    .charge(key_id, amount)
                    .map(|settled| Charge::Done(settled.alerts))
            }
            Admission::Shared {
                redis,
                local_share,
                ledger,
                ..
            } => (redis, local_share, ledger),
        };
        for _ in 0..2 {
            let error = match redis.charge(key_id, limits, amount, once).await {
                Ok(Some(Charged::Done)) => return Ok(Charge::Done(Vec::new())),
                Ok(Some(Charged::Refused(refusal))) => return Err(refusal),
                Ok(Some(Charged::Repeat(first))) => return Ok(Charge::Repeat(first)),
                Ok(None) => match seed_spend(redis, ledger, key_id, limits).await {
                    Ok(()) => continue,
                    Err(Unseeded::Ledger) => return Err(Refusal::Unavailable),
                    Err(Unseeded::Redis(error)) => error,
                },
                Err(error) => error,
            };
            if redis.on_unavailable == OnUnavailable::FailOpen {
                return local_share
                    .charge(key_id, amount)
                    .map(|settled| Charge::Done(settled.alerts));
            }
            tracing::debug!(%error, "charge refused: shared state unreachable");
            return Err(Refusal::Unavailable);
        }
        Err(Refusal::Unavailable)
    }

    /// A key's live budget figures without waiting: the embedded backend only.
    pub fn budget_now(&self, key_id: &str) -> Option<BudgetSnapshot> {
        match self {
            Admission::Embedded(limiter) => limiter.budget(key_id),
            Admission::Shared { .. } => None,
        }
    }

    /// A key's live budget figures, the same on every replica.
    pub async fn budget(&self, key_id: &str, limits: &KeyLimits) -> Option<BudgetSnapshot> {
        let (redis, ledger) = match self {
            Admission::Embedded(limiter) => return limiter.budget(key_id),
            Admission::Shared { redis, ledger, .. } => (redis, ledger),
        };
        match redis.budget(key_id, limits).await {
            Ok(Some(snapshot)) => return Some(snapshot),
            Ok(None) => {}
            Err(_) => return None,
        }
        seed_spend(redis, ledger, key_id, limits).await.ok()?;
        redis.budget(key_id, limits).await.ok().flatten()
    }

    /// Claims an alert episode, once across replicas (see `Limiter::claim_episode`). With
    /// Redis out of reach nobody claims it: the next check tries again.
    pub async fn claim_episode(&self, name: &str, lasts: std::time::Duration) -> bool {
        match self {
            Admission::Embedded(limiter) => limiter.claim_episode(name, lasts),
            Admission::Shared { redis, .. } => match redis.claim_episode(name, lasts).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(%error, "alert episode not claimed; checked again later");
                    false
                }
            },
        }
    }

    /// Tells the other replicas that a key changed; a no-op for one replica.
    pub async fn publish_key_change(&self, key_id: &str) {
        if let Admission::Shared { redis, .. } = self {
            if let Err(error) = redis.publish_key_change(key_id).await {
                tracing::error!(%error, "key change not announced; replicas see it at their next poll");
            }
        }
    }
}

/// Lets a fallback model be tried only when its own throttles admit the request.
pub struct FallbackGate<'a> {
    pub admission: &'a Admission,
    pub pass: Option<&'a mut Pass>,
    pub metrics: &'a crate::metrics::Metrics,
}

impl FallbackGate<'_> {
    pub async fn admit(&mut self, model: &Model) -> bool {
        let Some(pass) = self.pass.as_deref_mut() else {
            return true;
        };
        match self.admission.fall_back_to(pass, model).await {
            Ok(()) => true,
            Err(refusal) => {
                self.metrics
                    .rejections
                    .with_label_values(&[refusal.reason()])
                    .inc();
                false
            }
        }
    }
}

/// Why a key's period spend could not be put into Redis: the ledger could not be read (and
/// that was logged), or Redis could not be reached.
enum Unseeded {
    Ledger,
    Redis(redis::StateError),
}

/// Seeds a key's spend for its budget period in Redis from the ledger, unless a replica
/// already has.
async fn seed_spend(
    redis: &RedisState,
    ledger: &Arc<dyn LedgerReader>,
    key_id: &str,
    limits: &KeyLimits,
) -> Result<(), Unseeded> {
    let period = limits.budget.map_or(BudgetPeriod::Month, |(_, p)| p);
    let spent = spend_from_ledger(ledger, key_id, period)
        .await
        .map_err(|error| {
            tracing::error!(%error, "cannot read a budget's spend from the ledger");
            Unseeded::Ledger
        })?;
    redis
        .seed_spend(key_id, period, spent)
        .await
        .map_err(Unseeded::Redis)
}

async fn spend_from_ledger(
    ledger: &Arc<dyn LedgerReader>,
    key_id: &str,
    period: BudgetPeriod,
) -> Result<Money, LedgerError> {
    let ledger = ledger.clone();
    let key_id = key_id.to_owned();
    let from_ms = period.start_ms(crate::unix_ms());
    tokio::task::spawn_blocking(move || {
        ledger
            .spend_since(from_ms)
            .map(|spend| spend.get(&key_id).copied().unwrap_or(Money::ZERO))
    })
    .await
    .unwrap_or_else(|error| Err(LedgerError::Io(std::io::Error::other(error.to_string()))))
}

/// What charging a known amount did: charged (with the alert thresholds it crossed), or
/// found the idempotency key charged before (what was remembered of that charge).
pub enum Charge {
    Done(Vec<AlertCrossing>),
    Repeat(String),
}

/// Each key's running totals for the month: what volume tiers, allowances and credit packs
/// are rated against.
pub enum RatingTotals {
    Embedded(Rater),
    Shared {
        redis: Arc<RedisState>,
        ledger: Arc<dyn LedgerReader>,
    },
}

/// A request's price: its charge, its cost at list prices, and what it still adds to its
/// month's shared totals when rating did not wait for them.
pub struct Priced {
    pub rated: Rated,
    pub list_cost: Money,
    pub month: Option<MonthDelta>,
}

impl RatingTotals {
    /// Rates one request without waiting: embedded totals, or shared ones the plan's charge
    /// does not depend on (their advance then rides on the settlement). `None` when the
    /// charge needs the shared totals (see [`RatingTotals::rate`]).
    pub fn rate_now(
        &self,
        key_id: &str,
        plan: &Plan,
        model: &Model,
        usage: crate::meter::record::TokenUsage,
        seats: u32,
        started_ms: i64,
    ) -> Option<Priced> {
        match self {
            RatingTotals::Embedded(rater) => {
                let (rated, list_cost) =
                    rater.rate(key_id, plan, model.rated(), usage, seats, started_ms);
                Some(Priced {
                    rated,
                    list_cost,
                    month: None,
                })
            }
            RatingTotals::Shared { .. } if !plan.reads_totals() => {
                let request = plan.meter(model.rated(), usage);
                Some(Priced {
                    rated: plan.charge(Cursor::default(), &request, seats),
                    list_cost: list_cost(model, usage),
                    month: Some(MonthDelta {
                        start_ms: BudgetPeriod::Month.start_ms(started_ms),
                        delta: request.delta,
                    }),
                })
            }
            RatingTotals::Shared { .. } => None,
        }
    }

    /// Rates one request against the totals every replica shares. Should Redis be out of
    /// reach, the request is rated as the first of its month (list prices, no allowance used)
    /// and logged: a volume tier may then be off for this request only.
    pub async fn rate(
        &self,
        key_id: &str,
        plan: &Plan,
        model: &Model,
        usage: crate::meter::record::TokenUsage,
        seats: u32,
        started_ms: i64,
    ) -> Priced {
        if let Some(priced) = self.rate_now(key_id, plan, model, usage, seats, started_ms) {
            return priced;
        }
        let RatingTotals::Shared { redis, ledger } = self else {
            unreachable!("embedded totals always rate now");
        };
        let month = BudgetPeriod::Month.start_ms(started_ms);
        let request = plan.meter(model.rated(), usage);
        let delta = request.delta;
        let priced = |before: Cursor| Priced {
            rated: plan.charge(before, &request, seats),
            list_cost: list_cost(model, usage),
            month: None,
        };
        for _ in 0..2 {
            match redis.advance_totals(key_id, month, delta).await {
                Ok(Some(before)) => return priced(before),
                Ok(None) => {
                    let totals = totals_from_ledger(ledger, key_id, month).await;
                    if let Err(error) = redis.seed_totals(key_id, month, totals).await {
                        tracing::error!(%error, "month totals not seeded");
                        break;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "month totals unreachable; rated without them");
                    break;
                }
            }
        }
        priced(Cursor::default())
    }
}

/// The ledger's list-price column: the model's own prices, whatever the plan charges.
fn list_cost(model: &Model, usage: crate::meter::record::TokenUsage) -> Money {
    usage.cost(&model.prices)
}

async fn totals_from_ledger(ledger: &Arc<dyn LedgerReader>, key_id: &str, month: i64) -> Cursor {
    let ledger = ledger.clone();
    let key_id = key_id.to_owned();
    tokio::task::spawn_blocking(move || {
        ledger
            .cursors(month)
            .ok()
            .and_then(|mut totals| totals.remove(&key_id))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}
