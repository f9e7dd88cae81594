//! Reading a client's request: the body under its size limit (refused with 413 before it is
//! kept or parsed) and the few fields the gateway itself needs (`model`, `stream`).

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Frame;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::meter::prompt::{ChatBody, ChatRequest};

pub(super) struct ParsedRequest<B> {
    pub body: B,
    pub model: String,
    pub stream: bool,
    /// A top-level member appears more than once (the body holds its last value).
    pub repeats_members: bool,
}

impl<B> ParsedRequest<B> {
    pub fn map<C>(self, read: impl FnOnce(B) -> C) -> ParsedRequest<C> {
        ParsedRequest {
            body: read(self.body),
            model: self.model,
            stream: self.stream,
            repeats_members: self.repeats_members,
        }
    }
}

/// A request's body as the gateway reads it: a whole `Value`, or, for a chat request small
/// enough to read on the serving lane, a [`ChatBody`] with its messages borrowed.
pub(super) enum RequestBody<'a> {
    Value(Value),
    Chat(ChatBody<'a>),
}

impl RequestBody<'_> {
    /// A top-level member's value (not `messages`).
    pub fn member(&self, name: &str) -> Option<&Value> {
        match self {
            RequestBody::Value(body) => body.get(name),
            RequestBody::Chat(body) => body.member(name),
        }
    }
}

/// The body, refused with 413 before keeping more than the limit (and before any parsing),
/// and with 408 when it pauses longer than `idle`.
pub(super) async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        discard(body, declared).await;
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut length = 0;
    while let Some(frame) = next_frame(&mut body, idle).await? {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        length += data.len();
        if length > limit {
            discard(body, None).await;
            return Err(GatewayError::BodyTooLarge { limit });
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 | 1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// `future`'s output, unless it takes longer than `limit`. One that is ready at once (a piece
/// of a body that came with the request head, a short answer that came with its head) is
/// taken without arming a timer: a timer was an insertion into and a removal from the lane's
/// timer wheel, several times a request.
pub(super) async fn within<F: Future + Unpin>(
    limit: Duration,
    mut future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match (&mut future).now_or_never() {
        Some(output) => Ok(output),
        None => tokio::time::timeout(limit, future).await,
    }
}

/// The body's next piece, within `idle`.
async fn next_frame(body: &mut Body, idle: Duration) -> Result<Option<Frame<Bytes>>, GatewayError> {
    let frame = within(idle, body.frame())
        .await
        .map_err(|_| GatewayError::BodyTimeout)?;
    frame.transpose().map_err(unreadable)
}

/// A body that could not be read: it paused too long (`server.body_idle_timeout_ms`), or
/// the connection failed under it.
fn unreadable(error: axum::Error) -> GatewayError {
    let inner = error.into_inner();
    match inner.downcast_ref::<tower_http::timeout::TimeoutError>() {
        Some(_) => GatewayError::BodyTimeout,
        None => GatewayError::bad_request("the request body could not be read"),
    }
}

/// How much of a refused body is still read and dropped, and for how long: a server that
/// closes a connection with unread data resets it, and a client still sending then sees a
/// broken pipe instead of the 413 (as nginx's lingering close avoids). Past either bound the
/// connection is cut.
const DISCARD_MAX_BYTES: u64 = 64 * 1024 * 1024;
const DISCARD_MAX_TIME: Duration = Duration::from_secs(5);

async fn discard(mut body: Body, declared: Option<u64>) {
    if declared.is_some_and(|length| length > DISCARD_MAX_BYTES) {
        return;
    }
    let drain = async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |data| data.len() as u64);
            if read > DISCARD_MAX_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_MAX_TIME, drain).await;
}

pub(super) fn parse_request(bytes: &[u8]) -> Result<ParsedRequest<Value>, GatewayError> {
    refuse_unless_object(bytes)?;
    let ValueMembers { body, repeats } = crate::json::from_slice(bytes).map_err(unparsable)?;
    let body = Value::Object(body);
    let (model, stream) = read_fields(|name| body.get(name))?;
    Ok(ParsedRequest {
        body,
        model,
        stream,
        repeats_members: repeats,
    })
}

/// [`parse_request`] of a chat request, read as a [`ChatBody`].
pub(super) fn parse_chat_request(
    bytes: &[u8],
) -> Result<ParsedRequest<ChatBody<'_>>, GatewayError> {
    refuse_unless_object(bytes)?;
    // The same parser as a `Value` parse: the same errors at the same places.
    let body: ChatBody = crate::json::from_slice(bytes).map_err(unparsable)?;
    let (model, stream) = read_fields(|name| body.member(name))?;
    let repeats_members = body.repeats();
    Ok(ParsedRequest {
        body,
        model,
        stream,
        repeats_members,
    })
}

/// A body that is not a JSON object is refused as unparsable when it is not JSON at all.
fn refuse_unless_object(bytes: &[u8]) -> Result<(), GatewayError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return Ok(());
    }
    crate::json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(unparsable)?;
    Err(GatewayError::bad_request(
        "the request body must be a JSON object",
    ))
}

fn unparsable(error: serde_json::Error) -> GatewayError {
    GatewayError::bad_request(format!(
        "We could not parse the JSON body of your request: {error}"
    ))
}

