//! Anthropic's Messages API through the gateway, served by OpenAI-compatible models: the
//! official Anthropic Python SDK, unmodified, sees Anthropic's shapes; the ledger sees one
//! metered row per request, as for chat.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::Harness;
use serde_json::{json, Value};
use tollgate::api::Endpoint;
use tollgate::mock_upstream::MockOptions;

const ROUTER: &str = r#"
[router]
virtual_model = "auto"
default = "cheap"
"#;

/// An upstream that speaks the Messages API (the mock again), with a model on it.
const CLAUDE: &str = r#"
[upstreams.claude]
kind = "anthropic"
base_url = "$MOCK_URL"
api_key_env = "TOLLGATE_TEST_PROVIDER_KEY"

[models."claude-sonnet"]
upstream = "claude"
tier = "frontier"
input_per_mtok = 3.0
cached_input_per_mtok = 0.3
cache_write_input_per_mtok = 3.75
output_per_mtok = 15.0
max_output_tokens = 8192
"#;

/// Runs the SDK script against the gateway with `model`; what it saw.
async fn sdk(gw: &Harness, model: &str) -> Value {
    let poor = gw
        .create_key(json!({"name": format!("poor-{model}"), "budget_usd": 0.000001}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (base_url, key, model) = (gw.url.clone(), gw.key.clone(), model.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        common::run_python("sdk_anthropic.py", &[&base_url, &key, &poor, &model], &[])
    })
    .await
    .unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_through_the_gateway() {
    let gw = Harness::start_with(MockOptions::default(), ROUTER).await;
    let seen = sdk(&gw, "gpt-4o-mini").await;

    assert_eq!(seen["plain"]["type"], "message");
    assert_eq!(seen["plain"]["role"], "assistant");
    assert_eq!(seen["plain"]["text"], " the quick brown fox jumps");
    assert_eq!(seen["plain"]["stop_reason"], "end_turn");
    // (3 + "system" 1 + "Be brief." 3) + (3 + "user" 1 + "Say hi" 2) + 3 = 16.
    assert_eq!(seen["plain"]["usage"]["input_tokens"], 16);
    assert_eq!(seen["plain"]["usage"]["output_tokens"], 5);
    assert_eq!(seen["plain"]["headers"]["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(seen["plain"]["headers"]["x-tollgate-route"], "direct");

    assert_eq!(seen["stream"]["text"], seen["stream"]["final_text"]);
    assert_eq!(
        seen["stream"]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        7
    );
    assert_eq!(seen["stream"]["stop_reason"], "end_turn");
    assert_eq!(seen["stream"]["usage"]["output_tokens"], 7);

    for tool in ["tool", "streamed_tool"] {
        assert_eq!(seen[tool]["name"], "get_weather", "{tool}");
        assert_eq!(seen[tool]["input"], json!({"city": "Oslo"}), "{tool}");
        assert_eq!(seen[tool]["stop_reason"], "tool_use", "{tool}");
    }
    assert_eq!(seen["answered"]["text"], " the quick brown fox");
    assert_eq!(seen["answered"]["stop_reason"], "end_turn");
    assert_eq!(seen["count"], 16);

    assert_eq!(seen["untranslatable"]["status"], 400);
    assert_eq!(seen["untranslatable"]["type"], "invalid_request_error");
    assert!(seen["untranslatable"]["message"]
        .as_str()
        .unwrap()
        .contains("thinking"));
    assert_eq!(seen["refused"]["status"], 429);
    assert_eq!(seen["refused"]["type"], "rate_limit_error");
    assert_eq!(seen["unauthenticated"]["status"], 401);
    assert_eq!(seen["unauthenticated"]["type"], "authentication_error");

    let records = gw.usage_records(7).await;
    let messages: Vec<_> = records
        .iter()
        .filter(|r| r.endpoint == Endpoint::Messages)
        .collect();
    assert_eq!(
        messages.len(),
        7,
        "five answered (counting tokens is not metered), the untranslatable and the refused"
    );
    let plain = messages[0];
    assert_eq!((plain.counted.input, plain.counted.output), (16, 5));
    assert_eq!(plain.reported.unwrap().input, 16);
    assert_eq!(plain.charge.nanos(), 16 * 150 + 5 * 600);
    assert!(messages[1].streamed);
    assert_eq!(messages[1].counted.output, 7);
}

/// A model whose upstream speaks Messages gets the client's request as sent (its model name
/// changed), with the provider key in `x-api-key` and an `anthropic-version`; its answers and
/// events reach the client as they are, and are metered from Anthropic's usage (cache reads and
/// writes included in the input) with the own count marked as an estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_an_anthropic_upstream_is_served_natively() {
    let extra = format!("{ROUTER}{CLAUDE}");
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    let seen = sdk(&gw, "claude-sonnet").await;
    assert_eq!(seen["plain"]["text"], " the quick brown fox jumps");
    assert_eq!(
        seen["plain"]["usage"]["input_tokens"], 25,
        "the mock's fixed prompt"
    );
    assert_eq!(seen["plain"]["usage"]["output_tokens"], 5);
    assert_eq!(
        seen["plain"]["headers"]["x-tollgate-model"],
        "claude-sonnet"
    );
    assert_eq!(seen["stream"]["text"], seen["stream"]["final_text"]);
    assert_eq!(seen["stream"]["usage"]["output_tokens"], 7);
    for tool in ["tool", "streamed_tool"] {
        assert_eq!(seen[tool]["input"], json!({"city": "Oslo"}), "{tool}");
        assert_eq!(seen[tool]["stop_reason"], "tool_use", "{tool}");
    }

    let cached = gw
        .http
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &gw.key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hi"}],
            "mock": {"prompt_tokens": 1000, "cached_tokens": 600, "cache_write_tokens": 300,
                "reply_tokens": 4}}))
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 200);
    let sent = gw.mock.stats().last_headers;
    assert_eq!(sent["x-api-key"], common::PROVIDER_KEY);
    assert!(!sent.contains_key("authorization"));
    assert!(sent.contains_key("anthropic-version"));
    let records = gw.usage_records(8).await;
    let native: Vec<_> = records
        .iter()
        .filter(|r| r.served_model.as_deref() == Some("claude-sonnet"))
        .collect();
    assert!(native.iter().all(|r| r.counted_estimate));
    let last = native.last().unwrap();
    let reported = last.reported.unwrap();
    assert_eq!(
        (
            reported.input,
            reported.cached_input,
            reported.cache_write_input,
            reported.output
        ),
        (1000, 600, 300, 4)
    );
    // 100 plain × $3 + 600 read × $0.30 + 300 written × $3.75 + 4 × $15 per million.
    assert_eq!(
        last.charge.nanos(),
        100 * 3_000 + 600 * 300 + 300 * 3_750 + 4 * 15_000
    );
    let stored = gw.app.ledger.record(&last.request_id).unwrap().unwrap();
    assert_eq!(
        stored.reported, last.reported,
        "cache writes reach the ledger"
    );

    // An overloaded provider's 529 reaches the client as it was sent, after the retries.
    let overloaded = gw
        .http
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &gw.key)
        .json(&json!({"model": "claude-sonnet", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hi"}], "mock": {"fail": "529"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(overloaded.status(), 529);
    let error: Value = overloaded.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "overloaded_error");

    // The Responses API has no translation to Messages yet.
    let responses = gw
        .post("/v1/responses")
        .json(&json!({"model": "claude-sonnet", "input": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(responses.status(), 400);
    let error: Value = responses.json().await.unwrap();
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/messages"));
}

/// An OpenAI chat request with tools, whole and streamed, served by a model on an Anthropic
/// upstream: the upstream is sent a Messages request, and the client gets chat's shapes back,
/// field by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_are_served_by_an_anthropic_model() {
    let extra = format!("{ROUTER}{CLAUDE}");
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({"model": "claude-sonnet", "max_tokens": 64,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Weather in Oslo?"}],
        "tools": tools, "mock": {"tool_call": true, "reply": "{\"city\": \"Oslo\"}"}});
    let answer = gw.chat(body.clone()).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-tollgate-model"], "claude-sonnet");
    let answer: Value = answer.json().await.unwrap();
    let sent = gw.mock.stats().last_body;
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert!(answer["id"].as_str().unwrap().starts_with("chatcmpl-msg_"));
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "claude-sonnet");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
    assert_eq!(answer["usage"]["prompt_tokens"], 25);
    assert_eq!(answer["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = gw.chat(streamed.clone()).await.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let arguments: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Oslo\"}");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("tool_calls")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 25);

    streamed["stream_options"] = Value::Null;
    let plain = gw.chat(streamed).await.text().await.unwrap();
    assert!(
        !plain.contains("\"usage\""),
        "a usage chunk nobody asked for: {plain}"
    );

    let records = gw.usage_records(3).await;
    for record in &records {
        assert_eq!(record.served_model.as_deref(), Some("claude-sonnet"));
        assert!(record.counted_estimate);
        assert_eq!(record.reported.unwrap().input, 25);
    }
    assert!(records
        .iter()
        .all(|r| r.reported.unwrap().output == records[0].reported.unwrap().output));
}

/// Throttle refusals in each API's shape: OpenAI's `rate_limit_exceeded` on the Responses API,
/// Anthropic's `rate_limit_error` on Messages, both with `retry-after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttles_refuse_in_each_apis_shape() {
    let gw = Harness::start().await;
    let key = gw.create_key(json!({"name": "slow", "rpm": 1})).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let message = |key: &str| {
        gw.http
            .post(format!("{}/v1/messages", gw.url))
            .header("x-api-key", key)
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
    };
    assert_eq!(message(&key).await.unwrap().status(), 200);
    let refused = message(&key).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "rate_limit_error");

    let responses = gw
        .http
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "input": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(responses.status(), 429);
    assert!(responses.headers().contains_key("retry-after"));
    let error: Value = responses.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
}
