//! Shared state on Redis, for several replicas enforcing one set of limits. Every admission
//! runs in one server-side script covering all of a request's limits at once — concurrency,
//! key and model RPM/TPM, budget — so nothing is checked on one replica's stale view. A budget
//! reservation and a concurrency slot are one lease: this replica renews the leases of the
//! requests it still serves, and a replica that dies stops renewing, so its leases expire and
//! free themselves within `lease`. Settlement is idempotent by lease. Dropping an unsettled
//! [`Lease`] never does I/O: it queues a release for a background task.
//!
//! Admissions, settlements and rating-total advances are batched: while one script call of a
//! kind is in flight from a thread, that thread's next calls of the kind queue and go
//! together as the next one. Alone, a request pays one round trip as before; under load, a
//! batch of requests costs Redis about what one did, since each script reads a key once and
//! writes it once however many of the batch's requests touch it. Requests in a batch are
//! admitted in order, each against the state the previous ones left: as exact as one by one.
//!
//! **Allowances.** Far from its limits, a key need not pay a round trip per admission: the
//! admission that finds this replica without room asks Redis, in the same script, for an
//! allowance — a slice of the key's remaining RPM, TPM and budget, taken there as if spent
//! (the budget part reserved under a lease like a request's) — and later requests are
//! admitted from it here. Exact all the same: every unit admitted here was taken from the
//! shared limit first, so no number of replicas admits more than the limit; Redis grants a
//! slice only while it is small against what remains (see `admit.lua`), so near a limit each
//! request is admitted in Redis, one by one. The cost of an allowance is capacity held and
//! unused for a moment: one left idle for a tick is given back, one is used for at most
//! half a lease before it must be topped up, and a request Redis refuses for budget first
//! has this replica give back its allowance's unreserved budget and is tried once more.
//! Only keys without a concurrency limit or spend-rate caps, on models without their own
//! throttles, get allowances. A team or customer (a level above keys) gets allowances of its
//! own on the same terms, and a key in one admits locally only when the allowances of all
//! its levels have room, all or none.
//!
//! The month's rating totals are advanced atomically per request, which hands each request
//! its own segment of the month (see `rating::plan::Plan::advance`), and alert
//! thresholds are claimed once per period in the settlement script, so N replicas send one
//! webhook. Key changes are published on a channel and a version counter (the poll is the
//! safety net for a missed message).
//!
//! Keys are `tg:{key id}:…` per key, `tg:{team:name}:…` and `tg:{customer:name}:…` per team
//! and customer (the same layout as a key's), `tg:model:{name}:…` per model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use thread_local::ThreadLocal;
use tokio::sync::{mpsc, oneshot, OnceCell};

pub use crate::config::OnUnavailable;
use crate::limits::gcra::Snapshot;
use crate::limits::{
    Above, AlertCrossing, BudgetPeriod, BudgetSnapshot, Demand, KeyLimits, Level, Limit,
    RateLimitHeaders, Refusal, UNCAPPED,
};
use crate::money::Money;
use crate::rating::plan::Cursor;

#[derive(Debug, Clone, thiserror::Error)]
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
    advance: Script,
    release: Script,
    fall_back: Script,
    renew: Script,
    view: Script,
    charge: Script,
    seed: Script,
    give_back: Script,
    episode: Script,
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
            charge: with_prelude(include_str!("scripts/charge.lua")),
            advance: with_prelude(include_str!("scripts/advance.lua")),
            seed: Script::new(include_str!("scripts/seed.lua")),
            give_back: with_prelude(include_str!("scripts/give_back.lua")),
            episode: Script::new(include_str!("scripts/episode.lua")),
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
    /// Each thread's queues of script calls waiting for the call in flight (see the module
    /// docs).
    batches: ThreadLocal<Batches>,
    client: redis::Client,
    scripts: Scripts,
    lease: Duration,
    replicas: u32,
    pub on_unavailable: OnUnavailable,
    up: AtomicBool,
    /// Leases this replica holds, by lease id: renewed until settled or released.
    live: DashMap<String, String>,
    /// This replica's allowance per key id, and those retired (their key changed) that wait
    /// for their last request to end before they are given back.
    allowances: DashMap<String, Arc<Mutex<Allowance>>>,
    retired: Mutex<Vec<(String, Arc<Mutex<Allowance>>)>>,
    /// Keys whose allowance is being asked for, so concurrent admissions ask once.
    granting: DashMap<String, ()>,
    releases: mpsc::UnboundedSender<Release>,
    alert_thresholds_pct: Vec<u8>,
    up_gauge: prometheus::IntGauge,
    decided_here: prometheus::IntCounter,
    decided_in_redis: prometheus::IntCounter,
}

/// The script kinds that are batched.
#[derive(Clone, Copy)]
enum Kind {
    Admit,
    Settle,
    Advance,
}

/// Most calls in one script: bounds how long Redis runs one script for (and Lua's unpack).
const MAX_BATCH: usize = 128;

impl Kind {
    const ALL: [Kind; 3] = [Kind::Admit, Kind::Settle, Kind::Advance];
}

/// A thread's queue per kind, indexed by `Kind as usize`.
#[derive(Default)]
struct Batches([Arc<Batch>; 3]);

#[derive(Default)]
struct Batch {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    calls: Vec<Call>,
    /// A task is sending this queue's calls; it keeps going until the queue is empty.
    sending: bool,
}

/// One request's part of a batched script: its keys and arguments, and what takes its answer.
struct Call {
    keys: Vec<String>,
    args: Vec<Arg>,
    answer: Reply,
}

type Answer = Result<Value, StateError>;

enum Reply {
    /// A caller waits for it.
    Awaited(oneshot::Sender<Answer>),
    /// Nobody waits: the sending task hands it on.
    Then(Box<dyn FnOnce(Answer) + Send>),
}

impl Reply {
    fn send(self, answer: Answer) {
        match self {
            Reply::Awaited(waiting) => {
                let _ = waiting.send(answer);
            }
            Reply::Then(take) => take(answer),
        }
    }
}

enum Arg {
    Int(i64),
    Text(String),
}

impl redis::ToRedisArgs for Arg {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Arg::Int(n) => n.write_redis_args(out),
            Arg::Text(text) => text.write_redis_args(out),
        }
    }
}

