//! Shared state on Redis, for several replicas enforcing one set of limits. Every admission
//! is one server-side script covering all of a request's limits at once — concurrency, key
//! and model RPM/TPM, budget — so nothing is checked on one replica's stale view. A budget
//! reservation and a concurrency slot are leases: this replica renews the leases of the
//! requests it still serves, and a replica that dies stops renewing, so its leases expire and
//! free themselves within `lease`. Settlement is idempotent by lease id. Dropping an unsettled
//! [`Lease`] never does I/O: it queues a release for a background task.
//!
//! The month's rating totals are advanced by one atomic increment per request, which hands
//! each request its own segment of the month (see `rating::plan::Plan::advance`), and alert
//! thresholds are claimed once per period in the settlement script, so N replicas send one
//! webhook. Key changes are published on a channel and a version counter (the poll is the
//! safety net for a missed message).
//!
//! Keys are `tg:{key id}:…` per key, `tg:model:{name}:…` per model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use thread_local::ThreadLocal;
use tokio::sync::mpsc;
use tokio::sync::OnceCell;

pub use crate::config::OnUnavailable;
use crate::limits::gcra::Snapshot;
use crate::limits::{
    AlertCrossing, BudgetPeriod, BudgetSnapshot, Demand, KeyLimits, RateLimitHeaders, Refusal,
    UNCAPPED,
};
use crate::money::Money;
use crate::rating::plan::Cursor;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("shared state (Redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("shared state (Redis): unexpected answer: {0}")]
    Answer(String),
}

const CHANGES_CHANNEL: &str = "tg:keys";
const CHANGES_VERSION: &str = "tg:keys:version";

struct Scripts {
    admit: Script,
    settle: Script,
    release: Script,
    fall_back: Script,
    renew: Script,
    view: Script,
    advance: Script,
    seed: Script,
}

impl Scripts {
    fn load() -> Scripts {
        let with_prelude =
            |body: &str| Script::new(&format!("{}\n{body}", include_str!("scripts/prelude.lua")));
        Scripts {
            admit: with_prelude(include_str!("scripts/admit.lua")),
            settle: with_prelude(include_str!("scripts/settle.lua")),
            release: with_prelude(include_str!("scripts/release.lua")),
            fall_back: with_prelude(include_str!("scripts/fallback.lua")),
            renew: with_prelude(include_str!("scripts/renew.lua")),
            view: with_prelude(include_str!("scripts/view.lua")),
            advance: Script::new(include_str!("scripts/advance.lua")),
            seed: Script::new(include_str!("scripts/seed.lua")),
        }
    }
}

/// The Redis side of every shared seam, one per process.
pub struct RedisState {
    /// One connection per thread that calls Redis: a serving lane's calls then stay on its
    /// thread. Through one shared connection, whose driver runs on one runtime, each call
    /// crossed to that runtime's workers and back, which cost ~90 µs of CPU per request.
    connections: ThreadLocal<OnceCell<ConnectionManager>>,
    connection_config: ConnectionManagerConfig,
    client: redis::Client,
    scripts: Scripts,
    lease: Duration,
    pub on_unavailable: OnUnavailable,
    up: AtomicBool,
    /// Leases this replica holds, by lease id: renewed until settled or released.
    live: DashMap<String, String>,
    releases: mpsc::UnboundedSender<Release>,
    alert_thresholds_pct: Vec<u8>,
    up_gauge: prometheus::IntGauge,
}

/// What an unsettled lease gives back, queued by `Drop` and sent by a background task.
struct Release {
    id: String,
    key_id: String,
    model: String,
    key_tpm: (u64, u64),
    model_tpm: (u64, u64),
}

/// What a request admitted through Redis holds until it settles.
pub struct Lease {
    state: Arc<RedisState>,
    id: String,
    key_id: String,
    model: String,
    /// (limit, tokens held) of the key's and the model's TPM; a zero limit is no limit.
    key_tpm: (u64, u64),
    model_tpm: (u64, u64),
    demand_tokens: u64,
    admitted_us: i64,
    reserved: Money,
    cap: Option<Money>,
    headers: RateLimitHeaders,
    settled: bool,
}

