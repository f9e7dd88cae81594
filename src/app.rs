//! The state every request shares: the current configuration (swapped whole on reload), the
//! tokenizer built at start-up, the key index, metrics, the usage channel, and the seams of
//! shared state (admission, rating totals) chosen at start-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::group::{Group, GroupIndex, GroupRecord, Levels};
use crate::auth::store::KeyStore;
use crate::auth::{KeyIndex, KeyRecord};
use crate::config::Config;
use crate::limits::{BudgetPeriod, KeyLimits, Level, SpendRate};
use crate::meter::sink::UsageSender;
use crate::meter::tokenizer::Tokenizer;
use crate::metrics::Metrics;
use crate::money::Money;
use crate::rating::ledger::LedgerReader;
use crate::state::{Admission, RatingTotals};

pub struct App {
    config: ArcSwap<Config>,
    pub tokenizer: Tokenizer,
    pub metrics: Arc<Metrics>,
    pub usage: UsageSender,
    pub keys: KeyIndex,
    /// Teams and customers that are budget levels above their keys.
    pub groups: GroupIndex,
    pub admission: Admission,
    pub key_store: Arc<dyn KeyStore>,
    /// Settlements (counting a finished answer, writing its record) still running on the
    /// blocking pool; shutdown waits for them before flushing the usage sink.
    pub settling: tokio_util::task::TaskTracker,
    /// For budget alert webhooks.
    pub webhooks: reqwest::Client,
    pub totals: RatingTotals,
    pub ledger: Arc<dyn LedgerReader>,
    /// Outcome reports lately accepted, for answering their repeats.
    pub outcomes: crate::outcomes::Recent,
    /// The model and key of each Responses API response served lately.
    pub response_owners: crate::responses::Owners,
    /// Held by an admin change of a key from its write to its activation here, so that two
    /// changes activate in the order they were written.
    pub key_writes: tokio::sync::Mutex<()>,
    /// Who may use the admin API: `TOLLGATE_ADMIN_TOKEN` (`None` disables it) and the console
    /// sessions made from it.
    pub console: crate::console::session::Sessions,
    /// Refusals and server errors minute by minute, for the admin API's health summary.
    pub health: crate::admin::health::History,
    ready: AtomicBool,
    /// The main runtime: work that must outlive a serving lane (settlements finished on shared
    /// state, webhooks) runs here.
    pub runtime: tokio::runtime::Handle,
}

/// What the gateway is built from, besides its configuration.
pub struct Services {
    pub tokenizer: Tokenizer,
    pub metrics: Arc<Metrics>,
    pub usage: UsageSender,
    pub key_store: Arc<dyn KeyStore>,
    pub ledger: Arc<dyn LedgerReader>,
    pub admission: Admission,
    pub totals: RatingTotals,
    pub admin_token: Option<String>,
    pub runtime: tokio::runtime::Handle,
}

impl App {
    pub fn new(config: Config, services: Services) -> App {
        for name in &config.model_order {
            if let Some(model) = config.model(name) {
                services.admission.set_model(name, model.rpm, model.tpm);
            }
        }
        let console = crate::console::session::Sessions::new(
            services.admin_token,
            !services.admission.is_shared(),
        );
        App {
            config: ArcSwap::from_pointee(config),
            tokenizer: services.tokenizer,
            metrics: services.metrics,
            usage: services.usage,
            keys: KeyIndex::default(),
            groups: GroupIndex::default(),
            admission: services.admission,
            key_store: services.key_store,
            settling: tokio_util::task::TaskTracker::new(),
            webhooks: reqwest::Client::new(),
            totals: services.totals,
            ledger: services.ledger,
            outcomes: crate::outcomes::Recent::default(),
            response_owners: crate::responses::Owners::default(),
            key_writes: tokio::sync::Mutex::new(()),
            console,
            health: Default::default(),
            ready: AtomicBool::new(false),
            runtime: services.runtime,
        }
    }

