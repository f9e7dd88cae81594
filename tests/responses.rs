//! OpenAI's Responses API through the gateway: metered, capped, routed and written to the
//! ledger as chat completions are, and stored responses reachable only by the key that made
//! them, at the upstream that made them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::Harness;
use serde_json::{json, Value};
use tollgate::api::Endpoint;
use tollgate::meter::record::{Outcome, TokenUsage};
use tollgate::mock_upstream::MockOptions;

const ROUTER: &str = r#"
[router]
virtual_model = "auto"
default = "cheap"
"#;

async fn respond(gw: &Harness, key: &str, body: Value) -> reqwest::Response {
    gw.http
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn stored(gw: &Harness, key: &str, method: reqwest::Method, path: &str) -> reqwest::Response {
    gw.http
        .request(method, format!("{}/v1/responses/{path}", gw.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// `instructions` and `input` count as the chat messages they amount to: (3 + "system" 1 +
/// "Be brief." 3) + (3 + "user" 1 + "Say hi" 2) + 3 of reply priming = 16 tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_counted_rated_and_recorded_like_a_chat_completion() {
    let gw = Harness::start().await;
    let key = gw.key.clone();
    let body = json!({
        "model": "gpt-4o-mini", "instructions": "Be brief.", "input": "Say hi",
        "mock": {"reply_tokens": 7}
    });
    let answer = respond(&gw, &key, body.clone()).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(answer.headers()["x-tollgate-route"], "direct");
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["usage"]["input_tokens"], 16);
    assert_eq!(answer["usage"]["output_tokens"], 7);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = respond(&gw, &key, streamed).await;
    assert_eq!(stream.status(), 200);
    let events = stream.text().await.unwrap();
    assert!(
        events.contains("event: response.output_text.delta"),
        "{events}"
    );
    assert!(events.contains("event: response.completed"), "{events}");
    assert!(
        !events.contains("[DONE]"),
        "a Responses stream has no [DONE]"
    );

    let records = gw.usage_records(2).await;
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record.endpoint, Endpoint::Responses);
        assert_eq!(record.outcome, Outcome::Completed);
        assert_eq!(record.finish_reason.as_deref(), Some("completed"));
        assert_eq!(
            record.counted,
            TokenUsage {
                input: 16,
                cached_input: 0,
                output: 7,
                cache_write_input: 0,
            }
        );
        assert_eq!(record.reported, Some(record.counted));
        // 16 × $0.15 + 7 × $0.60 per million tokens.
        assert_eq!(record.charge.nanos(), 2_400 + 4_200);
    }
    assert_eq!(
        records.iter().filter(|r| r.streamed).count(),
        1,
        "one streamed, one not"
    );
}

/// A function call's arguments are the output; a reply cut at `max_output_tokens` is
/// incomplete, and that bound is what the budget reserves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_calls_and_incomplete_answers_are_metered() {
    let gw = Harness::start().await;
    let key = gw.key.clone();
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    for stream in [false, true] {
        let answer = respond(
            &gw,
            &key,
            json!({"model": "gpt-4o-mini", "input": "Weather in Oslo?", "tools": tools,
                "stream": stream, "mock": {"tool_call": true, "reply": "{\"city\": \"Oslo\"}"}}),
        )
        .await;
        assert_eq!(answer.status(), 200);
        let text = answer.text().await.unwrap();
        assert!(text.contains("function_call"), "{text}");
    }
    let records = gw.usage_records(2).await;
    let tokenizer = tollgate::meter::tokenizer::Tokenizer::new().unwrap();
    let arguments = tokenizer.count_text(
        tollgate::meter::tokenizer::Encoding::O200kBase,
        "{\"city\": \"Oslo\"}",
    );
    for record in &records {
        assert_eq!(record.counted.output, arguments);
        assert_eq!(record.reported.unwrap().output, arguments);
    }
    let capped = json!({"model": "gpt-4o-mini", "input": "Count", "max_output_tokens": 3,
        "mock": {"reply_tokens": 10}});
    let answer: Value = respond(&gw, &key, capped).await.json().await.unwrap();
    assert_eq!(answer["status"], "incomplete");
    let records = gw.usage_records(3).await;
    let record = records.last().unwrap();
    assert_eq!(record.finish_reason.as_deref(), Some("max_output_tokens"));
    assert_eq!(record.counted.output, 3);
}

