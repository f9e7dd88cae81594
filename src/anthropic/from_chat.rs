//! Chat completions served by a model whose upstream speaks Anthropic's Messages API: the
//! request is translated into a Messages request, and the answer — whole, streamed, or an
//! error — back into chat's shapes. What chat can ask and Messages cannot do (`n` > 1,
//! `logprobs`, a JSON-schema `response_format`, audio) is refused with a 400 naming it.

use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{invalid, translate_answer, unsupported, Events};
use crate::error::GatewayError;

/// The Messages request a chat completion request amounts to, for `upstream_model`;
/// `max_output` stands in for an absent `max_tokens`, which Messages requires.
pub fn messages_request(
    chat: &[u8],
    upstream_model: &str,
    max_output: u64,
) -> Result<Bytes, GatewayError> {
    let chat: Map<String, Value> = crate::json::from_slice(chat)
        .map_err(|error| GatewayError::bad_request(format!("invalid JSON: {error}")))?;
    if chat.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(unsupported("`n` above 1", "n"));
    }
    for (field, what) in [
        ("logprobs", "`logprobs`"),
        ("top_logprobs", "`top_logprobs`"),
        ("audio", "audio output"),
        ("prediction", "predicted outputs"),
    ] {
        if chat
            .get(field)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        {
            return Err(unsupported(what, field));
        }
    }
    if chat
        .get("response_format")
        .is_some_and(|format| format["type"] != "text" && !format.is_null())
    {
        return Err(unsupported("a JSON `response_format`", "response_format"));
    }
    let mut request = Map::new();
    request.insert("model".to_owned(), json!(upstream_model));
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|field| chat.get(*field).and_then(Value::as_u64))
        .unwrap_or(max_output);
    request.insert("max_tokens".to_owned(), json!(max_tokens));
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    let Some(Value::Array(messages)) = chat.get("messages") else {
        return Err(invalid("messages: Field required", "messages"));
    };
    for message in messages {
        let role = message["role"].as_str().unwrap_or("");
        match role {
            "system" | "developer" => system.push(plain_text(&message["content"])),
            "user" => push_turn(&mut turns, "user", user_blocks(&message["content"])?),
            "assistant" => {
                let mut blocks = Vec::new();
                let text = plain_text(&message["content"]);
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for call in message["tool_calls"].as_array().into_iter().flatten() {
                    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
                    }));
                }
                push_turn(&mut turns, "assistant", blocks);
            }
            "tool" => push_turn(
                &mut turns,
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"],
                    "content": plain_text(&message["content"]),
                })],
            ),
            _ => return Err(invalid("messages: unknown role", "messages")),
        }
    }
    if !system.is_empty() {
        request.insert("system".to_owned(), json!(system.join("\n\n")));
    }
    request.insert("messages".to_owned(), Value::Array(turns));
    if let Some(Value::Array(tools)) = chat.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .map(|tool| {
                let function = &tool["function"];
                let mut translated = json!({"name": function["name"],
                    "input_schema": function.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
                if let Some(description) = function["description"].as_str() {
                    translated["description"] = json!(description);
                }
                translated
            })
            .collect();
        request.insert("tools".to_owned(), Value::Array(tools));
    }
    let parallel = chat.get("parallel_tool_calls").and_then(Value::as_bool);
    let mut choice = match chat.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => return Err(invalid("tool_choice: unknown value", "tool_choice")),
        },
        Some(named) => Some(json!({"type": "tool", "name": named["function"]["name"]})),
    };
    if parallel == Some(false) {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(choice) = choice {
        request.insert("tool_choice".to_owned(), choice);
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
    ] {
        if let Some(value) = chat.get(from).filter(|v| !v.is_null()) {
            request.insert(to.to_owned(), value.clone());
        }
    }
    match chat.get("stop") {
        Some(Value::String(stop)) => {
            request.insert("stop_sequences".to_owned(), json!([stop]));
        }
        Some(stops @ Value::Array(_)) => {
            request.insert("stop_sequences".to_owned(), stops.clone());
        }
        _ => {}
    }
    if let Some(user) = chat.get("user").filter(|user| user.is_string()) {
        request.insert("metadata".to_owned(), json!({"user_id": user}));
    }
    if let Some(mock) = chat.get("mock") {
        request.insert("mock".to_owned(), mock.clone());
    }
    serde_json::to_vec(&Value::Object(request))
        .map(Bytes::from)
        .map_err(|error| GatewayError::Internal(format!("cannot encode the request: {error}")))
}

/// Consecutive turns of one role are one Messages turn (tool results follow each other).
fn push_turn(turns: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = turns.last_mut().filter(|last| last["role"] == role) {
        if let Some(content) = last["content"].as_array_mut() {
            content.extend(blocks);
            return;
        }
    }
    turns.push(json!({"role": role, "content": blocks}));
}