/// What a settlement through Redis found.
pub struct Settled {
    pub overshoot: Money,
    pub alerts: Vec<AlertCrossing>,
}

/// An admission's answer before it is a lease.
pub enum Admitted {
    Lease(Lease),
    Refused(Refusal, RateLimitHeaders),
    /// The key's spend for this period is not in Redis yet: seed it from the ledger, then
    /// admit again.
    NeedsSeed,
}

fn key_of(key_id: &str, what: &str) -> String {
    format!("tg:{{{key_id}}}:{what}")
}

fn model_key(model: &str, what: &str) -> String {
    format!("tg:model:{model}:{what}")
}

fn spend_key(key_id: &str, period_start_ms: i64) -> String {
    key_of(key_id, &format!("spend:{period_start_ms}"))
}

fn totals_key(key_id: &str, month_start_ms: i64) -> String {
    key_of(key_id, &format!("totals:{month_start_ms}"))
}

/// How long a period's figures are kept after it ends, for late settlements and reports.
const KEEP_AFTER_PERIOD_MS: i64 = 7 * 86_400_000;

fn period_ttl_ms(period: BudgetPeriod, now_ms: i64) -> Option<i64> {
    period
        .reset_ms(now_ms)
        .map(|reset| (reset - now_ms).max(0) + KEEP_AFTER_PERIOD_MS)
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

fn ints(value: Value) -> Result<Vec<i64>, StateError> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|item| int(item).ok_or_else(|| StateError::Answer(format!("{item:?}"))))
            .collect(),
        other => Err(StateError::Answer(format!("{other:?}"))),
    }
}

fn snapshot(limit: u64, remaining: i64, reset_us: i64) -> Option<Snapshot> {
    (limit > 0 && remaining >= 0).then(|| Snapshot {
        limit,
        remaining: remaining as u64,
        reset: Duration::from_micros(reset_us.max(0) as u64),
    })
}

/// The headers from a script's four (remaining, reset) pairs: key RPM, key TPM, model RPM,
/// model TPM — the tighter of key and model per dimension.
fn headers(limits: [u64; 4], pairs: &[i64]) -> RateLimitHeaders {
    let at = |i: usize| {
        snapshot(
            limits[i],
            pairs.get(2 * i).copied().unwrap_or(-1),
            pairs.get(2 * i + 1).copied().unwrap_or(0),
        )
    };
    RateLimitHeaders {
        requests: crate::limits::tighter(at(0), at(2)),
        tokens: crate::limits::tighter(at(1), at(3)),
    }
}

fn refusal(reason: i64, retry_us: i64, remaining: Money, needed: Money) -> Refusal {
    let retry_after = Duration::from_micros(retry_us.max(1) as u64);
    let limited = |limit_kind, scope| Refusal::RateLimited {
        limit_kind,
        scope,
        retry_after,
    };
    match reason {
        1 => limited("requests", "concurrency"),
        2 => limited("requests", "key"),
        3 => limited("tokens", "key"),
        4 => limited("requests", "model"),
        5 => limited("tokens", "model"),
        _ => Refusal::InsufficientQuota { remaining, needed },
    }
}

/// A key's budget as the script takes it: the cap in nano-dollars, -1 for none.
fn cap_of(limits: &KeyLimits) -> (i64, BudgetPeriod) {
    match limits.budget {
        Some((cap, period)) if cap != UNCAPPED => (cap.nanos(), period),
        Some((_, period)) => (-1, period),
        None => (-1, BudgetPeriod::Month),
    }
}

impl RedisState {
    /// Connects (bounded in time) and starts the release and renewal tasks on this runtime.
    pub async fn connect(
        url: &str,
        lease: Duration,
        on_unavailable: OnUnavailable,
        alert_thresholds_pct: Vec<u8>,
        up_gauge: prometheus::IntGauge,
    ) -> Result<Arc<RedisState>, StateError> {
        let client = redis::Client::open(url)?;
        let connection_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let (releases, queued) = mpsc::unbounded_channel();
        let mut alert_thresholds_pct = alert_thresholds_pct;
        alert_thresholds_pct.sort_unstable();
        let state = Arc::new(RedisState {
            connections: ThreadLocal::new(),
            connection_config,
            client,
            scripts: Scripts::load(),
            lease,
            on_unavailable,
            up: AtomicBool::new(true),
            live: DashMap::new(),
            releases,
            alert_thresholds_pct,
            up_gauge,
        });
        // Fails the start when Redis cannot be reached at all.
        state.connection().await?;
        state.up_gauge.set(1);
        tokio::spawn(release_queued(Arc::downgrade(&state), queued));
        tokio::spawn(renew_leases(Arc::downgrade(&state)));
        Ok(state)
    }

