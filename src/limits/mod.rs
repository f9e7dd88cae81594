//! Admission: per-key throttles (requests and tokens per minute, concurrency, dollars per
//! minute and per hour), per-model throttles protecting upstream quotas, and per-key budget
//! caps by reservation. A request is
//! admitted all-or-nothing — a later refusal rolls back what earlier checks took — and gets a
//! [`Ticket`] that settles exactly once: explicitly with the actual tokens and cost, or on drop
//! (the request never reached an answer) by giving back what it reserved.
//!
//! Live state is atomics behind an `Arc` per key, found through a concurrent map; nothing here
//! blocks or awaits. The [`Limiter`] is the seam for a shared backend (several replicas
//! enforcing one cap): the request path only calls `admit` and `Ticket::settle`.

pub mod budget;
pub mod gcra;

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use dashmap::DashMap;

pub use budget::{Budget, BudgetExceeded, BudgetPeriod, BudgetSnapshot, UNCAPPED};
use gcra::{Gcra, Snapshot};

use crate::money::Money;

/// Time as the limiter sees it; injectable so tests roll periods without sleeping.
pub trait Clock: Send + Sync {
    fn now_us(&self) -> i64;
    fn now_ms(&self) -> i64 {
        self.now_us() / 1_000
    }
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at_ms(ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(ms * 1_000))
    }

    pub fn advance(&self, by: Duration) {
        self.0
            .fetch_add(i64::try_from(by.as_micros()).unwrap_or(0), Ordering::AcqRel);
    }

    pub fn set_ms(&self, ms: i64) {
        self.0.store(ms * 1_000, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A key's limits as administered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrency: Option<u32>,
    pub budget: Option<(Money, BudgetPeriod)>,
    /// Caps on how fast money can go: what requests may reserve per minute and per hour.
    pub spend_rate: SpendRate,
}

/// Dollars a key may reserve per minute and per hour: a runaway loop is slowed to a known
/// worst case instead of burning a period's budget in an hour. GCRA over nano-dollars, so a
/// key may spend a whole window's cap at once and then at the cap's pace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendRate {
    pub per_minute: Option<Money>,
    pub per_hour: Option<Money>,
}

/// What one request asks for: tokens for TPM (input plus the most output it may produce) and
/// the worst-case cost for the budget.
#[derive(Clone, Copy, Debug, Default)]
pub struct Demand {
    pub tokens: u64,
    pub cost: Money,
}

/// A key's limits. The counters are shared `Arc`s so that changing a key's limits keeps what
/// its requests already took, and requests admitted before the change settle into the same
/// counters as those admitted after it.
struct KeyState {
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Gcra>>,
    max_concurrency: Option<u32>,
    /// Counted with or without a limit, so that a limit set later starts from the truth.
    in_flight: Arc<AtomicU32>,
    budget: Option<Arc<Budget>>,
    usd_per_minute: Option<Arc<Gcra>>,
    usd_per_hour: Option<Arc<Gcra>>,
}

struct ModelState {
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Gcra>>,
}

/// The throttle for a (possibly changed) per-minute limit: the live one, resized in place.
fn carried(old: Option<&Arc<Gcra>>, per_minute: Option<u64>, now_us: i64) -> Option<Arc<Gcra>> {
    carried_over(old, per_minute, gcra::WINDOW_US, now_us)
}

fn carried_over(
    old: Option<&Arc<Gcra>>,
    limit: Option<u64>,
    window_us: i64,
    now_us: i64,
) -> Option<Arc<Gcra>> {
    let limit = limit?;
    Some(match old {
        Some(old) => {
            old.resize(limit, now_us);
            old.clone()
        }
        None => Arc::new(Gcra::per_window(limit, window_us)),
    })
}

/// A spend-rate cap as a throttle on nano-dollars.
fn spend_throttle(
    old: Option<&Arc<Gcra>>,
    cap: Option<Money>,
    window_us: i64,
    now_us: i64,
) -> Option<Arc<Gcra>> {
    let nanos = cap.map(|cap| u64::try_from(cap.nanos()).unwrap_or(0));
    carried_over(old, nanos, window_us, now_us)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A throttle refused; `limit_kind` is OpenAI's `requests` or `tokens`.
    RateLimited {
        limit_kind: &'static str,
        scope: &'static str,
        retry_after: Duration,
    },
    /// The key's budget cannot cover the request's worst case.
    InsufficientQuota { remaining: Money, needed: Money },
    /// The shared state that holds the limits cannot be reached (`fail_closed`).
    Unavailable,
}

impl From<BudgetExceeded> for Refusal {
    fn from(exceeded: BudgetExceeded) -> Refusal {
        Refusal::InsufficientQuota {
            remaining: exceeded.remaining,
            needed: exceeded.needed,
        }
    }
}

