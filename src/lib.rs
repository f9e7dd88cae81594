//! tollgate: an OpenAI-compatible LLM gateway that authenticates, admits, routes, forwards,
//! meters and rates every request. See README.md for the request's path through the modules.

pub mod admin;
pub mod anthropic;
pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod demo;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod json;
pub mod lanes;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod mock_upstream;
pub mod money;
pub mod outcomes;
pub mod proxy;
pub mod rating;
pub mod reload;
pub mod responses;
pub mod route;
pub mod server;
pub mod spend_watch;
pub mod state;
pub mod store;
pub mod stream;
pub mod upstream;

/// Shared state by name that the request path looks up (keys, groups, models, metric series):
/// foldhash rather than SipHash, which was a visible share of that path; the names are the
/// operator's, not a client's.
pub(crate) type ByName<T> =
    dashmap::DashMap<String, std::sync::Arc<T>, foldhash::fast::RandomState>;

/// Unix time in milliseconds: the timestamp format of records, keys and the ledger.
pub fn unix_ms() -> i64 {
    api::unix_ms()
}

/// A Unix time in milliseconds as RFC 3339 in UTC, to the second.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}
