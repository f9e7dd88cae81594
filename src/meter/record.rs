//! The facts the hot path hands to rating: one [`UsageRecord`] per finished request and one
//! [`OutcomeEvent`] per reported outcome. Plain data, no behaviour beyond simple derivations,
//! so every sink (JSON lines, the rating ledger) reads the same thing.

use serde::{Deserialize, Serialize};

use crate::api::Endpoint;

use crate::money::Money;

/// Token figures for one request. `cached_input` is the part of `input` served from the
/// provider's prompt cache (it is included in `input`, as OpenAI reports it);
/// `cache_write_input` the part written to it (Anthropic bills those writes at a premium).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_input: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.input + self.output
    }

    /// List cost of these tokens at `prices`.
    pub fn cost(&self, prices: &crate::money::ModelPrices) -> crate::money::Money {
        let (cached, written, plain) = self.input_parts();
        prices.cost(cached, written, plain, self.output)
    }

    /// The input as (read from the cache, written to it, neither), each held inside `input`.
    pub fn input_parts(&self) -> (u64, u64, u64) {
        let cached = self.cached_input.min(self.input);
        let written = self.cache_write_input.min(self.input - cached);
        (cached, written, self.input - cached - written)
    }
}

/// How the request ended, as far as the gateway saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered and the whole answer reached the client.
    Completed,
    /// The upstream answered with an error status, passed through to the client.
    UpstreamError,
    /// The gateway could not get an answer (connect error, timeout, stream cut).
    GatewayError,
    /// The client went away before the answer ended.
    ClientDisconnected,
    /// Refused before going upstream (auth, throttle, budget, bad request).
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::UpstreamError => "upstream_error",
            Outcome::GatewayError => "gateway_error",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A short name in a usage record (a key's id, a model's, a tier's, a route rule's…), held
/// inside the record itself up to 24 bytes: a record is built on a serving lane and read and
/// dropped on the usage thread, and a `String` per name cost an allocation there and, on the
/// other core, a fetch and a cross-thread free (in a load A/B, inline names took a
/// non-streaming request from 57.3 to 52.3 µs of CPU).
pub type Name = compact_str::CompactString;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The gateway's own id for the request, unique in the ledger.
    pub request_id: String,
    /// The `x-request-id` the client chose, when it chose one. Kept beside the gateway's id,
    /// never in its place: a client that reuses an id (its retries, or another tenant's id)
    /// must not make a billable request collide with one already recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// Unix time in milliseconds when the gateway accepted the request.
    pub started_at_ms: i64,
    pub key_id: Option<Name>,
    pub key_name: Option<Name>,
    pub plan: Option<Name>,
    pub endpoint: Endpoint,
    pub requested_model: Name,
    /// The configured model name that served the request (after routing and fallbacks).
    pub served_model: Option<Name>,
    pub upstream: Option<Name>,
    pub tier: Option<Name>,
    pub route_rule: Option<Name>,
    pub streamed: bool,
    pub status: u16,
    pub outcome: Outcome,
    pub finish_reason: Option<Name>,
    /// What the upstream said it used, when it said so.
    pub reported: Option<TokenUsage>,
    /// What tollgate counted itself with the model's tokenizer.
    pub counted: TokenUsage,
    pub attempts: u32,
    /// The provider answered (with a success status), so the tokens are billable; refused
    /// and failed requests are recorded with their counts but bill nothing.
    #[serde(default = "answered_by_default")]
    pub answered: bool,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    /// What the request cost: rated under the key's plan when it settled.
    pub charge: Money,
    /// The same tokens at list price, for reports.
    pub list_cost: Money,
    /// What the request added to its key's month totals (see `rating::plan::Rated`): its
    /// cost at the plan's prices, and credits burned (credit plans).
    #[serde(default)]
    pub plan_cost: Money,
    pub micro_credits: u64,
    /// The Responses API response served, by the provider's id: its model and key answer
    /// later requests about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    /// The gateway's own token count is an estimate: the model's provider publishes no
    /// tokenizer (Anthropic's). Its usage figures are what is billed.
    #[serde(default)]
    pub counted_estimate: bool,
}

impl UsageRecord {
    /// The figures that are billed: none for a request the provider did not answer, else the
    /// upstream's when it reported them, else our own count.
    pub fn billed(&self) -> TokenUsage {
        match self.answered {
            true => self.reported.unwrap_or(self.counted),
            false => TokenUsage::default(),
        }
    }
}

fn answered_by_default() -> bool {
    true
}

/// A billable outcome reported by an application through `POST /v1/outcomes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    pub idempotency_key: String,
    /// Price × quantity under the key's plan when reported.
    pub charge: Money,
    pub key_id: String,
    pub plan: Option<String>,
    pub outcome_type: String,
    pub quantity: u64,
    pub request_id: Option<String>,
    pub at_ms: i64,
}

/// Everything that flows from the hot path to the usage sink. Usage records dominate the
/// traffic, so boxing them to shrink the rare outcome variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MeterEvent {
    Usage(UsageRecord),
    Outcome(OutcomeEvent),
}