    /// This thread's connection, made on first use.
    async fn connection(&self) -> Result<ConnectionManager, StateError> {
        let made = self
            .connections
            .get_or_default()
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(
                    self.client.clone(),
                    self.connection_config.clone(),
                )
            })
            .await
            .cloned()
            .map_err(StateError::from);
        // Only a failure to connect says anything: a connection made earlier is handed out
        // whether or not Redis still answers.
        match made {
            Ok(connection) => Ok(connection),
            Err(error) => self.observe(Err(error)),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Notes whether the last call reached Redis; logs each transition once. Returns the
    /// result unchanged.
    fn observe<T>(&self, result: Result<T, StateError>) -> Result<T, StateError> {
        // A script's own error still means Redis answered.
        let reached = !matches!(&result, Err(StateError::Redis(e))
            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal());
        if self.up.swap(reached, Ordering::AcqRel) != reached {
            self.up_gauge.set(i64::from(reached));
            match (&result, reached) {
                (_, true) => tracing::warn!("shared state (Redis) reachable again"),
                (Err(error), false) => tracing::error!(%error, "shared state (Redis) unreachable"),
                (Ok(_), false) => {}
            }
        }
        result
    }

    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Value, StateError> {
        let mut connection = self.connection().await?;
        let result = invocation
            .invoke_async::<Value>(&mut connection)
            .await
            .map_err(StateError::from);
        self.observe(result)
    }

    /// Admits one request against every limit at once.
    pub async fn admit(
        self: &Arc<Self>,
        key_id: &str,
        limits: &KeyLimits,
        model: &str,
        model_limits: (u64, u64),
        demand: Demand,
    ) -> Result<Admitted, StateError> {
        let now_ms = crate::unix_ms();
        let (cap, period) = cap_of(limits);
        let period_start = period.start_ms(now_ms);
        let id = crate::api::new_request_id();
        let key_rpm = limits.rpm.map_or(0, u64::from);
        let key_tpm = limits.tpm.unwrap_or(0);
        let (model_rpm, model_tpm) = model_limits;
        let mut invocation = self.scripts.admit.prepare_invoke();
        invocation
            .key(key_of(key_id, "slots"))
            .key(key_of(key_id, "rpm"))
            .key(key_of(key_id, "tpm"))
            .key(model_key(model, "rpm"))
            .key(model_key(model, "tpm"))
            .key(spend_key(key_id, period_start))
            .key(key_of(key_id, "leases"))
            .key(key_of(key_id, "lease_amounts"))
            .key(key_of(key_id, "reserved"))
            .arg(&id)
            .arg(self.lease.as_millis() as u64)
            .arg(limits.max_concurrency.map_or(-1, i64::from))
            .arg(key_rpm)
            .arg(key_tpm)
            .arg(model_rpm)
            .arg(model_tpm)
            .arg(demand.tokens)
            .arg(cap)
            .arg(demand.cost.nanos().max(0));
        let answer = ints(self.run(invocation).await?)?;
        let limits4 = [key_rpm, key_tpm, model_rpm, model_tpm];
        match answer.first().copied() {
            Some(0) => {
                let reserved = Money(answer.get(1).copied().unwrap_or(0));
                self.live.insert(id.clone(), key_id.to_owned());
                Ok(Admitted::Lease(Lease {
                    state: self.clone(),
                    id,
                    key_id: key_id.to_owned(),
                    model: model.to_owned(),
                    key_tpm: (key_tpm, if key_tpm > 0 { demand.tokens } else { 0 }),
                    model_tpm: (model_tpm, if model_tpm > 0 { demand.tokens } else { 0 }),
                    demand_tokens: demand.tokens,
                    admitted_us: now_ms * 1_000,
                    reserved,
                    cap: (cap >= 0).then_some(Money(cap)),
                    headers: headers(limits4, answer.get(2..).unwrap_or_default()),
                    settled: false,
                }))
            }
            Some(1) => {
                let reason = answer.get(1).copied().unwrap_or(0);
                let retry_us = answer.get(2).copied().unwrap_or(1);
                let remaining = Money(answer.get(3).copied().unwrap_or(0));
                Ok(Admitted::Refused(
                    refusal(reason, retry_us, remaining, demand.cost),
                    headers(limits4, answer.get(4..).unwrap_or_default()),
                ))
            }
            Some(2) => Ok(Admitted::NeedsSeed),
            _ => Err(StateError::Answer(format!("{answer:?}"))),
        }
    }

    /// Sets a key's spend for the period that starts at `period_start_ms`, unless a replica
    /// already has.
    pub async fn seed_spend(
        &self,
        key_id: &str,
        period: BudgetPeriod,
        spent: Money,
    ) -> Result<(), StateError> {
        let now_ms = crate::unix_ms();
        let mut command = redis::cmd("SET");
        command
            .arg(spend_key(key_id, period.start_ms(now_ms)))
            .arg(spent.nanos())
            .arg("NX");
        if let Some(ttl) = period_ttl_ms(period, now_ms) {
            command.arg("PX").arg(ttl);
        }
        let mut connection = self.connection().await?;
        let result = command
            .query_async::<Value>(&mut connection)
            .await
            .map_err(StateError::from);
        self.observe(result).map(|_| ())
    }

    /// Moves a lease's model throttles to a fallback model (see `Limiter::fall_back_to`).
    pub async fn fall_back_to(
        &self,
        lease: &mut Lease,
        model: &str,
        model_limits: (u64, u64),
    ) -> Result<Result<(), Refusal>, StateError> {
        let (rpm, tpm) = model_limits;
        let mut invocation = self.scripts.fall_back.prepare_invoke();
        invocation
            .key(model_key(model, "rpm"))
            .key(model_key(model, "tpm"))
            .key(model_key(&lease.model, "tpm"))
            .arg(rpm)
            .arg(tpm)
            .arg(lease.model_tpm.0)
            .arg(lease.demand_tokens)
            .arg(lease.model_tpm.1);
        let answer = ints(self.run(invocation).await?)?;
        match answer.first().copied() {
            Some(0) => {
                lease.model = model.to_owned();
                lease.model_tpm = (tpm, if tpm > 0 { lease.demand_tokens } else { 0 });
                Ok(Ok(()))
            }
            Some(reason) => Ok(Err(refusal(
                reason,
                answer.get(1).copied().unwrap_or(1),
                Money::ZERO,
                Money::ZERO,
            ))),
            None => Err(StateError::Answer("empty".to_owned())),
        }
    }

    /// Replaces a lease by what the request used, exactly once.
    pub async fn settle(
        &self,
        mut lease: Lease,
        tokens: u64,
        cost: Money,
        period: BudgetPeriod,
    ) -> Result<Settled, StateError> {
        lease.settled = true;
        self.live.remove(&lease.id);
        let now_ms = crate::unix_ms();
        let period_start = period.start_ms(now_ms);
        let mut invocation = self.scripts.settle.prepare_invoke();
        invocation
            .key(key_of(&lease.key_id, "slots"))
            .key(key_of(&lease.key_id, "tpm"))
            .key(model_key(&lease.model, "tpm"))
            .key(spend_key(&lease.key_id, period_start))
            .key(key_of(&lease.key_id, "leases"))
            .key(key_of(&lease.key_id, "lease_amounts"))
            .key(key_of(&lease.key_id, "reserved"))
            .key(format!("tg:settled:{}", lease.id))
            .key(key_of(&lease.key_id, &format!("alerted:{period_start}")))
            .arg(&lease.id)
            .arg(lease.key_tpm.0)
            .arg(lease.key_tpm.1)
            .arg(lease.model_tpm.0)
            .arg(lease.model_tpm.1)
            .arg(tokens)
            .arg(lease.admitted_us)
            .arg(cost.nanos())
            .arg(lease.cap.map_or(-1, Money::nanos))
            .arg(period_ttl_ms(period, now_ms).unwrap_or(KEEP_AFTER_PERIOD_MS));
        for threshold in &self.alert_thresholds_pct {
            invocation.arg(*threshold);
        }
        let answer = ints(self.run(invocation).await?)?;
        let spent = answer.get(1).copied().unwrap_or(0);
        let first = answer.get(2).copied().unwrap_or(0);
        let used_pct = lease.cap.map_or(0, |cap| {
            u64::try_from(i128::from(spent) * 100 / i128::from(cap.nanos().max(1))).unwrap_or(0)
        });
        let alerts = crate::limits::crossed(&self.alert_thresholds_pct, first as u64, used_pct);
        let overshoot = match lease.cap {
            Some(_) => (cost - lease.reserved).max(Money::ZERO),
            None => Money::ZERO,
        };
        Ok(Settled { overshoot, alerts })
    }

    /// A key's budget figures, the same on every replica. `None` until the period's spend has
    /// been seeded.
    pub async fn budget(
        &self,
        key_id: &str,
        limits: &KeyLimits,
    ) -> Result<Option<BudgetSnapshot>, StateError> {
        let now_ms = crate::unix_ms();
        let (cap, period) = cap_of(limits);
        let period_start = period.start_ms(now_ms);
        let mut invocation = self.scripts.view.prepare_invoke();
        invocation
            .key(spend_key(key_id, period_start))
            .key(key_of(key_id, "leases"))
            .key(key_of(key_id, "lease_amounts"))
            .key(key_of(key_id, "reserved"))
            .key(key_of(key_id, "slots"));
        let answer = ints(self.run(invocation).await?)?;
        let spent = answer.first().copied().unwrap_or(-1);
        if spent < 0 {
            return Ok(None);
        }
        let reserved = answer.get(1).copied().unwrap_or(0);
        let cap = if cap < 0 { UNCAPPED.nanos() } else { cap };
        Ok(Some(BudgetSnapshot {
            budget_usd: Money(cap),
            spend_usd: Money(spent),
            reserved_usd: Money(reserved),
            remaining_usd: Money(cap.saturating_sub(spent).saturating_sub(reserved))
                .max(Money::ZERO),
            period_start_ms: period_start,
            resets_at_ms: period.reset_ms(now_ms),
        }))
    }

    /// Advances a key's month totals by `delta` and returns them as they stood before it, or
    /// `None` when the month must first be seeded from the ledger.
    pub async fn advance_totals(
        &self,
        key_id: &str,
        month_start_ms: i64,
        delta: Cursor,
    ) -> Result<Option<Cursor>, StateError> {
        let mut invocation = self.scripts.advance.prepare_invoke();
        invocation
            .key(totals_key(key_id, month_start_ms))
            .arg(delta.tokens)
            .arg(delta.list_cost.nanos())
            .arg(delta.micro_credits);
        let after = ints(self.run(invocation).await?)?;
        let [tokens, list_cost, micro_credits] = after[..] else {
            return Ok(None);
        };
        Ok(Some(Cursor {
            tokens: (tokens as u64).saturating_sub(delta.tokens),
            list_cost: Money(list_cost) - delta.list_cost,
            micro_credits: (micro_credits as u64).saturating_sub(delta.micro_credits),
        }))
    }

    pub async fn seed_totals(
        &self,
        key_id: &str,
        month_start_ms: i64,
        totals: Cursor,
    ) -> Result<(), StateError> {
        let ttl = period_ttl_ms(BudgetPeriod::Month, month_start_ms.max(crate::unix_ms()))
            .unwrap_or(KEEP_AFTER_PERIOD_MS);
        let mut invocation = self.scripts.seed.prepare_invoke();
        invocation
            .key(totals_key(key_id, month_start_ms))
            .arg(totals.tokens)
            .arg(totals.list_cost.nanos())
            .arg(totals.micro_credits)
            .arg(ttl);
        self.run(invocation).await.map(|_| ())
    }

    /// Tells every replica that a key was created, changed or revoked. The message carries
    /// the change's version, so a replica that sees a gap knows it missed one.
    pub async fn publish_key_change(&self, key_id: &str) -> Result<(), StateError> {
        let mut connection = self.connection().await?;
        let result = async {
            let version: i64 = redis::cmd("INCR")
                .arg(CHANGES_VERSION)
                .query_async(&mut connection)
                .await?;
            redis::cmd("PUBLISH")
                .arg(CHANGES_CHANNEL)
                .arg(format!("{version} {key_id}"))
                .query_async::<()>(&mut connection)
                .await
        }
        .await
        .map_err(StateError::from);
        self.observe(result)
    }

    /// The key change counter, for the poll that catches a missed message.
    pub async fn key_version(&self) -> Result<i64, StateError> {
        let mut connection = self.connection().await?;
        let result = redis::cmd("GET")
            .arg(CHANGES_VERSION)
            .query_async::<Option<i64>>(&mut connection)
            .await
            .map(Option::unwrap_or_default)
            .map_err(StateError::from);
        self.observe(result)
    }

    /// Changes as they are announced, `(version, key id)`, until the subscription breaks.
    pub async fn key_changes(&self) -> Result<mpsc::Receiver<(i64, String)>, StateError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(CHANGES_CHANNEL).await?;
        let (tx, rx) = mpsc::channel(1_024);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                let Some((version, key_id)) = payload.split_once(' ') else {
                    continue;
                };
                let Ok(version) = version.parse() else {
                    continue;
                };
                if tx.send((version, key_id.to_owned())).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Checks that Redis answers; used by the renewal loop to notice recovery while idle.
    async fn ping(&self) {
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        let result = redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map_err(StateError::from);
        let _ = self.observe(result);
    }
}

