//! The first stage of configuration: `routes.toml` exactly as written, read by serde with
//! unknown fields refused. Nothing here is checked beyond its type; [`super::Config::from_raw`]
//! resolves references and turns these into runtime types.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub budgets: RawBudgets,
    #[serde(default)]
    pub plans: BTreeMap<String, crate::rating::plan::RawPlan>,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub router: crate::route::RawRouter,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub store: RawStore,
}

/// Where throttles, reservations, rating totals, alert flags and the key change feed live.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    /// `embedded` (default) or `redis`.
    pub backend: String,
    /// Overridden by env `TOLLGATE_REDIS_URL`.
    pub redis_url: Option<String>,
    /// `fail_closed` (default) or `fail_open`.
    pub on_unavailable: String,
    /// How long a reservation or concurrency slot outlives a replica that stopped renewing it.
    pub lease_secs: u64,
    /// How many replicas share the limits: under `fail_open` each enforces 1/replicas of
    /// every limit on its own.
    pub replicas: u32,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            backend: "embedded".to_owned(),
            redis_url: None,
            on_unavailable: "fail_closed".to_owned(),
            lease_secs: 30,
            replicas: 2,
        }
    }
}

/// Where keys and the usage ledger live.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `sqlite` (default) or `postgres`.
    pub backend: String,
    /// Overridden by env `TOLLGATE_POSTGRES_URL`.
    pub postgres_url: Option<String>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "sqlite".to_owned(),
            postgres_url: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLedger {
    /// `batched` (default) or `strict`.
    pub durability: String,
    /// Whole days raw usage rows are kept; absent keeps them forever.
    pub raw_retention_days: Option<i64>,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            durability: "batched".to_owned(),
            raw_retention_days: None,
        }
    }
}

/// Retries and fallbacks before the first byte reaches the client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    /// Attempts on one model before falling back to the next (1 = no retry).
    pub attempts_per_model: u32,
    /// Attempts across all models for one request.
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Wall-clock budget for all attempts; a `Retry-After` beyond it means fall back instead.
    pub budget_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            attempts_per_model: 2,
            max_attempts: 4,
            backoff_initial_ms: 100,
            backoff_max_ms: 2_000,
            budget_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: Option<String>,
    pub data_dir: String,
    pub max_body_bytes: u64,
    pub shutdown_grace_secs: u64,
    pub usage_channel_capacity: usize,
    /// Prompts whose body is larger than this are tokenized on the blocking pool.
    pub inline_count_max_bytes: usize,
    pub log_format: String,
    pub per_key_metrics: bool,
    pub per_group_metrics: bool,
    pub reload_poll_secs: u64,
    /// Threads serving client connections; 0 means one per core.
    pub workers: usize,
    /// Open client connections served in full; 0 derives it from the open-file limit.
    pub max_connections: usize,
    /// How long a client has to send a request head (and an idle keep-alive connection
    /// waits for its next request).
    pub header_read_timeout_ms: u64,
    /// The longest pause allowed between two pieces of a request body.
    pub body_idle_timeout_ms: u64,
    /// How long a console sign-in lasts.
    pub console_session_secs: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".to_owned(),
            admin_listen: None,
            data_dir: "data".to_owned(),
            max_body_bytes: 8 * 1024 * 1024,
            shutdown_grace_secs: 30,
            usage_channel_capacity: 65_536,
            inline_count_max_bytes: 4 * 1024,
            log_format: "text".to_owned(),
            per_key_metrics: true,
            per_group_metrics: true,
            reload_poll_secs: 2,
            workers: 0,
            max_connections: 0,
            header_read_timeout_ms: 20_000,
            body_idle_timeout_ms: 20_000,
            console_session_secs: 8 * 3600,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// The API the upstream speaks: `openai` (chat completions and the rest) or `anthropic`
    /// (the Messages API).
    #[serde(default)]
    pub kind: UpstreamKind,
    pub base_url: String,
    /// The `anthropic-version` header sent to an `anthropic` upstream, unless the client sent
    /// its own.
    pub anthropic_version: Option<String>,
    /// Name of the environment variable holding the provider key; the key itself never
    /// appears in the config file.
    pub api_key_env: Option<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Longest silence allowed between two chunks of a body once it started.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    #[default]
    Openai,
    Anthropic,
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_first_byte_timeout_ms() -> u64 {
    120_000
}

fn default_idle_timeout_ms() -> u64 {
    120_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub upstream: String,
    pub upstream_model: Option<String>,
    pub tier: String,
    pub encoding: Option<String>,
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
    /// Input written to the provider's prompt cache (Anthropic's cache writes); by default
    /// the input price.
    pub cache_write_input_per_mtok: Option<f64>,
    pub output_per_mtok: f64,
    /// The worst case reserved against budgets when a request names no `max_tokens`.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u64,
    /// Upstream quota protection: requests and tokens per minute across all keys.
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
}

/// Budget alerts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBudgets {
    /// Spend shares (percent of the cap) that log, count and announce once per period.
    pub alert_thresholds_pct: Vec<u8>,
    /// Optional URL that receives a JSON event per crossing.
    pub alert_webhook: Option<String>,
    /// A key spends too fast when its last ten minutes cost more than this many times its
    /// trailing 7-day average for ten minutes; 0 turns this off.
    pub velocity_factor: f64,
    /// …and at least this much (USD), so a key with little history does not alert on cents.
    pub velocity_min_usd: f64,
    /// A key also spends too fast when its last ten minutes run above this pace (USD/hour).
    pub velocity_usd_per_hour: Option<f64>,
    /// How often spend velocity is checked.
    pub velocity_check_secs: u64,
}

impl Default for RawBudgets {
    fn default() -> Self {
        RawBudgets {
            alert_thresholds_pct: vec![50, 80, 100],
            alert_webhook: None,
            velocity_factor: 5.0,
            velocity_min_usd: 1.0,
            velocity_usd_per_hour: None,
            velocity_check_secs: 60,
        }
    }
}

fn default_max_output_tokens() -> u64 {
    4_096
}