    /// The configuration a request keeps for its whole life, even across a reload.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn replace_config(&self, config: Config) {
        for name in &config.model_order {
            if let Some(model) = config.model(name) {
                self.admission.set_model(name, model.rpm, model.tpm);
            }
        }
        self.config.store(Arc::new(config));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// A key was created or changed: the hot path sees it from the next request on. `spent`
    /// is the current period's spend from the ledger at start-up; an update keeps the live one.
    pub fn key_activated(&self, record: KeyRecord, spent: Option<Money>) {
        if record.is_revoked() {
            self.key_revoked(&record.id);
            return;
        }
        let record = self.effective(record);
        let limits = self.key_limits(&record);
        self.admission
            .upsert(Level::Key, &record.id, &limits, spent);
        self.keys.put(record);
    }

    /// A key as the request path sees it: without a plan of its own, it is rated under its
    /// customer's.
    pub fn effective(&self, mut record: KeyRecord) -> KeyRecord {
        if record.plan.is_none() {
            if let Some(customer) = record.customer.as_deref() {
                record.plan = self
                    .groups
                    .get(Level::Customer, customer)
                    .and_then(|group| group.record.plan.clone());
            }
        }
        record
    }

    /// A team or customer was created or changed: the next request of each of its keys is
    /// admitted against it. `spent` is its keys' spend this period from the ledger, needed at
    /// start-up and when its period or its keys change.
    pub fn group_activated(&self, record: GroupRecord, spent: Option<Money>) {
        self.admission
            .upsert(record.level, &record.name, &record.limits(), spent);
        self.groups.put(record);
    }

    pub fn group_removed(&self, level: Level, name: &str) {
        self.groups.remove(level, name);
        self.admission.remove(level, name);
    }

    /// A customer's plan is its keys' plan where they have none: after the customer changed,
    /// they are activated again.
    pub async fn refresh_members(&self, level: Level, name: &str) {
        if level != Level::Customer {
            return;
        }
        let store = self.key_store.clone();
        match tokio::task::spawn_blocking(move || store.list()).await {
            Ok(Ok(keys)) => {
                for key in keys {
                    if key.customer.as_deref() == Some(name) && key.plan.is_none() {
                        self.key_activated(key, None);
                    }
                }
            }
            Ok(Err(error)) => tracing::error!(%error, "cannot load a customer's keys"),
            Err(error) => tracing::error!(%error, "cannot load a customer's keys"),
        }
    }

    /// The levels above a key that its requests are admitted at.
    pub fn levels(&self, key: &KeyRecord) -> Levels {
        self.groups
            .above(key.team.as_deref(), key.customer.as_deref())
    }

    pub fn key_limits(&self, record: &KeyRecord) -> KeyLimits {
        key_limits(
            record,
            self.config().plan(record.plan.as_deref()).implied_cap(),
        )
    }

    /// The period a key's budget runs over: its own, or a month under a hard-stop credit pack.
    pub fn budget_period(&self, record: &KeyRecord) -> BudgetPeriod {
        self.key_limits(record)
            .budget
            .map_or(record.budget_period, |(_, period)| period)
    }

    pub fn key_revoked(&self, id: &str) {
        self.keys.remove(id);
        self.admission.remove(Level::Key, id);
    }

    /// POSTs an alert about a key to the alert webhook, if one is configured, without
    /// waiting: `event` is its JSON object, to which the key and its live budget are added.
    pub fn post_alert(
        self: &Arc<Self>,
        config: &Config,
        key: Arc<KeyRecord>,
        mut event: serde_json::Value,
    ) {
        let Some(url) = config.budget_alerts.webhook.clone() else {
            return;
        };
        let app = self.clone();
        self.runtime.spawn(async move {
            event["key_id"] = serde_json::json!(key.id);
            event["key_name"] = serde_json::json!(key.name);
            event["budget"] = app.budget_view(&key, None).await;
            app.send_alert(url, &event).await;
        });
    }

