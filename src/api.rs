//! The names of the API as clients and providers see it, which every layer may use: the
//! proxied endpoints, the request id and the gateway's own headers. A leaf: it imports nothing
//! of the crate.

use axum::http::HeaderName;
use serde::{Deserialize, Serialize};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The model that actually served the request.
pub static X_TOLLGATE_MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
/// The routing rule that chose it (`direct` when the client named the model).
pub static X_TOLLGATE_ROUTE: HeaderName = HeaderName::from_static("x-tollgate-route");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// OpenAI's Responses API (`/v1/responses`).
    Responses,
    /// Anthropic's Messages API (`/v1/messages`), served as the chat completion it amounts to.
    Messages,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Messages,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    /// The path clients send it to.
    pub fn client_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
        }
    }

    /// The endpoint clients reach at `path`.
    pub fn at(path: &str) -> Option<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .find(|endpoint| endpoint.client_path() == path)
    }

    /// The path under the upstream's base URL (which ends in `/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions | Endpoint::Messages => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
        }
    }
}

/// A fresh request id: 48 bits of milliseconds then 80 random bits, in hex. Time first (as in
/// UUIDv7) so that the ledger's unique index on request ids grows at its end instead of
/// touching a random page per record.
pub fn new_request_id() -> String {
    std::str::from_utf8(&fresh_request_id())
        .unwrap_or_default()
        .to_owned()
}

/// [`new_request_id`] for a header: one allocation, which the value's clones share (a value
/// made from a `String` allocates again when first cloned).
pub fn new_request_id_bytes() -> bytes::Bytes {
    bytes::Bytes::from_owner(fresh_request_id())
}

fn fresh_request_id() -> [u8; 36] {
    let random: u128 = rand::random();
    let ms = unix_ms() as u128 & ((1 << 48) - 1);
    let mut id = *b"req_00000000000000000000000000000000";
    // 16 bytes are exactly the 32 digits after the prefix: this cannot fail.
    let _ = hex::encode_to_slice(((ms << 80) | (random >> 48)).to_be_bytes(), &mut id[4..]);
    id
}

/// Marks a request whose `x-request-id` is the client's own rather than the gateway's.
#[derive(Clone, Copy)]
pub struct ClientChoseRequestId;

/// `YYYY-MM-DD` (UTC midnight) or RFC 3339, to Unix milliseconds.
pub fn parse_instant(text: &str) -> Option<i64> {
    if let Some(midnight) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
    {
        return Some(midnight.and_utc().timestamp_millis());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_hex_after_the_prefix_and_ordered_by_time() {
        let first = new_request_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let header = new_request_id_bytes();
        let later = std::str::from_utf8(&header).unwrap();
        for id in [first.as_str(), later] {
            assert_eq!(id.len(), 36);
            let digits = id.strip_prefix("req_").unwrap();
            assert!(digits
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        }
        assert!(first.as_str() < later, "{first} then {later}");
        let ms = i64::from_str_radix(&later[4..16], 16).unwrap();
        assert!((unix_ms() - ms).abs() < 10_000);
    }
}
