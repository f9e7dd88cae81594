//! Admission: throttles (requests and tokens per minute, dollars per minute and per hour) and
//! budget caps by reservation at every level a request belongs to — its key, the key's team and
//! its customer — plus a key's concurrency and per-model throttles protecting upstream quotas.
//! A request is admitted at every level at once, all-or-nothing — a later refusal rolls back
//! what earlier checks took — and gets a [`Ticket`] that settles exactly once: explicitly with
//! the actual tokens and cost, or on drop (the request never reached an answer) by giving back
//! what it reserved.
//!
//! Live state is atomics behind an `Arc` per level, found through a concurrent map; nothing
//! here blocks or awaits. The [`Limiter`] is the embedded backend of `state::Admission`.

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
use crate::ByName;

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

/// The levels a request is admitted at, checked in this order: its key, then the key's team,
/// then its customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Key,
    Team,
    Customer,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Key => "key",
            Level::Team => "team",
            Level::Customer => "customer",
        }
    }
}

/// A level above a key: its name; and, for a backend that is told them with each request
/// (the shared one; the embedded one holds them since `Limiter::upsert`), its limits and the
/// id its state goes by there (`team:eng`, see `state::redis::owner_of`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelRef<'a> {
    pub name: &'a str,
    pub limits: &'a KeyLimits,
    pub shared_id: &'a str,
}

/// The levels above a key that a request must fit too: its team and its customer, for those
/// that exist as budget levels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Above<'a> {
    pub team: Option<LevelRef<'a>>,
    pub customer: Option<LevelRef<'a>>,
}

impl Above<'_> {
    pub const NONE: Above<'static> = Above {
        team: None,
        customer: None,
    };
}

/// A level's limits. The counters are shared `Arc`s so that changing a level's limits keeps
/// what its requests already took, and requests admitted before the change settle into the
/// same counters as those admitted after it.
struct LevelState {
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Gcra>>,
    max_concurrency: Option<u32>,
    /// Counted with or without a limit, so that a limit set later starts from the truth.
    in_flight: Arc<AtomicU32>,
    budget: Option<Arc<Budget>>,
    usd_per_minute: Option<Arc<Gcra>>,
    usd_per_hour: Option<Arc<Gcra>>,
}

impl LevelState {
    /// The state for (possibly changed) limits, carrying over the live counters of `old`.
    fn carried(
        old: Option<&LevelState>,
        limits: &KeyLimits,
        spent: Option<Money>,
        now_us: i64,
    ) -> LevelState {
        let now_ms = now_us / 1_000;
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
        LevelState {
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
        }
    }

    fn spend_throttles(&self) -> impl Iterator<Item = &Arc<Gcra>> {
        [&self.usd_per_minute, &self.usd_per_hour]
            .into_iter()
            .flatten()
    }
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

/// The throttle that refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Concurrency,
    Requests,
    Tokens,
    ModelRequests,
    ModelTokens,
    SpendPerMinute,
    SpendPerHour,
}

impl Limit {
    /// OpenAI's `type` for the limit: `requests` or `tokens`.
    pub fn kind(self) -> &'static str {
        match self {
            Limit::Tokens | Limit::ModelTokens => "tokens",
            _ => "requests",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A throttle of a level (or of the model, whatever `level` says) refused.
    RateLimited {
        level: Level,
        limit: Limit,
        retry_after: Duration,
    },
    /// A level's budget cannot cover the request's worst case.
    InsufficientQuota {
        level: Level,
        remaining: Money,
        needed: Money,
    },
    /// The shared state that holds the limits cannot be reached (`fail_closed`).
    Unavailable,
}

impl Refusal {
    fn over_budget(level: Level, exceeded: BudgetExceeded) -> Refusal {
        Refusal::InsufficientQuota {
            level,
            remaining: exceeded.remaining,
            needed: exceeded.needed,
        }
    }

    /// A bounded label for metrics. A key's own limits keep their first names (`budget`,
    /// `key_rpm`…); a team's and a customer's are prefixed by the level.
    pub fn reason(&self) -> &'static str {
        const BY_LEVEL: [[&str; 5]; 3] = [
            [
                "key_rpm",
                "key_tpm",
                "key_usd_per_minute",
                "key_usd_per_hour",
                "budget",
            ],
            [
                "team_rpm",
                "team_tpm",
                "team_usd_per_minute",
                "team_usd_per_hour",
                "team_budget",
            ],
            [
                "customer_rpm",
                "customer_tpm",
                "customer_usd_per_minute",
                "customer_usd_per_hour",
                "customer_budget",
            ],
        ];
        let (level, column) = match self {
            Refusal::Unavailable => return "state_unavailable",
            Refusal::RateLimited { limit, level, .. } => match limit {
                Limit::Concurrency => return "concurrency",
                Limit::ModelRequests => return "model_rpm",
                Limit::ModelTokens => return "model_tpm",
                Limit::Requests => (level, 0),
                Limit::Tokens => (level, 1),
                Limit::SpendPerMinute => (level, 2),
                Limit::SpendPerHour => (level, 3),
            },
            Refusal::InsufficientQuota { level, .. } => (level, 4),
        };
        BY_LEVEL[*level as usize][column]
    }
}

