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

use crate::auth::group::members_spend;
use crate::auth::store::KeyStore;
use crate::config::Model;
use crate::console::session::Session;
use crate::error::GatewayError;
use crate::limits::{
    Above, AlertCrossing, BudgetPeriod, BudgetSnapshot, Demand, KeyLimits, Level, LevelRef,
    Limiter, RateLimitHeaders, Refusal, Settlement, SpendRate, Ticket,
};
use crate::money::Money;
use crate::rating::ledger::{LedgerError, LedgerReader};
use crate::rating::plan::{Cursor, Plan, Rated};
use crate::rating::Rater;
pub use redis::Once;
use redis::{owner_of, Admitted, Charged, OnUnavailable, RedisState, Seed};
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
        /// Which keys a team or customer has, for its spend from the ledger.
        keys: Arc<dyn KeyStore>,
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

    /// Installs or changes a level's limits: a key by id, a team or customer by name.
    pub fn upsert(&self, level: Level, id: &str, limits: &KeyLimits, spent: Option<Money>) {
        match self {
            Admission::Embedded(limiter) => limiter.upsert(level, id, limits, spent),
            Admission::Shared {
                redis,
                local_share,
                share,
                ..
            } => {
                redis.retire_allowance(&owner(level, id));
                local_share.upsert(
                    level,
                    id,
                    &shared_limits(limits, *share),
                    spent.map(|s| money_share(s, *share)),
                )
            }
        }
    }

    pub fn remove(&self, level: Level, id: &str) {
        match self {
            Admission::Embedded(limiter) => limiter.remove(level, id),
            Admission::Shared {
                redis, local_share, ..
            } => {
                redis.retire_allowance(&owner(level, id));
                local_share.remove(level, id)
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

    /// The period of a level's live budget, to tell whether a change needs the ledger's
    /// spend. Shared budgets are kept per period, so they never need it.
    pub fn budget_period(&self, level: Level, id: &str) -> Option<BudgetPeriod> {
        match self {
            Admission::Embedded(limiter) => limiter.budget_period(level, id),
            Admission::Shared { .. } => None,
        }
    }

    /// Every limit of the request at once, all or nothing.
    pub async fn admit(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        above: Above<'_>,
        model: &Model,
        demand: Demand,
    ) -> Result<Pass, Refused> {
        match self {
            Admission::Embedded(limiter) => match limiter.admit(key_id, above, &model.name, demand)
            {
                Ok(ticket) => Ok(Pass::Local(ticket)),
                Err(refusal) => Err(Refused {
                    refusal,
                    headers: limiter.headers(key_id, above, &model.name),
                }),
            },
            // Boxed: the Redis calls make its future about 2 KB, and every future awaiting
            // this one would otherwise carry (and copy, each time it is created) that size on
            // the embedded path too.
            Admission::Shared {
                redis,
                local_share,
                ledger,
                keys,
                ..
            } => {
                let shared = Seeding {
                    redis,
                    ledger,
                    keys,
                };
                Box::pin(admit_shared(
                    shared,
                    local_share,
                    key_id,
                    limits,
                    above,
                    model,
                    demand,
                ))
                .await
            }
        }
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

    /// Charges an amount known before it is spent (a reported outcome) to the budget of the
    /// key and of the levels above it, whole or not at all, once per `once.id`: across
    /// replicas by Redis, in one process by the caller (and, for good, by the ledger's unique
    /// key).
    pub async fn charge(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        above: Above<'_>,
        amount: Money,
        once: Once<'_>,
    ) -> Result<Charge, Refusal> {
        let (redis, local_share, ledger, keys) = match self {
            Admission::Embedded(limiter) => {
                return limiter
                    .charge(key_id, above, amount)
                    .map(|settled| Charge::Done(settled.alerts))
            }
            Admission::Shared {
                redis,
                local_share,
                ledger,
                keys,
                ..
            } => (redis, local_share, ledger, keys),
        };
        let seeding = Seeding {
            redis,
            ledger,
            keys,
        };
        // The levels above are charged first, each under an id of its own; unless the key's
        // charge then lands, what they took is given back.
        let mut taken = Vec::new();
        let mut charged = Ok(Charged::Done);
        for (level, group) in above_levels(above) {
            let id = crate::api::new_request_id();
            let alone = Once {
                id: &id,
                record: "",
            };
            charged = charge_level(seeding, level, group.name, group.limits, amount, alone).await;
            if !matches!(charged, Ok(Charged::Done)) {
                break;
            }
            taken.push((owner_of(level, group.name), group.limits));
        }
        if matches!(charged, Ok(Charged::Done)) {
            charged = charge_level(seeding, Level::Key, key_id, limits, amount, once).await;
        }
        if !matches!(charged, Ok(Charged::Done)) {
            for (owner, limits) in taken {
                let id = crate::api::new_request_id();
                let undo = Once {
                    id: &id,
                    record: "",
                };
                if let Err(error) = redis
                    .charge(Level::Key, &owner, limits, Money::ZERO - amount, undo)
                    .await
                {
                    tracing::error!(%error, "a refused charge stays counted until the period is seeded again");
                }
            }
        }
        let error = match charged {
            Ok(Charged::Done) => return Ok(Charge::Done(Vec::new())),
            Ok(Charged::Refused(refusal)) => return Err(refusal),
            Ok(Charged::Repeat(first)) => return Ok(Charge::Repeat(first)),
            Err(Unseeded::Ledger) => return Err(Refusal::Unavailable),
            Err(Unseeded::Redis(error)) => error,
        };
        if redis.on_unavailable == OnUnavailable::FailOpen {
            return local_share
                .charge(key_id, above, amount)
                .map(|settled| Charge::Done(settled.alerts));
        }
        tracing::debug!(%error, "charge refused: shared state unreachable");
        Err(Refusal::Unavailable)
    }

    /// A key's live budget figures without waiting: the embedded backend only.
    pub fn budget_now(&self, key_id: &str) -> Option<BudgetSnapshot> {
        match self {
            Admission::Embedded(limiter) => limiter.budget(Level::Key, key_id),
            Admission::Shared { .. } => None,
        }
    }

    /// A key's own throttles now, where this replica holds them (embedded state only).
    pub fn key_throttles_now(&self, key_id: &str) -> Option<crate::limits::RateLimitHeaders> {
        match self {
            Admission::Embedded(limiter) => Some(limiter.key_throttles(key_id)),
            Admission::Shared { .. } => None,
        }
    }

    /// A level's live budget figures, the same on every replica.
    pub async fn budget(
        &self,
        level: Level,
        id: &str,
        limits: &KeyLimits,
    ) -> Option<BudgetSnapshot> {
        let (redis, ledger, keys) = match self {
            Admission::Embedded(limiter) => return limiter.budget(level, id),
            Admission::Shared {
                redis,
                ledger,
                keys,
                ..
            } => (redis, ledger, keys),
        };
        let owner = owner(level, id);
        match redis.budget(&owner, limits).await {
            Ok(Some(snapshot)) => return Some(snapshot),
            Ok(None) => {}
            Err(_) => return None,
        }
        let seeding = Seeding {
            redis,
            ledger,
            keys,
        };
        seed_level(seeding, level, id, limits).await.ok()?;
        redis.budget(&owner, limits).await.ok().flatten()
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

    /// Replaces a team's or customer's live spend by its keys' spend from the ledger, after a
    /// key moved in or out of it.
    pub async fn recount(&self, level: Level, name: &str, limits: &KeyLimits, spent: Money) {
        match self {
            Admission::Embedded(limiter) => limiter.upsert(level, name, limits, Some(spent)),
            Admission::Shared { redis, .. } => {
                let period = limits.budget.map_or(BudgetPeriod::Month, |(_, p)| p);
                let owner = owner(level, name);
                if let Err(error) = redis.seed_spend(&owner, period, spent, Seed::Replace).await {
                    tracing::error!(%error, "a group's spend was not recounted; it is at the next period");
                }
            }
        }
    }

    /// Tells the other replicas that a key changed; a no-op for one replica.
    /// Ends a console session on every replica (this one keeps its own list as well).
    pub async fn end_console_session(
        &self,
        session: &Session,
        now_ms: i64,
    ) -> Result<(), GatewayError> {
        match self {
            Admission::Embedded(_) => Ok(()),
            Admission::Shared { redis, .. } => {
                let ttl = session.expires_ms - now_ms;
                redis
                    .end_console_session(&session.id_hex(), ttl)
                    .await
                    .map_err(|error| {
                        tracing::error!(%error, "console sign-out not recorded in Redis");
                        GatewayError::StateUnavailable
                    })
            }
        }
    }

    /// Whether another replica ended this console session. Refuses when Redis cannot say:
    /// the bearer token still works then.
    pub async fn console_session_ended(&self, session: &Session) -> Result<bool, GatewayError> {
        match self {
            Admission::Embedded(_) => Ok(false),
            Admission::Shared { redis, .. } => redis
                .console_session_ended(&session.id_hex())
                .await
                .map_err(|_| GatewayError::StateUnavailable),
        }
    }

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

/// [`Admission::admit`] through Redis: the level's spend seeded from the ledger when Redis
/// lacks it, and this replica's share of the limits enforced while Redis is out of reach under
/// `fail_open`.
async fn admit_shared(
    shared: Seeding<'_>,
    local_share: &Limiter,
    key_id: &str,
    limits: &KeyLimits,
    above: Above<'_>,
    model: &Model,
    demand: Demand,
) -> Result<Pass, Refused> {
    let unavailable = |error: redis::StateError| {
        if shared.redis.on_unavailable == OnUnavailable::FailOpen {
            return local_share
                .admit(key_id, above, &model.name, demand)
                .map(Pass::Local)
                .map_err(|refusal| Refused {
                    refusal,
                    headers: local_share.headers(key_id, above, &model.name),
                });
        }
        tracing::debug!(%error, "admission refused: shared state unreachable");
        Err(Refused {
            refusal: Refusal::Unavailable,
            headers: RateLimitHeaders::default(),
        })
    };
    // Each level may need its spend seeded once, then the request is admitted.
    for _ in 0..4 {
        let admitted = shared
            .redis
            .admit(
                key_id,
                limits,
                above,
                &model.name,
                model_limits(model),
                demand,
            )
            .await;
        match admitted {
            Ok(Admitted::Lease(lease)) => return Ok(Pass::Shared(lease)),
            Ok(Admitted::Refused(refusal, headers)) => return Err(Refused { refusal, headers }),
            Ok(Admitted::NeedsSeed(level)) => {
                let (id, limits) = above_levels(above)
                    .find(|(above, _)| *above == level)
                    .map_or((key_id, limits), |(_, above)| (above.name, above.limits));
                match seed_level(shared, level, id, limits).await {
                    Ok(()) => {}
                    Err(Unseeded::Ledger) => {
                        return Err(Refused {
                            refusal: Refusal::Unavailable,
                            headers: RateLimitHeaders::default(),
                        })
                    }
                    Err(Unseeded::Redis(error)) => return unavailable(error),
                }
            }
            Err(error) => return unavailable(error),
        }
    }
    Err(Refused {
        refusal: Refusal::Unavailable,
        headers: RateLimitHeaders::default(),
    })
}

/// What shared admission works with: Redis, and the ledger and key store that seed a level's
/// spend in it.
#[derive(Clone, Copy)]
struct Seeding<'a> {
    redis: &'a Arc<RedisState>,
    ledger: &'a Arc<dyn LedgerReader>,
    keys: &'a Arc<dyn KeyStore>,
}

/// Seeds a level's spend for its budget period in Redis from the ledger, unless a replica
/// already has: a key's own, or the spend of the keys that name a team or customer now (as
/// the embedded backend restores it). `id` is the key's id or the group's name.
async fn seed_level(
    seeding: Seeding<'_>,
    level: Level,
    id: &str,
    limits: &KeyLimits,
) -> Result<(), Unseeded> {
    let period = limits.budget.map_or(BudgetPeriod::Month, |(_, p)| p);
    let ledger = seeding.ledger.clone();
    let keys = seeding.keys.clone();
    let wanted = id.to_owned();
    let from_ms = period.start_ms(crate::unix_ms());
    let spent = tokio::task::spawn_blocking(move || {
        let spend = ledger.spend_since(from_ms)?;
        Ok(match level {
            Level::Key => spend.get(&wanted).copied().unwrap_or(Money::ZERO),
            _ => {
                let keys = keys
                    .list()
                    .map_err(|error| LedgerError::Io(std::io::Error::other(error.to_string())))?;
                members_spend(&spend, &keys, level, &wanted)
            }
        })
    })
    .await
    .unwrap_or_else(|error| Err(LedgerError::Io(std::io::Error::other(error.to_string()))))
    .map_err(|error: LedgerError| {
        tracing::error!(%error, "cannot read a budget's spend from the ledger");
        Unseeded::Ledger
    })?;
    let owner = owner(level, id);
    seeding
        .redis
        .seed_spend(&owner, period, spent, Seed::IfMissing)
        .await
        .map_err(Unseeded::Redis)
}

/// Charges one level (a key by id, a group by name), seeding its spend first if need be.
async fn charge_level(
    seeding: Seeding<'_>,
    level: Level,
    id: &str,
    limits: &KeyLimits,
    amount: Money,
    once: Once<'_>,
) -> Result<Charged, Unseeded> {
    let owner = owner(level, id);
    for _ in 0..2 {
        match seeding
            .redis
            .charge(level, &owner, limits, amount, once)
            .await
        {
            Ok(Some(charged)) => return Ok(charged),
            Ok(None) => seed_level(seeding, level, id, limits).await?,
            Err(error) => return Err(Unseeded::Redis(error)),
        }
    }
    Err(Unseeded::Ledger)
}

/// Where a level's shared state lives: a key's under its id, a group's under
/// [`owner_of`].
fn owner(level: Level, id: &str) -> String {
    match level {
        Level::Key => id.to_owned(),
        _ => owner_of(level, id),
    }
}

/// The levels above a key, with their kind.
fn above_levels(above: Above<'_>) -> impl Iterator<Item = (Level, LevelRef<'_>)> {
    [(Level::Team, above.team), (Level::Customer, above.customer)]
        .into_iter()
        .filter_map(|(level, above)| above.map(|above| (level, above)))
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
