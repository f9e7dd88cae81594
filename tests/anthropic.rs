//! Anthropic's Messages API through the gateway, served by OpenAI-compatible models: the
//! official Anthropic Python SDK, unmodified, sees Anthropic's shapes; the ledger sees one
//! metered row per request, as for chat.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Harness;
use serde_json::{json, Value};
use tollgate::api::Endpoint;
use tollgate::mock_upstream::MockOptions;

const ROUTER: &str = r#"
[router]
virtual_model = "auto"
default = "cheap"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_through_the_gateway() {
    let gw = Harness::start_with(MockOptions::default(), ROUTER).await;
    let poor = gw
        .create_key(json!({"name": "poor", "budget_usd": 0.000001}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (base_url, key) = (gw.url.clone(), gw.key.clone());
    let out = tokio::task::spawn_blocking(move || {
        common::run_python("sdk_anthropic.py", &[&base_url, &key, &poor], &[])
    })
    .await
    .unwrap();
    let seen: Value = serde_json::from_str(out.trim()).unwrap();

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
