//! Configuration: `routes.toml` read in two stages. [`raw`] is the file as serde sees it, with
//! unknown fields refused; [`Config::from_raw`] resolves every reference (a model's upstream
//! exists, its encoding is known, its prices are exact) into the runtime types the request path
//! uses. Every problem is reported with file, line, column and field. A `Config` is immutable;
//! hot reload swaps in a whole new one, so a request finishes on the config it started with.

mod locate;
pub mod raw;

// foldhash: the request path looks models and plans up by name several times a request, and
// SipHash was a visible share of that path; the names are the operator's, not a client's.
use foldhash::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::api::Endpoint;
use crate::meter::sink::Durability;
use crate::meter::tokenizer::Encoding;
use crate::money::{ModelPrices, Money, TokenPrice};
use crate::rating::plan::{build_plans, Plan};
use crate::route::Router;
use crate::upstream::{provider_client, Connections, ProviderClient};
pub use raw::UpstreamKind;

use raw::RawConfig;
use thread_local::ThreadLocal;

/// A whole validated configuration.
#[derive(Debug)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConfig,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub models: HashMap<String, Arc<Model>>,
    /// Model names in the order the file declares them, for `/v1/models`.
    pub model_order: Vec<String>,
    pub retry: RetryPolicy,
    pub budget_alerts: BudgetAlerts,
    /// Pricing plans by name; always holds `list` (per-token at list price).
    pub plans: HashMap<String, Plan>,
    pub durability: Durability,
    /// Whole days raw usage rows are kept (`[ledger] raw_retention_days`); `None` keeps them.
    pub raw_retention_days: Option<u32>,
    pub router: Option<Router>,
    /// Chosen at start-up; a reload that changes it is logged and takes effect on restart.
    pub state: StateBackend,
    pub store: StoreBackend,
}