    /// POSTs an alert about a team or customer, as [`App::post_alert`] does about a key:
    /// `level` and `name` say which, and its live budget is added.
    pub fn post_group_alert(
        self: &Arc<Self>,
        config: &Config,
        group: Arc<Group>,
        mut event: serde_json::Value,
    ) {
        let Some(url) = config.budget_alerts.webhook.clone() else {
            return;
        };
        let app = self.clone();
        self.runtime.spawn(async move {
            event["level"] = serde_json::json!(group.record.level.as_str());
            event["name"] = serde_json::json!(group.record.name);
            event["budget"] = app.group_budget_view(&group.record, None).await;
            app.send_alert(url, &event).await;
        });
    }

    async fn send_alert(&self, url: reqwest::Url, event: &serde_json::Value) {
        if let Err(error) = self.webhooks.post(url).json(event).send().await {
            tracing::error!(error = %error.without_url(), "alert webhook failed");
        }
    }

    /// Live budget figures for the admin API. Spend is tracked for every key; an uncapped key
    /// shows no cap and no remaining amount. With the key's spend per hour, the period is
    /// projected at that pace too (see `spend_watch::project`).
    pub async fn budget_view(
        &self,
        record: &KeyRecord,
        pace_per_hour: Option<Money>,
    ) -> serde_json::Value {
        let limits = self.key_limits(&self.effective(record.clone()));
        let snapshot = self.admission.budget(Level::Key, &record.id, &limits).await;
        budget_json(snapshot, pace_per_hour)
    }

    /// A team's or customer's live budget figures and projection, as a key's.
    pub async fn group_budget_view(
        &self,
        record: &GroupRecord,
        pace_per_hour: Option<Money>,
    ) -> serde_json::Value {
        let snapshot = self
            .admission
            .budget(record.level, &record.name, &record.limits())
            .await;
        budget_json(snapshot, pace_per_hour)
    }
}

/// Live budget figures as the admin API shows them, projected at `pace_per_hour` when given.
fn budget_json(
    snapshot: Option<crate::limits::BudgetSnapshot>,
    pace_per_hour: Option<Money>,
) -> serde_json::Value {
    let Some(snapshot) = snapshot else {
        return serde_json::Value::Null;
    };
    let capped = snapshot.budget_usd != crate::limits::UNCAPPED;
    let mut view = serde_json::json!({
        "budget_usd": capped.then_some(snapshot.budget_usd),
        "spend_usd": snapshot.spend_usd,
        "reserved_usd": snapshot.reserved_usd,
        "remaining_usd": capped.then_some(snapshot.remaining_usd),
        "period_start": crate::rfc3339(snapshot.period_start_ms),
        "resets_at": snapshot.resets_at_ms.map(crate::rfc3339),
    });
    if let Some(pace) = pace_per_hour {
        let projection = crate::spend_watch::project(
            snapshot.spend_usd,
            capped.then_some(snapshot.budget_usd),
            crate::unix_ms(),
            snapshot.resets_at_ms,
            pace,
        );
        view["pace_usd_per_hour"] = serde_json::json!(projection.pace_per_hour);
        view["projected_spend_usd"] = serde_json::json!(projection.spend_at_reset);
        view["cap_reached_at"] = serde_json::json!(projection.cap_reached_ms.map(crate::rfc3339));
    }
    view
}

/// A key's limits. A key on a hard-stop credit pack is capped at the pack per month unless it
/// has its own cap; a key without any cap gets an unreachable one so its spend is tracked.
pub fn key_limits(record: &KeyRecord, plan_cap: Option<Money>) -> KeyLimits {
    // A hard-stop credit pack is a monthly cap the key's own cap can only lower: when the
    // credits are gone the key stops, whatever its own budget says.
    let budget = match (record.budget_usd, plan_cap) {
        (Some(cap), Some(pack)) => (cap.min(pack), BudgetPeriod::Month),
        (Some(cap), None) => (cap, record.budget_period),
        (None, Some(pack)) => (pack, BudgetPeriod::Month),
        (None, None) => (crate::limits::UNCAPPED, record.budget_period),
    };
    KeyLimits {
        rpm: record.rpm,
        tpm: record.tpm,
        max_concurrency: record.max_concurrency,
        budget: Some(budget),
        spend_rate: SpendRate {
            per_minute: record.max_usd_per_minute,
            per_hour: record.max_usd_per_hour,
        },
    }
}