impl Refusal {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::RateLimited {
                scope: "concurrency",
                ..
            } => "concurrency",
            Refusal::RateLimited {
                scope: "model",
                limit_kind: "requests",
                ..
            } => "model_rpm",
            Refusal::RateLimited { scope: "model", .. } => "model_tpm",
            Refusal::RateLimited {
                scope: SPEND_PER_MINUTE,
                ..
            } => "key_usd_per_minute",
            Refusal::RateLimited {
                scope: SPEND_PER_HOUR,
                ..
            } => "key_usd_per_hour",
            Refusal::RateLimited {
                limit_kind: "requests",
                ..
            } => "key_rpm",
            Refusal::RateLimited { .. } => "key_tpm",
            Refusal::InsufficientQuota { .. } => "budget",
            Refusal::Unavailable => "state_unavailable",
        }
    }
}

/// The scopes of a refusal by a spend-rate cap.
pub const SPEND_PER_MINUTE: &str = "spend_per_minute";
pub const SPEND_PER_HOUR: &str = "spend_per_hour";

/// Takes units from one throttle, or says which limit refused and how long to wait.
fn throttle(
    limit: &Gcra,
    units: u64,
    now_us: i64,
    limit_kind: &'static str,
    scope: &'static str,
) -> Result<Snapshot, Refusal> {
    limit
        .acquire(units, now_us)
        .map_err(|retry_after| Refusal::RateLimited {
            limit_kind,
            scope,
            retry_after,
        })
}

/// OpenAI's six `x-ratelimit-*` values, for the tightest limit that applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub requests: Option<Snapshot>,
    pub tokens: Option<Snapshot>,
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

impl RateLimitHeaders {
    /// Adds the headers of the dimensions that have a limit.
    pub fn write_to(&self, headers: &mut HeaderMap) {
        let dimensions = [
            (
                self.requests,
                [&LIMIT_REQUESTS, &REMAINING_REQUESTS, &RESET_REQUESTS],
            ),
            (
                self.tokens,
                [&LIMIT_TOKENS, &REMAINING_TOKENS, &RESET_TOKENS],
            ),
        ];
        for (snapshot, [limit, remaining, reset]) in dimensions {
            let Some(snapshot) = snapshot else { continue };
            headers.insert(limit.clone(), HeaderValue::from(snapshot.limit));
            headers.insert(remaining.clone(), HeaderValue::from(snapshot.remaining));
            if let Ok(value) = HeaderValue::try_from(go_duration(snapshot.reset)) {
                headers.insert(reset.clone(), value);
            }
        }
    }
}

/// Keeps the snapshot with the least room left, as a share of its limit.
pub fn tighter(current: Option<Snapshot>, candidate: Option<Snapshot>) -> Option<Snapshot> {
    match (current, candidate) {
        (Some(a), Some(b)) => {
            let a_share = u128::from(a.remaining) * u128::from(b.limit);
            let b_share = u128::from(b.remaining) * u128::from(a.limit);
            Some(if b_share < a_share { b } else { a })
        }
        (a, b) => a.or(b),
    }
}

/// Durations the way OpenAI writes them (Go's format): `20ms`, `1s`, `6m0s`, `1h2m3s`,
/// `59.94s`.
pub fn go_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = (ms % 3_600_000) / 60_000;
    let seconds_ms = ms % 60_000;
    let seconds = if seconds_ms.is_multiple_of(1_000) {
        format!("{}s", seconds_ms / 1_000)
    } else {
        let text = format!("{}.{:03}", seconds_ms / 1_000, seconds_ms % 1_000);
        format!("{}s", text.trim_end_matches('0'))
    };
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

/// Every key's and model's live limits.
pub struct Limiter {
    keys: DashMap<String, Arc<KeyState>>,
    models: DashMap<String, Arc<ModelState>>,
    clock: Arc<dyn Clock>,
    alert_thresholds_pct: Vec<u8>,
    /// Alert episodes running, by name, until (ms) they end unless claimed again.
    episodes: DashMap<String, i64>,
    /// How many episodes were left at the last sweep of ended ones.
    episodes_swept_at: AtomicUsize,
}

/// A budget threshold crossed by a settlement, to log, count and announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertCrossing {
    pub threshold_pct: u8,
    pub used_pct: u64,
}

/// What settling found, for metrics and alerts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    pub overshoot: Money,
    pub alerts: Vec<AlertCrossing>,
}

impl Limiter {
    pub fn new(clock: Arc<dyn Clock>, alert_thresholds_pct: Vec<u8>) -> Limiter {
        let mut alert_thresholds_pct = alert_thresholds_pct;
        alert_thresholds_pct.sort_unstable();
        alert_thresholds_pct.dedup();
        alert_thresholds_pct.truncate(64);
        Limiter {
            keys: DashMap::new(),
            models: DashMap::new(),
            clock,
            alert_thresholds_pct,
            episodes: DashMap::new(),
            episodes_swept_at: AtomicUsize::new(1_024),
        }
    }