/// What a replica does while its shared state cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Refuse every request with 503 and report not ready: no limit can be exceeded.
    FailClosed,
    /// Serve, each replica enforcing its share of every limit on its own.
    FailOpen,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StateBackend {
    Embedded,
    Redis {
        url: String,
        on_unavailable: OnUnavailable,
        lease: Duration,
        /// How many replicas share the limits: each enforces 1/replicas of every limit under
        /// `fail_open`, and an allowance takes at most a quarter of 1/replicas of what remains.
        replicas: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    Sqlite,
    Postgres { url: String },
}

/// The URL from the environment when set there, else from the file.
fn url_from(env: &str, file: &Option<String>) -> Option<String> {
    std::env::var(env)
        .ok()
        .filter(|url| !url.is_empty())
        .or_else(|| file.clone())
}

fn state_backend(raw: &raw::RawState, problems: &mut Problems) -> StateBackend {
    let on_unavailable = match raw.on_unavailable.as_str() {
        "fail_closed" => OnUnavailable::FailClosed,
        "fail_open" => OnUnavailable::FailOpen,
        other => {
            problems.push(
                &["state", "on_unavailable"],
                format!("`{other}` is not `fail_closed` or `fail_open`"),
            );
            OnUnavailable::FailClosed
        }
    };
    if raw.lease_secs < 3 {
        problems.push(&["state", "lease_secs"], "must be at least 3");
    }
    if raw.replicas == 0 {
        problems.push(&["state", "replicas"], "must be at least 1");
    }
    match raw.backend.as_str() {
        "embedded" => StateBackend::Embedded,
        "redis" => match url_from("TOLLGATE_REDIS_URL", &raw.redis_url) {
            Some(url) => StateBackend::Redis {
                url,
                on_unavailable,
                lease: Duration::from_secs(raw.lease_secs.max(3)),
                replicas: raw.replicas.max(1),
            },
            None => {
                problems.push(
                    &["state", "redis_url"],
                    "backend `redis` needs `redis_url` (or env TOLLGATE_REDIS_URL)",
                );
                StateBackend::Embedded
            }
        },
        other => {
            problems.push(
                &["state", "backend"],
                format!("`{other}` is not `embedded` or `redis`"),
            );
            StateBackend::Embedded
        }
    }
}

fn store_backend(raw: &raw::RawStore, problems: &mut Problems) -> StoreBackend {
    match raw.backend.as_str() {
        "sqlite" => StoreBackend::Sqlite,
        "postgres" => match url_from("TOLLGATE_POSTGRES_URL", &raw.postgres_url) {
            Some(url) => StoreBackend::Postgres { url },
            None => {
                problems.push(
                    &["store", "postgres_url"],
                    "backend `postgres` needs `postgres_url` (or env TOLLGATE_POSTGRES_URL)",
                );
                StoreBackend::Sqlite
            }
        },
        other => {
            problems.push(
                &["store", "backend"],
                format!("`{other}` is not `sqlite` or `postgres`"),
            );
            StoreBackend::Sqlite
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts_per_model: u32,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub budget: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub usage_channel_capacity: usize,
    pub inline_count_max_bytes: usize,
    pub log_json: bool,
    pub per_key_metrics: bool,
    /// `tollgate_group_*` gauges labelled by level and team or customer name.
    pub per_group_metrics: bool,
    pub reload_poll: Duration,
    /// Threads serving client connections (each a single-threaded runtime, see `lanes`).
    pub workers: usize,
    /// Open client connections served in full (see `lanes::ConnectionGate`); 0 derives it
    /// from the open-file limit when serving starts.
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub console_session: Duration,
}

/// A provider endpoint. Holds its own pooled HTTP client so timeouts are per upstream.
pub struct Upstream {
    pub name: String,
    /// Base URL without a trailing slash, ending in the API version (`…/v1`).
    pub base_url: String,
    /// Each endpoint's URL, in the order of [`Endpoint::ALL`], parsed once: parsing one per
    /// request was a twelfth of the gateway's instructions.
    endpoint_uris: [hyper::http::Uri; 5],
    pub kind: UpstreamKind,
    /// The header carrying the provider key (`Authorization: Bearer …`, or Anthropic's
    /// `x-api-key`), resolved from the environment.
    pub credentials: Option<(hyper::http::HeaderName, hyper::http::HeaderValue)>,
    /// Sent to an `anthropic` upstream unless the client sent its own.
    pub anthropic_version: hyper::http::HeaderValue,
    /// One pooled client per thread: a lane's requests use only connections whose tasks run
    /// on that lane (see `crate::lanes`).
    clients: ThreadLocal<ProviderClient>,
    /// Each lane's own connections, for an `http://` upstream (a TLS one uses `clients`).
    connections: Option<Connections>,
    connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Upstream {
    /// The provider key itself, to keep it out of logged text.
    pub fn api_key(&self) -> Option<&str> {
        let value = self.credentials.as_ref()?.1.to_str().ok()?;
        Some(value.strip_prefix("Bearer ").unwrap_or(value)).filter(|key| !key.is_empty())
    }

    pub fn client(&self) -> &ProviderClient {
        self.clients
            .get_or(|| provider_client(self.connect_timeout))
    }

    pub fn connections(&self) -> Option<&Connections> {
        self.connections.as_ref()
    }

    pub fn uri(&self, endpoint: Endpoint) -> hyper::http::Uri {
        self.endpoint_uris[endpoint as usize].clone()
    }
}

impl fmt::Debug for Upstream {
    /// Written by hand so the provider key can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("kind", &self.kind)
            .field("has_key", &self.credentials.is_some())
            .finish()
    }
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    /// `name` as the `x-tollgate-model` header's value, made once (`None` if it cannot be one).
    pub name_header: Option<axum::http::HeaderValue>,
    pub upstream: Arc<Upstream>,
    pub upstream_model: String,
    pub tier: String,
    pub encoding: Encoding,
    pub prices: ModelPrices,
    pub max_output_tokens: u64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
}

impl Model {
    pub fn rated(&self) -> crate::rating::RatedModel<'_> {
        crate::rating::RatedModel {
            name: &self.name,
            tier: &self.tier,
            prices: &self.prices,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BudgetAlerts {
    pub thresholds_pct: Vec<u8>,
    pub webhook: Option<reqwest::Url>,
    pub velocity: Velocity,
}

/// When a key's spend over the last ten minutes is a spike (see `spend_watch`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Velocity {
    /// Times the trailing 7-day average for ten minutes; `None` when off.
    pub factor: Option<f64>,
    pub min: Money,
    /// A fixed pace (per hour) that is a spike whatever the history.
    pub per_hour: Option<Money>,
    pub check_every: Duration,
}

/// Dollars from the config file: finite, not negative, to the nano-dollar.
fn config_dollars(value: f64) -> Option<Money> {
    (value.is_finite() && value >= 0.0)
        .then(|| Money::parse_usd(&format!("{value:.9}")).ok())
        .flatten()
}

fn velocity_settings(raw: &raw::RawBudgets, problems: &mut Problems) -> Velocity {
    let factor = match raw.velocity_factor {
        0.0 => None,
        f if f.is_finite() && f >= 1.0 => Some(f),
        _ => {
            problems.push(
                &["budgets", "velocity_factor"],
                "must be at least 1 (times the usual rate), or 0 to turn velocity alerts off",
            );
            None
        }
    };
    let min = config_dollars(raw.velocity_min_usd).unwrap_or_else(|| {
        problems.push(
            &["budgets", "velocity_min_usd"],
            "must be a number of USD from 0 up",
        );
        Money::ZERO
    });
    let per_hour = raw.velocity_usd_per_hour.and_then(|pace| {
        let money = config_dollars(pace).filter(|m| *m > Money::ZERO);
        if money.is_none() {
            problems.push(
                &["budgets", "velocity_usd_per_hour"],
                "must be above zero USD",
            );
        }
        money
    });
    if !(1..=3_600).contains(&raw.velocity_check_secs) {
        problems.push(&["budgets", "velocity_check_secs"], "must be 1 to 3600");
    }
    Velocity {
        factor,
        min,
        per_hour,
        check_every: Duration::from_secs(raw.velocity_check_secs.clamp(1, 3_600)),
    }
}

/// The Messages API version sent to `anthropic` upstreams by default.
const ANTHROPIC_VERSION: &str = "2023-06-01";

static LIST_PLAN: std::sync::LazyLock<Plan> = std::sync::LazyLock::new(Plan::list);

/// Everything wrong with one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, problem.line, problem.column, problem.field, problem.message
            )?;
        }
        Ok(())
    }
}