/// What an unsettled lease or an allowance gives back, sent by a background task.
struct Release {
    id: String,
    key_id: String,
    model: String,
    /// (limit, units) given back to the key's RPM, the key's TPM and the model's TPM.
    key_rpm: (u64, u64),
    key_tpm: (u64, u64),
    model_tpm: (u64, u64),
    /// The key's spend-rate caps and the nano-dollars the request took from them.
    spend: (SpendCaps, u64),
    /// A request's release happens once, by its lease; an allowance's is not guarded so,
    /// since a grant that raced its return may give back the same id again.
    once: bool,
}

/// A key's spend-rate caps as the scripts take them: nano-dollars per minute and per hour,
/// 0 for none.
#[derive(Clone, Copy, Default)]
struct SpendCaps {
    per_minute: u64,
    per_hour: u64,
}

impl SpendCaps {
    fn of(limits: &KeyLimits) -> SpendCaps {
        let nanos =
            |cap: Option<Money>| cap.map_or(0, |cap| u64::try_from(cap.nanos()).unwrap_or(0));
        SpendCaps {
            per_minute: nanos(limits.spend_rate.per_minute),
            per_hour: nanos(limits.spend_rate.per_hour),
        }
    }

    fn any(self) -> bool {
        self.per_minute > 0 || self.per_hour > 0
    }
}

/// A slice of one key's shared limits held by this replica (see the module docs). `None`
/// where the key has no such limit.
struct Allowance {
    id: String,
    key_rpm: u64,
    key_tpm: u64,
    requests: Option<u64>,
    tokens: Option<u64>,
    /// Nano-dollars left to reserve; below zero after a request cost more than it reserved.
    budget: Option<i64>,
    in_flight: u32,
    used_since_tick: bool,
    /// After this it admits nothing more until topped up; its lease in Redis outlives it.
    usable_until: Instant,
    /// The throttle headers at the last top-up, and what this replica has taken since.
    headers: RateLimitHeaders,
    requests_taken: u64,
    tokens_taken: u64,
}

impl Allowance {
    fn headers(&self) -> RateLimitHeaders {
        let less = |snapshot: Option<Snapshot>, taken: u64| {
            snapshot.map(|s| Snapshot {
                remaining: s.remaining.saturating_sub(taken),
                ..s
            })
        };
        RateLimitHeaders {
            requests: less(self.headers.requests, self.requests_taken),
            tokens: less(self.headers.tokens, self.tokens_taken),
        }
    }

    fn release(&self, key_id: &str) -> Release {
        Release {
            id: self.id.clone(),
            key_id: key_id.to_owned(),
            model: String::new(),
            key_rpm: (self.key_rpm, self.requests.unwrap_or(0)),
            key_tpm: (self.key_tpm, self.tokens.unwrap_or(0)),
            model_tpm: (0, 0),
            spend: (SpendCaps::default(), 0),
            once: false,
        }
    }
}

/// Clears a key's "allowance being asked for" mark however the asking admission ends.
struct Granting<'a> {
    state: &'a RedisState,
    key_id: &'a str,
}

impl Drop for Granting<'_> {
    fn drop(&mut self) {
        self.state.granting.remove(self.key_id);
    }
}

/// What a request admitted through Redis holds until it settles.
pub struct Lease {
    state: Arc<RedisState>,
    id: String,
    key_id: String,
    model: String,
    key_rpm: u64,
    /// (limit, tokens held) of the key's and the model's TPM; a zero limit is no limit.
    key_tpm: (u64, u64),
    model_tpm: (u64, u64),
    demand_tokens: u64,
    admitted_us: i64,
    reserved: Money,
    cap: Option<Money>,
    /// The budget period of its level.
    period: BudgetPeriod,
    /// The key's spend-rate caps and the nano-dollars taken from them.
    spend: (SpendCaps, u64),
    headers: RateLimitHeaders,
    settled: bool,
    /// The allowance it was admitted from, if any: it holds no lease of its own.
    allowance: Option<Arc<Mutex<Allowance>>>,
    /// A key's lease holds those of its team and customer, which settle and release with it.
    levels: Vec<Lease>,
    /// Another level refused the request: it never happened, so its request unit goes back
    /// with the rest.
    refused: bool,
}

/// What a request used, for its settlement.
pub struct Used {
    pub tokens: u64,
    pub cost: Money,
    /// The key's budget period, whose spend the cost joins.
    pub period: BudgetPeriod,
}

/// What one request adds to its key's totals for the month that starts at `start_ms`.
#[derive(Clone, Copy)]
pub struct MonthDelta {
    pub start_ms: i64,
    pub delta: Cursor,
}

/// Whether seeding a spend keeps one already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seed {
    IfMissing,
    Replace,
}

/// An admission's answer before it is a lease.
/// A charge made once per idempotency key: the key, and what to answer a repeat of it with.
#[derive(Clone, Copy)]
pub struct Once<'a> {
    pub id: &'a str,
    pub record: &'a str,
}

/// How long an idempotency key is remembered in Redis; the ledger remembers it for good.
const ONCE_KEPT_MS: i64 = 7 * 24 * 3_600_000;

pub enum Charged {
    Done,
    Refused(Refusal),
    /// The idempotency key was charged before: what was remembered of that charge.
    Repeat(String),
}