/// The model and the stream flag, with `stream_options` checked, from a body's top-level
/// members as `member` gives them.
fn read_fields<'v>(
    member: impl Fn(&str) -> Option<&'v Value>,
) -> Result<(String, bool), GatewayError> {
    let model = match member("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        None | Some(Value::Null) => {
            return Err(GatewayError::BadRequest {
                message: "you must provide a model parameter".to_owned(),
                param: Some("model"),
            })
        }
        _ => {
            return Err(GatewayError::BadRequest {
                message: "`model` must be a non-empty string".to_owned(),
                param: Some("model"),
            })
        }
    };
    let stream = match member("stream") {
        Some(Value::Bool(stream)) => *stream,
        None | Some(Value::Null) => false,
        _ => {
            return Err(GatewayError::BadRequest {
                message: "`stream` must be a boolean".to_owned(),
                param: Some("stream"),
            })
        }
    };
    if !matches!(
        member("stream_options"),
        None | Some(Value::Object(_) | Value::Null)
    ) {
        return Err(GatewayError::BadRequest {
            message: "`stream_options` must be an object".to_owned(),
            param: Some("stream_options"),
        });
    }
    Ok((model, stream))
}

/// A request body's top-level members as `Value` would parse them (a repeated name keeps its
/// place and takes its last value), and whether any name repeats: a body without repeats may
/// be forwarded as it came, since every parser reads it as the gateway did.
struct ValueMembers {
    body: Map<String, Value>,
    repeats: bool,
}

impl<'de> Deserialize<'de> for ValueMembers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = ValueMembers;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValueMembers, A::Error> {
                // Room for a typical request's members (model, messages, stream, limits,
                // sampling, tools…) at once, rather than growing and rehashing partway.
                let mut body = Map::with_capacity(map.size_hint().unwrap_or(0).max(8));
                let mut repeats = false;
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value::<Value>()?;
                    repeats |= body.insert(name, value).is_some();
                }
                Ok(ValueMembers { body, repeats })
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(error: GatewayError) -> String {
        match error {
            GatewayError::BadRequest { message, .. } => message,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn repeated_top_level_members_are_noticed_and_the_last_value_kept() {
        let parsed = parse_request(br#" {"model":"a","stream":false,"model":"b"}"#).unwrap();
        assert!(parsed.repeats_members);
        assert_eq!(parsed.model, "b");
        assert_eq!(
            parsed.body.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["model", "stream"]
        );

        let parsed =
            parse_request(br#"{"model":"a","messages":[{"role":"user","role":"x"}]}"#).unwrap();
        assert!(
            !parsed.repeats_members,
            "only the top level is forwarded member by member"
        );
        assert_eq!(parsed.model, "a");
    }

    #[test]
    fn a_chat_request_is_read_and_checked_as_a_whole_one_is() {
        let body = r#"{"model":"m","stream":true,"max_tokens":16,"temperature":0.5,"messages":[{"role":"user","content":"hi"}]}"#;
        let parsed = parse_chat_request(body.as_bytes()).unwrap();
        let whole = parse_request(body.as_bytes()).unwrap();
        assert_eq!(
            (parsed.model.as_str(), parsed.stream, parsed.repeats_members),
            ("m", true, false)
        );
        assert_eq!((whole.model.as_str(), whole.stream), ("m", true));
        for name in ["max_tokens", "temperature", "n"] {
            assert_eq!(parsed.body.member(name), whole.body.get(name), "{name}");
        }

        let repeated =
            parse_chat_request(br#"{"model":"x","stream":false,"model":"named"}"#).unwrap();
        assert!(repeated.repeats_members);
        assert_eq!(repeated.model, "named");
        let escaped = parse_chat_request(br#"{"model":"na\u006ded"}"#).unwrap();
        assert_eq!(escaped.model, "named");

        for refused in [
            r#"{"model":"named","stream":"yes"}"#,
            r#"{"model":"named","stream_options":1}"#,
            r#"{"model":"named","temperature":1e400}"#,
            r#"{"model":"named","messages":[{"content":"\ud800"}]}"#,
            r#"{"model":"","messages":[]}"#,
            r#"{"model":null}"#,
            r#"{"model":"named",}"#,
            r#"["model"]"#,
        ] {
            assert_eq!(
                message(parse_chat_request(refused.as_bytes()).err().unwrap()),
                message(parse_request(refused.as_bytes()).err().unwrap()),
                "{refused}"
            );
        }
    }

    #[test]
    fn bodies_that_are_not_objects_keep_their_messages() {
        assert_eq!(
            message(parse_request(b" [1, 2]").err().unwrap()),
            "the request body must be a JSON object"
        );
        assert!(message(parse_request(b"[1, 2").err().unwrap())
            .starts_with("We could not parse the JSON body of your request: "));
        assert!(message(parse_request(br#"{"model":"a",}"#).err().unwrap())
            .starts_with("We could not parse the JSON body of your request: "));
        assert!(message(parse_request(br#"{"model":"a"} x"#).err().unwrap())
            .starts_with("We could not parse the JSON body of your request: trailing characters"));
    }
}