/// Problems found after parsing, by field path; turned into lines by [`ConfigError`].
#[derive(Default)]
pub struct Problems(Vec<(Vec<String>, String)>);

impl Problems {
    pub fn push(&mut self, path: &[&str], message: impl Into<String>) {
        self.0.push((
            path.iter().map(|s| (*s).to_owned()).collect(),
            message.into(),
        ));
    }

    pub fn push_owned(&mut self, path: Vec<String>, message: impl Into<String>) {
        self.0.push((path, message.into()));
    }

    fn into_error(self, file: &str, source: &str) -> Option<ConfigError> {
        if self.0.is_empty() {
            return None;
        }
        let problems = self
            .0
            .into_iter()
            .map(|(path, message)| {
                let (line, column) = locate::span_of(source, &path)
                    .map_or((1, 1), |span| locate::line_col(source, span.start));
                Problem {
                    line,
                    column,
                    field: path.join("."),
                    message,
                }
            })
            .collect();
        Some(ConfigError {
            file: file.to_owned(),
            problems,
        })
    }
}

impl Config {
    /// Reads and validates a file. Provider keys are read from the environment here, once.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, |_| {})
    }

    /// Like [`Config::load`], with a chance to adjust the raw file before validation (the
    /// demo points every upstream at its mock this way).
    pub fn load_with(
        path: &Path,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                line: 0,
                column: 0,
                field: "-".to_owned(),
                message: format!("cannot read the file: {error}"),
            }],
        })?;
        Config::parse_with(&source, path, adjust)
    }

    pub fn parse(source: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(source, path, |_| {})
    }

    fn parse_with(
        source: &str,
        path: &Path,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut raw: RawConfig = toml::from_str(source).map_err(|error| {
            let (line, column) = error
                .span()
                .map_or((1, 1), |span| locate::line_col(source, span.start));
            let field = error
                .span()
                .and_then(|span| field_at(source, span.start))
                .unwrap_or_else(|| "-".to_owned());
            ConfigError {
                file: file.clone(),
                problems: vec![Problem {
                    line,
                    column,
                    field,
                    message: error.message().trim().to_owned(),
                }],
            }
        })?;
        adjust(&mut raw);
        let mut problems = Problems::default();
        let config = Config::from_raw(raw, path, &mut problems);
        match problems.into_error(&file, source) {
            Some(error) => Err(error),
            None => Ok(config),
        }
    }

    /// Second stage: checks references and builds runtime types, recording every problem
    /// rather than stopping at the first.
    fn from_raw(raw: RawConfig, path: &Path, problems: &mut Problems) -> Config {
        let server = server_config(&raw.server, path, problems);
        let mut upstreams = HashMap::default();
        for (name, upstream) in &raw.upstreams {
            if let Some(built) = build_upstream(name, upstream, problems) {
                upstreams.insert(name.clone(), Arc::new(built));
            }
        }
        if raw.models.is_empty() {
            problems.push(&["models"], "declare at least one model");
        }
        let mut models = HashMap::default();
        let mut model_order = Vec::new();
        for (name, model) in &raw.models {
            if let Some(built) = build_model(name, model, &upstreams, problems) {
                models.insert(name.clone(), Arc::new(built));
                model_order.push(name.clone());
            }
        }
        let retry = &raw.retry;
        if retry.attempts_per_model == 0 {
            problems.push(&["retry", "attempts_per_model"], "must be at least 1");
        }
        if retry.max_attempts == 0 {
            problems.push(&["retry", "max_attempts"], "must be at least 1");
        }
        let webhook = raw.budgets.alert_webhook.as_deref().and_then(|url| {
            reqwest::Url::parse(url)
                .map_err(|_| {
                    problems.push(
                        &["budgets", "alert_webhook"],
                        format!("`{url}` is not a URL"),
                    );
                })
                .ok()
        });
        if raw.budgets.alert_thresholds_pct.contains(&0) {
            problems.push(
                &["budgets", "alert_thresholds_pct"],
                "thresholds are percentages from 1 up",
            );
        }
        let velocity = velocity_settings(&raw.budgets, problems);
        let catalog: HashMap<String, (ModelPrices, String)> = models
            .iter()
            .map(|(name, model)| (name.clone(), (model.prices, model.tier.clone())))
            .collect();
        let mut plan_problems = Vec::new();
        let plans = build_plans(&raw.plans, &catalog, &mut plan_problems);
        for (path, message) in plan_problems {
            problems.push_owned(path, message);
        }
        let durability = match raw.ledger.durability.as_str() {
            "batched" => Durability::Batched,
            "strict" => Durability::Strict,
            other => {
                problems.push(
                    &["ledger", "durability"],
                    format!("`{other}` is not `batched` or `strict`"),
                );
                Durability::Batched
            }
        };
        let raw_retention_days = match raw.ledger.raw_retention_days {
            None => None,
            Some(days @ 1..=36_500) => u32::try_from(days).ok(),
            Some(other) => {
                problems.push(
                    &["ledger", "raw_retention_days"],
                    format!(
                        "{other} is not a number of days from 1 to 36500; leave it out to keep raw rows"
                    ),
                );
                None
            }
        };
        let catalog: Vec<(String, String)> = model_order
            .iter()
            .filter_map(|name| models.get(name).map(|m| (name.clone(), m.tier.clone())))
            .collect();
        // With no valid model, the model problems are the ones worth reading.
        let router = match Router::build(&raw.router, &catalog) {
            _ if catalog.is_empty() => None,
            Ok(router) => Some(router),
            Err(router_problems) => {
                for (path, message) in router_problems {
                    problems.push_owned(path, message);
                }
                None
            }
        };
        Config {
            state: state_backend(&raw.state, problems),
            store: store_backend(&raw.store, problems),
            router,
            plans,
            durability,
            raw_retention_days,
            budget_alerts: BudgetAlerts {
                thresholds_pct: raw.budgets.alert_thresholds_pct.clone(),
                webhook,
                velocity,
            },
            source: path.to_owned(),
            server,
            upstreams,
            models,
            model_order,
            retry: RetryPolicy {
                attempts_per_model: retry.attempts_per_model.max(1),
                max_attempts: retry.max_attempts.max(1),
                backoff_initial: Duration::from_millis(retry.backoff_initial_ms),
                backoff_max: Duration::from_millis(retry.backoff_max_ms),
                budget: Duration::from_millis(retry.budget_ms),
            },
        }
    }

    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.get(name)
    }

    /// A key's plan; a key without one, or whose plan was removed from the config, is rated
    /// at list price.
    pub fn plan(&self, name: Option<&str>) -> &Plan {
        name.and_then(|name| self.plans.get(name))
            .or_else(|| self.plans.get("list"))
            .unwrap_or(&LIST_PLAN)
    }

    /// The model the demo's example lines use: the routing model once one is configured,
    /// else the first declared chat model.
    pub fn demo_model(&self) -> String {
        match &self.router {
            Some(router) => router.virtual_model.clone(),
            None => self.model_order.first().cloned().unwrap_or_default(),
        }
    }

    /// Every model name a client may use, in declaration order.
    pub fn client_models(&self) -> impl Iterator<Item = &str> {
        self.router
            .iter()
            .map(|router| router.virtual_model.as_str())
            .chain(self.model_order.iter().map(String::as_str))
    }

    /// Whether a client may name this model (a configured one or the routing model).
    pub fn knows_model(&self, name: &str) -> bool {
        self.models.contains_key(name) || self.router.as_ref().is_some_and(|r| r.is_virtual(name))
    }
}

