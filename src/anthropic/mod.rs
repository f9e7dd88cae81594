//! Anthropic's Messages API in front of OpenAI-compatible models. A `POST /v1/messages` is
//! translated into the chat completion it amounts to, which then takes chat's whole path
//! (key, throttles, budget, routing, counting, ledger); the answer — whole, streamed, or an
//! error — is translated back into Anthropic's shapes. What has no chat equivalent is refused
//! with a 400 naming it, never silently dropped: extended `thinking`, `top_k`, document and
//! search-result blocks, server tools. `cache_control` marks are dropped: they change what a
//! provider caches, not what it answers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

mod from_chat;

pub use from_chat::{messages_request, to_chat_answer};

use crate::app::App;
use crate::error::GatewayError;
use crate::meter::tokenizer::Encoding;

/// The client's key: `x-api-key`, as Anthropic's SDKs send it, or a bearer token.
pub fn secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .or_else(|| crate::auth::bearer(headers))
}

fn unsupported(what: &str, param: &'static str) -> GatewayError {
    GatewayError::BadRequest {
        message: format!(
            "{what} cannot be translated for the OpenAI-compatible model this request goes to"
        ),
        param: Some(param),
    }
}

fn invalid(message: &str, param: &'static str) -> GatewayError {
    GatewayError::BadRequest {
        message: message.to_owned(),
        param: Some(param),
    }
}

/// The chat completion request a Messages request amounts to, as JSON bytes, and its model.
pub fn to_chat(bytes: &[u8]) -> Result<Bytes, GatewayError> {
    let request: Map<String, Value> = match crate::json::from_slice(bytes) {
        Ok(Value::Object(request)) => request,
        Ok(_) => return Err(GatewayError::bad_request("the body must be a JSON object")),
        Err(error) => {
            return Err(GatewayError::bad_request(format!(
                "We could not parse the JSON body of your request: {error}"
            )))
        }
    };
    for (field, what) in [
        ("thinking", "extended thinking (`thinking`)"),
        ("top_k", "`top_k`"),
        ("mcp_servers", "MCP servers (`mcp_servers`)"),
        ("container", "a code execution `container`"),
    ] {
        if request.get(field).is_some_and(|value| !value.is_null()) {
            return Err(unsupported(what, field));
        }
    }
    let mut chat = Map::new();
    chat.insert(
        "model".to_owned(),
        request.get("model").cloned().unwrap_or(Value::Null),
    );
    let max_tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid("max_tokens: Field required", "max_tokens"))?;
    chat.insert("max_completion_tokens".to_owned(), json!(max_tokens));
    let mut messages = Vec::new();
    match request.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(Value::Array(blocks)) => {
            let text = text_of(blocks, "system")?;
            messages.push(json!({"role": "system", "content": text}));
        }
        Some(_) => return Err(invalid("system: must be a string or text blocks", "system")),
    }
    let Some(Value::Array(turns)) = request.get("messages") else {
        return Err(invalid("messages: Field required", "messages"));
    };
    for turn in turns {
        translate_turn(turn, &mut messages)?;
    }
    chat.insert("messages".to_owned(), Value::Array(messages));
    if let Some(Value::Array(tools)) = request.get("tools") {
        let tools = tools.iter().map(chat_tool).collect::<Result<Vec<_>, _>>()?;
        chat.insert("tools".to_owned(), Value::Array(tools));
    }
    if let Some(choice) = request.get("tool_choice").filter(|c| !c.is_null()) {
        let (choice, parallel) = tool_choice(choice)?;
        chat.insert("tool_choice".to_owned(), choice);
        if let Some(parallel) = parallel {
            chat.insert("parallel_tool_calls".to_owned(), json!(parallel));
        }
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stop_sequences", "stop"),
        ("stream", "stream"),
    ] {
        if let Some(value) = request.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.to_owned(), value.clone());
        }
    }
    if let Some(user) = request
        .get("metadata")
        .and_then(|metadata| metadata.get("user_id"))
        .filter(|user| user.is_string())
    {
        chat.insert("user".to_owned(), user.clone());
    }
    if request.get("stream") == Some(&Value::Bool(true)) {
        // The translated stream's closing event carries the usage.
        chat.insert("stream_options".to_owned(), json!({"include_usage": true}));
    }
    // Steering for the mock upstream passes on like any unknown field would.
    if let Some(mock) = request.get("mock") {
        chat.insert("mock".to_owned(), mock.clone());
    }
    serde_json::to_vec(&Value::Object(chat))
        .map(Bytes::from)
        .map_err(|error| GatewayError::Internal(format!("cannot encode the request: {error}")))
}