pub enum Admitted {
    Lease(Lease),
    Refused(Refusal, RateLimitHeaders),
    /// The spend of this level for its period is not in Redis yet: seed it from the ledger,
    /// then admit again.
    NeedsSeed(Level),
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

/// Named apart from the `totals:` hashes of earlier versions, which summed list prices: those
/// are left to expire and the month is seeded again from the ledger.
fn totals_key(key_id: &str, month_start_ms: i64) -> String {
    key_of(key_id, &format!("month:{month_start_ms}"))
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

/// The admission script's reason for a refusal on budget.
const BUDGET_REFUSED: i64 = 6;

fn refusal(level: Level, reason: i64, retry_us: i64, remaining: Money, needed: Money) -> Refusal {
    let retry_after = Duration::from_micros(retry_us.max(1) as u64);
    let limited = |limit| Refusal::RateLimited {
        level,
        limit,
        retry_after,
    };
    match reason {
        1 => limited(Limit::Concurrency),
        2 => limited(Limit::Requests),
        3 => limited(Limit::Tokens),
        4 => limited(Limit::ModelRequests),
        5 => limited(Limit::ModelTokens),
        7 => limited(Limit::SpendPerMinute),
        8 => limited(Limit::SpendPerHour),
        _ => Refusal::InsufficientQuota {
            level,
            remaining,
            needed,
        },
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

/// Where a team's or customer's shared state lives: the same layout as a key's, under a
/// name no key id can take (key ids hold no colon).
pub fn owner_of(level: Level, name: &str) -> String {
    format!("{}:{name}", level.as_str())
}

/// One level's part of an admission: its owner (a key id, or a team's or customer's
/// [`owner_of`]), its limits, and the model's (the key's call carries them; others none).
#[derive(Clone, Copy)]
struct LevelCall<'a> {
    level: Level,
    owner: &'a str,
    limits: &'a KeyLimits,
    model: &'a str,
    model_limits: (u64, u64),
}

impl LevelCall<'_> {
    /// Allowances admit without checking concurrency, spend rates or a model's throttles.
    fn may_hold_allowance(&self) -> bool {
        self.model_limits == (0, 0)
            && self.limits.max_concurrency.is_none()
            && !SpendCaps::of(self.limits).any()
    }

    /// The keys and arguments of `admit.lua` for this level, lease `id`.
    fn call(&self, id: &str, demand: Demand, allowance_id: &str) -> (Vec<String>, Vec<Arg>) {
        let owner = &self.owner;
        let limits = self.limits;
        let (cap, period) = cap_of(limits);
        let spend_caps = SpendCaps::of(limits);
        let keys = vec![
            key_of(owner, "leases"),
            key_of(owner, "rpm"),
            key_of(owner, "tpm"),
            model_key(self.model, "rpm"),
            model_key(self.model, "tpm"),
            spend_key(owner, period.start_ms(crate::unix_ms())),
            key_of(owner, "lease_amounts"),
            key_of(owner, "reserved"),
            key_of(owner, "usd_per_minute"),
            key_of(owner, "usd_per_hour"),
        ];
        let args = vec![
            Arg::Text(id.to_owned()),
            Arg::Int(limits.max_concurrency.map_or(-1, i64::from)),
            Arg::Int(limits.rpm.map_or(0, i64::from)),
            Arg::Int(limits.tpm.map_or(0, |v| v as i64)),
            Arg::Int(self.model_limits.0 as i64),
            Arg::Int(self.model_limits.1 as i64),
            Arg::Int(demand.tokens as i64),
            Arg::Int(cap),
            Arg::Int(demand.cost.nanos().max(0)),
            Arg::Text(allowance_id.to_owned()),
            Arg::Int(spend_caps.per_minute as i64),
            Arg::Int(spend_caps.per_hour as i64),
        ];
        (keys, args)
    }
}

impl RedisState {
    /// Connects (bounded in time) and starts the release and renewal tasks on this runtime.
    pub async fn connect(
        url: &str,
        lease: Duration,
        on_unavailable: OnUnavailable,
        replicas: u32,
        alert_thresholds_pct: Vec<u8>,
        up_gauge: prometheus::IntGauge,
        admissions: prometheus::IntCounterVec,
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
            batches: ThreadLocal::new(),
            client,
            scripts: Scripts::load(),
            lease,
            replicas,
            on_unavailable,
            up: AtomicBool::new(true),
            live: DashMap::new(),
            allowances: DashMap::new(),
            retired: Mutex::new(Vec::new()),
            granting: DashMap::new(),
            releases,
            alert_thresholds_pct,
            up_gauge,
            decided_here: admissions.with_label_values(&["allowance"]),
            decided_in_redis: admissions.with_label_values(&["redis"]),
        });
        // Fails the start when Redis cannot be reached at all.
        state.connection().await?;
        state.up_gauge.set(1);
        tokio::spawn(release_queued(Arc::downgrade(&state), queued));
        tokio::spawn(renew_leases(Arc::downgrade(&state)));
        tokio::spawn(return_idle_allowances(Arc::downgrade(&state)));
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
            if !reached {
                self.drop_allowances();
            }
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

    /// Runs one request's part of a batched script (see the module docs) and returns its
    /// answer.
    async fn batched(
        self: &Arc<Self>,
        kind: Kind,
        keys: Vec<String>,
        args: Vec<Arg>,
    ) -> Result<Value, StateError> {
        let (answer, answered) = oneshot::channel();
        self.enqueue(kind, keys, args, Reply::Awaited(answer));
        answered
            .await
            .unwrap_or_else(|_| Err(StateError::Answer("batch abandoned".to_owned())))
    }

    /// Queues one request's part of a batched script.
    fn enqueue(self: &Arc<Self>, kind: Kind, keys: Vec<String>, args: Vec<Arg>, answer: Reply) {
        let batch = &self.batches.get_or_default().0[kind as usize];
        let lead = {
            let mut queue = lock(&batch.queue);
            queue.calls.push(Call { keys, args, answer });
            !std::mem::replace(&mut queue.sending, true)
        };
        // Sent from its own task, so a request that goes away cannot strand the others.
        if lead {
            tokio::spawn(send_batches(self.clone(), kind, batch.clone()));
        }
    }

    /// Sends what every thread has queued, from here: at shutdown, a lane's queue may have
    /// no runtime left to send it.
    pub async fn flush(self: &Arc<Self>) {
        for batches in self.batches.iter() {
            for kind in Kind::ALL {
                let queued = std::mem::take(&mut lock(&batches.0[kind as usize].queue).calls);
                if !queued.is_empty() {
                    self.send_batch(kind, queued).await;
                }
            }
        }
    }

    /// Admits one request against every limit at once: its key's, its model's, and those of
    /// the levels above the key.
    pub async fn admit(
        self: &Arc<Self>,
        key_id: &str,
        limits: &KeyLimits,
        above: Above<'_>,
        model: &str,
        model_limits: (u64, u64),
        demand: Demand,
    ) -> Result<Admitted, StateError> {
        if above != Above::default() {
            return self
                .admit_levels(key_id, limits, above, model, model_limits, demand)
                .await;
        }
        let level = LevelCall {
            level: Level::Key,
            owner: key_id,
            limits,
            model,
            model_limits,
        };
        let may_hold_allowance = level.may_hold_allowance();
        if may_hold_allowance {
            if let Some(lease) = self.admit_here(&[(key_id, model, cap_of(limits))], demand) {
                self.decided_here.inc();
                return Ok(Admitted::Lease(lease));
            }
        }
        let granting = (may_hold_allowance
            && self.granting.insert(key_id.to_owned(), ()).is_none())
        .then_some(Granting {
            state: self,
            key_id,
        });
        let (allowance_id, fresh) = match (&granting, self.allowances.get(key_id)) {
            (None, _) => (String::new(), false),
            (Some(_), Some(allowance)) => (lock(&allowance).id.clone(), false),
            (Some(_), None) => (crate::api::new_request_id(), true),
        };
        let id = crate::api::new_request_id();
        let (keys, args) = level.call(&id, demand, &allowance_id);
        let mut answer = ints(self.batched(Kind::Admit, keys, args).await?)?;
        if answer.get(..2) == Some(&[1, BUDGET_REFUSED]) && self.give_back_idle_budget(key_id).await
        {
            let (keys, args) = level.call(&id, demand, &allowance_id);
            answer = ints(self.batched(Kind::Admit, keys, args).await?)?;
        }
        self.decided_in_redis.inc();
        let admitted = self.admitted(&level, id, demand, &answer)?;
        if let (Admitted::Lease(lease), [requests, tokens, budget]) =
            (&admitted, answer.get(10..).unwrap_or_default())
        {
            self.add_allowance(
                key_id,
                (allowance_id, fresh),
                (lease.key_rpm, lease.key_tpm.0),
                [*requests, *tokens, *budget],
                lease.headers,
            );
        }
        drop(granting);
        Ok(admitted)
    }

    /// Admits a request of a key in a team or a customer: one lease per level, asked for
    /// together (in one script call when the batch allows) unless this replica's allowances
    /// of every level have room. A level that refuses has the others give back what they
    /// took, as the embedded limiter does; near a cap that may refuse a request another
    /// level's passing hold crowded out, never admit past a cap.
    async fn admit_levels(
        self: &Arc<Self>,
        key_id: &str,
        limits: &KeyLimits,
        above: Above<'_>,
        model: &str,
        model_limits: (u64, u64),
        demand: Demand,
    ) -> Result<Admitted, StateError> {
        // On the stack: most requests are admitted from allowances, without a round trip.
        let key = LevelCall {
            level: Level::Key,
            owner: key_id,
            limits,
            model,
            model_limits,
        };
        let mut calls = [key; 3];
        let mut count = 1;
        for (level, above) in [(Level::Team, above.team), (Level::Customer, above.customer)] {
            if let Some(above) = above {
                calls[count] = LevelCall {
                    level,
                    owner: above.shared_id,
                    limits: above.limits,
                    model: "",
                    model_limits: (0, 0),
                };
                count += 1;
            }
        }
        let levels = &calls[..count];
        if levels.iter().all(LevelCall::may_hold_allowance) {
            let mut here = [(key_id, model, cap_of(limits)); 3];
            for (slot, call) in here.iter_mut().zip(levels) {
                *slot = (call.owner, call.model, cap_of(call.limits));
            }
            if let Some(lease) = self.admit_here(&here[..count], demand) {
                self.decided_here.inc();
                return Ok(Admitted::Lease(lease));
            }
        }
        // Each level that may hold an allowance asks Redis for one, unless another admission
        // of this replica is asking already.
        let granting: Vec<Option<Granting>> = levels
            .iter()
            .map(|call| {
                (call.may_hold_allowance()
                    && self.granting.insert(call.owner.to_owned(), ()).is_none())
                .then_some(Granting {
                    state: self,
                    key_id: call.owner,
                })
            })
            .collect();
        let allowance_ids: Vec<(String, bool)> = granting
            .iter()
            .zip(levels)
            .map(
                |(granting, call)| match (granting, self.allowances.get(call.owner)) {
                    (None, _) => (String::new(), false),
                    (Some(_), Some(allowance)) => (lock(&allowance).id.clone(), false),
                    (Some(_), None) => (crate::api::new_request_id(), true),
                },
            )
            .collect();
        self.decided_in_redis.inc();
        for attempt in 0..2 {
            let ids: Vec<String> = levels
                .iter()
                .map(|_| crate::api::new_request_id())
                .collect();
            let answers = levels.iter().zip(&ids).zip(&allowance_ids).map(
                |((call, id), (allowance_id, _))| {
                    let (keys, args) = call.call(id, demand, allowance_id);
                    self.batched(Kind::Admit, keys, args)
                },
            );
            let answers = futures_util::future::join_all(answers).await;
            let mut leases = Vec::with_capacity(levels.len());
            let mut refused = None;
            for (((call, id), answer), allowance) in
                levels.iter().zip(ids).zip(answers).zip(&allowance_ids)
            {
                // Leases made so far are released when they drop, should a level refuse.
                let answer = ints(answer?)?;
                match self.admitted(call, id, demand, &answer)? {
                    Admitted::Lease(lease) => {
                        if let [requests, tokens, budget] = answer.get(10..).unwrap_or_default() {
                            self.add_allowance(
                                call.owner,
                                allowance.clone(),
                                (lease.key_rpm, lease.key_tpm.0),
                                [*requests, *tokens, *budget],
                                lease.headers,
                            );
                        }
                        leases.push(lease);
                    }
                    other => {
                        refused.get_or_insert((call.owner, other));
                    }
                }
            }
            let Some((owner, refused)) = refused else {
                let mut leases = leases.into_iter();
                let Some(key) = leases.next() else {
                    return Err(StateError::Answer("no lease for the key".to_owned()));
                };
                return Ok(Admitted::Lease(Lease::joined(key, leases)));
            };
            for lease in &mut leases {
                lease.refused = true;
            }
            let for_budget = matches!(
                refused,
                Admitted::Refused(Refusal::InsufficientQuota { .. }, _)
            );
            // Budget idle in this replica's allowance of the level that refused goes back
            // first (see `give_back_idle_budget`), then the request is tried once more.
            if !(attempt == 0 && for_budget && self.give_back_idle_budget(owner).await) {
                return Ok(refused);
            }
        }
        Err(StateError::Answer("admission retried".to_owned()))
    }

    /// A level's answer to its admission call.
    fn admitted(
        self: &Arc<Self>,
        call: &LevelCall<'_>,
        id: String,
        demand: Demand,
        answer: &[i64],
    ) -> Result<Admitted, StateError> {
        let limits = call.limits;
        let (cap, period) = cap_of(limits);
        let key_rpm = limits.rpm.map_or(0, u64::from);
        let key_tpm = limits.tpm.unwrap_or(0);
        let (model_rpm, model_tpm) = call.model_limits;
        let spend_caps = SpendCaps::of(limits);
        let limits4 = [key_rpm, key_tpm, model_rpm, model_tpm];
        match answer.first().copied() {
            Some(0) => {
                let reserved = Money(answer.get(1).copied().unwrap_or(0));
                let headers = headers(limits4, answer.get(2..10).unwrap_or_default());
                self.live.insert(id.clone(), call.owner.to_owned());
                Ok(Admitted::Lease(Lease {
                    state: self.clone(),
                    id,
                    key_id: call.owner.to_owned(),
                    model: call.model.to_owned(),
                    key_rpm,
                    key_tpm: (key_tpm, if key_tpm > 0 { demand.tokens } else { 0 }),
                    model_tpm: (model_tpm, if model_tpm > 0 { demand.tokens } else { 0 }),
                    demand_tokens: demand.tokens,
                    admitted_us: crate::unix_ms() * 1_000,
                    reserved,
                    cap: (cap >= 0).then_some(Money(cap)),
                    period,
                    spend: (
                        spend_caps,
                        if spend_caps.any() {
                            demand.cost.nanos().max(0) as u64
                        } else {
                            0
                        },
                    ),
                    headers,
                    settled: false,
                    allowance: None,
                    levels: Vec::new(),
                    refused: false,
                }))
            }
            Some(1) => {
                let reason = answer.get(1).copied().unwrap_or(0);
                let retry_us = answer.get(2).copied().unwrap_or(1);
                let remaining = Money(answer.get(3).copied().unwrap_or(0));
                Ok(Admitted::Refused(
                    refusal(call.level, reason, retry_us, remaining, demand.cost),
                    headers(limits4, answer.get(4..).unwrap_or_default()),
                ))
            }
            Some(2) => Ok(Admitted::NeedsSeed(call.level)),
            _ => Err(StateError::Answer(format!("{answer:?}"))),
        }
    }

    /// Admits a request from this replica's allowances for each of its levels (`(owner,
    /// model, cap_of)`: its key, then its team and customer), when every one has room: all
    /// or none.
    fn admit_here(
        self: &Arc<Self>,
        levels: &[(&str, &str, (i64, BudgetPeriod))],
        demand: Demand,
    ) -> Option<Lease> {
        // Under `fail_closed` a replica that lost Redis refuses; it learns so from the key
        // change subscription at once, not only from its next call.
        if !self.is_up() {
            return None;
        }
        // Every map guard is gone before the first allowance is locked; allowances are
        // locked in level order, key first, so two admissions never wait on each other.
        // Fixed arrays: this is the path most requests take, and it allocates one lease.
        let mut shared: [Option<Arc<Mutex<Allowance>>>; 3] = [None, None, None];
        for (slot, (owner, ..)) in shared.iter_mut().zip(levels) {
            *slot = Some(self.allowances.get(*owner)?.clone());
        }
        let mut held: [Option<std::sync::MutexGuard<'_, Allowance>>; 3] = [None, None, None];
        for (slot, allowance) in held.iter_mut().zip(shared.iter().flatten()) {
            *slot = Some(lock(allowance));
        }
        let reserve = |cap: i64| match cap >= 0 {
            true => demand.cost.nanos().max(0),
            false => 0,
        };
        let now = Instant::now();
        let room = held
            .iter()
            .flatten()
            .zip(levels)
            .all(|(allowance, (_, _, (cap, _)))| {
                now < allowance.usable_until
                    && allowance.requests.is_none_or(|left| left >= 1)
                    && allowance.tokens.is_none_or(|left| left >= demand.tokens)
                    && allowance.budget.is_none_or(|left| left >= reserve(*cap))
            });
        if !room {
            return None;
        }
        // What each level's lease needs is read while the allowances are held; the leases
        // are made after, outside them.
        let mut taken = [(0, 0, RateLimitHeaders::default()); 3];
        for ((allowance, taken), (_, _, (cap, _))) in
            held.iter_mut().flatten().zip(&mut taken).zip(levels)
        {
            let reserve = reserve(*cap);
            if let Some(left) = &mut allowance.requests {
                *left -= 1;
            }
            if let Some(left) = &mut allowance.tokens {
                *left -= demand.tokens;
            }
            if let Some(left) = &mut allowance.budget {
                *left -= reserve;
            }
            allowance.requests_taken += 1;
            allowance.tokens_taken += demand.tokens;
            allowance.in_flight += 1;
            allowance.used_since_tick = true;
            *taken = (allowance.key_rpm, allowance.key_tpm, allowance.headers());
        }
        drop(held);
        let admitted_us = crate::unix_ms() * 1_000;
        let mut key_lease: Option<Lease> = None;
        for ((shared, (key_rpm, key_tpm, headers)), (owner, model, (cap, period))) in
            shared.into_iter().flatten().zip(taken).zip(levels)
        {
            let lease = Lease {
                state: self.clone(),
                // Admitted from an allowance, a request's lease settles through the
                // allowance's: the key's id names it in the logs, the levels' need none.
                id: match key_lease {
                    None => crate::api::new_request_id(),
                    Some(_) => String::new(),
                },
                key_id: (*owner).to_owned(),
                model: (*model).to_owned(),
                key_rpm,
                key_tpm: (key_tpm, if key_tpm > 0 { demand.tokens } else { 0 }),
                model_tpm: (0, 0),
                demand_tokens: demand.tokens,
                admitted_us,
                reserved: Money(reserve(*cap)),
                cap: (*cap >= 0).then_some(Money(*cap)),
                period: *period,
                spend: (SpendCaps::default(), 0),
                headers,
                settled: false,
                allowance: Some(shared),
                levels: Vec::new(),
                refused: false,
            };
            match &mut key_lease {
                None => key_lease = Some(lease),
                Some(key_lease) => key_lease.join(lease),
            }
        }
        key_lease
    }

    /// Gives back what this replica's allowance for a key holds and no request reserved, once
    /// Redis refused a request of the key for budget: near the cap, budget idle in an
    /// allowance that cannot admit it (too little left, or past its use) would otherwise
    /// refuse requests the cap still has room for. True when something went back.
    async fn give_back_idle_budget(&self, key_id: &str) -> bool {
        let Some(shared) = self.allowances.get(key_id).map(|entry| entry.clone()) else {
            return false;
        };
        let (id, idle) = {
            let mut allowance = lock(&shared);
            let Some(idle) = allowance.budget.filter(|left| *left > 0) else {
                return false;
            };
            allowance.budget = Some(0);
            (allowance.id.clone(), idle)
        };
        let mut invocation = self.scripts.give_back.prepare_invoke();
        invocation
            .key(key_of(key_id, "lease_amounts"))
            .key(key_of(key_id, "reserved"))
            .arg(id)
            .arg(idle);
        match self.run(invocation).await {
            Ok(Value::Int(given)) => given > 0,
            Ok(_) => false,
            Err(error) => {
                tracing::debug!(%error, "allowance budget not given back; its lease will expire");
                false
            }
        }
    }

    /// Adds what Redis granted (-1: the key has no such limit) to the key's allowance.
    /// An allowance given back while this grant was on its way is not brought back to
    /// life: the grant is given back too (`fresh` says whether `id` was minted for it).
    fn add_allowance(
        &self,
        key_id: &str,
        (id, fresh): (String, bool),
        (key_rpm, key_tpm): (u64, u64),
        [requests, tokens, budget]: [i64; 3],
        headers: RateLimitHeaders,
    ) {
        let usable_until = Instant::now() + self.lease / 2;
        let granted = |n: i64| u64::try_from(n).ok();
        let current = self.allowances.get(key_id).map(|entry| entry.clone());
        let stale = match &current {
            Some(allowance) => lock(allowance).id != id,
            None => !fresh,
        };
        if stale {
            let _ = self.releases.send(Release {
                id,
                key_id: key_id.to_owned(),
                model: String::new(),
                key_rpm: (key_rpm, granted(requests).unwrap_or(0)),
                key_tpm: (key_tpm, granted(tokens).unwrap_or(0)),
                model_tpm: (0, 0),
                spend: (SpendCaps::default(), 0),
                once: false,
            });
            return;
        }
        let entry = self
            .allowances
            .entry(key_id.to_owned())
            .or_insert_with(|| {
                self.live.insert(id.clone(), key_id.to_owned());
                Arc::new(Mutex::new(Allowance {
                    id,
                    key_rpm,
                    key_tpm,
                    requests: granted(requests).map(|_| 0),
                    tokens: granted(tokens).map(|_| 0),
                    budget: granted(budget).map(|_| 0),
                    in_flight: 0,
                    used_since_tick: true,
                    usable_until,
                    headers,
                    requests_taken: 0,
                    tokens_taken: 0,
                }))
            })
            .clone();
        let mut allowance = lock(&entry);
        if let (Some(left), Some(more)) = (&mut allowance.requests, granted(requests)) {
            *left += more;
        }
        if let (Some(left), Some(more)) = (&mut allowance.tokens, granted(tokens)) {
            *left += more;
        }
        if let (Some(left), Some(more)) = (&mut allowance.budget, granted(budget)) {
            *left += more as i64;
        }
        allowance.usable_until = usable_until;
        allowance.headers = headers;
        allowance.requests_taken = 0;
        allowance.tokens_taken = 0;
    }

    /// Redis went away, and may come back empty (it keeps no state across a restart): what
    /// this replica took from it is forgotten rather than admitted from, or given back.
    fn drop_allowances(&self) {
        self.allowances.retain(|_, allowance| {
            self.live.remove(&lock(allowance).id);
            false
        });
        lock(&self.retired).retain(|(_, allowance)| {
            self.live.remove(&lock(allowance).id);
            false
        });
    }

    /// A key's limits changed or it was revoked: its allowance admits nothing more and is
    /// given back once its last request ends.
    pub fn retire_allowance(&self, key_id: &str) {
        if let Some((key_id, allowance)) = self.allowances.remove(key_id) {
            lock(&self.retired).push((key_id, allowance));
        }
    }

    /// Gives back every allowance whose requests have all ended; at shutdown, after the last
    /// settlement, that is all of them.
    pub async fn return_allowances(&self, only_idle: bool) {
        let mut returned = Vec::new();
        self.allowances.retain(|key_id, shared| {
            let mut allowance = lock(shared);
            let idle = !allowance.used_since_tick || Instant::now() >= allowance.usable_until;
            allowance.used_since_tick = false;
            if allowance.in_flight == 0 && (idle || !only_idle) {
                returned.push(allowance.release(key_id));
                return false;
            }
            true
        });
        lock(&self.retired).retain(|(key_id, shared)| {
            let allowance = lock(shared);
            if allowance.in_flight == 0 {
                returned.push(allowance.release(key_id));
                return false;
            }
            true
        });
        for release in returned {
            self.live.remove(&release.id);
            if let Err(error) = self.release(&release).await {
                tracing::debug!(%error, "allowance not given back; its lease will expire");
            }
        }
    }

    /// Claims an alert episode (see `scripts/episode.lua`): true for the one replica that
    /// starts it.
    pub async fn claim_episode(&self, name: &str, lasts: Duration) -> Result<bool, StateError> {
        let mut invocation = self.scripts.episode.prepare_invoke();
        invocation
            .key(format!("tg:episode:{name}"))
            .arg(lasts.as_millis() as u64);
        Ok(matches!(self.run(invocation).await?, Value::Int(1)))
    }

    /// Sets a key's (or group's) spend for its current period, unless a replica already has;
    /// with `Seed::Replace`, whatever it was.
    pub async fn seed_spend(
        &self,
        key_id: &str,
        period: BudgetPeriod,
        spent: Money,
        seed: Seed,
    ) -> Result<(), StateError> {
        let now_ms = crate::unix_ms();
        let mut command = redis::cmd("SET");
        command
            .arg(spend_key(key_id, period.start_ms(now_ms)))
            .arg(spent.nanos());
        if seed == Seed::IfMissing {
            command.arg("NX");
        }
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
                Level::Key,
                reason,
                answer.get(1).copied().unwrap_or(1),
                Money::ZERO,
                Money::ZERO,
            ))),
            None => Err(StateError::Answer("empty".to_owned())),
        }
    }

    /// Replaces a lease by what the request used, exactly once, without waiting for Redis:
    /// the alert thresholds this settlement crossed first in the period, for all replicas,
    /// are handed to `alerts` when Redis answers. `month` carries what the request adds to
    /// its month's rating totals when rating did not advance them. Returns how far the cost
    /// went past the reservation.
    pub fn settle(
        self: &Arc<Self>,
        mut lease: Lease,
        used: Used,
        month: Option<MonthDelta>,
        alerts: Box<dyn FnOnce(Vec<AlertCrossing>) + Send>,
    ) -> Money {
        let Used {
            tokens,
            cost,
            period,
        } = used;
        lease.settled = true;
        self.live.remove(&lease.id);
        for level in std::mem::take(&mut lease.levels) {
            let used = Used {
                tokens,
                cost,
                period: level.period,
            };
            self.settle(level, used, None, Box::new(|_| {}));
        }
        let now_ms = crate::unix_ms();
        let period_start = period.start_ms(now_ms);
        let (tokens, allowance_id) = match lease.allowance.clone() {
            Some(allowance) => settle_here(&allowance, &mut lease, tokens, cost),
            None => (tokens, String::new()),
        };
        let (month_start_ms, delta) = match month {
            Some(month) => (month.start_ms, Some(month.delta)),
            None => (BudgetPeriod::Month.start_ms(now_ms), None),
        };
        let keys = vec![
            key_of(&lease.key_id, "leases"),
            key_of(&lease.key_id, "tpm"),
            model_key(&lease.model, "tpm"),
            spend_key(&lease.key_id, period_start),
            key_of(&lease.key_id, "lease_amounts"),
            key_of(&lease.key_id, "reserved"),
            key_of(&lease.key_id, &format!("alerted:{period_start}")),
            totals_key(&lease.key_id, month_start_ms),
            key_of(&lease.key_id, "usd_per_minute"),
            key_of(&lease.key_id, "usd_per_hour"),
        ];
        let args = vec![
            Arg::Text(std::mem::take(&mut lease.id)),
            Arg::Int(lease.key_tpm.0 as i64),
            Arg::Int(lease.key_tpm.1 as i64),
            Arg::Int(lease.model_tpm.0 as i64),
            Arg::Int(lease.model_tpm.1 as i64),
            Arg::Int(tokens as i64),
            Arg::Int(lease.admitted_us),
            Arg::Int(cost.nanos()),
            Arg::Int(lease.cap.map_or(-1, Money::nanos)),
            Arg::Int(period_ttl_ms(period, now_ms).unwrap_or(KEEP_AFTER_PERIOD_MS)),
            Arg::Text(allowance_id),
            Arg::Int(delta.map_or(-1, |d| d.tokens as i64)),
            Arg::Int(delta.map_or(0, |d| d.plan_cost.nanos())),
            Arg::Int(delta.map_or(0, |d| d.micro_credits as i64)),
            Arg::Int(lease.spend.0.per_minute as i64),
            Arg::Int(lease.spend.0.per_hour as i64),
            Arg::Int(lease.spend.1 as i64),
        ];
        let cap = lease.cap;
        let state = self.clone();
        let answered = move |answer: Answer| {
            let answer = match answer.and_then(ints) {
                Ok(answer) => answer,
                Err(error) => {
                    tracing::error!(%error, "settlement not recorded in shared state");
                    return;
                }
            };
            let spent = answer.get(1).copied().unwrap_or(0);
            let first = answer.get(2).copied().unwrap_or(0);
            let used_pct = cap.map_or(0, |cap| {
                u64::try_from(i128::from(spent) * 100 / i128::from(cap.nanos().max(1))).unwrap_or(0)
            });
            let crossed =
                crate::limits::crossed(&state.alert_thresholds_pct, first as u64, used_pct);
            if !crossed.is_empty() {
                alerts(crossed);
            }
        };
        self.enqueue(Kind::Settle, keys, args, Reply::Then(Box::new(answered)));
        match lease.cap {
            Some(_) => (cost - lease.reserved).max(Money::ZERO),
            None => Money::ZERO,
        }
    }

    /// Charges a known amount (a reported outcome) to a key's budget, whole or not at all,
    /// once per idempotency key across replicas (remembered with `record` for a week). `None`
    /// until the period's spend has been seeded.
    pub async fn charge(
        &self,
        level: Level,
        key_id: &str,
        limits: &KeyLimits,
        amount: Money,
        once: Once<'_>,
    ) -> Result<Option<Charged>, StateError> {
        let (cap, period) = cap_of(limits);
        let spend_caps = SpendCaps::of(limits);
        let period_start = period.start_ms(crate::unix_ms());
        let mut invocation = self.scripts.charge.prepare_invoke();
        invocation
            .key(spend_key(key_id, period_start))
            .key(key_of(key_id, "leases"))
            .key(key_of(key_id, "lease_amounts"))
            .key(key_of(key_id, "reserved"))
            .key(key_of(key_id, &format!("once:{}", once.id)))
            .key(key_of(key_id, "usd_per_minute"))
            .key(key_of(key_id, "usd_per_hour"))
            .arg(amount.nanos())
            .arg(cap)
            .arg(once.record)
            .arg(ONCE_KEPT_MS)
            .arg(spend_caps.per_minute)
            .arg(spend_caps.per_hour);
        let answer = self.run(invocation).await?;
        let Value::Array(parts) = &answer else {
            return Err(StateError::Answer(format!("charge: {answer:?}")));
        };
        let int = |i: usize| match parts.get(i) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        match (int(0), parts.get(1)) {
            (Some(0), _) => Ok(Some(Charged::Done)),
            (Some(1), _) => Ok(Some(Charged::Refused(Refusal::InsufficientQuota {
                level,
                remaining: Money(int(1).unwrap_or(0)),
                needed: amount,
            }))),
            (Some(2), _) => Ok(None),
            (Some(3), Some(Value::BulkString(first))) => Ok(Some(Charged::Repeat(
                String::from_utf8_lossy(first).into_owned(),
            ))),
            _ => Err(StateError::Answer(format!("charge: {answer:?}"))),
        }
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
            .key(key_of(key_id, "reserved"));
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
        self: &Arc<Self>,
        key_id: &str,
        month_start_ms: i64,
        delta: Cursor,
    ) -> Result<Option<Cursor>, StateError> {
        let args = vec![
            Arg::Int(delta.tokens as i64),
            Arg::Int(delta.plan_cost.nanos()),
            Arg::Int(delta.micro_credits as i64),
        ];
        let keys = vec![totals_key(key_id, month_start_ms)];
        let after = ints(self.batched(Kind::Advance, keys, args).await?)?;
        let [tokens, plan_cost, micro_credits] = after[..] else {
            return Ok(None);
        };
        Ok(Some(Cursor {
            tokens: (tokens as u64).saturating_sub(delta.tokens),
            plan_cost: Money(plan_cost) - delta.plan_cost,
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
            .arg(totals.plan_cost.nanos())
            .arg(totals.micro_credits)
            .arg(ttl);
        self.run(invocation).await.map(|_| ())
    }

    /// Marks a console session signed out for every replica, until it would have expired.
    pub async fn end_console_session(&self, id: &str, ttl_ms: i64) -> Result<(), StateError> {
        let mut connection = self.connection().await?;
        let result = redis::cmd("SET")
            .arg(format!("tg:console:ended:{id}"))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async::<()>(&mut connection)
            .await
            .map_err(StateError::from);
        self.observe(result)
    }

    pub async fn console_session_ended(&self, id: &str) -> Result<bool, StateError> {
        let mut connection = self.connection().await?;
        let result = redis::cmd("EXISTS")
            .arg(format!("tg:console:ended:{id}"))
            .query_async::<bool>(&mut connection)
            .await
            .map_err(StateError::from);
        self.observe(result)
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

    /// Changes as they are announced, `(version, key id)`, until the subscription breaks —
    /// which is also the first sign that Redis went away.
    pub async fn key_changes(
        self: &Arc<Self>,
    ) -> Result<mpsc::Receiver<(i64, String)>, StateError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(CHANGES_CHANNEL).await?;
        let (tx, rx) = mpsc::channel(1_024);
        let state = Arc::downgrade(self);
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
            if let Some(state) = state.upgrade() {
                let lost = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "key change subscription closed",
                );
                let _ = state.observe::<()>(Err(StateError::Redis(lost.into())));
            }
        });
        Ok(rx)
    }

    async fn release(&self, release: &Release) -> Result<(), StateError> {
        let mut invocation = self.scripts.release.prepare_invoke();
        invocation
            .key(key_of(&release.key_id, "leases"))
            .key(key_of(&release.key_id, "rpm"))
            .key(key_of(&release.key_id, "tpm"))
            .key(model_key(&release.model, "tpm"))
            .key(key_of(&release.key_id, "lease_amounts"))
            .key(key_of(&release.key_id, "reserved"))
            .key(key_of(&release.key_id, "usd_per_minute"))
            .key(key_of(&release.key_id, "usd_per_hour"))
            .arg(&release.id)
            .arg(release.key_rpm.0)
            .arg(release.key_rpm.1)
            .arg(release.key_tpm.0)
            .arg(release.key_tpm.1)
            .arg(release.model_tpm.0)
            .arg(release.model_tpm.1)
            .arg(u8::from(release.once))
            .arg(release.spend.0.per_minute)
            .arg(release.spend.0.per_hour)
            .arg(release.spend.1);
        self.run(invocation).await.map(|_| ())
    }

    async fn send_batch(&self, kind: Kind, calls: Vec<Call>) {
        let script = match kind {
            Kind::Admit => &self.scripts.admit,
            Kind::Settle => &self.scripts.settle,
            Kind::Advance => &self.scripts.advance,
        };
        let mut invocation = script.prepare_invoke();
        match kind {
            Kind::Admit => {
                invocation
                    .arg(self.lease.as_millis() as u64)
                    .arg(self.replicas);
            }
            Kind::Settle => {
                invocation.arg(self.alert_thresholds_pct.len());
                for threshold in &self.alert_thresholds_pct {
                    invocation.arg(*threshold);
                }
            }
            Kind::Advance => {}
        }
        for call in &calls {
            for key in &call.keys {
                invocation.key(key);
            }
            for arg in &call.args {
                invocation.arg(arg);
            }
        }
        match self.run(invocation).await {
            Ok(Value::Array(answers)) if answers.len() == calls.len() => {
                for (call, answer) in calls.into_iter().zip(answers) {
                    call.answer.send(Ok(answer));
                }
            }
            Ok(other) => {
                let error = StateError::Answer(format!("{other:?}"));
                for call in calls {
                    call.answer.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for call in calls {
                    call.answer.send(Err(error.clone()));
                }
            }
        }
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

    /// A key's lease holding those of the levels above it, with the tightest throttle headers
    /// of them all.
    fn joined(mut key: Lease, levels: impl IntoIterator<Item = Lease>) -> Lease {
        for level in levels {
            key.join(level);
        }
        key
    }

    /// Takes a level's lease into a key's: it settles and releases with it.
    fn join(&mut self, level: Lease) {
        self.headers = RateLimitHeaders {
            requests: crate::limits::tighter(self.headers.requests, level.headers.requests),
            tokens: crate::limits::tighter(self.headers.tokens, level.headers.tokens),
        };
        self.levels.push(level);
    }
}

impl Drop for Lease {
    /// An unsettled lease (the request never got an answer) is released by the background
    /// task; should that fail too, its expiry frees it.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(shared) = &self.allowance {
            let mut allowance = lock(shared);
            allowance.in_flight -= 1;
            if let Some(left) = &mut allowance.tokens {
                *left += self.key_tpm.1;
            }
            if let Some(left) = &mut allowance.budget {
                *left += self.reserved.nanos();
            }
            return;
        }
        self.state.live.remove(&self.id);
        let _ = self.state.releases.send(Release {
            id: std::mem::take(&mut self.id),
            key_id: std::mem::take(&mut self.key_id),
            model: std::mem::take(&mut self.model),
            key_rpm: (self.key_rpm, u64::from(self.refused)),
            key_tpm: self.key_tpm,
            model_tpm: self.model_tpm,
            spend: self.spend,
            once: true,
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn release_queued(
    state: std::sync::Weak<RedisState>,
    mut queued: mpsc::UnboundedReceiver<Release>,
) {
    while let Some(release) = queued.recv().await {
        let Some(state) = state.upgrade() else {
            return;
        };
        if let Err(error) = state.release(&release).await {
            tracing::debug!(%error, "lease release failed; it will expire instead");
        }
    }
}

/// Gives back, every second, the allowances no request used since the last time.
async fn return_idle_allowances(state: std::sync::Weak<RedisState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        state.return_allowances(true).await;
    }
}

/// Settles a request admitted from an allowance there: the allowance takes back what the
/// request reserved and did not use. Returns the tokens used beyond what the allowance holds,
/// which Redis charges, and the allowance's id, whose reservation pays the cost.
fn settle_here(
    allowance: &Mutex<Allowance>,
    lease: &mut Lease,
    tokens: u64,
    cost: Money,
) -> (u64, String) {
    let mut allowance = lock(allowance);
    allowance.in_flight -= 1;
    if let Some(left) = &mut allowance.budget {
        *left += lease.reserved.nanos() - cost.nanos();
    }
    let held = std::mem::take(&mut lease.key_tpm.1);
    let mut beyond = tokens.saturating_sub(held);
    if let Some(left) = &mut allowance.tokens {
        let covered = beyond.min(*left);
        *left = *left + held.saturating_sub(tokens) - covered;
        beyond -= covered;
    }
    (beyond, allowance.id.clone())
}

/// Sends a thread's queued calls of one kind, a batch per script call, until none is left.
async fn send_batches(state: Arc<RedisState>, kind: Kind, batch: Arc<Batch>) {
    loop {
        let calls: Vec<Call> = {
            let mut queue = lock(&batch.queue);
            if queue.calls.is_empty() {
                queue.sending = false;
                return;
            }
            let take = queue.calls.len().min(MAX_BATCH);
            queue.calls.drain(..take).collect()
        };
        state.send_batch(kind, calls).await;
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