/// The key that contains a byte offset, for parse errors whose message omits it.
fn field_at(source: &str, offset: usize) -> Option<String> {
    let line_start = source[..offset.min(source.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = source[line_start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    (!key.is_empty() && line.contains('=')).then(|| key.trim_matches('"').to_owned())
}

fn server_config(raw: &raw::RawServer, path: &Path, problems: &mut Problems) -> ServerConfig {
    let listen = parse_addr(&raw.listen, &["server", "listen"], problems);
    let admin_listen = raw
        .admin_listen
        .as_deref()
        .map(|addr| parse_addr(addr, &["server", "admin_listen"], problems));
    if raw.max_body_bytes == 0 {
        problems.push(&["server", "max_body_bytes"], "must be greater than 0");
    }
    if raw.usage_channel_capacity == 0 {
        problems.push(
            &["server", "usage_channel_capacity"],
            "must be greater than 0",
        );
    }
    if raw.workers > MAX_WORKERS {
        problems.push(
            &["server", "workers"],
            format!("must be 0 (one per core) to {MAX_WORKERS}"),
        );
    }
    let workers = match raw.workers {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n.min(MAX_WORKERS),
    };
    let log_json = match raw.log_format.as_str() {
        "json" => true,
        "text" => false,
        other => {
            problems.push(
                &["server", "log_format"],
                format!("`{other}` is not `text` or `json`"),
            );
            false
        }
    };
    // A relative data dir is relative to the config file, so `--config elsewhere/routes.toml`
    // does not scatter state into the current directory.
    let data_dir = Path::new(&raw.data_dir);
    let data_dir = if data_dir.is_absolute() {
        data_dir.to_owned()
    } else {
        path.parent()
            .unwrap_or_else(|| Path::new("."))
            .join(data_dir)
    };
    ServerConfig {
        listen,
        admin_listen,
        data_dir,
        max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs),
        usage_channel_capacity: raw.usage_channel_capacity.max(1),
        inline_count_max_bytes: raw.inline_count_max_bytes,
        log_json,
        per_key_metrics: raw.per_key_metrics,
        per_group_metrics: raw.per_group_metrics,
        reload_poll: Duration::from_secs(raw.reload_poll_secs.max(1)),
        workers,
        max_connections: raw.max_connections,
        header_read_timeout: Duration::from_millis(raw.header_read_timeout_ms.max(1)),
        body_idle_timeout: Duration::from_millis(raw.body_idle_timeout_ms.max(1)),
        console_session: Duration::from_secs(raw.console_session_secs.max(1)),
    }
}

/// Past a few per core, more lanes only add threads that contend for the same cores.
const MAX_WORKERS: usize = 1024;

fn parse_addr(text: &str, path: &[&str], problems: &mut Problems) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        problems.push(
            path,
            format!("`{text}` is not an address like 127.0.0.1:8080"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn build_upstream(name: &str, raw: &raw::RawUpstream, problems: &mut Problems) -> Option<Upstream> {
    let field = |leaf: &'static str| ["upstreams", name, leaf];
    let base_url = raw.base_url.trim_end_matches('/').to_owned();
    let endpoint_url = |endpoint: Endpoint| {
        let path = match raw.kind {
            UpstreamKind::Openai => endpoint.upstream_path(),
            UpstreamKind::Anthropic => "/messages",
        };
        reqwest::Url::parse(&format!("{base_url}{path}"))
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https"))
            .and_then(|url| url.as_str().parse::<hyper::http::Uri>().ok())
    };
    let Some(endpoint_uris) = Endpoint::ALL
        .map(endpoint_url)
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .and_then(|uris| <[hyper::http::Uri; 5]>::try_from(uris).ok())
    else {
        problems.push(
            &field("base_url"),
            format!("`{}` is not an http(s) URL", raw.base_url),
        );
        return None;
    };
    let (credential_header, credential_prefix) = match raw.kind {
        UpstreamKind::Openai => (hyper::http::header::AUTHORIZATION, "Bearer "),
        UpstreamKind::Anthropic => (hyper::http::HeaderName::from_static("x-api-key"), ""),
    };
    let credentials = match &raw.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(key) if !key.is_empty() => {
                match hyper::http::HeaderValue::from_str(&format!("{credential_prefix}{key}")) {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        Some((credential_header, value))
                    }
                    Err(_) => {
                        problems.push(
                            &field("api_key_env"),
                            format!("the value of ${var} is not a valid header value"),
                        );
                        return None;
                    }
                }
            }
            // Not an error: `tollgate check` runs where secrets are absent, and a provider
            // that needs the key will answer 401, which passes through to the client.
            _ => {
                tracing::warn!(upstream = name, var = %var, "provider key variable is not set");
                None
            }
        },
    };
    let version = raw
        .anthropic_version
        .as_deref()
        .unwrap_or(ANTHROPIC_VERSION);
    let Ok(anthropic_version) = hyper::http::HeaderValue::from_str(version) else {
        problems.push(&field("anthropic_version"), "not a valid header value");
        return None;
    };
    for (leaf, value) in [
        ("connect_timeout_ms", raw.connect_timeout_ms),
        ("first_byte_timeout_ms", raw.first_byte_timeout_ms),
        ("idle_timeout_ms", raw.idle_timeout_ms),
    ] {
        if value == 0 {
            problems.push(&field(leaf), "must be greater than 0");
        }
    }
    let connect_timeout = Duration::from_millis(raw.connect_timeout_ms.max(1));
    Some(Upstream {
        name: name.to_owned(),
        base_url,
        connections: Connections::for_uri(&endpoint_uris[0], connect_timeout),
        endpoint_uris,
        kind: raw.kind,
        credentials,
        anthropic_version,
        clients: ThreadLocal::new(),
        connect_timeout,
        first_byte_timeout: Duration::from_millis(raw.first_byte_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(raw.idle_timeout_ms.max(1)),
    })
}

fn build_model(
    name: &str,
    raw: &raw::RawModel,
    upstreams: &HashMap<String, Arc<Upstream>>,
    problems: &mut Problems,
) -> Option<Model> {
    let field = |leaf: &'static str| ["models", name, leaf];
    let upstream = match upstreams.get(&raw.upstream) {
        Some(upstream) => Some(upstream.clone()),
        None => {
            problems.push(
                &field("upstream"),
                format!("no upstream named `{}` in [upstreams]", raw.upstream),
            );
            None
        }
    };
    let encoding = match &raw.encoding {
        Some(encoding) => Encoding::from_name(encoding).or_else(|| {
            problems.push(
                &field("encoding"),
                format!("unknown encoding `{encoding}`; use o200k_base or cl100k_base"),
            );
            None
        }),
        // Anthropic publishes no tokenizer: the own count is o200k_base's estimate.
        None if upstream
            .as_ref()
            .is_some_and(|upstream| upstream.kind == UpstreamKind::Anthropic) =>
        {
            Some(Encoding::O200kBase)
        }
        None => {
            let upstream_model = raw.upstream_model.as_deref().unwrap_or(name);
            Encoding::for_model(upstream_model).or_else(|| {
                problems.push(
                    &field("encoding"),
                    format!(
                        "cannot infer the tokenizer of `{upstream_model}`; set encoding = \"o200k_base\" or \"cl100k_base\""
                    ),
                );
                None
            })
        }
    };
    if raw.tier.trim().is_empty() {
        problems.push(&field("tier"), "must not be empty");
    }
    if raw.rpm == Some(0) {
        problems.push(
            &field("rpm"),
            "must be at least 1 (leave it out for no limit)",
        );
    }
    if raw.tpm == Some(0) {
        problems.push(
            &field("tpm"),
            "must be at least 1 (leave it out for no limit)",
        );
    }
    let mut price = |leaf: &'static str, value: f64| match Money::from_config_float(value)
        .ok()
        .filter(|money| *money >= Money::ZERO)
        .map(TokenPrice::per_million)
    {
        Some(Ok(price)) => Some(price),
        _ => {
            problems.push(
                &field(leaf),
                format!(
                    "`{value}` is not a price in USD per 1M tokens with at most three decimals"
                ),
            );
            None
        }
    };
    let input = price("input_per_mtok", raw.input_per_mtok);
    let cached_input = match raw.cached_input_per_mtok {
        Some(value) => price("cached_input_per_mtok", value),
        None => input,
    };
    let cache_write_input = match raw.cache_write_input_per_mtok {
        Some(value) => price("cache_write_input_per_mtok", value),
        None => input,
    };
    let output = price("output_per_mtok", raw.output_per_mtok);
    Some(Model {
        name: name.to_owned(),
        name_header: axum::http::HeaderValue::from_str(name).ok(),
        upstream: upstream?,
        upstream_model: raw
            .upstream_model
            .clone()
            .unwrap_or_else(|| name.to_owned()),
        tier: raw.tier.clone(),
        encoding: encoding?,
        prices: ModelPrices {
            input: input?,
            cached_input: cached_input?,
            cache_write_input: cache_write_input?,
            output: output?,
        },
        max_output_tokens: raw.max_output_tokens,
        rpm: raw.rpm,
        tpm: raw.tpm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[upstreams.mock]
base_url = "http://127.0.0.1:9/v1/"

[models."gpt-4o-mini"]
upstream = "mock"
tier = "cheap"
input_per_mtok = 0.15
output_per_mtok = 0.60
"#;

    #[test]
    fn loads_a_good_config() {
        let config = Config::parse(GOOD, Path::new("routes.toml")).unwrap();
        let model = config.model("gpt-4o-mini").unwrap();
        assert_eq!(model.upstream.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(model.prices.input.nanos_per_token(), 150);
        assert_eq!(model.prices.cached_input.nanos_per_token(), 150);
        assert_eq!(model.prices.cost(0, 0, 1000, 1000), Money(750_000));
    }

    #[test]
    fn names_file_line_and_field_of_a_bad_reference() {
        let bad = GOOD.replace("upstream = \"mock\"", "upstream = \"nope\"");
        let error = Config::parse(&bad, Path::new("routes.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "routes.toml:6:1: models.gpt-4o-mini.upstream: no upstream named `nope` in [upstreams]"
        );
    }

    #[test]
    fn names_line_of_an_unknown_field() {
        let bad = GOOD.replace("tier = \"cheap\"", "tier = \"cheap\"\ntypo = 1");
        let error = Config::parse(&bad, Path::new("routes.toml")).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("routes.toml:8:1: typo: unknown field `typo`"),
            "{text}"
        );
    }

    #[test]
    fn workers_default_to_one_per_core_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let config = Config::parse(GOOD, Path::new("routes.toml")).unwrap();
        assert_eq!(config.server.workers, cores);
        let three = format!("[server]\nworkers = 3\n{GOOD}");
        let config = Config::parse(&three, Path::new("routes.toml")).unwrap();
        assert_eq!(config.server.workers, 3);
        let many = format!("[server]\nworkers = 5000\n{GOOD}");
        let error = Config::parse(&many, Path::new("routes.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "routes.toml:2:1: server.workers: must be 0 (one per core) to 1024"
        );
    }

    #[test]
    fn refuses_inexact_prices() {
        let bad = GOOD.replace("0.15", "0.0001");
        let error = Config::parse(&bad, Path::new("routes.toml")).unwrap_err();
        assert!(error
            .to_string()
            .contains("models.gpt-4o-mini.input_per_mtok"));
    }
}
