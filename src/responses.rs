//! OpenAI's Responses API beside chat completions. A `POST /v1/responses` takes the proxied
//! path of every endpoint (see `proxy`); this module holds what is particular to it: the chat
//! conversation a request amounts to (counted and routed as chat is), which model and key own
//! each response the gateway served, and the requests about a stored response (retrieve,
//! delete, cancel, input items), which go to the upstream that made it, for its key only.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dashmap::DashMap;
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::config::Model;
use crate::error::GatewayError;

/// The routes about stored responses (`POST /v1/responses` itself is a proxied endpoint).
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/responses/{id}", get(stored).delete(stored))
        .route("/v1/responses/{id}/cancel", post(cancel))
        .route("/v1/responses/{id}/input_items", get(input_items))
}

async fn stored(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
) -> Response {
    relay_stored(&app, &headers, method, &id, "", query.as_deref()).await
}

async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    relay_stored(&app, &headers, Method::POST, &id, "/cancel", None).await
}

async fn input_items(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    relay_stored(
        &app,
        &headers,
        Method::GET,
        &id,
        "/input_items",
        query.as_deref(),
    )
    .await
}

async fn relay_stored(
    app: &App,
    headers: &HeaderMap,
    method: Method,
    id: &str,
    suffix: &str,
    query: Option<&str>,
) -> Response {
    relay(app, headers, method, id, suffix, query)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn relay(
    app: &App,
    headers: &HeaderMap,
    method: Method,
    id: &str,
    suffix: &str,
    query: Option<&str>,
) -> Result<Response, GatewayError> {
    let key = crate::auth::bearer(headers)
        .and_then(|secret| app.keys.authenticate(secret))
        .ok_or(GatewayError::InvalidApiKey)?;
    // Another key's response is answered as one that does not exist: its id says nothing.
    let model = owner(app, id)
        .await
        .filter(|owner| owner.key_id == key.id)
        .and_then(|owner| app.config().model(&owner.model).cloned())
        .ok_or_else(|| GatewayError::ResponseNotFound(id.to_owned()))?;
    let path = match query {
        Some(query) => format!("/responses/{id}{suffix}?{query}"),
        None => format!("/responses/{id}{suffix}"),
    };
    let deleting = method == Method::DELETE;
    let reply = crate::upstream::relay(&model, method, &path).await?;
    if deleting && reply.status().is_success() {
        app.response_owners.forget(id);
    }
    let (parts, body) = reply.into_parts();
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = parts.status;
    for name in [
        axum::http::header::CONTENT_TYPE,
        axum::http::header::RETRY_AFTER,
    ] {
        if let Some(value) = parts.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Ok(response)
}

/// Who a response belongs to: the model that produced it and the key that asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub model: String,
    pub key_id: String,
    /// The tokens of the conversation up to and including this response, which the provider
    /// reads (and bills) again when it is continued.
    pub context_tokens: u64,
}

/// The owner of a response the gateway served within [`OWNERS_MS`]: from the responses served
/// lately here, else from the ledger, where every replica's requests are recorded.
pub async fn owner(app: &App, id: &str) -> Option<Owner> {
    if let Some(owner) = app.response_owners.owner(id) {
        return Some(owner);
    }
    let ledger = app.ledger.clone();
    let lookup = id.to_owned();
    let record = tokio::task::spawn_blocking(move || ledger.response(&lookup))
        .await
        .ok()?
        .inspect_err(|error| tracing::warn!(%error, "cannot look a response up in the ledger"))
        .ok()??;
    if record.started_at_ms <= crate::unix_ms() - OWNERS_MS {
        return None;
    }
    let owner = Owner {
        model: record.served_model.as_deref()?.to_owned(),
        key_id: record.key_id.as_deref()?.to_owned(),
        context_tokens: record.billed().total(),
    };
    app.response_owners.remember(id, owner.clone());
    Some(owner)
}

/// The owners of the responses served lately, bounded in number and age: the newest
/// [`OWNERS_MAX`] within [`OWNERS_MS`]. The ledger holds them all.
#[derive(Default)]
pub struct Owners(DashMap<String, (Owner, i64)>);

/// How long a response's owner is remembered: OpenAI keeps a stored response for 30 days.
const OWNERS_MS: i64 = 30 * 24 * 3_600_000;
const OWNERS_MAX: usize = 200_000;

impl Owners {
    pub fn remember(&self, id: &str, owner: Owner) {
        let now = crate::unix_ms();
        if self.0.len() >= OWNERS_MAX {
            self.0.retain(|_, (_, at)| *at > now - OWNERS_MS);
            if self.0.len() >= OWNERS_MAX {
                // The oldest tenth goes; a conversation continued later is routed afresh.
                let mut ages: Vec<i64> = self.0.iter().map(|entry| entry.value().1).collect();
                let cut = ages.len() / 10;
                let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
                let oldest_kept = *oldest_kept;
                self.0.retain(|_, (_, at)| *at >= oldest_kept);
            }
        }
        self.0.insert(id.to_owned(), (owner, now));
    }

    pub fn owner(&self, id: &str) -> Option<Owner> {
        let entry = self.0.get(id)?;
        let (owner, at) = entry.value();
        (*at > crate::unix_ms() - OWNERS_MS).then(|| owner.clone())
    }

    pub fn forget(&self, id: &str) {
        self.0.remove(id);
    }
}

/// Refuses what the gateway could not meter or could not check belongs to the key: a
/// background response (answered later, through retrieval), and a stored conversation or
/// stored items named by id, which the provider resolves across everything its account holds,
/// another tenant's included. `previous_response_id` is checked (see [`continued`]).
pub fn check_request(body: &Value) -> Result<(), GatewayError> {
    let refuse = |message: &str, param: &'static str| {
        Err(GatewayError::BadRequest {
            message: message.to_owned(),
            param: Some(param),
        })
    };
    if body["background"] == true {
        return refuse(
            "background responses are not supported by this gateway: their usage could not be metered; send the request without `background`",
            "background",
        );
    }
    if !body["conversation"].is_null() {
        return refuse(
            "stored conversations are not supported by this gateway: it cannot check that one belongs to your key; continue with `previous_response_id`",
            "conversation",
        );
    }
    let by_reference = body["input"]
        .as_array()
        .is_some_and(|items| items.iter().any(|item| item["type"] == "item_reference"));
    if by_reference {
        return refuse(
            "input items by reference are not supported by this gateway: it cannot check that they belong to your key; send the items themselves",
            "input",
        );
    }
    Ok(())
}