    /// Claims an alert episode: true when none was running under `name`; every claim keeps
    /// it running `lasts` more, and one not claimed for that long has ended.
    pub fn claim_episode(&self, name: &str, lasts: Duration) -> bool {
        let now_ms = self.clock.now_ms();
        let until = now_ms + i64::try_from(lasts.as_millis()).unwrap_or(i64::MAX / 2);
        // Ended episodes are forgotten in bulk now and then, so the map holds about what runs.
        if self.episodes.len() >= self.episodes_swept_at.load(Ordering::Relaxed) * 2 {
            self.episodes.retain(|_, running| *running > now_ms);
            self.episodes_swept_at
                .store(self.episodes.len().max(1_024), Ordering::Relaxed);
        }
        match self.episodes.insert(name.to_owned(), until) {
            Some(running) => running <= now_ms,
            None => true,
        }
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// Installs a key's limits, or changes them keeping its live counters: throttles keep
    /// their last minute's use, requests in flight stay counted, and a budget over the same
    /// period keeps its spend and reservations. `spent` is the period's spend from the ledger;
    /// it is needed at start-up and when the budget period changes, and replaces the live
    /// spend when given (reservations in flight still stay).
    pub fn upsert_key(&self, id: &str, limits: &KeyLimits, spent: Option<Money>) {
        let now_us = self.clock.now_us();
        let now_ms = now_us / 1_000;
        let old = self.keys.get(id).map(|entry| entry.value().clone());
        let old = old.as_deref();
        let live = old.and_then(|o| o.budget.as_ref());
        let budget = limits.budget.map(|(cap, period)| match (spent, live) {
            (None, Some(live)) if live.period() == period => {
                live.set_cap(cap);
                live.clone()
            }
            (Some(spent), Some(live)) => {
                live.set_cap(cap);
                live.rebase(period, spent, now_ms);
                live.clone()
            }
            _ => Arc::new(Budget::new(
                cap,
                period,
                spent.unwrap_or(Money::ZERO),
                now_ms,
            )),
        });
        let state = KeyState {
            rpm: carried(
                old.and_then(|o| o.rpm.as_ref()),
                limits.rpm.map(u64::from),
                now_us,
            ),
            tpm: carried(old.and_then(|o| o.tpm.as_ref()), limits.tpm, now_us),
            max_concurrency: limits.max_concurrency,
            in_flight: old.map_or_else(Arc::default, |o| o.in_flight.clone()),
            budget,
            usd_per_minute: spend_throttle(
                old.and_then(|o| o.usd_per_minute.as_ref()),
                limits.spend_rate.per_minute,
                gcra::WINDOW_US,
                now_us,
            ),
            usd_per_hour: spend_throttle(
                old.and_then(|o| o.usd_per_hour.as_ref()),
                limits.spend_rate.per_hour,
                gcra::HOUR_US,
                now_us,
            ),
        };
        self.keys.insert(id.to_owned(), Arc::new(state));
    }

    /// The period of a key's live budget, to tell whether a change needs the ledger's spend.
    pub fn budget_period(&self, key_id: &str) -> Option<BudgetPeriod> {
        let state = self.keys.get(key_id)?;
        state.budget.as_ref().map(|b| b.period())
    }

    pub fn remove_key(&self, id: &str) {
        self.keys.remove(id);
    }

    /// Sets a model's throttles; a reload that leaves them unchanged keeps their state.
    pub fn set_model(&self, name: &str, rpm: Option<u32>, tpm: Option<u64>) {
        if rpm.is_none() && tpm.is_none() {
            self.models.remove(name);
            return;
        }
        let now_us = self.clock.now_us();
        let old = self.models.get(name).map(|entry| entry.value().clone());
        let state = ModelState {
            rpm: carried(
                old.as_ref().and_then(|o| o.rpm.as_ref()),
                rpm.map(u64::from),
                now_us,
            ),
            tpm: carried(old.as_ref().and_then(|o| o.tpm.as_ref()), tpm, now_us),
        };
        self.models.insert(name.to_owned(), Arc::new(state));
    }

    pub fn budget(&self, key_id: &str) -> Option<BudgetSnapshot> {
        let now_ms = self.clock.now_ms();
        let state = self.keys.get(key_id).map(|entry| entry.value().clone())?;
        state.budget.as_ref().map(|b| b.snapshot(now_ms))
    }

    /// Checks, in order: concurrency, key RPM, key TPM, model RPM and TPM, budget. Each step's
    /// guard rolls itself back if a later step refuses.
    pub fn admit(&self, key_id: &str, model: &str, demand: Demand) -> Result<Ticket, Refusal> {
        let now_us = self.clock.now_us();
        // Clone the Arcs out so no map guard outlives this statement.
        let key = self.keys.get(key_id).map(|entry| entry.value().clone());
        let model_state = self.models.get(model).map(|entry| entry.value().clone());
        let mut ticket = Ticket {
            key: key.clone(),
            model: model_state.clone(),
            tokens: 0,
            model_tokens: 0,
            demand_tokens: demand.tokens,
            admitted_us: now_us,
            reserved: Money::ZERO,
            spend_taken: 0,
            holds_slot: false,
            requests_taken: (false, false),
            headers: RateLimitHeaders::default(),
            settled: false,
        };
        match Limiter::take(
            &mut ticket,
            key.as_ref(),
            model_state.as_ref(),
            demand,
            now_us,
        ) {
            Ok(()) => Ok(ticket),
            Err(refusal) => {
                ticket.rollback_requests();
                Err(refusal)
            }
        }
    }

    /// The throttle headers as they stand now, for a refused request: OpenAI sends them on
    /// its 429s too, and clients pace themselves by them.
    pub fn headers(&self, key_id: &str, model: &str) -> RateLimitHeaders {
        let now_us = self.clock.now_us();
        let key = self.keys.get(key_id).map(|entry| entry.value().clone());
        let model_state = self.models.get(model).map(|entry| entry.value().clone());
        let snapshot = |limit: Option<&Arc<Gcra>>| limit.map(|limit| limit.snapshot(now_us));
        RateLimitHeaders {
            requests: tighter(
                key.as_ref().and_then(|k| snapshot(k.rpm.as_ref())),
                model_state.as_ref().and_then(|m| snapshot(m.rpm.as_ref())),
            ),
            tokens: tighter(
                key.as_ref().and_then(|k| snapshot(k.tpm.as_ref())),
                model_state.as_ref().and_then(|m| snapshot(m.tpm.as_ref())),
            ),
        }
    }

    fn take(
        ticket: &mut Ticket,
        key: Option<&Arc<KeyState>>,
        model_state: Option<&Arc<ModelState>>,
        demand: Demand,
        now_us: i64,
    ) -> Result<(), Refusal> {
        if let Some(key) = key {
            let before = key.in_flight.fetch_add(1, Ordering::AcqRel);
            if key.max_concurrency.is_some_and(|limit| before >= limit) {
                key.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::RateLimited {
                    limit_kind: "requests",
                    scope: "concurrency",
                    retry_after: Duration::from_secs(1),
                });
            }
            ticket.holds_slot = true;
            if let Some(rpm) = &key.rpm {
                let snapshot = throttle(rpm, 1, now_us, "requests", "key")?;
                ticket.requests_taken.0 = true;
                ticket.headers.requests = Some(snapshot);
            }
            if let Some(tpm) = &key.tpm {
                let snapshot = throttle(tpm, demand.tokens, now_us, "tokens", "key")?;
                ticket.tokens = demand.tokens;
                ticket.headers.tokens = Some(snapshot);
            }
        }
        if let Some(model_state) = model_state {
            if let Some(rpm) = &model_state.rpm {
                let snapshot = throttle(rpm, 1, now_us, "requests", "model")?;
                ticket.requests_taken.1 = true;
                ticket.headers.requests = tighter(ticket.headers.requests, Some(snapshot));
            }
            if let Some(tpm) = &model_state.tpm {
                let snapshot = throttle(tpm, demand.tokens, now_us, "tokens", "model")?;
                ticket.model_tokens = demand.tokens;
                ticket.headers.tokens = tighter(ticket.headers.tokens, Some(snapshot));
            }
        }
        if let Some(key) = key {
            ticket.spend_taken = take_spend(key, demand.cost, now_us)?;
        }
        if let Some(budget) = key.and_then(|k| k.budget.as_ref()) {
            ticket.reserved = budget.reserve(demand.cost, now_us / 1_000)?;
        }
        Ok(())
    }