/// A chat message's text: the string, or its text parts joined.
fn plain_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn user_blocks(content: &Value) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        Value::String(text) => return Ok(vec![json!({"type": "text", "text": text})]),
        Value::Array(parts) => parts,
        _ => return Ok(Vec::new()),
    };
    parts
        .iter()
        .map(|part| match part["type"].as_str() {
            Some("text") => Ok(json!({"type": "text", "text": part["text"]})),
            Some("image_url") => {
                let url = part["image_url"]["url"].as_str().unwrap_or("");
                Ok(
                    match url
                        .strip_prefix("data:")
                        .and_then(|rest| rest.split_once(";base64,"))
                    {
                        Some((media_type, data)) => json!({"type": "image", "source":
                        {"type": "base64", "media_type": media_type, "data": data}}),
                        None => json!({"type": "image", "source": {"type": "url", "url": url}}),
                    },
                )
            }
            other => Err(unsupported(
                &format!("a `{}` content part", other.unwrap_or("untyped")),
                "messages",
            )),
        })
        .collect()
}

/// Chat's finish reason for an Anthropic stop reason.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Chat's usage for Anthropic's: the prompt includes cache reads and writes.
fn usage(anthropic: &Value) -> Value {
    let read = anthropic["cache_read_input_tokens"].as_u64().unwrap_or(0);
    let prompt = anthropic["input_tokens"].as_u64().unwrap_or(0)
        + read
        + anthropic["cache_creation_input_tokens"]
            .as_u64()
            .unwrap_or(0);
    let completion = anthropic["output_tokens"].as_u64().unwrap_or(0);
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": read}})
}

fn completion_id(message_id: &Value) -> String {
    format!("chatcmpl-{}", message_id.as_str().unwrap_or("tollgate"))
}

/// A whole Anthropic message as a chat completion.
fn to_completion(message: &Value, model: &str) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            _ => {}
        }
    }
    let mut reply = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !calls.is_empty() {
        reply["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": completion_id(&message["id"]),
        "object": "chat.completion",
        "created": crate::unix_ms() / 1000,
        "model": model,
        "choices": [{"index": 0, "message": reply, "logprobs": null,
            "finish_reason": finish_reason(message["stop_reason"].as_str().unwrap_or("end_turn"))}],
        "usage": usage(&message["usage"]),
    })
}

/// A Messages upstream's answer as a chat client expects it: a chat completion, a stream of
/// chunks (the usage chunk only if `include_usage`), or an error in OpenAI's shape.
pub async fn to_chat_answer(response: Response, model: &str, include_usage: bool) -> Response {
    let events = Chunks::new(model, include_usage);
    translate_answer(response, events, |status, bytes| {
        let parsed: Value = crate::json::from_slice(bytes).unwrap_or(Value::Null);
        match (status.is_success(), parsed["type"].as_str()) {
            (true, Some("message")) => Some(to_completion(&parsed, model)),
            (false, Some("error")) => Some(json!({"error": {
                "message": parsed["error"]["message"],
                "type": parsed["error"]["type"],
                "param": null,
                "code": null,
            }})),
            // Already OpenAI's shape: the gateway's own errors.
            _ => None,
        }
    })
    .await
}

/// The chat chunks of a Messages event stream.
struct Chunks {
    model: String,
    id: String,
    created: i64,
    include_usage: bool,
    /// Each content block's tool call number, for the tool use blocks.
    tools: Vec<(u64, u64)>,
    input_usage: Value,
}

impl Chunks {
    fn new(model: &str, include_usage: bool) -> Chunks {
        Chunks {
            model: model.to_owned(),
            id: String::new(),
            created: crate::unix_ms() / 1000,
            include_usage,
            tools: Vec::new(),
            input_usage: Value::Null,
        }
    }

    fn chunk(&self, out: &mut Vec<u8>, choices: Value, usage: Option<Value>) {
        let mut chunk = json!({"id": self.id, "object": "chat.completion.chunk",
            "created": self.created, "model": self.model, "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
    }

    fn delta(&self, out: &mut Vec<u8>, delta: Value) {
        self.chunk(
            out,
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]),
            None,
        );
    }