/// A conversation continued with `previous_response_id`: the model that produced that
/// response and the tokens the provider will read again.
pub struct Continued {
    pub model: Option<Arc<Model>>,
    pub context_tokens: u64,
}

/// The conversation a request continues by `previous_response_id`. Unless the client
/// names a model, it goes to the model that produced that response, so a conversation never
/// changes provider midway. A response this key does not own (another key's, or one the
/// gateway never served) is not found: the provider would otherwise hand one tenant's
/// conversation to another.
pub async fn continued(app: &App, previous: &str, key_id: &str) -> Result<Continued, GatewayError> {
    match owner(app, previous).await {
        Some(owner) if owner.key_id == key_id => Ok(Continued {
            model: app.config().model(&owner.model).cloned(),
            context_tokens: owner.context_tokens,
        }),
        _ => Err(GatewayError::ResponseNotFound(previous.to_owned())),
    }
}

/// The chat request a Responses request amounts to, which is what is counted, routed and
/// reserved:
/// `instructions` as the system message, `input` (a string, or items: messages with text,
/// image, audio and file parts, function calls and their outputs) as the conversation,
/// function tools in chat's shape (the provider's built-in tools by their type), and a JSON
/// schema text format as `response_format`.
pub fn as_chat(body: &Value) -> Value {
    let mut messages = Vec::new();
    if let Some(instructions) = body["instructions"].as_str() {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match &body["input"] {
        Value::String(text) => messages.push(json!({"role": "user", "content": text})),
        Value::Array(items) => messages.extend(items.iter().filter_map(chat_message)),
        _ => {}
    }
    let mut chat = Map::new();
    chat.insert("messages".to_owned(), Value::Array(messages));
    if let Some(tools) = body["tools"].as_array() {
        let tools = tools.iter().map(chat_tool).collect();
        chat.insert("tools".to_owned(), Value::Array(tools));
    }
    let format = &body["text"]["format"];
    if format["type"] == "json_schema" {
        let mut schema = format.clone();
        if let Some(schema) = schema.as_object_mut() {
            schema.remove("type");
        }
        chat.insert(
            "response_format".to_owned(),
            json!({"type": "json_schema", "json_schema": schema}),
        );
    }
    if let Some(limit) = body.get("max_output_tokens") {
        chat.insert("max_completion_tokens".to_owned(), limit.clone());
    }
    Value::Object(chat)
}

fn chat_message(item: &Value) -> Option<Value> {
    match item["type"].as_str() {
        Some("message") | None => {
            let content = match &item["content"] {
                Value::Array(parts) => Value::Array(parts.iter().map(chat_part).collect()),
                other => other.clone(),
            };
            Some(json!({"role": item["role"].as_str().unwrap_or("user"), "content": content}))
        }
        Some("function_call") => Some(json!({
            "role": "assistant",
            "tool_calls": [{
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }],
        })),
        Some("function_call_output") => Some(json!({
            "role": "tool",
            "tool_call_id": item["call_id"],
            "content": match &item["output"] {
                Value::String(text) => Value::String(text.clone()),
                other => Value::String(other.to_string()),
            },
        })),
        // Reasoning items are opaque (encrypted) and references name stored items.
        _ => None,
    }
}

fn chat_part(part: &Value) -> Value {
    match part["type"].as_str() {
        Some("input_text") | Some("output_text") => {
            json!({"type": "text", "text": part["text"]})
        }
        Some("refusal") => json!({"type": "text", "text": part["refusal"]}),
        Some("input_image") => json!({"type": "image_url"}),
        Some("input_audio") => json!({"type": "input_audio"}),
        _ => part.clone(),
    }
}

fn chat_tool(tool: &Value) -> Value {
    match tool["type"].as_str() {
        Some("function") => json!({
            "type": "function",
            "function": {
                "name": tool["name"],
                "description": tool["description"],
                "parameters": tool["parameters"],
            },
        }),
        kind => json!({"type": kind, "function": {"name": kind}}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responses_request_reads_as_the_chat_it_amounts_to() {
        let body = json!({
            "model": "auto",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [
                    {"type": "input_text", "text": "What is in this image?"},
                    {"type": "input_image", "image_url": "https://example.com/a.png"}
                ]},
                {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "a cat"},
                {"type": "reasoning", "encrypted_content": "xyz"}
            ],
            "tools": [
                {"type": "function", "name": "look", "description": "Look", "parameters": {"type": "object", "properties": {}}},
                {"type": "web_search"}
            ],
            "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}},
            "max_output_tokens": 300
        });
        assert_eq!(
            as_chat(&body),
            json!({
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url"}
                    ]},
                    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "a cat"}
                ],
                "tools": [
                    {"type": "function", "function": {"name": "look", "description": "Look", "parameters": {"type": "object", "properties": {}}}},
                    {"type": "web_search", "function": {"name": "web_search"}}
                ],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
                "max_completion_tokens": 300
            })
        );
        assert_eq!(
            as_chat(&json!({"input": "hi"})),
            json!({"messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn owners_are_bounded_and_forgotten() {
        let owners = Owners::default();
        let owner = Owner {
            model: "m".to_owned(),
            key_id: "k".to_owned(),
            context_tokens: 10,
        };
        owners.remember("resp_1", owner.clone());
        assert_eq!(owners.owner("resp_1"), Some(owner.clone()));
        owners.forget("resp_1");
        assert_eq!(owners.owner("resp_1"), None);
        for i in 0..OWNERS_MAX + 5 {
            owners.remember(&format!("resp_{i}"), owner.clone());
        }
        assert!(owners.0.len() <= OWNERS_MAX);
    }
}