    /// Moves a ticket's model throttles to a fallback model before it is tried: its RPM and
    /// TPM protect that provider's quota whichever way a request reaches it. The model that
    /// failed keeps its request unit (a request did go out) but gives back its tokens, since a
    /// failed attempt produces none. A refusal takes nothing, and the fallback is skipped.
    pub fn fall_back_to(&self, ticket: &mut Ticket, model: &str) -> Result<(), Refusal> {
        let now_us = self.clock.now_us();
        let next = self.models.get(model).map(|entry| entry.value().clone());
        let rpm = next.as_ref().and_then(|state| state.rpm.as_ref());
        let tpm = next.as_ref().and_then(|state| state.tpm.as_ref());
        if let Some(rpm) = rpm {
            throttle(rpm, 1, now_us, "requests", "model")?;
        }
        if let Some(tpm) = tpm {
            if let Err(refusal) = throttle(tpm, ticket.demand_tokens, now_us, "tokens", "model") {
                if let Some(rpm) = rpm {
                    rpm.release(1);
                }
                return Err(refusal);
            }
        }
        let model_tokens = if tpm.is_some() {
            ticket.demand_tokens
        } else {
            0
        };
        if let Some(tpm) = ticket.model.as_ref().and_then(|state| state.tpm.as_ref()) {
            tpm.release(ticket.model_tokens);
        }
        ticket.model = next;
        ticket.model_tokens = model_tokens;
        Ok(())
    }

