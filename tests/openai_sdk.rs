//! The official OpenAI Python SDK as the client, with only its base URL changed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{run_python, Harness};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_works_unchanged() {
    let gw = Harness::start().await;
    let base_url = format!("{}/v1", gw.url);
    let key = gw.key.clone();
    let out =
        tokio::task::spawn_blocking(move || run_python("sdk_client.py", &[&base_url, &key], &[]))
            .await
            .unwrap();
    let seen: Value = serde_json::from_str(out.trim()).unwrap();

    assert_eq!(seen["chat"]["object"], "chat.completion");
    assert_eq!(seen["chat"]["finish_reason"], "stop");
    assert_eq!(seen["chat"]["usage"]["completion_tokens"], 5);
    assert_eq!(
        seen["chat"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        5
    );
    assert!(seen["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(seen["headers"]["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(seen["headers"]["x-tollgate-route"], "direct");

    assert_eq!(seen["stream"]["usage"]["completion_tokens"], 7);
    assert_eq!(seen["stream"]["finish_reason"], "stop");
    assert_eq!(
        seen["stream"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        7
    );
    assert!(seen["plain_stream_chunks"].as_u64().unwrap() >= 3);

    assert_eq!(seen["embeddings"]["count"], 2);
    assert!(
        seen["embeddings"]["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
            >= 2
    );
    assert_eq!(seen["retrieved_model"], "gpt-4o-mini");
    let models: Vec<&str> = seen["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(models.contains(&"gpt-4o-mini"));
    assert_eq!(seen["unknown_model_error"], "NotFoundError");
    assert_eq!(seen["bad_key_error"], "AuthenticationError");
}