    fn message_event(&mut self, event: &Value, out: &mut Vec<u8>) {
        match event["type"].as_str() {
            Some("message_start") => {
                self.id = completion_id(&event["message"]["id"]);
                self.input_usage = event["message"]["usage"].clone();
                self.delta(out, json!({"role": "assistant", "content": ""}));
            }
            Some("content_block_start") if event["content_block"]["type"] == "tool_use" => {
                let number = self.tools.len() as u64;
                self.tools
                    .push((event["index"].as_u64().unwrap_or(0), number));
                let block = &event["content_block"];
                self.delta(
                    out,
                    json!({"tool_calls": [{"index": number, "id": block["id"], "type": "function",
                        "function": {"name": block["name"], "arguments": ""}}]}),
                );
            }
            Some("content_block_delta") => {
                let delta = &event["delta"];
                if let Some(text) = delta["text"].as_str() {
                    self.delta(out, json!({"content": text}));
                } else if let Some(json) = delta["partial_json"].as_str() {
                    let index = event["index"].as_u64().unwrap_or(0);
                    let number = self
                        .tools
                        .iter()
                        .find(|(block, _)| *block == index)
                        .map_or(0, |(_, number)| *number);
                    self.delta(
                        out,
                        json!({"tool_calls": [{"index": number, "function": {"arguments": json}}]}),
                    );
                }
            }
            Some("message_delta") => {
                let stop = event["delta"]["stop_reason"].as_str().unwrap_or("end_turn");
                self.chunk(
                    out,
                    json!([{"index": 0, "delta": {}, "logprobs": null,
                        "finish_reason": finish_reason(stop)}]),
                    None,
                );
                if self.include_usage {
                    let mut merged = self.input_usage.clone();
                    if !merged.is_object() {
                        merged = json!({});
                    }
                    merged["output_tokens"] = event["usage"]["output_tokens"].clone();
                    self.chunk(out, json!([]), Some(usage(&merged)));
                }
            }
            Some("message_stop") => out.extend_from_slice(b"data: [DONE]\n\n"),
            Some("error") => {
                let error = json!({"error": {"message": event["error"]["message"],
                    "type": event["error"]["type"]}});
                out.extend_from_slice(format!("data: {error}\n\n").as_bytes());
            }
            _ => {}
        }
    }
}

impl Events for Chunks {
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if let Ok(event) = crate::json::from_slice::<Value>(data) {
            self.message_event(&event, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_becomes_the_messages_request_it_amounts_to() {
        let chat = json!({
            "model": "auto", "stream": true, "temperature": 0.2, "stop": "END", "user": "u-1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"at\":1}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "{\"at\":2}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "tool", "tool_call_id": "call_2", "content": "a dog"}
            ],
            "tools": [{"type": "function", "function": {"name": "look", "description": "Look",
                "parameters": {"type": "object", "properties": {"at": {"type": "integer"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false
        });
        let request: Value = serde_json::from_slice(
            &messages_request(chat.to_string().as_bytes(), "claude-x", 4096).unwrap(),
        )
        .unwrap();
        assert_eq!(
            request,
            json!({
                "model": "claude-x", "max_tokens": 4096, "system": "Be brief.",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is here?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "look", "input": {"at": 1}},
                        {"type": "tool_use", "id": "call_2", "name": "look", "input": {"at": 2}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "a dog"}
                    ]}
                ],
                "tools": [{"name": "look", "description": "Look",
                    "input_schema": {"type": "object", "properties": {"at": {"type": "integer"}}}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "temperature": 0.2, "stream": true, "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"}
            })
        );
        let mut two = chat.clone();
        two["n"] = json!(2);
        assert!(messages_request(two.to_string().as_bytes(), "claude-x", 1).is_err());
        let mut schema = chat.clone();
        schema["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x"}});
        assert!(messages_request(schema.to_string().as_bytes(), "claude-x", 1).is_err());
    }

    #[test]
    fn a_messages_stream_becomes_chat_chunks() {
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":20,"cache_read_input_tokens":5,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me look."}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"look","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"at\":"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"1}"}}"#,
            r#"{"type":"content_block_stop","index":1}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":12}}"#,
            r#"{"type":"message_stop"}"#,
        ];
        let stream: String = events
            .iter()
            .map(|e| format!("event: x\ndata: {e}\n\n"))
            .collect();
        let mut chunks = Chunks::new("claude-x", true);
        let mut partial = bytes::BytesMut::new();
        let out: Vec<u8> = stream
            .as_bytes()
            .chunks(5)
            .flat_map(|piece| super::super::translate(&mut chunks, &mut partial, piece).to_vec())
            .collect();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        let parsed: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let deltas: Vec<&Value> = parsed.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
        assert_eq!(deltas[1], &json!({"content": "Let me look."}));
        assert_eq!(deltas[2]["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(
            deltas[3]["tool_calls"][0]["function"]["arguments"],
            "{\"at\":"
        );
        assert_eq!(parsed[5]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            parsed[6]["usage"],
            json!({"prompt_tokens": 25, "completion_tokens": 12, "total_tokens": 37,
                "prompt_tokens_details": {"cached_tokens": 5}})
        );
        assert!(parsed.iter().all(|c| c["id"] == "chatcmpl-msg_1"));
    }
}