impl Lease {
    pub fn headers(&self) -> RateLimitHeaders {
        self.headers
    }
}

impl Drop for Lease {
    /// An unsettled lease (the request never got an answer) is released by the background
    /// task; should that fail too, its expiry frees it.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.state.live.remove(&self.id);
        let _ = self.state.releases.send(Release {
            id: std::mem::take(&mut self.id),
            key_id: std::mem::take(&mut self.key_id),
            model: std::mem::take(&mut self.model),
            key_tpm: self.key_tpm,
            model_tpm: self.model_tpm,
        });
    }
}

async fn release_queued(
    state: std::sync::Weak<RedisState>,
    mut queued: mpsc::UnboundedReceiver<Release>,
) {
    while let Some(release) = queued.recv().await {
        let Some(state) = state.upgrade() else {
            return;
        };
        let mut invocation = state.scripts.release.prepare_invoke();
        invocation
            .key(key_of(&release.key_id, "slots"))
            .key(key_of(&release.key_id, "tpm"))
            .key(model_key(&release.model, "tpm"))
            .key(key_of(&release.key_id, "leases"))
            .key(key_of(&release.key_id, "lease_amounts"))
            .key(key_of(&release.key_id, "reserved"))
            .key(format!("tg:settled:{}", release.id))
            .arg(&release.id)
            .arg(release.key_tpm.0)
            .arg(release.key_tpm.1)
            .arg(release.model_tpm.0)
            .arg(release.model_tpm.1);
        if let Err(error) = state.run(invocation).await {
            tracing::debug!(%error, "lease release failed; it will expire instead");
        }
    }
}

/// Renews this replica's leases three times per lease period, so they outlive any request
/// still being served and expire soon after the replica stops.
async fn renew_leases(state: std::sync::Weak<RedisState>) {
    loop {
        let period = match state.upgrade() {
            Some(state) => state.lease / 3,
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let mut by_key: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for entry in state.live.iter() {
            by_key
                .entry(entry.value().clone())
                .or_default()
                .push(entry.key().clone());
        }
        if by_key.is_empty() {
            state.ping().await;
        }
        for (key_id, ids) in by_key {
            let mut invocation = state.scripts.renew.prepare_invoke();
            invocation
                .key(key_of(&key_id, "slots"))
                .key(key_of(&key_id, "leases"))
                .arg(state.lease.as_millis() as u64);
            for id in &ids {
                invocation.arg(id);
            }
            if let Err(error) = state.run(invocation).await {
                tracing::debug!(%error, "lease renewal failed");
                break;
            }
        }
    }
}