    /// Replaces a ticket's reservations by what the request really used.
    pub fn settle(&self, mut ticket: Ticket, tokens: u64, cost: Money) -> Settlement {
        ticket.settled = true;
        let now_us = self.clock.now_us();
        let now_ms = now_us / 1_000;
        let admitted_us = ticket.admitted_us;
        let correct =
            |limit: &Gcra, reserved: u64| limit.settle(reserved, tokens, admitted_us, now_us);
        let mut settlement = Settlement::default();
        if let Some(key) = ticket.key.take() {
            if let Some(tpm) = &key.tpm {
                correct(tpm, ticket.tokens);
            }
            let cost_nanos = u64::try_from(cost.nanos()).unwrap_or(0);
            for limit in [&key.usd_per_minute, &key.usd_per_hour]
                .into_iter()
                .flatten()
            {
                limit.settle(ticket.spend_taken, cost_nanos, admitted_us, now_us);
            }
            if let Some(budget) = &key.budget {
                let settled = budget.settle(ticket.reserved, cost, now_ms);
                settlement.overshoot = settled.overshoot;
                settlement.alerts = self.crossings(budget, settled.used_pct, now_ms);
            }
            if ticket.holds_slot {
                key.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Some(model) = ticket.model.take() {
            if let Some(tpm) = &model.tpm {
                correct(tpm, ticket.model_tokens);
            }
        }
        settlement
    }

    /// Charges an amount known before it is spent (a reported outcome) to the key's budget,
    /// whole or not at all.
    pub fn charge(&self, key_id: &str, amount: Money) -> Result<Settlement, Refusal> {
        let now_us = self.clock.now_us();
        let now_ms = now_us / 1_000;
        let key = self.keys.get(key_id).map(|entry| entry.value().clone());
        let Some(key) = key else {
            return Ok(Settlement::default());
        };
        let Some(budget) = key.budget.as_ref() else {
            charge_spend(&key, amount, now_us);
            return Ok(Settlement::default());
        };
        let reserved = budget.reserve(amount, now_ms)?;
        let settled = budget.settle(reserved, amount, now_ms);
        charge_spend(&key, amount, now_us);
        Ok(Settlement {
            overshoot: Money::ZERO,
            alerts: self.crossings(budget, settled.used_pct, now_ms),
        })
    }

    /// Thresholds newly crossed this period; each is reported once per period.
    fn crossings(&self, budget: &Budget, used_pct: u64, now_ms: i64) -> Vec<AlertCrossing> {
        let reached = self
            .alert_thresholds_pct
            .iter()
            .enumerate()
            .filter(|(_, threshold)| used_pct >= u64::from(**threshold))
            .fold(0u64, |mask, (bit, _)| mask | 1 << bit);
        let first = budget.first_crossings(reached, now_ms);
        crossed(&self.alert_thresholds_pct, first, used_pct)
    }
}

/// The thresholds whose bits are set in `mask` (bit i = the i-th of `thresholds_pct`).
pub fn crossed(thresholds_pct: &[u8], mask: u64, used_pct: u64) -> Vec<AlertCrossing> {
    thresholds_pct
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, threshold)| AlertCrossing {
            threshold_pct: *threshold,
            used_pct,
        })
        .collect()
}

/// Takes a request's worst-case cost from the key's spend-rate throttles, both or neither;
/// returns the nano-dollars taken.
fn take_spend(key: &KeyState, cost: Money, now_us: i64) -> Result<u64, Refusal> {
    let nanos = u64::try_from(cost.nanos()).unwrap_or(0);
    if let Some(minute) = &key.usd_per_minute {
        throttle(minute, nanos, now_us, "requests", SPEND_PER_MINUTE)?;
    }
    if let Some(hour) = &key.usd_per_hour {
        if let Err(refusal) = throttle(hour, nanos, now_us, "requests", SPEND_PER_HOUR) {
            if let Some(minute) = &key.usd_per_minute {
                minute.release(nanos);
            }
            return Err(refusal);
        }
    }
    Ok(nanos)
}

/// An amount charged outright (a reported outcome) counts against the spend rate: it is
/// money gone, but it is never refused for the rate, only the requests after it are paced.
fn charge_spend(key: &KeyState, amount: Money, now_us: i64) {
    let nanos = u64::try_from(amount.nanos()).unwrap_or(0);
    for limit in [&key.usd_per_minute, &key.usd_per_hour]
        .into_iter()
        .flatten()
    {
        limit.charge(nanos, now_us);
    }
}

/// What an admitted request holds until it settles.
pub struct Ticket {
    key: Option<Arc<KeyState>>,
    model: Option<Arc<ModelState>>,
    tokens: u64,
    model_tokens: u64,
    /// The tokens admitted, for a fallback model's own throttle.
    demand_tokens: u64,
    admitted_us: i64,
    reserved: Money,
    /// Nano-dollars taken from the key's spend-rate throttles.
    spend_taken: u64,
    holds_slot: bool,
    /// Whether a key and a model request unit were taken (kept: the request happened).
    requests_taken: (bool, bool),
    headers: RateLimitHeaders,
    settled: bool,
}

