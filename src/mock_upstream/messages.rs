//! The mock's Anthropic Messages API (`POST /v1/messages`), standing in for an upstream of
//! `kind = "anthropic"`: a whole message or its event stream, with the steering of chat
//! (`mock.reply_tokens`, `reply`, `fail`, `tool_call`, `no_usage`, `cached_tokens`, and
//! `cache_write_tokens` for prompt-cache writes). Errors come in Anthropic's shape; its
//! `input_tokens` leave out cache reads and writes, as Anthropic's do.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{answer, failure, intake, stream_response, FailMode, Interrupt, Shared};

fn error(status: u16, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body = match intake(&shared, &headers, &raw, "/v1/messages") {
        Ok(body) => body,
        Err(_) => return error(400, "invalid_request_error", "invalid JSON body"),
    };
    if headers.get("x-api-key").is_none() || headers.get("anthropic-version").is_none() {
        return error(
            401,
            "authentication_error",
            "x-api-key and anthropic-version are required",
        );
    }
    let failing = failure(&shared, &headers, &body);
    if !shared.options.latency.is_zero() {
        tokio::time::sleep(shared.options.latency).await;
    }
    match failing {
        Some(FailMode::Status(529)) => return error(529, "overloaded_error", "Overloaded"),
        Some(FailMode::Status(status)) => {
            return error(status, "api_error", "Internal server error")
        }
        Some(FailMode::RateLimited { retry_after_secs }) => {
            let mut response = error(429, "rate_limit_error", "Rate limited");
            if let Ok(value) = retry_after_secs.to_string().parse() {
                response.headers_mut().insert("retry-after", value);
            }
            return response;
        }
        Some(FailMode::Hang) => std::future::pending::<()>().await,
        _ => {}
    }
    let model = body["model"].as_str().unwrap_or("claude").to_owned();
    let number = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("msg_mock{number:016}");
    let mut steering = body.clone();
    steering["max_output_tokens"] = body["max_tokens"].clone();
    let (pieces, cut) = answer(&steering);
    let text: String = pieces.concat();
    let tool = (body["mock"]["tool_call"] == json!(true))
        .then(|| body["tools"][0]["name"].as_str())
        .flatten()
        .map(str::to_owned);
    // A fixed prompt size unless steered: the mock cannot tokenize as Claude does.
    let prompt = body["mock"]["prompt_tokens"].as_u64().unwrap_or(25);
    let cache_read = body["mock"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(prompt);
    let cache_write = body["mock"]["cache_write_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(prompt - cache_read);
    let input = prompt - cache_read - cache_write;
    let output = pieces.len() as u64;
    let usage = (body["mock"]["no_usage"] != json!(true)).then(|| {
        json!({"input_tokens": input, "output_tokens": output,
            "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write})
    });
    let block = match &tool {
        Some(name) => {
            json!({"type": "tool_use", "id": format!("toolu_mock{number:016}"), "name": name,
            "input": serde_json::from_str::<Value>(&text).unwrap_or_else(|_| json!({}))})
        }
        None => json!({"type": "text", "text": text}),
    };
    let stop_reason = match (&tool, cut) {
        (Some(_), _) => "tool_use",
        (None, true) => "max_tokens",
        (None, false) => "end_turn",
    };
    let interrupt = match failing {
        Some(FailMode::Cut { after_chunks }) => Some(Interrupt::Cut(after_chunks)),
        Some(FailMode::Stall { after_chunks }) => Some(Interrupt::Stall(after_chunks)),
        _ => None,
    };
    if body["stream"] != json!(true) {
        let mut message = json!({"id": id, "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": stop_reason, "stop_sequence": null});
        if let Some(usage) = usage {
            message["usage"] = usage;
        }
        return axum::Json(message).into_response();
    }
    let mut frames = Vec::with_capacity(pieces.len() + 6);
    let event = |frames: &mut Vec<Bytes>, kind: &str, data: Value| {
        frames.push(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")));
    };
    let mut start_usage = usage.clone().unwrap_or(Value::Null);
    if start_usage.is_object() {
        start_usage["output_tokens"] = json!(1);
    }
    event(
        &mut frames,
        "message_start",
        json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    );
    let mut opening = block.clone();
    match &tool {
        Some(_) => opening["input"] = json!({}),
        None => opening["text"] = json!(""),
    }
    event(
        &mut frames,
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": opening}),
    );
    for piece in &pieces {
        let delta = match &tool {
            Some(_) => json!({"type": "input_json_delta", "partial_json": piece}),
            None => json!({"type": "text_delta", "text": piece}),
        };
        event(
            &mut frames,
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        );
    }
    event(
        &mut frames,
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    let mut closing = json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null}});
    if usage.is_some() {
        closing["usage"] = json!({"output_tokens": output});
    }
    event(&mut frames, "message_delta", closing);
    event(&mut frames, "message_stop", json!({"type": "message_stop"}));
    stream_response(shared, frames, interrupt)
}