/// A conversation continued with `previous_response_id` stays with the model that stored the
/// response, whatever the router would pick; a stored response is reachable by its own key
/// only, and another key's id is answered as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continued_conversation_stays_with_its_model_and_its_key() {
    let gw = Harness::start_with(MockOptions::default(), ROUTER).await;
    let key = gw.key.clone();
    let other = gw.create_key(json!({"name": "other"})).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = respond(&gw, &key, json!({"model": "auto", "input": "Hello"})).await;
    assert_eq!(first.status(), 200);
    let model = first.headers()["x-tollgate-model"]
        .to_str()
        .unwrap()
        .to_owned();
    let first: Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    let mut previous = id.clone();
    for _ in 0..6 {
        let next = respond(
            &gw,
            &key,
            json!({"model": "auto", "input": "And then?", "previous_response_id": previous}),
        )
        .await;
        assert_eq!(next.status(), 200);
        assert_eq!(next.headers()["x-tollgate-model"], model.as_str());
        assert_eq!(next.headers()["x-tollgate-route"], "previous_response");
        let next: Value = next.json().await.unwrap();
        // The provider bills the earlier turns again; its figure is what is billed.
        assert!(next["usage"]["input_tokens"].as_u64().unwrap() > 15);
        previous = next["id"].as_str().unwrap().to_owned();
    }
    let records = gw.usage_records(7).await;
    let last = records.last().unwrap();
    // 3 + "user" 1 + "And then?" 3, + 3 of reply priming.
    assert_eq!(last.counted.input, 10, "own count: the new input only");
    assert!(last.reported.unwrap().input > 10);

    let stolen = respond(
        &gw,
        &other,
        json!({"model": "auto", "input": "Tell me", "previous_response_id": id}),
    )
    .await;
    assert_eq!(stolen.status(), 404);
    let error: Value = stolen.json().await.unwrap();
    assert_eq!(error["error"]["code"], "not_found");
    assert_eq!(
        stored(&gw, &other, reqwest::Method::GET, &id)
            .await
            .status(),
        404
    );

    let retrieved = stored(&gw, &key, reqwest::Method::GET, &id).await;
    assert_eq!(retrieved.status(), 200);
    assert_eq!(retrieved.json::<Value>().await.unwrap()["id"], id.as_str());
    let items: Value = stored(
        &gw,
        &key,
        reqwest::Method::GET,
        &format!("{id}/input_items"),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(items["data"][0]["content"][0]["text"], "Hello");
    let cancel = stored(&gw, &key, reqwest::Method::POST, &format!("{id}/cancel")).await;
    assert_eq!(cancel.status(), 400, "only background responses cancel");
    let deleted = stored(&gw, &key, reqwest::Method::DELETE, &id).await;
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        stored(&gw, &key, reqwest::Method::GET, &id).await.status(),
        404
    );
    // Retrieval is not metered: the ledger holds the seven answered requests and the refusal.
    assert_eq!(gw.usage_records(8).await.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_before_the_upstream_in_openai_shape() {
    let gw = Harness::start().await;
    let poor = gw
        .create_key(json!({"name": "poor", "budget_usd": 0.000001}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = respond(
        &gw,
        &poor,
        json!({"model": "gpt-4o", "input": "Write a novel", "max_output_tokens": 1000}),
    )
    .await;
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");

    let background = respond(
        &gw,
        &gw.key,
        json!({"model": "gpt-4o-mini", "input": "Later", "background": true}),
    )
    .await;
    assert_eq!(background.status(), 400);
    let error: Value = background.json().await.unwrap();
    assert_eq!(error["error"]["param"], "background");
    for (field, value, param) in [
        ("conversation", json!("conv_123"), "conversation"),
        (
            "input",
            json!([{"type": "item_reference", "id": "msg_of_another_tenant"}]),
            "input",
        ),
    ] {
        let mut body = json!({"model": "gpt-4o-mini", "input": "Go on"});
        body[field] = value;
        let refused = respond(&gw, &gw.key, body).await;
        assert_eq!(refused.status(), 400);
        let error: Value = refused.json().await.unwrap();
        assert_eq!(error["error"]["param"], param);
    }
    assert_eq!(gw.mock.stats().by_path.get("/v1/responses"), None);
}

/// The provider reads a continued conversation's earlier turns again, so the budget reserves
/// them: a continuation of a long conversation is refused where a fresh request of the same
/// size is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_reserves_the_conversation_it_carries() {
    let gw = Harness::start().await;
    let created = gw.create_key(json!({"name": "long"})).await;
    let (key, id) = (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    );
    let long = respond(
        &gw,
        &key,
        json!({"model": "gpt-4o-mini", "input": "Read this", "mock": {"prompt_tokens": 500000}}),
    )
    .await;
    assert_eq!(long.status(), 200);
    let previous = long.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Spent: 500,000 × $0.15 + 16 × $0.60 per million = $0.0750096; $0.01 remains.
    let patched = gw
        .admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"))
        .json(&json!({"budget_usd": 0.0850096}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let continued = respond(
        &gw,
        &key,
        json!({"model": "gpt-4o-mini", "input": "Summarise", "max_output_tokens": 10,
            "previous_response_id": previous}),
    )
    .await;
    assert_eq!(continued.status(), 429);
    let error: Value = continued.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");
    let fresh = respond(
        &gw,
        &key,
        json!({"model": "gpt-4o-mini", "input": "Summarise", "max_output_tokens": 10}),
    )
    .await;
    assert_eq!(fresh.status(), 200);
}

/// The official OpenAI Python SDK's `responses` client, unmodified: plain, streamed, a
/// function tool, a continuation through `auto`, retrieval, input items, deletion and a budget
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_speaks_responses_through_the_gateway() {
    let gw = Harness::start_with(MockOptions::default(), ROUTER).await;
    let poor = gw
        .create_key(json!({"name": "poor", "budget_usd": 0.000001}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let base_url = format!("{}/v1", gw.url);
    let key = gw.key.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::run_python("sdk_responses.py", &[&base_url, &key, &poor], &[])
    })
    .await
    .unwrap();
    let seen: Value = serde_json::from_str(out.trim()).unwrap();

    assert_eq!(seen["plain"]["object"], "response");
    assert_eq!(seen["plain"]["status"], "completed");
    assert_eq!(seen["plain"]["text"], " the quick brown fox jumps");
    assert_eq!(seen["plain"]["usage"]["input_tokens"], 16);
    assert_eq!(seen["plain"]["usage"]["output_tokens"], 5);
    assert_eq!(seen["plain"]["headers"]["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(seen["plain"]["headers"]["x-tollgate-route"], "direct");

    assert_eq!(seen["stream"]["text"], seen["stream"]["final_text"]);
    assert_eq!(seen["stream"]["usage"]["output_tokens"], 7);

    assert_eq!(seen["tool"]["name"], "get_weather");
    assert_eq!(seen["tool"]["arguments"]["city"], "Oslo");

    assert_eq!(
        seen["continued"]["headers"]["x-tollgate-model"],
        "gpt-4o-mini"
    );
    assert_eq!(
        seen["continued"]["headers"]["x-tollgate-route"],
        "previous_response"
    );
    assert_eq!(seen["input_items"], json!(["function_call_output"]));
    assert_eq!(seen["after_delete"], 404);
    assert_eq!(seen["refused"]["status"], 429);
    assert_eq!(seen["refused"]["code"], "insufficient_quota");

    let records = gw.usage_records(6).await;
    let responses: Vec<_> = records
        .iter()
        .filter(|r| r.endpoint == Endpoint::Responses)
        .collect();
    assert_eq!(responses.len(), 5, "four answered and one refused");
    let plain = &responses[0];
    assert_eq!(plain.counted.input, 16);
    assert_eq!(plain.counted.output, 5);
    assert_eq!(plain.charge.nanos(), 16 * 150 + 5 * 600);
}

/// The gateway remembers whose a response is across a restart: the ledger holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_outlives_a_restart_of_the_gateway() {
    let mut gw = Harness::start_with(MockOptions::default(), ROUTER).await;
    let key = gw.key.clone();
    let first = respond(&gw, &key, json!({"model": "auto", "input": "Hello"})).await;
    let model = first.headers()["x-tollgate-model"]
        .to_str()
        .unwrap()
        .to_owned();
    let id = first.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.restart().await;
    let next = respond(
        &gw,
        &key,
        json!({"model": "auto", "input": "Again", "previous_response_id": id}),
    )
    .await;
    assert_eq!(next.status(), 200);
    assert_eq!(next.headers()["x-tollgate-model"], model.as_str());
    assert_eq!(next.headers()["x-tollgate-route"], "previous_response");
    assert_eq!(
        stored(&gw, &key, reqwest::Method::GET, &id).await.status(),
        200
    );
}

/// Chat completions, Responses and Anthropic Messages on one key, 200 at once: the cap holds
/// across the three APIs and the spend is exactly what the admitted requests cost. The bodies
/// are the same conversation — 21 input tokens, 16 output, reserved with 32 — so each costs
/// 21 × 150 + 16 × 600 = 12,750 nano-dollars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_across_chat_responses_and_messages_under_concurrency() {
    const ACTUAL: i64 = 12_750;
    let gw = Harness::start().await;
    let cap = 20 * ACTUAL;
    let created = gw
        .create_key(
            json!({"name": "mixed", "budget_usd": cap as f64 / 1e9, "budget_period": "day"}),
        )
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 32, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to the gateway."}], "mock": {"reply_tokens": 16}});
    let response = json!({"model": "gpt-4o-mini", "max_output_tokens": 32,
        "instructions": "You are terse.", "input": "Say hello to the gateway.",
        "mock": {"reply_tokens": 16}});
    let message = json!({"model": "gpt-4o-mini", "max_tokens": 32, "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hello to the gateway."}],
        "mock": {"reply_tokens": 16}});
    let sent = (0..200).map(|i| {
        let (path, body) = match i % 3 {
            0 => ("/v1/chat/completions", &chat),
            1 => ("/v1/responses", &response),
            _ => ("/v1/messages", &message),
        };
        gw.http
            .post(format!("{}{path}", gw.url))
            .bearer_auth(&key)
            .json(body)
            .send()
    });
    let mut admitted = 0;
    for answer in futures_util::future::join_all(sent).await {
        let answer = answer.unwrap();
        match answer.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let error: Value = answer.json().await.unwrap();
                // Anthropic's shape on /v1/messages, OpenAI's elsewhere.
                assert!(
                    error["error"]["code"] == "insufficient_quota"
                        || error["error"]["type"] == "rate_limit_error",
                    "{error}"
                );
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let state: Value = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/keys/{}", created["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let spend = (state["spend_usd"].as_f64().unwrap() * 1e9).round() as i64;
    assert_eq!(spend, admitted * ACTUAL);
    assert!(spend <= cap, "spend {spend} passed the cap {cap}");
    assert!(admitted >= 11, "only {admitted} admitted");
    assert_eq!(state["reserved_usd"].as_f64().unwrap(), 0.0);
    let records = gw.usage_records(200).await;
    let answered: Vec<_> = records.iter().filter(|r| r.answered).collect();
    assert_eq!(answered.len() as i64, admitted);
    assert!(answered.iter().any(|r| r.endpoint == Endpoint::Responses));
    assert!(answered.iter().any(|r| r.endpoint == Endpoint::Messages));
    assert!(answered.iter().all(|r| r.charge.nanos() == ACTUAL));
}