/// Takes units from one throttle, or says which limit refused and how long to wait.
fn throttle(
    gcra: &Gcra,
    units: u64,
    now_us: i64,
    level: Level,
    limit: Limit,
) -> Result<Snapshot, Refusal> {
    gcra.acquire(units, now_us)
        .map_err(|retry_after| Refusal::RateLimited {
            level,
            limit,
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
    /// Adds the headers of the dimensions that have a limit. Their values are written into
    /// one buffer that every header value shares: one allocation on every answer, not one per
    /// figure.
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
        let mut text = String::with_capacity(96);
        let mut number = itoa::Buffer::new();
        let mut spans = [[(0, 0); 3]; 2];
        for ((snapshot, _), spans) in dimensions.iter().zip(&mut spans) {
            let Some(snapshot) = snapshot else { continue };
            let start = text.len();
            text.push_str(number.format(snapshot.limit));
            spans[0] = (start, text.len());
            let start = text.len();
            text.push_str(number.format(snapshot.remaining));
            spans[1] = (start, text.len());
            let start = text.len();
            write_go_duration(&mut text, snapshot.reset);
            spans[2] = (start, text.len());
        }
        let shared = bytes::Bytes::from(text);
        for ((snapshot, names), spans) in dimensions.iter().zip(&spans) {
            if snapshot.is_none() {
                continue;
            }
            for (name, &(start, end)) in names.iter().zip(spans) {
                if let Ok(value) = HeaderValue::from_maybe_shared(shared.slice(start..end)) {
                    headers.insert((*name).clone(), value);
                }
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
    let mut text = String::new();
    write_go_duration(&mut text, duration);
    text
}

fn write_go_duration(out: &mut String, duration: Duration) {
    let mut number = itoa::Buffer::new();
    let ms = duration.as_millis();
    if ms < 1_000 {
        out.push_str(number.format(ms));
        out.push_str("ms");
        return;
    }
    let hours = ms / 3_600_000;
    let minutes = (ms % 3_600_000) / 60_000;
    if hours > 0 {
        out.push_str(number.format(hours));
        out.push('h');
    }
    if hours > 0 || minutes > 0 {
        out.push_str(number.format(minutes));
        out.push('m');
    }
    out.push_str(number.format((ms % 60_000) / 1_000));
    let mut fraction = ms % 1_000;
    if fraction > 0 {
        // Trailing zeros go: 59.940 s is written 59.94s.
        let mut digits = 3;
        while fraction.is_multiple_of(10) {
            fraction /= 10;
            digits -= 1;
        }
        let written = number.format(fraction);
        out.push('.');
        out.extend(std::iter::repeat_n('0', digits - written.len()));
        out.push_str(written);
    }
    out.push('s');
}

/// Every key's, team's, customer's and model's live limits.
pub struct Limiter {
    keys: ByName<LevelState>,
    teams: ByName<LevelState>,
    customers: ByName<LevelState>,
    models: ByName<ModelState>,
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

/// What settling found, for metrics and alerts: the key's overshoot and the key's alert
/// thresholds crossed.
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
            keys: ByName::default(),
            teams: ByName::default(),
            customers: ByName::default(),
            models: ByName::default(),
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

    fn levels(&self, level: Level) -> &ByName<LevelState> {
        match level {
            Level::Key => &self.keys,
            Level::Team => &self.teams,
            Level::Customer => &self.customers,
        }
    }

    fn state(&self, level: Level, id: &str) -> Option<Arc<LevelState>> {
        // Cloned out so no map guard outlives this call.
        self.levels(level)
            .get(id)
            .map(|entry| entry.value().clone())
    }

    /// Installs a level's limits (a key by id, a team or customer by name), or changes them
    /// keeping its live counters: throttles keep their last minute's use, requests in flight
    /// stay counted, and a budget over the same period keeps its spend and reservations.
    /// `spent` is the period's spend from the ledger; it is needed at start-up and when the
    /// budget period or a group's members change, and replaces the live spend when given
    /// (reservations in flight still stay).
    pub fn upsert(&self, level: Level, id: &str, limits: &KeyLimits, spent: Option<Money>) {
        let now_us = self.clock.now_us();
        let old = self.state(level, id);
        let state = LevelState::carried(old.as_deref(), limits, spent, now_us);
        self.levels(level).insert(id.to_owned(), Arc::new(state));
    }

    /// The period of a level's live budget, to tell whether a change needs the ledger's spend.
    pub fn budget_period(&self, level: Level, id: &str) -> Option<BudgetPeriod> {
        let state = self.state(level, id)?;
        state.budget.as_ref().map(|b| b.period())
    }

    pub fn remove(&self, level: Level, id: &str) {
        self.levels(level).remove(id);
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

    pub fn budget(&self, level: Level, id: &str) -> Option<BudgetSnapshot> {
        let now_ms = self.clock.now_ms();
        let state = self.state(level, id)?;
        state.budget.as_ref().map(|b| b.snapshot(now_ms))
    }

    /// The holds a request takes: its key, then its team and customer where they are levels.
    fn holds(&self, key_id: &str, above: Above<'_>) -> [Option<Hold>; 3] {
        let hold = |level, id: Option<&str>| {
            id.and_then(|id| self.state(level, id))
                .map(|state| Hold::new(level, state))
        };
        [
            hold(Level::Key, Some(key_id)),
            hold(Level::Team, above.team.map(|team| team.name)),
            hold(
                Level::Customer,
                above.customer.map(|customer| customer.name),
            ),
        ]
    }

    /// Admits a request at every level at once. Checks, in order: the key's concurrency, each
    /// level's RPM and TPM, the model's RPM and TPM, each level's dollars per minute and per
    /// hour, each level's budget. Whatever a refused request took is given back.
    pub fn admit(
        &self,
        key_id: &str,
        above: Above<'_>,
        model: &str,
        demand: Demand,
    ) -> Result<Ticket, Refusal> {
        let now_us = self.clock.now_us();
        let mut ticket = Ticket {
            levels: self.holds(key_id, above),
            model: self.models.get(model).map(|entry| entry.value().clone()),
            model_tokens: 0,
            model_request_taken: false,
            demand_tokens: demand.tokens,
            admitted_us: now_us,
            headers: RateLimitHeaders::default(),
            settled: false,
        };
        match ticket.take(demand, now_us) {
            Ok(()) => Ok(ticket),
            Err(refusal) => {
                ticket.rollback_requests();
                Err(refusal)
            }
        }
    }

    /// The throttle headers as they stand now, for a refused request: OpenAI sends them on
    /// its 429s too, and clients pace themselves by them.
    pub fn headers(&self, key_id: &str, above: Above<'_>, model: &str) -> RateLimitHeaders {
        let now_us = self.clock.now_us();
        let snapshot = |limit: Option<&Arc<Gcra>>| limit.map(|limit| limit.snapshot(now_us));
        let model_state = self.models.get(model).map(|entry| entry.value().clone());
        let mut headers = RateLimitHeaders {
            requests: model_state.as_ref().and_then(|m| snapshot(m.rpm.as_ref())),
            tokens: model_state.as_ref().and_then(|m| snapshot(m.tpm.as_ref())),
        };
        for hold in self.holds(key_id, above).iter().flatten() {
            headers.requests = tighter(headers.requests, snapshot(hold.state.rpm.as_ref()));
            headers.tokens = tighter(headers.tokens, snapshot(hold.state.tpm.as_ref()));
        }
        headers
    }

    /// A key's own throttles as they stand now (its team's, customer's and models' apart):
    /// the per-key gauges read at a scrape.
    pub fn key_throttles(&self, key_id: &str) -> RateLimitHeaders {
        let now_us = self.clock.now_us();
        let state = self.state(Level::Key, key_id);
        let snapshot = |limit: Option<&Arc<Gcra>>| limit.map(|limit| limit.snapshot(now_us));
        RateLimitHeaders {
            requests: state.as_ref().and_then(|s| snapshot(s.rpm.as_ref())),
            tokens: state.as_ref().and_then(|s| snapshot(s.tpm.as_ref())),
        }
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
            throttle(rpm, 1, now_us, Level::Key, Limit::ModelRequests)?;
        }
        if let Some(tpm) = tpm {
            if let Err(refusal) = throttle(
                tpm,
                ticket.demand_tokens,
                now_us,
                Level::Key,
                Limit::ModelTokens,
            ) {
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

    /// Replaces a ticket's reservations at every level by what the request really used.
    pub fn settle(&self, mut ticket: Ticket, tokens: u64, cost: Money) -> Settlement {
        ticket.settled = true;
        let now_us = self.clock.now_us();
        let now_ms = now_us / 1_000;
        let admitted_us = ticket.admitted_us;
        let cost_nanos = u64::try_from(cost.nanos()).unwrap_or(0);
        let mut settlement = Settlement::default();
        for hold in ticket.levels.iter_mut().flatten() {
            let state = &hold.state;
            if let Some(tpm) = &state.tpm {
                tpm.settle(hold.tokens, tokens, admitted_us, now_us);
            }
            for limit in state.spend_throttles() {
                limit.settle(hold.spend_taken, cost_nanos, admitted_us, now_us);
            }
            if let Some(budget) = &state.budget {
                let settled = budget.settle(hold.reserved, cost, now_ms);
                if hold.level == Level::Key {
                    settlement.overshoot = settled.overshoot;
                    settlement.alerts = self.crossings(budget, settled.used_pct, now_ms);
                }
            }
            if hold.holds_slot {
                state.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            hold.forget();
        }
        if let Some(tpm) = ticket.model.as_ref().and_then(|model| model.tpm.as_ref()) {
            tpm.settle(ticket.model_tokens, tokens, admitted_us, now_us);
        }
        settlement
    }

    /// Charges an amount known before it is spent (a reported outcome) to the budget of every
    /// level at once, whole or not at all.
    pub fn charge(
        &self,
        key_id: &str,
        above: Above<'_>,
        amount: Money,
    ) -> Result<Settlement, Refusal> {
        let now_us = self.clock.now_us();
        let now_ms = now_us / 1_000;
        let mut holds = self.holds(key_id, above);
        for hold in holds.iter_mut().flatten() {
            if let Some(budget) = &hold.state.budget {
                // A refusal drops the holds, which gives back what earlier levels reserved.
                hold.reserved = budget
                    .reserve(amount, now_ms)
                    .map_err(|exceeded| Refusal::over_budget(hold.level, exceeded))?;
            }
        }
        let mut settlement = Settlement::default();
        let nanos = u64::try_from(amount.nanos()).unwrap_or(0);
        for hold in holds.iter_mut().flatten() {
            if let Some(budget) = &hold.state.budget {
                let settled = budget.settle(hold.reserved, amount, now_ms);
                if hold.level == Level::Key {
                    settlement.alerts = self.crossings(budget, settled.used_pct, now_ms);
                }
            }
            hold.forget();
            // Money gone counts against the spend rate, but is never refused for it: only the
            // requests after it are paced.
            for limit in hold.state.spend_throttles() {
                limit.charge(nanos, now_us);
            }
        }
        Ok(settlement)
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

/// What a request holds at one level until it settles.
struct Hold {
    level: Level,
    state: Arc<LevelState>,
    tokens: u64,
    reserved: Money,
    /// Nano-dollars taken from the level's spend-rate throttles.
    spend_taken: u64,
    holds_slot: bool,
    /// Whether a request unit was taken (kept: the request happened).
    request_taken: bool,
}

impl Hold {
    fn new(level: Level, state: Arc<LevelState>) -> Hold {
        Hold {
            level,
            state,
            tokens: 0,
            reserved: Money::ZERO,
            spend_taken: 0,
            holds_slot: false,
            request_taken: false,
        }
    }

    /// Takes a concurrency slot and the request and token throttles.
    fn take_throttles(
        &mut self,
        tokens: u64,
        now_us: i64,
        headers: &mut RateLimitHeaders,
    ) -> Result<(), Refusal> {
        let state = &self.state;
        let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
        self.holds_slot = true;
        if state.max_concurrency.is_some_and(|limit| before >= limit) {
            return Err(Refusal::RateLimited {
                level: self.level,
                limit: Limit::Concurrency,
                retry_after: Duration::from_secs(1),
            });
        }
        if let Some(rpm) = &state.rpm {
            let snapshot = throttle(rpm, 1, now_us, self.level, Limit::Requests)?;
            self.request_taken = true;
            headers.requests = tighter(headers.requests, Some(snapshot));
        }
        if let Some(tpm) = &state.tpm {
            let snapshot = throttle(tpm, tokens, now_us, self.level, Limit::Tokens)?;
            self.tokens = tokens;
            headers.tokens = tighter(headers.tokens, Some(snapshot));
        }
        Ok(())
    }

    /// Takes a request's worst-case cost from the spend-rate throttles, both or neither.
    fn take_spend(&mut self, cost: Money, now_us: i64) -> Result<(), Refusal> {
        let nanos = u64::try_from(cost.nanos()).unwrap_or(0);
        let state = &self.state;
        if let Some(minute) = &state.usd_per_minute {
            throttle(minute, nanos, now_us, self.level, Limit::SpendPerMinute)?;
        }
        if let Some(hour) = &state.usd_per_hour {
            if let Err(refusal) = throttle(hour, nanos, now_us, self.level, Limit::SpendPerHour) {
                if let Some(minute) = &state.usd_per_minute {
                    minute.release(nanos);
                }
                return Err(refusal);
            }
        }
        self.spend_taken = nanos;
        Ok(())
    }

    /// Gives back everything but the request unit.
    fn release(&mut self) {
        let state = &self.state;
        if let Some(tpm) = &state.tpm {
            tpm.release(self.tokens);
        }
        if let Some(budget) = &state.budget {
            budget.release(self.reserved);
        }
        for limit in state.spend_throttles() {
            limit.release(self.spend_taken);
        }
        if self.holds_slot {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.forget();
    }

    /// Holds nothing any more: what it took was settled or given back.
    fn forget(&mut self) {
        self.tokens = 0;
        self.reserved = Money::ZERO;
        self.spend_taken = 0;
        self.holds_slot = false;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

/// What an admitted request holds until it settles.
pub struct Ticket {
    /// The key's hold, then the team's and the customer's where they are levels.
    levels: [Option<Hold>; 3],
    model: Option<Arc<ModelState>>,
    model_tokens: u64,
    model_request_taken: bool,
    /// The tokens admitted, for a fallback model's own throttle.
    demand_tokens: u64,
    admitted_us: i64,
    headers: RateLimitHeaders,
    settled: bool,
}

impl Ticket {
    pub fn headers(&self) -> RateLimitHeaders {
        self.headers
    }

    /// What the ticket reserved of its key's budget.
    pub fn reserved(&self) -> Money {
        self.levels[0]
            .as_ref()
            .map_or(Money::ZERO, |hold| hold.reserved)
    }

    fn take(&mut self, demand: Demand, now_us: i64) -> Result<(), Refusal> {
        for hold in self.levels.iter_mut().flatten() {
            hold.take_throttles(demand.tokens, now_us, &mut self.headers)?;
        }
        if let Some(model) = &self.model {
            if let Some(rpm) = &model.rpm {
                let snapshot = throttle(rpm, 1, now_us, Level::Key, Limit::ModelRequests)?;
                self.model_request_taken = true;
                self.headers.requests = tighter(self.headers.requests, Some(snapshot));
            }
            if let Some(tpm) = &model.tpm {
                let snapshot =
                    throttle(tpm, demand.tokens, now_us, Level::Key, Limit::ModelTokens)?;
                self.model_tokens = demand.tokens;
                self.headers.tokens = tighter(self.headers.tokens, Some(snapshot));
            }
        }
        for hold in self.levels.iter_mut().flatten() {
            hold.take_spend(demand.cost, now_us)?;
        }
        let now_ms = now_us / 1_000;
        for hold in self.levels.iter_mut().flatten() {
            if let Some(budget) = &hold.state.budget {
                hold.reserved = budget
                    .reserve(demand.cost, now_ms)
                    .map_err(|exceeded| Refusal::over_budget(hold.level, exceeded))?;
            }
        }
        Ok(())
    }

    /// Gives back the request units too: used when admission refused part-way, since the
    /// refused request never happened.
    fn rollback_requests(&mut self) {
        for hold in self.levels.iter_mut().flatten() {
            if hold.request_taken {
                if let Some(rpm) = &hold.state.rpm {
                    rpm.release(1);
                }
                hold.request_taken = false;
            }
        }
        if self.model_request_taken {
            if let Some(rpm) = self.model.as_ref().and_then(|m| m.rpm.as_ref()) {
                rpm.release(1);
            }
            self.model_request_taken = false;
        }
    }
}

impl Drop for Ticket {
    /// A ticket dropped unsettled (refused part-way, or a request that never got an answer)
    /// gives back its reservations, its tokens, its concurrency slots (each level's hold does
    /// on its own drop) and — when admission itself failed part-way — the request units it
    /// took (see `rollback_requests`).
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(tpm) = self.model.as_ref().and_then(|model| model.tpm.as_ref()) {
            tpm.release(self.model_tokens);
        }
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
    fn rate_limit_headers_name_each_limited_dimension() {
        let mut headers = HeaderMap::new();
        RateLimitHeaders {
            requests: Some(Snapshot {
                limit: 60,
                remaining: 59,
                reset: Duration::from_millis(1_000),
            }),
            tokens: None,
        }
        .write_to(&mut headers);
        let value = |headers: &HeaderMap, name: &str| {
            headers.get(name).map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            value(&headers, "x-ratelimit-limit-requests").as_deref(),
            Some("60")
        );
        assert_eq!(
            value(&headers, "x-ratelimit-remaining-requests").as_deref(),
            Some("59")
        );
        assert_eq!(
            value(&headers, "x-ratelimit-reset-requests").as_deref(),
            Some("1s")
        );
        assert_eq!(headers.len(), 3);
        RateLimitHeaders {
            requests: None,
            tokens: Some(Snapshot {
                limit: 150_000,
                remaining: 149_000,
                reset: Duration::from_millis(400),
            }),
        }
        .write_to(&mut headers);
        assert_eq!(
            value(&headers, "x-ratelimit-limit-tokens").as_deref(),
            Some("150000")
        );
        assert_eq!(
            value(&headers, "x-ratelimit-remaining-tokens").as_deref(),
            Some("149000")
        );
        assert_eq!(
            value(&headers, "x-ratelimit-reset-tokens").as_deref(),
            Some("400ms")
        );
        assert_eq!(headers.len(), 6);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(59_940)), "59.94s");
        assert_eq!(go_duration(Duration::from_secs(3_723)), "1h2m3s");
        assert_eq!(go_duration(Duration::from_millis(1_005)), "1.005s");
        assert_eq!(go_duration(Duration::from_millis(1_050)), "1.05s");
        assert_eq!(go_duration(Duration::from_millis(10_100)), "10.1s");
        assert_eq!(go_duration(Duration::from_millis(3_605_020)), "1h0m5.02s");
        assert_eq!(go_duration(Duration::ZERO), "0ms");
        assert_eq!(go_duration(Duration::from_millis(61_050)), "1m1.05s");
        assert_eq!(go_duration(Duration::from_millis(999)), "999ms");
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
        limiter.upsert(Level::Key, "k", &limits, None);
        let refused = limiter.admit("k", Above::NONE, "m", demand(10, Money(101)));
        assert!(matches!(refused, Err(Refusal::InsufficientQuota { .. })));
        // Nothing stayed taken: the slot, the tokens and the request are all free again.
        let ticket = limiter
            .admit("k", Above::NONE, "m", demand(1_000, Money(100)))
            .unwrap();
        assert_eq!(ticket.headers().requests.unwrap().remaining, 9);
        assert_eq!(ticket.headers().tokens.unwrap().remaining, 0);
        let busy = limiter.admit("k", Above::NONE, "m", demand(1, Money(0)));
        assert_eq!(busy.err().map(|r| r.reason()), Some("concurrency"));
        let settlement = limiter.settle(ticket, 400, Money(60));
        assert_eq!(settlement.alerts.len(), 1);
        assert_eq!(settlement.alerts[0].threshold_pct, 50);
        let budget = limiter.budget(Level::Key, "k").unwrap();
        assert_eq!(budget.spend_usd, Money(60));
        assert_eq!(budget.reserved_usd, Money::ZERO);
        let again = limiter
            .admit("k", Above::NONE, "m", demand(600, Money(40)))
            .unwrap();
        assert_eq!(again.headers().tokens.unwrap().remaining, 0);
    }

    #[test]
    fn a_fallback_moves_the_model_tokens_and_a_refusal_takes_nothing() {
        let clock = Arc::new(ManualClock::at_ms(1_000_000));
        let limiter = limiter(clock);
        limiter.upsert(Level::Key, "k", &KeyLimits::default(), None);
        limiter.set_model("a", None, Some(1_000));
        limiter.set_model("b", Some(1), Some(1_000));
        let tokens_left = |model: &str| {
            limiter
                .headers("k", Above::NONE, model)
                .tokens
                .unwrap()
                .remaining
        };
        let mut first = limiter
            .admit("k", Above::NONE, "a", demand(600, Money::ZERO))
            .unwrap();
        assert_eq!(tokens_left("a"), 400);
        limiter.fall_back_to(&mut first, "b").unwrap();
        assert_eq!((tokens_left("a"), tokens_left("b")), (1_000, 400));
        let mut second = limiter
            .admit("k", Above::NONE, "a", demand(300, Money::ZERO))
            .unwrap();
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
        limiter.upsert(Level::Key, "k", &limits, None);
        let tokens_left = || {
            limiter
                .headers("k", Above::NONE, "m")
                .tokens
                .unwrap()
                .remaining
        };
        let quick = limiter
            .admit("k", Above::NONE, "m", demand(600, Money::ZERO))
            .unwrap();
        limiter.settle(quick, 100, Money::ZERO);
        assert_eq!(tokens_left(), 900);
        let long = limiter
            .admit("k", Above::NONE, "m", demand(800, Money::ZERO))
            .unwrap();
        clock.advance(Duration::from_secs(61));
        let recent = limiter
            .admit("k", Above::NONE, "m", demand(700, Money::ZERO))
            .unwrap();
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
        limiter.upsert(Level::Key, "k", &limits, None);
        let ticket = limiter
            .admit("k", Above::NONE, "m", demand(100, Money(10)))
            .unwrap();
        drop(ticket);
        assert!(limiter
            .admit("k", Above::NONE, "m", demand(100, Money(10)))
            .is_ok());
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
        limiter.upsert(Level::Key, "k", &limits, None);
        let before = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(60)))
            .unwrap();
        limits.max_concurrency = Some(2);
        limits.rpm = Some(20);
        limits.budget = Some((Money(150), BudgetPeriod::Day));
        limiter.upsert(Level::Key, "k", &limits, None);
        let after = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(60)))
            .unwrap();
        assert_eq!(after.headers().requests.unwrap().remaining, 18);
        let busy = limiter.admit("k", Above::NONE, "m", demand(0, Money(0)));
        assert_eq!(busy.err().map(|r| r.reason()), Some("concurrency"));
        limiter.settle(before, 0, Money(50));
        let budget = limiter.budget(Level::Key, "k").unwrap();
        assert_eq!(budget.spend_usd, Money(50));
        assert_eq!(budget.reserved_usd, Money(60));
        assert_eq!(budget.remaining_usd, Money(40));
        limits.budget = Some((Money(150), BudgetPeriod::Month));
        limiter.upsert(Level::Key, "k", &limits, Some(Money(7)));
        assert_eq!(
            limiter.budget_period(Level::Key, "k"),
            Some(BudgetPeriod::Month)
        );
        let budget = limiter.budget(Level::Key, "k").unwrap();
        assert_eq!(budget.spend_usd, Money(7));
        assert_eq!(budget.reserved_usd, Money(60), "still reserved for `after`");
        limiter.settle(after, 0, Money(30));
        let budget = limiter.budget(Level::Key, "k").unwrap();
        assert_eq!(budget.spend_usd, Money(37));
        assert_eq!(budget.reserved_usd, Money::ZERO);
    }

    #[test]
    fn a_reload_keeps_model_throttles() {
        let clock = Arc::new(ManualClock::at_ms(0));
        let limiter = limiter(clock);
        limiter.set_model("gpt", Some(1), None);
        assert!(limiter
            .admit("a", Above::NONE, "gpt", Demand::default())
            .is_ok());
        limiter.set_model("gpt", Some(1), None);
        let refused = limiter
            .admit("a", Above::NONE, "gpt", Demand::default())
            .err()
            .unwrap();
        assert_eq!(refused.reason(), "model_rpm");
    }

    #[test]
    fn model_limits_protect_the_upstream() {
        let clock = Arc::new(ManualClock::at_ms(0));
        let limiter = limiter(clock.clone());
        limiter.set_model("gpt", Some(2), None);
        assert!(limiter
            .admit("a", Above::NONE, "gpt", Demand::default())
            .is_ok());
        assert!(limiter
            .admit("b", Above::NONE, "gpt", Demand::default())
            .is_ok());
        let refused = limiter
            .admit("c", Above::NONE, "gpt", Demand::default())
            .err()
            .unwrap();
        assert_eq!(refused.reason(), "model_rpm");
        clock.advance(Duration::from_secs(30));
        assert!(limiter
            .admit("c", Above::NONE, "gpt", Demand::default())
            .is_ok());
    }

    #[test]
    fn alerts_fire_once_per_period() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock.clone());
        let limits = KeyLimits {
            budget: Some((Money(100), BudgetPeriod::Day)),
            ..KeyLimits::default()
        };
        limiter.upsert(Level::Key, "k", &limits, None);
        let t = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(90)))
            .unwrap();
        let crossed: Vec<u8> = limiter
            .settle(t, 0, Money(90))
            .alerts
            .iter()
            .map(|a| a.threshold_pct)
            .collect();
        assert_eq!(crossed, vec![50, 80]);
        let t = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(5)))
            .unwrap();
        assert!(limiter.settle(t, 0, Money(5)).alerts.is_empty());
        clock.advance(Duration::from_secs(86_400));
        let t = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(60)))
            .unwrap();
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
        limiter.upsert(Level::Key, "k", &limits, None);
        let worst = demand(10, Money(4_000_000));
        let first = limiter.admit("k", Above::NONE, "m", worst).unwrap();
        let second = limiter.admit("k", Above::NONE, "m", worst).unwrap();
        let refused = limiter.admit("k", Above::NONE, "m", worst).err().unwrap();
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
        let third = limiter.admit("k", Above::NONE, "m", worst).unwrap();
        // A dropped ticket (no answer) gives back all it took.
        drop(third);
        // Over the hour: $0.002 spent, then whole minutes of $0.01 until the hour's $0.10.
        let mut admitted = Money(2_000_000);
        for _ in 0..60 {
            clock.advance(Duration::from_secs(60));
            while let Ok(ticket) =
                limiter.admit("k", Above::NONE, "m", demand(10, Money(1_000_000)))
            {
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
            .admit("k", Above::NONE, "m", demand(10, Money(1_000_000)))
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
        limiter.upsert(Level::Key, "k", &limits, None);
        // The hour refuses after the minute said yes: the minute keeps nothing of it.
        let held = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(9_000_000)))
            .unwrap();
        clock.advance(Duration::from_secs(60));
        let refused = limiter.admit("k", Above::NONE, "m", demand(0, Money(4_000_000)));
        assert_eq!(refused.err().map(|r| r.reason()), Some("key_usd_per_hour"));
        assert_eq!(
            limiter
                .headers("k", Above::NONE, "m")
                .requests
                .unwrap()
                .remaining,
            100
        );
        drop(held);
        let ticket = limiter
            .admit("k", Above::NONE, "m", demand(0, Money(10_000_000)))
            .unwrap();
        limiter.settle(ticket, 0, Money::ZERO);
        // A reported outcome is charged whole, and the requests after it wait for the rate.
        limiter.charge("k", Above::NONE, Money(10_000_000)).unwrap();
        let refused = limiter.admit("k", Above::NONE, "m", demand(0, Money(1_000_000)));
        assert_eq!(
            refused.err().map(|r| r.reason()),
            Some("key_usd_per_minute")
        );
    }

    #[test]
    fn a_request_is_admitted_at_every_level_or_at_none() {
        let clock = Arc::new(ManualClock::at_ms(1_700_000_000_000));
        let limiter = limiter(clock);
        let key = KeyLimits {
            rpm: Some(10),
            budget: Some((Money(1_000), BudgetPeriod::Day)),
            ..KeyLimits::default()
        };
        let team = KeyLimits {
            rpm: Some(3),
            budget: Some((Money(250), BudgetPeriod::Day)),
            ..KeyLimits::default()
        };
        limiter.upsert(Level::Key, "a", &key, None);
        limiter.upsert(Level::Key, "b", &key, None);
        limiter.upsert(Level::Team, "eng", &team, Some(Money(20)));
        let above = Above {
            team: Some(LevelRef {
                name: "eng",
                limits: &team,
                shared_id: "team:eng",
            }),
            customer: None,
        };
        let first = limiter
            .admit("a", above, "m", demand(0, Money(100)))
            .unwrap();
        let second = limiter
            .admit("b", above, "m", demand(0, Money(100)))
            .unwrap();
        // The team has 250 − 20 spent − 200 reserved left: it refuses, and key `a` gives
        // back its reservation and its request unit.
        let refused = limiter.admit("a", above, "m", demand(0, Money(100)));
        assert_eq!(
            refused.err(),
            Some(Refusal::InsufficientQuota {
                level: Level::Team,
                remaining: Money(30),
                needed: Money(100),
            })
        );
        assert_eq!(
            limiter.budget(Level::Key, "a").unwrap().reserved_usd,
            Money(100)
        );
        let requests = |id| limiter.headers(id, Above::NONE, "m").requests.unwrap();
        assert_eq!(requests("a").remaining, 9);
        // The cost settles into both levels; a dropped ticket gives back at both.
        limiter.settle(first, 0, Money(40));
        drop(second);
        let eng = limiter.budget(Level::Team, "eng").unwrap();
        assert_eq!((eng.spend_usd, eng.reserved_usd), (Money(60), Money::ZERO));
        assert_eq!(
            limiter.budget(Level::Key, "a").unwrap().spend_usd,
            Money(40)
        );
        assert_eq!(
            limiter.budget(Level::Key, "b").unwrap().reserved_usd,
            Money::ZERO
        );
        // The team's RPM took two units (the refused request's went back): one more passes.
        assert!(limiter.admit("b", above, "m", demand(0, Money(10))).is_ok());
        let refused = limiter
            .admit("a", above, "m", demand(0, Money(10)))
            .err()
            .unwrap();
        assert_eq!(refused.reason(), "team_rpm");
        assert_eq!(requests("a").remaining, 9, "a refused request took nothing");
        // A key whose team is not a level is admitted on its own limits.
        assert!(limiter
            .admit("a", Above::NONE, "m", demand(0, Money(10)))
            .is_ok());
        // An outcome is charged at every level, or at none.
        let charged = limiter.charge("a", above, Money(500));
        assert_eq!(charged.err().map(|r| r.reason()), Some("team_budget"));
        assert_eq!(
            limiter.budget(Level::Key, "a").unwrap().reserved_usd,
            Money::ZERO
        );
        limiter.charge("a", above, Money(100)).unwrap();
        let eng = limiter.budget(Level::Team, "eng").unwrap();
        assert_eq!((eng.spend_usd, eng.reserved_usd), (Money(160), Money::ZERO));
    }
}