/// Text blocks joined, for where chat takes one string (a system prompt, a tool result).
fn text_of(blocks: &[Value], param: &'static str) -> Result<String, GatewayError> {
    let mut text = String::new();
    for block in blocks {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or("")),
            other => {
                return Err(unsupported(
                    &format!("a `{}` block here", other.unwrap_or("untyped")),
                    param,
                ))
            }
        }
    }
    Ok(text)
}

/// One Messages turn as chat messages: a user turn's tool results become `tool` messages
/// (before its other content, as chat requires them right after the calls); an assistant
/// turn's tool uses become `tool_calls`.
fn translate_turn(turn: &Value, messages: &mut Vec<Value>) -> Result<(), GatewayError> {
    let role = match turn["role"].as_str() {
        Some(role @ ("user" | "assistant")) => role,
        _ => {
            return Err(invalid(
                "messages: each role must be user or assistant",
                "messages",
            ))
        }
    };
    let blocks = match &turn["content"] {
        Value::String(text) => {
            messages.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => {
            return Err(invalid(
                "messages: content must be a string or blocks",
                "messages",
            ))
        }
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block["type"].as_str() {
            Some("text") => parts.push(json!({"type": "text", "text": block["text"]})),
            Some("image") => parts.push(image_part(&block["source"])?),
            Some("tool_use") if role == "assistant" => calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            Some("tool_result") if role == "user" => {
                let content = match &block["content"] {
                    Value::String(text) => text.clone(),
                    Value::Array(blocks) => text_of(blocks, "messages")?,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                messages.push(json!({
                    "role": "tool",
                    "tool_call_id": block["tool_use_id"],
                    "content": content,
                }));
            }
            other => {
                return Err(unsupported(
                    &format!(
                        "a `{}` content block in a {role} turn",
                        other.unwrap_or("untyped")
                    ),
                    "messages",
                ))
            }
        }
    }
    if role == "assistant" {
        let text: String = parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect();
        let mut message = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        if !text.is_empty() || message.get("tool_calls").is_some() {
            messages.push(message);
        }
    } else if !parts.is_empty() {
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(source: &Value) -> Result<Value, GatewayError> {
    let url = match source["type"].as_str() {
        Some("base64") => format!(
            "data:{};base64,{}",
            source["media_type"].as_str().unwrap_or("image/png"),
            source["data"].as_str().unwrap_or("")
        ),
        Some("url") => source["url"].as_str().unwrap_or("").to_owned(),
        _ => return Err(unsupported("an image given by file id", "messages")),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn chat_tool(tool: &Value) -> Result<Value, GatewayError> {
    match tool["type"].as_str() {
        None | Some("custom") => Ok(json!({
            "type": "function",
            "function": {
                "name": tool["name"],
                "description": tool["description"],
                "parameters": tool["input_schema"],
            },
        })),
        Some(kind) => Err(unsupported(&format!("the server tool `{kind}`"), "tools")),
    }
}

/// `tool_choice` in chat's terms, and `parallel_tool_calls` when it disables them.
fn tool_choice(choice: &Value) -> Result<(Value, Option<bool>), GatewayError> {
    let parallel = choice["disable_parallel_tool_use"]
        .as_bool()
        .map(|disabled| !disabled);
    let chat = match choice["type"].as_str() {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
        _ => return Err(invalid("tool_choice: unknown type", "tool_choice")),
    };
    Ok((chat, parallel))
}

/// Anthropic's reason for a chat finish reason.
fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage: its `input_tokens` leave out what was read from the cache.
fn usage(chat: &Value) -> Value {
    let prompt = chat["prompt_tokens"].as_u64().unwrap_or(0);
    let cached = chat["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(prompt);
    json!({
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": chat["completion_tokens"].as_u64().unwrap_or(0),
    })
}

fn message_id(chat_id: &Value) -> String {
    format!("msg_{}", chat_id.as_str().unwrap_or("tollgate"))
}

/// A whole chat completion as an Anthropic message.
fn to_message(chat: &Value, model: &str) -> Value {
    let choice = &chat["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|text| !text.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    if let Some(refusal) = message["refusal"].as_str() {
        content.push(json!({"type": "text", "text": refusal}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        content.push(json!({
            "type": "tool_use",
            "id": call["id"],
            "name": call["function"]["name"],
            "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
        }));
    }
    json!({
        "id": message_id(&chat["id"]),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str().unwrap_or("stop")),
        "stop_sequence": null,
        "usage": usage(&chat["usage"]),
    })
}

/// Anthropic's error type for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An answer of chat's path as the Messages client expects it: a whole message, a stream of
/// Messages events, or an error in Anthropic's shape (status and headers kept). A `native`
/// answer, from an upstream that speaks Messages, is already in those shapes.
pub async fn to_messages(
    response: Response,
    model: &str,
    counted_input: u64,
    native: bool,
) -> Response {
    if native && response.status().is_success() {
        return response;
    }
    let events = Translator::new(model, counted_input);
    translate_answer(response, events, |status, bytes| {
        let parsed: Value = crate::json::from_slice(bytes).unwrap_or(Value::Null);
        if parsed["type"] == "error" {
            return None;
        }
        Some(if status.is_success() {
            to_message(&parsed, model)
        } else {
            let message = parsed["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
            json!({"type": "error", "error": {"type": error_type(status), "message": message}})
        })
    })
    .await
}

/// An answer in one API's shapes turned into another's, its status and headers kept: an event
/// stream by `events` as it arrives; a whole body by `whole`, whose JSON replaces it (`None`
/// keeps the body as it is).
async fn translate_answer<E: Events + Send + Unpin + 'static>(
    response: Response,
    events: E,
    whole: impl FnOnce(StatusCode, &[u8]) -> Option<Value>,
) -> Response {
    let status = response.status();
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    let (mut parts, body) = response.into_parts();
    if status.is_success() && is_stream {
        let stream = Translated::new(body.into_data_stream(), events);
        return Response::from_parts(parts, Body::from_stream(stream));
    }
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Some(translated) = whole(status, &bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(translated.to_string()))
}

/// The Messages events of a chat completion stream, event by event.
struct Translator {
    model: String,
    id: Option<String>,
    input_tokens: u64,
    /// The open content block: its index, and the tool call index it holds (for tool use).
    open: Option<(u64, Option<u64>)>,
    next_index: u64,
    stop_reason: &'static str,
    usage: Option<Value>,
}

impl Translator {
    fn new(model: &str, input_tokens: u64) -> Translator {
        Translator {
            model: model.to_owned(),
            id: None,
            input_tokens,
            open: None,
            next_index: 0,
            stop_reason: "end_turn",
            usage: None,
        }
    }

    fn event(out: &mut Vec<u8>, kind: &str, data: Value) {
        out.extend_from_slice(format!("event: {kind}\ndata: {data}\n\n").as_bytes());
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if self.id.is_none() {
            let id = message_id(&chunk["id"]);
            Translator::event(
                out,
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
                }}),
            );
            self.id = Some(id);
        }
        if chunk["usage"].is_object() {
            self.usage = Some(usage(&chunk["usage"]));
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|text| !text.is_empty()) {
            self.open_block(out, None, &json!({"type": "text", "text": ""}));
            let index = self.next_index - 1;
            Translator::event(
                out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let tool = call["index"].as_u64().unwrap_or(0);
            if call["id"].is_string() || self.open.is_none_or(|(_, open)| open != Some(tool)) {
                let block = json!({"type": "tool_use", "id": call["id"],
                    "name": call["function"]["name"], "input": {}});
                self.open_block(out, Some(tool), &block);
            }
            if let Some(arguments) = call["function"]["arguments"]
                .as_str()
                .filter(|arguments| !arguments.is_empty())
            {
                let index = self.next_index - 1;
                Translator::event(
                    out,
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                );
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.stop_reason = stop_reason(finish);
        }
    }

    /// Opens a block of a new kind (or a new tool call), closing the one open.
    fn open_block(&mut self, out: &mut Vec<u8>, tool: Option<u64>, block: &Value) {
        if let Some((_, open_tool)) = self.open {
            if tool.is_none() && open_tool.is_none() {
                return;
            }
        }
        self.close_block(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((index, tool));
        Translator::event(
            out,
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            Translator::event(
                out,
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.id.is_none() {
            return;
        }
        self.close_block(out);
        let usage = self
            .usage
            .take()
            .unwrap_or_else(|| json!({"input_tokens": self.input_tokens, "output_tokens": 0}));
        Translator::event(
            out,
            "message_delta",
            json!({"type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": null},
                "usage": usage}),
        );
        Translator::event(out, "message_stop", json!({"type": "message_stop"}));
        self.id = None;
    }
}

impl Events for Translator {
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if data == b"[DONE]" {
            self.finish(out);
        } else if let Ok(chunk) = crate::json::from_slice::<Value>(data) {
            self.chunk(&chunk, out);
        }
    }

    /// A provider may end without `[DONE]`: the stream's end closes the message.
    fn end(&mut self, out: &mut Vec<u8>) {
        self.finish(out);
    }
}

/// One API's stream events turned into another's, event by event.
trait Events {
    /// Translates one complete event, given its `data`.
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>);

    /// What the end of the stream adds.
    fn end(&mut self, _out: &mut Vec<u8>) {}
}

/// Translates the complete events in `partial` and `chunk`, keeping an unfinished one.
fn translate(events: &mut impl Events, partial: &mut BytesMut, chunk: &[u8]) -> Bytes {
    partial.extend_from_slice(chunk);
    let mut out = Vec::new();
    while let Some(end) = crate::stream::first_event_end(partial) {
        let event = partial.split_to(end);
        if let Some(data) = crate::stream::event_data(&event) {
            events.event(data, &mut out);
        }
    }
    Bytes::from(out)
}

/// An answer's event stream, translated as its events arrive.
struct Translated<S, E> {
    upstream: S,
    events: E,
    partial: BytesMut,
    done: bool,
}

impl<S, E> Translated<S, E> {
    fn new(upstream: S, events: E) -> Translated<S, E> {
        Translated {
            upstream,
            events,
            partial: BytesMut::new(),
            done: false,
        }
    }
}

impl<S, E> Stream for Translated<S, E>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    E: Events + Unpin,
{
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.upstream).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = translate(&mut this.events, &mut this.partial, &chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    this.done = true;
                    let mut out = Vec::new();
                    this.events.end(&mut out);
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Bytes::from(out))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// `POST /v1/messages/count_tokens`: the input tokens of a Messages request, counted as the
/// chat completion it amounts to, with the model's encoding (o200k_base for the virtual
/// model). Not metered: it costs the provider nothing.
pub async fn count_tokens(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let counted = (|| {
        secret(&headers)
            .and_then(|secret| app.keys.authenticate(secret))
            .ok_or(GatewayError::InvalidApiKey)?;
        let mut request: Value = serde_json::from_slice(&body)
            .map_err(|error| GatewayError::bad_request(format!("invalid JSON: {error}")))?;
        // Counting needs no output limit.
        if request.get("max_tokens").is_none() {
            request["max_tokens"] = json!(1);
        }
        let chat: Value = serde_json::from_slice(&to_chat(request.to_string().as_bytes())?)
            .map_err(|error| GatewayError::Internal(error.to_string()))?;
        let config = app.config();
        let model = chat["model"].as_str().unwrap_or("");
        let encoding = config
            .model(model)
            .map_or(Encoding::O200kBase, |model| model.encoding);
        Ok::<u64, GatewayError>(app.tokenizer.count_chat_prompt(encoding, &chat))
    })();
    match counted {
        Ok(tokens) => axum::Json(json!({"input_tokens": tokens})).into_response(),
        Err(error) => error_response(error),
    }
}

/// A gateway error in Anthropic's shape, its status and headers kept.
pub fn error_response(error: GatewayError) -> Response {
    let response = error.into_response();
    let status = response.status();
    let (mut parts, body) = response.into_parts();
    let message = futures_util::FutureExt::now_or_never(body.collect())
        .and_then(Result::ok)
        .and_then(|b| serde_json::from_slice::<Value>(&b.to_bytes()).ok())
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = json!({"type": "error", "error": {"type": error_type(status), "message": message}});
    Response::from_parts(parts, Body::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_request_becomes_the_chat_completion_it_amounts_to() {
        let request = json!({
            "model": "auto", "max_tokens": 300, "stream": true,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"at": "image"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a cat"}]},
                    {"type": "text", "text": "And?"}
                ]}
            ],
            "tools": [{"name": "look", "description": "Look", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "temperature": 0.5,
            "metadata": {"user_id": "u-1"}
        });
        let chat: Value =
            serde_json::from_slice(&to_chat(request.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            chat,
            json!({
                "model": "auto",
                "max_completion_tokens": 300,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is here?"},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
                    ]},
                    {"role": "assistant", "content": "Let me look.", "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": "{\"at\":\"image\"}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
                    {"role": "user", "content": [{"type": "text", "text": "And?"}]}
                ],
                "tools": [{"type": "function", "function": {"name": "look", "description": "Look", "parameters": {"type": "object"}}}],
                "tool_choice": "required",
                "parallel_tool_calls": false,
                "temperature": 0.5,
                "stop": ["END"],
                "stream": true,
                "user": "u-1",
                "stream_options": {"include_usage": true}
            })
        );
        for (field, value) in [
            (
                "thinking",
                json!({"type": "enabled", "budget_tokens": 1024}),
            ),
            ("top_k", json!(5)),
        ] {
            let mut refused = request.clone();
            refused[field] = value;
            let error = to_chat(refused.to_string().as_bytes()).unwrap_err();
            assert!(error.to_string().contains(field), "{error}");
        }
        let mut search = request.clone();
        search["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
        assert!(to_chat(search.to_string().as_bytes()).is_err());
    }

    #[test]
    fn a_chat_completion_becomes_an_anthropic_message() {
        let chat = json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Checking.",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"at\":1}"}}]
            }}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 10}}
        });
        assert_eq!(
            to_message(&chat, "gpt-4o-mini"),
            json!({
                "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-4o-mini",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "look", "input": {"at": 1}}
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10, "output_tokens": 9}
            })
        );
    }

    #[test]
    fn a_chat_stream_becomes_messages_events_however_it_is_cut() {
        let chunks = [
            r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"look","arguments":""}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"at\":"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7}}"#,
        ];
        let mut stream = String::new();
        for chunk in chunks {
            stream.push_str(&format!("data: {chunk}\n\n"));
        }
        stream.push_str("data: [DONE]\n\n");
        let events = |pieces: &[&[u8]]| -> Vec<Value> {
            let mut translator = Translator::new("gpt-4o-mini", 12);
            let mut partial = BytesMut::new();
            let out: Vec<u8> = pieces
                .iter()
                .flat_map(|piece| translate(&mut translator, &mut partial, piece).to_vec())
                .collect();
            String::from_utf8(out)
                .unwrap()
                .split("\n\n")
                .filter_map(|event| {
                    event
                        .split_once("data: ")
                        .map(|(_, data)| serde_json::from_str(data).unwrap())
                })
                .collect()
        };
        let whole = events(&[stream.as_bytes()]);
        let kinds: Vec<&str> = whole.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(whole[0]["message"]["usage"]["input_tokens"], 12);
        assert_eq!(
            whole[2]["delta"],
            json!({"type": "text_delta", "text": "Hi"})
        );
        assert_eq!(
            whole[4]["content_block"],
            json!({"type": "tool_use", "id": "call_1", "name": "look", "input": {}})
        );
        assert_eq!(whole[4]["index"], 1);
        assert_eq!(
            whole[5]["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"at\":"})
        );
        assert_eq!(whole[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(whole[8]["usage"]["output_tokens"], 7);
        let bytes = stream.as_bytes();
        let cut: Vec<&[u8]> = bytes.chunks(7).collect();
        assert_eq!(events(&cut), whole);
    }
}