impl Ticket {
    pub fn headers(&self) -> RateLimitHeaders {
        self.headers
    }

    pub fn reserved(&self) -> Money {
        self.reserved
    }
}

impl Drop for Ticket {
    /// A ticket dropped unsettled (refused part-way, or a request that never got an answer)
    /// gives back its reservation, its tokens, its concurrency slot, and — when admission
    /// itself failed part-way — the request units it took.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(key) = &self.key {
            if let Some(tpm) = &key.tpm {
                tpm.release(self.tokens);
            }
            if let Some(budget) = &key.budget {
                budget.release(self.reserved);
            }
            for limit in [&key.usd_per_minute, &key.usd_per_hour]
                .into_iter()
                .flatten()
            {
                limit.release(self.spend_taken);
            }
            if self.holds_slot {
                key.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Some(model) = &self.model {
            if let Some(tpm) = &model.tpm {
                tpm.release(self.model_tokens);
            }
        }
    }
}

impl Ticket {
    /// Gives back the request units too: used when admission refused part-way, since the
    /// refused request never happened.
    fn rollback_requests(&mut self) {
        if self.requests_taken.0 {
            if let Some(rpm) = self.key.as_ref().and_then(|k| k.rpm.as_ref()) {
                rpm.release(1);
            }
        }
        if self.requests_taken.1 {
            if let Some(rpm) = self.model.as_ref().and_then(|m| m.rpm.as_ref()) {
                rpm.release(1);
            }
        }
        self.requests_taken = (false, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(clock: Arc<ManualClock>) -> Limiter {
        Limiter::new(clock, vec![50, 80, 100])
    }

    fn demand(tokens: u64, cost: Money) -> Demand {
        Demand { tokens, cost }
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(59_940)), "59.94s");
        assert_eq!(go_duration(Duration::from_secs(3_723)), "1h2m3s");
    }

