//! The mock's Responses API: `POST /v1/responses` (whole or as typed SSE events) and the
//! stored-response endpoints, with the steering of chat (`mock.reply_tokens`, `fail`,
//! `tool_call`, `no_usage`, …). Responses are stored for retrieval and continuation; a
//! continued conversation's `input_tokens` include the earlier turns, as the provider's do.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{
    answer, encoding_for, error_response, fail_early, failure, intake, stream_response, FailMode,
    Interrupt, Shared,
};

/// A stored response and the input items it was asked with.
#[derive(Clone)]
pub(super) struct Stored {
    response: Value,
    input_items: Vec<Value>,
}

/// The newest [`Store::KEPT`] responses. One is forgotten per one stored: a bench sends
/// millions, and clearing a full map at once held every request for ~0.6 s.
#[derive(Default)]
pub(super) struct Store {
    by_id: HashMap<String, Stored>,
    order: VecDeque<String>,
}

impl Store {
    const KEPT: usize = 10_000;

    fn insert(&mut self, id: String, stored: Stored) {
        if self.order.len() >= Store::KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, stored);
    }

    fn get(&self, id: &str) -> Option<&Stored> {
        self.by_id.get(id)
    }

    fn remove(&mut self, id: &str) -> Option<Stored> {
        self.by_id.remove(id)
    }
}

fn not_found(id: &str) -> Response {
    error_response(
        404,
        "invalid_request_error",
        "not_found",
        &format!("Response with id '{id}' not found."),
    )
}

pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body = match intake(&shared, &headers, &raw, "/v1/responses") {
        Ok(body) => body,
        Err(response) => return response,
    };
    let failing = failure(&shared, &headers, &body);
    if !shared.options.latency.is_zero() {
        tokio::time::sleep(shared.options.latency).await;
    }
    if let Some(mode) = failing {
        if let Some(response) = fail_early(mode, &headers).await {
            return response;
        }
    }
    let previous = match body["previous_response_id"].as_str() {
        None => None,
        Some(id) => match shared.responses().get(id).cloned() {
            Some(stored) => Some(stored),
            None => {
                return error_response(
                    404,
                    "invalid_request_error",
                    "previous_response_not_found",
                    &format!("Previous response with id '{id}' not found."),
                )
            }
        },
    };
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let number = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("resp_mock{number:016}");
    let (pieces, cut) = answer(&body);
    let text: String = pieces.concat();
    let tool = (body["mock"]["tool_call"] == json!(true))
        .then(|| body["tools"][0]["name"].as_str())
        .flatten()
        .map(str::to_owned);
    let tokenizer = crate::meter::tokenizer::Tokenizer::new().ok();
    let encoding = encoding_for(&model);
    let earlier = previous.as_ref().map_or(0, |stored| {
        stored.response["usage"]["input_tokens"]
            .as_u64()
            .unwrap_or(0)
            + stored.response["usage"]["output_tokens"]
                .as_u64()
                .unwrap_or(0)
    });
    let input_tokens = body["mock"]["prompt_tokens"].as_u64().unwrap_or_else(|| {
        earlier
            + tokenizer.map_or(0, |t| {
                t.count_chat_prompt(encoding, &crate::responses::as_chat(&body))
            })
    });
    let output_tokens = match &tool {
        Some(_) => tokenizer.map_or(0, |t| t.count_text(encoding, &text)),
        None => pieces.len() as u64,
    };
    let cached = body["mock"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(input_tokens);
    let usage = (body["mock"]["no_usage"] != json!(true)).then(|| {
        json!({
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        })
    });
    let item = match &tool {
        Some(name) => json!({
            "id": format!("fc_mock{number:016}"), "type": "function_call", "status": "completed",
            "call_id": format!("call_mock{number:016}"), "name": name, "arguments": text,
        }),
        None => json!({
            "id": format!("msg_mock{number:016}"), "type": "message", "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }),
    };
    let created_at = crate::unix_ms() / 1000;
    let status = if cut { "incomplete" } else { "completed" };
    let mut response = json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "background": false, "error": null,
        "incomplete_details": if cut { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": body["instructions"], "max_output_tokens": body["max_output_tokens"],
        "model": model, "output": [item], "parallel_tool_calls": true,
        "previous_response_id": body["previous_response_id"],
        "reasoning": {"effort": null, "summary": null}, "store": true,
        "temperature": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": body.get("tools").cloned().unwrap_or(json!([])),
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": null, "metadata": {},
    });
    let input_items = match &body["input"] {
        Value::String(text) => vec![json!({
            "id": format!("msg_in{number:016}"), "type": "message", "role": "user",
            "status": "completed", "content": [{"type": "input_text", "text": text}],
        })],
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    };
    shared.responses().insert(
        id.clone(),
        Stored {
            response: response.clone(),
            input_items,
        },
    );
    let interrupt = match failing {
        Some(FailMode::Cut { after_chunks }) => Some(Interrupt::Cut(after_chunks)),
        Some(FailMode::Stall { after_chunks }) => Some(Interrupt::Stall(after_chunks)),
        _ => None,
    };
    if body["stream"] != json!(true) {
        if interrupt.is_some() {
            return Response::builder()
                .status(200)
                .body(axum::body::Body::from_stream(futures_util::stream::once(
                    async { Err::<Bytes, std::io::Error>(std::io::Error::other("cut")) },
                )))
                .unwrap_or_default();
        }
        return axum::Json(response).into_response();
    }
    let mut frames = Vec::with_capacity(pieces.len() + 8);
    let mut sequence = 0;
    let mut event = |frames: &mut Vec<Bytes>, kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        frames.push(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")));
    };
    let full = response.clone();
    response["status"] = json!("in_progress");
    response["output"] = json!([]);
    response["usage"] = Value::Null;
    response["incomplete_details"] = Value::Null;
    event(
        &mut frames,
        "response.created",
        json!({"response": response}),
    );
    event(
        &mut frames,
        "response.in_progress",
        json!({"response": response}),
    );
    let item_id = full["output"][0]["id"].clone();
    let mut started = full["output"][0].clone();
    started["status"] = json!("in_progress");
    match &tool {
        Some(_) => {
            started["arguments"] = json!("");
            event(
                &mut frames,
                "response.output_item.added",
                json!({"output_index": 0, "item": started}),
            );
            for piece in &pieces {
                event(
                    &mut frames,
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": 0, "delta": piece}),
                );
            }
            event(
                &mut frames,
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": 0, "arguments": text, "name": tool}),
            );
        }
        None => {
            started["content"] = json!([]);
            event(
                &mut frames,
                "response.output_item.added",
                json!({"output_index": 0, "item": started}),
            );
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            event(
                &mut frames,
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
            );
            for piece in &pieces {
                event(
                    &mut frames,
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}),
                );
            }
            event(
                &mut frames,
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
            );
            let part = json!({"type": "output_text", "text": text, "annotations": []});
            event(
                &mut frames,
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
            );
        }
    }
    event(
        &mut frames,
        "response.output_item.done",
        json!({"output_index": 0, "item": full["output"][0]}),
    );
    let last = if cut {
        "response.incomplete"
    } else {
        "response.completed"
    };
    event(&mut frames, last, json!({"response": full}));
    if body["mock"]["malformed"] == json!(true) {
        frames.insert(
            1,
            Bytes::from_static(b"event: response.in_progress\ndata: {not json\n\n"),
        );
    }
    stream_response(shared, frames, interrupt)
}

pub(super) async fn retrieve(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    match shared.responses().get(&id) {
        Some(stored) => axum::Json(stored.response.clone()).into_response(),
        None => not_found(&id),
    }
}

pub(super) async fn delete(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.responses().remove(&id) {
        Some(_) => {
            axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
        }
        None => not_found(&id),
    }
}

/// Only a background response can be cancelled, and the mock answers none in the background.
pub(super) async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.responses().get(&id) {
        Some(_) => error_response(
            400,
            "invalid_request_error",
            "invalid_request",
            "Only responses created with background=true can be cancelled.",
        ),
        None => not_found(&id),
    }
}

pub(super) async fn input_items(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    match shared.responses().get(&id) {
        Some(stored) => {
            let data = &stored.input_items;
            axum::Json(json!({
                "object": "list", "data": data, "has_more": false,
                "first_id": data.first().map(|item| item["id"].clone()),
                "last_id": data.last().map(|item| item["id"].clone()),
            }))
            .into_response()
        }
        None => not_found(&id),
    }
}