    #[test]
    fn refusal_rolls_back_what_was_taken() {
        let clock = Arc::new(ManualClock::at_ms(1_000_000));
        let limiter = limiter(clock.clone());
        let limits = KeyLimits {
            rpm: Some(10),
            tpm: Some(1_000),
            max_concurrency: Some(1),
            budget: Some((Money(100), BudgetPeriod::Day)),
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        let refused = limiter.admit("k", "m", demand(10, Money(101)));
        assert!(matches!(refused, Err(Refusal::InsufficientQuota { .. })));
        // Nothing stayed taken: the slot, the tokens and the request are all free again.
        let ticket = limiter.admit("k", "m", demand(1_000, Money(100))).unwrap();
        assert_eq!(ticket.headers().requests.unwrap().remaining, 9);
        assert_eq!(ticket.headers().tokens.unwrap().remaining, 0);
        let busy = limiter.admit("k", "m", demand(1, Money(0)));
        assert_eq!(busy.err().map(|r| r.reason()), Some("concurrency"));
        let settlement = limiter.settle(ticket, 400, Money(60));
        assert_eq!(settlement.alerts.len(), 1);
        assert_eq!(settlement.alerts[0].threshold_pct, 50);
        let budget = limiter.budget("k").unwrap();
        assert_eq!(budget.spend_usd, Money(60));
        assert_eq!(budget.reserved_usd, Money::ZERO);
        let again = limiter.admit("k", "m", demand(600, Money(40))).unwrap();
        assert_eq!(again.headers().tokens.unwrap().remaining, 0);
    }

    #[test]
    fn a_fallback_moves_the_model_tokens_and_a_refusal_takes_nothing() {
        let clock = Arc::new(ManualClock::at_ms(1_000_000));
        let limiter = limiter(clock);
        limiter.upsert_key("k", &KeyLimits::default(), None);
        limiter.set_model("a", None, Some(1_000));
        limiter.set_model("b", Some(1), Some(1_000));
        let tokens_left = |model: &str| limiter.headers("k", model).tokens.unwrap().remaining;
        let mut first = limiter.admit("k", "a", demand(600, Money::ZERO)).unwrap();
        assert_eq!(tokens_left("a"), 400);
        limiter.fall_back_to(&mut first, "b").unwrap();
        assert_eq!((tokens_left("a"), tokens_left("b")), (1_000, 400));
        let mut second = limiter.admit("k", "a", demand(300, Money::ZERO)).unwrap();
        let refused = limiter.fall_back_to(&mut second, "b").unwrap_err();
        assert_eq!(refused.reason(), "model_rpm");
        assert_eq!((tokens_left("a"), tokens_left("b")), (700, 400));
        limiter.settle(first, 100, Money::ZERO);
        assert_eq!(tokens_left("b"), 900);
    }

    #[test]
    fn a_request_that_outlived_the_window_refunds_nothing() {
        let clock = Arc::new(ManualClock::at_ms(1_000_000));
        let limiter = limiter(clock.clone());
        let limits = KeyLimits {
            tpm: Some(1_000),
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        let tokens_left = || limiter.headers("k", "m").tokens.unwrap().remaining;
        let quick = limiter.admit("k", "m", demand(600, Money::ZERO)).unwrap();
        limiter.settle(quick, 100, Money::ZERO);
        assert_eq!(tokens_left(), 900);
        let long = limiter.admit("k", "m", demand(800, Money::ZERO)).unwrap();
        clock.advance(Duration::from_secs(61));
        let recent = limiter.admit("k", "m", demand(700, Money::ZERO)).unwrap();
        assert_eq!(tokens_left(), 300);
        // The long request used 50 of its 800 long ago: the last minute holds only `recent`.
        limiter.settle(long, 50, Money::ZERO);
        assert_eq!(tokens_left(), 300);
        limiter.settle(recent, 700, Money::ZERO);
    }

    #[test]
    fn dropped_tickets_release_everything() {
        let clock = Arc::new(ManualClock::at_ms(5_000));
        let limiter = limiter(clock);
        let limits = KeyLimits {
            tpm: Some(100),
            max_concurrency: Some(1),
            budget: Some((Money(10), BudgetPeriod::Total)),
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        let ticket = limiter.admit("k", "m", demand(100, Money(10))).unwrap();
        drop(ticket);
        assert!(limiter.admit("k", "m", demand(100, Money(10))).is_ok());
    }

    #[test]
    fn changing_a_keys_limits_keeps_what_its_requests_took() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock);
        let mut limits = KeyLimits {
            rpm: Some(10),
            max_concurrency: Some(1),
            budget: Some((Money(100), BudgetPeriod::Day)),
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        let before = limiter.admit("k", "m", demand(0, Money(60))).unwrap();
        limits.max_concurrency = Some(2);
        limits.rpm = Some(20);
        limits.budget = Some((Money(150), BudgetPeriod::Day));
        limiter.upsert_key("k", &limits, None);
        let after = limiter.admit("k", "m", demand(0, Money(60))).unwrap();
        assert_eq!(after.headers().requests.unwrap().remaining, 18);
        let busy = limiter.admit("k", "m", demand(0, Money(0)));
        assert_eq!(busy.err().map(|r| r.reason()), Some("concurrency"));
        limiter.settle(before, 0, Money(50));
        let budget = limiter.budget("k").unwrap();
        assert_eq!(budget.spend_usd, Money(50));
        assert_eq!(budget.reserved_usd, Money(60));
        assert_eq!(budget.remaining_usd, Money(40));
        limits.budget = Some((Money(150), BudgetPeriod::Month));
        limiter.upsert_key("k", &limits, Some(Money(7)));
        assert_eq!(limiter.budget_period("k"), Some(BudgetPeriod::Month));
        let budget = limiter.budget("k").unwrap();
        assert_eq!(budget.spend_usd, Money(7));
        assert_eq!(budget.reserved_usd, Money(60), "still reserved for `after`");
        limiter.settle(after, 0, Money(30));
        let budget = limiter.budget("k").unwrap();
        assert_eq!(budget.spend_usd, Money(37));
        assert_eq!(budget.reserved_usd, Money::ZERO);
    }

    #[test]
    fn a_reload_keeps_model_throttles() {
        let clock = Arc::new(ManualClock::at_ms(0));
        let limiter = limiter(clock);
        limiter.set_model("gpt", Some(1), None);
        assert!(limiter.admit("a", "gpt", Demand::default()).is_ok());
        limiter.set_model("gpt", Some(1), None);
        let refused = limiter.admit("a", "gpt", Demand::default()).err().unwrap();
        assert_eq!(refused.reason(), "model_rpm");
    }

    #[test]
    fn model_limits_protect_the_upstream() {
        let clock = Arc::new(ManualClock::at_ms(0));
        let limiter = limiter(clock.clone());
        limiter.set_model("gpt", Some(2), None);
        assert!(limiter.admit("a", "gpt", Demand::default()).is_ok());
        assert!(limiter.admit("b", "gpt", Demand::default()).is_ok());
        let refused = limiter.admit("c", "gpt", Demand::default()).err().unwrap();
        assert_eq!(refused.reason(), "model_rpm");
        clock.advance(Duration::from_secs(30));
        assert!(limiter.admit("c", "gpt", Demand::default()).is_ok());
    }

    #[test]
    fn alerts_fire_once_per_period() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock.clone());
        let limits = KeyLimits {
            budget: Some((Money(100), BudgetPeriod::Day)),
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        let t = limiter.admit("k", "m", demand(0, Money(90))).unwrap();
        let crossed: Vec<u8> = limiter
            .settle(t, 0, Money(90))
            .alerts
            .iter()
            .map(|a| a.threshold_pct)
            .collect();
        assert_eq!(crossed, vec![50, 80]);
        let t = limiter.admit("k", "m", demand(0, Money(5))).unwrap();
        assert!(limiter.settle(t, 0, Money(5)).alerts.is_empty());
        clock.advance(Duration::from_secs(86_400));
        let t = limiter.admit("k", "m", demand(0, Money(60))).unwrap();
        assert_eq!(limiter.settle(t, 0, Money(60)).alerts.len(), 1);
    }

    #[test]
    fn an_episode_is_claimed_once_until_it_ends_and_ended_ones_are_forgotten() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock.clone());
        let lasts = Duration::from_secs(10);
        assert!(limiter.claim_episode("spike:k", lasts));
        clock.advance(Duration::from_secs(9));
        assert!(!limiter.claim_episode("spike:k", lasts), "still running");
        clock.advance(Duration::from_secs(9));
        assert!(
            !limiter.claim_episode("spike:k", lasts),
            "each claim extends it"
        );
        clock.advance(Duration::from_secs(11));
        assert!(limiter.claim_episode("spike:k", lasts), "ended: a new one");
        for n in 0..5_000 {
            limiter.claim_episode(&format!("old:{n}"), lasts);
        }
        // Once the map has doubled since its last sweep, the ended episodes go.
        clock.advance(Duration::from_secs(11));
        for n in 0..3_200 {
            assert!(limiter.claim_episode(&format!("new:{n}"), lasts));
        }
        assert!(
            limiter.episodes.len() <= 3_200,
            "{}",
            limiter.episodes.len()
        );
    }

    #[test]
    fn spend_rate_caps_pace_the_worst_case_and_settle_to_the_cost() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock.clone());
        // $0.01 a minute, $0.10 an hour; each request may cost up to $0.004.
        let limits = KeyLimits {
            spend_rate: SpendRate {
                per_minute: Some(Money(10_000_000)),
                per_hour: Some(Money(100_000_000)),
            },
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        let worst = demand(10, Money(4_000_000));
        let first = limiter.admit("k", "m", worst).unwrap();
        let second = limiter.admit("k", "m", worst).unwrap();
        let refused = limiter.admit("k", "m", worst).err().unwrap();
        assert_eq!(refused.reason(), "key_usd_per_minute");
        // $0.008 of the minute's $0.01 is held: room for $0.002 more, at $0.01 per 60 s,
        // comes back after 12 s.
        let Refusal::RateLimited { retry_after, .. } = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(retry_after, Duration::from_secs(12));
        // Settling at the real cost gives back what was reserved beyond it.
        limiter.settle(first, 10, Money(1_000_000));
        limiter.settle(second, 10, Money(1_000_000));
        let third = limiter.admit("k", "m", worst).unwrap();
        // A dropped ticket (no answer) gives back all it took.
        drop(third);
        // Over the hour: $0.002 spent, then whole minutes of $0.01 until the hour's $0.10.
        let mut admitted = Money(2_000_000);
        for _ in 0..60 {
            clock.advance(Duration::from_secs(60));
            while let Ok(ticket) = limiter.admit("k", "m", demand(10, Money(1_000_000))) {
                limiter.settle(ticket, 10, Money(1_000_000));
                admitted += Money(1_000_000);
            }
        }
        // An hour of minutes at $0.01 would be $0.60. The hourly cap holds it to its burst
        // ($0.10 at once) plus its pace over the hour: at most cap × (1 + span / window).
        assert!(
            admitted > Money(190_000_000) && admitted <= Money(200_000_000),
            "{admitted:?}"
        );
        let refused = limiter
            .admit("k", "m", demand(10, Money(1_000_000)))
            .err()
            .unwrap();
        assert_eq!(refused.reason(), "key_usd_per_hour");
    }

    #[test]
    fn a_spend_rate_refusal_takes_nothing_and_outcomes_count_against_it() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock.clone());
        let limits = KeyLimits {
            rpm: Some(100),
            budget: Some((Money(1_000_000_000), BudgetPeriod::Day)),
            spend_rate: SpendRate {
                per_minute: Some(Money(10_000_000)),
                per_hour: Some(Money(12_000_000)),
            },
            ..KeyLimits::default()
        };
        limiter.upsert_key("k", &limits, None);
        // The hour refuses after the minute said yes: the minute keeps nothing of it.
        let held = limiter
            .admit("k", "m", demand(0, Money(9_000_000)))
            .unwrap();
        clock.advance(Duration::from_secs(60));
        let refused = limiter.admit("k", "m", demand(0, Money(4_000_000)));
        assert_eq!(refused.err().map(|r| r.reason()), Some("key_usd_per_hour"));
        assert_eq!(limiter.headers("k", "m").requests.unwrap().remaining, 100);
        drop(held);
        let ticket = limiter
            .admit("k", "m", demand(0, Money(10_000_000)))
            .unwrap();
        limiter.settle(ticket, 0, Money::ZERO);
        // A reported outcome is charged whole, and the requests after it wait for the rate.
        limiter.charge("k", Money(10_000_000)).unwrap();
        let refused = limiter.admit("k", "m", demand(0, Money(1_000_000)));
        assert_eq!(
            refused.err().map(|r| r.reason()),
            Some("key_usd_per_minute")
        );
    }
}
