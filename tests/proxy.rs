//! The spine end to end: the real gateway on port 0 in front of the mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use common::{sse_data, Harness, PROVIDER_KEY};
use serde_json::{json, Value};
use tollgate::meter::record::{Outcome, UsageRecord};
use tollgate::mock_upstream::MockOptions;

fn hello(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the gateway."}
        ]
    })
}

#[tokio::test]
async fn chat_round_trip_is_metered_with_both_figures() {
    let mut gw = Harness::start().await;
    let response = gw.chat(hello("gpt-4o-mini")).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(headers["x-tollgate-route"], "direct");
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(request_id.starts_with("req_"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let upstream_usage = body["usage"].clone();
    gw.stop().await;

    let records = gw.usage_records(1).await;
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.request_id, request_id);
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.status, 200);
    assert_eq!(record.served_model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(record.upstream.as_deref(), Some("mock"));
    assert_eq!(record.finish_reason.as_deref(), Some("stop"));
    assert!(!record.streamed);
    assert_eq!(record.attempts, 1);
    let reported = record.reported.unwrap();
    assert_eq!(
        reported.input,
        upstream_usage["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        reported.output,
        upstream_usage["completion_tokens"].as_u64().unwrap()
    );
    // Python tiktoken (o200k_base): "system" 1, "You are terse." 4, "user" 1, "Say hello to
    // the gateway." 6; plus 3 per message and 3 to prime the reply.
    assert_eq!(record.counted.input, (3 + 1 + 4) + (3 + 1 + 6) + 3);
    assert_eq!(record.counted.output, reported.output);
}

#[tokio::test]
async fn unknown_fields_are_forwarded_and_keys_stay_on_their_side() {
    let gw = Harness::start().await;
    let mut body = hello("gpt-4o");
    body["a_field_from_the_future"] = json!({"nested": [1, 2, 3]});
    body["temperature"] = json!(0.25);
    let response = gw
        .post("/v1/chat/completions")
        .header("x-request-id", "client-chosen-id-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id-42");
    let text = response.text().await.unwrap();
    assert!(!text.contains(PROVIDER_KEY));

    let stats = gw.mock.stats();
    assert_eq!(
        stats.last_body["a_field_from_the_future"],
        json!({"nested": [1, 2, 3]})
    );
    assert_eq!(stats.last_body["temperature"], json!(0.25));
    assert_eq!(stats.last_body["model"], "gpt-4o");
    assert_eq!(
        stats.last_headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_eq!(
        stats.last_headers.get("x-request-id").map(String::as_str),
        Some("client-chosen-id-42")
    );
    let all_headers = format!("{:?}", stats.last_headers);
    assert!(!all_headers.contains(&gw.key));
}

async fn stream_text(gw: &Harness, body: Value) -> (reqwest::header::HeaderMap, String) {
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let headers = response.headers().clone();
    (headers, response.text().await.unwrap())
}

#[tokio::test]
async fn stream_hides_the_usage_chunk_the_client_did_not_ask_for() {
    let mut gw = Harness::start().await;
    let mut body = hello("gpt-4o-mini");
    body["stream"] = json!(true);
    body["mock"] = json!({"reply_tokens": 12});
    let (headers, text) = stream_text(&gw, body).await;
    assert_eq!(headers["x-tollgate-model"], "gpt-4o-mini");
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert!(
            chunk.get("usage").is_none() || chunk["usage"].is_null(),
            "{event}"
        );
        assert!(!chunk["choices"].as_array().unwrap().is_empty());
    }
    // The gateway asked upstream for usage on the client's behalf.
    assert_eq!(
        gw.mock.stats().last_body["stream_options"]["include_usage"],
        true
    );
    gw.stop().await;
    let record = &gw.usage_records(1).await[0];
    assert!(record.streamed);
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.reported.unwrap().output, 12);
    assert_eq!(record.counted.output, 12);
    assert_eq!(record.finish_reason.as_deref(), Some("stop"));
    assert!(record.ttft_ms.is_some());
}

#[tokio::test]
async fn stream_keeps_the_usage_chunk_when_asked() {
    let gw = Harness::start().await;
    let mut body = hello("gpt-4o-mini");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["mock"] = json!({"reply_tokens": 5});
    let (_, text) = stream_text(&gw, body).await;
    let events = sse_data(&text);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn completions_embeddings_and_models() {
    let mut gw = Harness::start().await;
    let response = gw
        .post("/v1/completions")
        .json(&json!({"model": "gpt-3.5-turbo", "prompt": "Once upon a time", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    // Embeddings do not stream: a client's `stream: true` still gets the provider's JSON.
    let response = gw
        .post("/v1/embeddings")
        .json(&json!({"model": "text-embedding-3-small", "input": ["hello world", "tollgate"], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);

    let routed = gw
        .post("/v1/completions")
        .json(&json!({"model": "auto", "prompt": "Once upon a time"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(routed, 400).await["error"]["param"], "model");

    let models: Value = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini") && ids.contains(&"text-embedding-3-small"));
    let model = |id: &str| {
        gw.http
            .get(format!("{}/v1/models/{id}", gw.url))
            .bearer_auth(&gw.key)
            .send()
    };
    let one: Value = model("gpt-4o-mini").await.unwrap().json().await.unwrap();
    assert_eq!(
        (one["id"].as_str(), one["object"].as_str()),
        (Some("gpt-4o-mini"), Some("model"))
    );
    let missing = model("gpt-9-ultra").await.unwrap();
    assert_eq!(
        error_of(missing, 404).await["error"]["code"],
        "model_not_found"
    );

    gw.stop().await;
    let records = gw.usage_records(2).await;
    let completion = records
        .iter()
        .find(|r| r.served_model.as_deref() == Some("gpt-3.5-turbo"))
        .unwrap();
    // "Once upon a time" is 4 tokens in cl100k_base; the answer was cut at 4.
    assert_eq!(completion.counted.input, 4);
    assert_eq!(completion.counted.output, 4);
    assert_eq!(completion.finish_reason.as_deref(), Some("length"));
    let embedding = records
        .iter()
        .find(|r| r.served_model.as_deref() == Some("text-embedding-3-small"))
        .unwrap();
    // "hello world" (2) + "tollgate" (3: toll, g, ate) in cl100k_base.
    assert_eq!(embedding.counted.input, embedding.reported.unwrap().input);
    assert_eq!(embedding.counted.output, 0);
}

async fn error_of(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"].get("param").is_some(), "{body}");
    assert!(body["error"].get("code").is_some(), "{body}");
    body
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let gw = Harness::start().await;
    let malformed = gw
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4o\", \"messages\": [")
        .send()
        .await
        .unwrap();
    let body = error_of(malformed, 400).await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("parse the JSON"));

    let options = gw
        .chat(json!({"model": "gpt-4o-mini", "stream": true, "stream_options": [true], "messages": []}))
        .await;
    assert_eq!(
        error_of(options, 400).await["error"]["param"],
        "stream_options"
    );

    let no_model = gw.chat(json!({"messages": []})).await;
    assert_eq!(error_of(no_model, 400).await["error"]["param"], "model");

    let unknown = gw.chat(hello("gpt-9-ultra")).await;
    assert_eq!(
        error_of(unknown, 404).await["error"]["code"],
        "model_not_found"
    );

    let huge = "x".repeat(5 * 1024 * 1024);
    let oversized = gw
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(oversized, 413).await["error"]["code"],
        "request_too_large"
    );

    let nowhere = gw
        .post("/v1/nowhere")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    error_of(nowhere, 404).await;
    assert_eq!(
        gw.mock.stats().requests,
        0,
        "nothing bad reached the upstream"
    );
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_after_retries() {
    let mut gw = Harness::start().await;
    let mut body = hello("gpt-4o-mini");
    body["mock"] = json!({"fail": "503"});
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");

    let mut body = hello("gpt-4o-mini");
    body["mock"] = json!({"fail": "429", "retry_after": 0});
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    gw.stop().await;
    let records = gw.usage_records(2).await;
    assert!(records.iter().all(|r| r.outcome == Outcome::UpstreamError));
    assert!(
        records.iter().all(|r| r.attempts == 2),
        "retried once on the same model"
    );
}

#[tokio::test]
async fn a_transient_failure_is_retried_invisibly() {
    let mut gw = Harness::start().await;
    let mut body = hello("gpt-4o-mini");
    body["mock"] = json!({"fail": "500", "fail_first": 1});
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 200);
    gw.stop().await;
    let record = &gw.usage_records(1).await[0];
    assert_eq!(record.attempts, 2);
    assert_eq!(record.outcome, Outcome::Completed);
}

#[tokio::test]
async fn hung_upstream_is_a_504_and_a_dead_one_a_502() {
    let dead = r#"
[upstreams.dead]
base_url = "http://127.0.0.1:1/v1"
connect_timeout_ms = 200

[models."dead-model"]
upstream = "dead"
tier = "cheap"
encoding = "o200k_base"
input_per_mtok = 1
output_per_mtok = 1
"#;
    let gw = Harness::start_with(MockOptions::default(), dead).await;
    let mut body = hello("gpt-4o-mini");
    body["mock"] = json!({"fail": "hang"});
    let started = Instant::now();
    let response = gw.chat(body).await;
    assert_eq!(
        error_of(response, 504).await["error"]["code"],
        "upstream_timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let response = gw.chat(hello("dead-model")).await;
    assert_eq!(response.headers()["x-tollgate-model"], "dead-model");
    assert_eq!(response.headers()["x-tollgate-route"], "direct");
    assert_eq!(
        error_of(response, 502).await["error"]["code"],
        "upstream_unreachable"
    );

    let response = gw.chat(json!({"messages": []})).await;
    assert!(!response.headers().contains_key("x-tollgate-route"));
}

/// No certificate the gateway would trust is at hand, so the "provider" only records what
/// the gateway opens with: a TLS ClientHello naming the host and offering HTTP/2 and 1.1.
#[tokio::test]
async fn an_https_upstream_is_spoken_to_over_tls() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hello_bytes = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut received = vec![0u8; 4096];
        let read = socket.read(&mut received).await.unwrap();
        received.truncate(read);
        received
    });
    let tls = format!(
        r#"
[upstreams.tls]
base_url = "https://localhost:{port}/v1"

[models."tls-model"]
upstream = "tls"
tier = "cheap"
encoding = "o200k_base"
input_per_mtok = 1
output_per_mtok = 1
"#
    );
    let gw = Harness::start_with(MockOptions::default(), &tls).await;
    let response = gw.chat(hello("tls-model")).await;
    assert_eq!(
        error_of(response, 502).await["error"]["code"],
        "upstream_unreachable"
    );
    let hello_bytes = hello_bytes.await.unwrap();
    assert_eq!(&hello_bytes[..2], &[0x16, 0x03], "a TLS handshake record");
    assert_eq!(hello_bytes[5], 0x01, "a ClientHello");
    let holds = |needle: &[u8]| hello_bytes.windows(needle.len()).any(|w| w == needle);
    assert!(holds(b"localhost"), "SNI names the host");
    assert!(
        holds(b"\x02h2") && holds(b"\x08http/1.1"),
        "ALPN offers h2 and http/1.1"
    );
}

/// A provider that keeps a connection for the next request but closes it once idle for
/// 100 ms (providers' keep-alive timeouts are seconds): it answers each request with a fixed
/// chat completion (`streamed`: as a chunked stream of three events) and notes the connection
/// it came on and its `Host` header.
async fn closing_when_idle_upstream(
    streamed: bool,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = seen.clone();
    tokio::spawn(async move {
        for connection in 0.. {
            let (socket, _) = listener.accept().await.unwrap();
            let noted = noted.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                loop {
                    let (mut host, mut length) = (String::new(), 0usize);
                    let mut line = String::new();
                    let head = async {
                        loop {
                            line.clear();
                            if socket.read_line(&mut line).await.ok()? == 0 {
                                return None;
                            }
                            let lower = line.to_ascii_lowercase();
                            if let Some(value) = lower.strip_prefix("host:") {
                                host = value.trim().to_owned();
                            }
                            if let Some(value) = lower.strip_prefix("content-length:") {
                                length = value.trim().parse().ok()?;
                            }
                            if line == "\r\n" {
                                return Some(());
                            }
                        }
                    };
                    match tokio::time::timeout(Duration::from_millis(100), head).await {
                        Ok(Some(())) => {}
                        _ => return,
                    }
                    let mut body = vec![0u8; length];
                    socket.read_exact(&mut body).await.unwrap();
                    noted.lock().unwrap().push((connection, host));
                    let response = if streamed {
                        let events = [
                            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
                            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                             "total_tokens": 10}}),
                        ]
                        .iter()
                        .map(|event| format!("data: {event}\n\n"))
                        .chain(["data: [DONE]\n\n".to_owned()])
                        .map(|event| format!("{:x}\r\n{event}\r\n", event.len()))
                        .collect::<String>();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{events}0\r\n\r\n"
                        )
                    } else {
                        let answer = json!({
                            "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                            "model": "gpt-4o-mini",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "hi"}}],
                            "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                      "total_tokens": 10}
                        })
                        .to_string();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                            answer.len()
                        )
                    };
                    socket
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .unwrap();
                }
            });
        }
    });
    (port, seen)
}

/// A gateway whose model `raw-model` is served by the upstream listening on `port`.
async fn in_front_of_raw_upstream(port: u16) -> Harness {
    let raw = format!(
        r#"
[upstreams.raw]
base_url = "http://127.0.0.1:{port}/v1"

[models."raw-model"]
upstream = "raw"
tier = "cheap"
encoding = "o200k_base"
input_per_mtok = 1
output_per_mtok = 1
"#
    );
    Harness::start_with(MockOptions::default(), &raw).await
}

#[tokio::test]
async fn connections_to_a_plain_http_upstream_are_kept_and_one_it_closed_is_not_reused() {
    let (port, seen) = closing_when_idle_upstream(false).await;
    let mut gw = in_front_of_raw_upstream(port).await;
    for _ in 0..2 {
        let response = gw.chat(hello("raw-model")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap()["usage"]["total_tokens"],
            10
        );
    }
    // Past the provider's idle timeout: the kept connection is closed, and the next request
    // must go on a new one rather than fail on the old.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let response = gw.chat(hello("raw-model")).await;
    assert_eq!(response.status(), 200);
    let host = format!("127.0.0.1:{port}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|(_, h)| *h == host), "{seen:?}");
    assert_eq!(
        seen[0].0, seen[1].0,
        "the second request reused the first one's connection"
    );
    assert_ne!(
        seen[1].0, seen[2].0,
        "the closed connection was not used again"
    );
    gw.stop().await;
}

/// A streamed answer's upstream connection serves the next request once the answer has been
/// read to its end.
#[tokio::test]
async fn a_streamed_answer_leaves_its_connection_for_the_next_request() {
    let (port, seen) = closing_when_idle_upstream(true).await;
    let mut gw = in_front_of_raw_upstream(port).await;
    for _ in 0..3 {
        let mut body = hello("raw-model");
        body["stream"] = json!(true);
        let response = gw.chat(body).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains(r#""content":"hi""#), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let records = gw.usage_records(3).await;
    assert!(
        records
            .iter()
            .all(|r| r.counted.output == 1 && r.status == 200),
        "{records:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|(connection, _)| *connection == seen[0].0),
        "every request came on the first one's connection: {seen:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_cut_stream_is_still_metered_for_what_was_sent() {
    let mut gw = Harness::start().await;
    let mut body = hello("gpt-4o-mini");
    body["stream"] = json!(true);
    body["mock"] = json!({"fail": "cut", "cut_after": 4, "reply_tokens": 50});
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.text().await.is_err(),
        "the client sees the stream break"
    );
    let record = gw.usage_records(1).await[0].clone();
    assert_eq!(record.outcome, Outcome::GatewayError);
    assert_eq!(record.status, 502);
    assert!(
        record.counted.output >= 1 && record.counted.output < 50,
        "{record:?}"
    );
    assert!(record.reported.is_none());
    // The provider billed the prompt and what it sent, so the gateway bills them too, and the
    // usage report says so. gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens.
    assert!(record.answered);
    assert_eq!(
        record.charge.nanos(),
        record.counted.input as i64 * 150 + record.counted.output as i64 * 600
    );
    let usage: serde_json::Value = gw
        .admin(reqwest::Method::GET, "/admin/usage?group_by=model")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["data"][0]["errors_billed"], 1, "{usage}");
    gw.stop().await;
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_is_metered() {
    let mut gw = Harness::start_with(
        MockOptions {
            tokens_per_sec: Some(50),
            ..MockOptions::default()
        },
        "",
    )
    .await;
    let mut body = hello("gpt-4o-mini");
    body["stream"] = json!(true);
    body["mock"] = json!({"reply_tokens": 500});
    let mut response = gw.chat(body).await;
    let mut received = 0;
    while received < 3 {
        let chunk = response.chunk().await.unwrap().unwrap();
        received += sse_data(std::str::from_utf8(&chunk).unwrap()).len();
    }
    drop(response);
    let mut cancelled = 0;
    for _ in 0..200 {
        cancelled = gw.mock.stats().streams_cancelled;
        if cancelled > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled, 1, "the upstream request was cancelled");
    gw.stop().await;
    let record = &gw.usage_records(1).await[0];
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert!(
        record.counted.output >= 2 && record.counted.output < 500,
        "{record:?}"
    );
}

/// Sends a request the mock answers as `steer` says, gives up on it after 300 ms, and returns
/// the one record the gateway wrote for it, with its outcome and status checked.
async fn record_of_a_client_that_left(steer: Value) -> UsageRecord {
    let mut gw = Harness::start().await;
    let mut body = hello("gpt-4o-mini");
    body["mock"] = steer;
    let gave_up = gw
        .post("/v1/chat/completions")
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    for _ in 0..200 {
        if !gw.usage_records(1).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.stop().await;
    let mut records = gw.usage_records(1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = records.remove(0);
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert_eq!(record.status, 499);
    assert_eq!(record.attempts, 1);
    assert!(record.counted.input > 0);
    record
}

/// A client that gives up on a whole-body answer while the provider is still working on it
/// is billed for its prompt: the provider charges for it all the same.
#[tokio::test]
async fn a_client_that_leaves_before_a_whole_answer_is_billed_its_prompt() {
    let record = record_of_a_client_that_left(json!({"fail": "hang"})).await;
    assert_eq!(record.billed().input, record.counted.input);
    assert_eq!(record.billed().output, 0);
    // gpt-4o-mini's list price: $0.15 per 1M input tokens = 150 nano-dollars a token.
    assert_eq!(record.charge.nanos(), 150 * record.counted.input as i64);
}

/// A client that leaves while the gateway waits to retry a provider's 429 owes nothing: the
/// provider billed no prompt for its refusal.
#[tokio::test]
async fn a_client_that_leaves_during_a_retry_wait_is_not_billed() {
    let record = record_of_a_client_that_left(json!({"fail": "429", "retry_after": 1})).await;
    assert_eq!(record.billed().input, 0);
    assert_eq!(record.charge.nanos(), 0);
}

#[tokio::test]
async fn an_adversarial_prompt_does_not_stall_the_gateway() {
    let mut gw = Harness::start().await;
    let prompt = "a".repeat(1024 * 1024);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "mock": {"prompt_tokens": 1}});
    let url = gw.url.clone();
    let big = tokio::spawn({
        let request = gw.post("/v1/chat/completions").json(&body);
        async move { request.send().await.unwrap().status() }
    });
    // While the megabyte is being counted, the gateway keeps answering.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    let health = gw.http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "healthz took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(big.await.unwrap(), 200);
    assert!(started.elapsed() < Duration::from_secs(20));
    gw.stop().await;
    let record = &gw.usage_records(1).await[0];
    assert!(
        record.counted.input > 1024 * 1024 / 16,
        "{:?}",
        record.counted
    );
}

/// A stop while a stream is in flight: the stream finishes whole within the grace period (5 s
/// in the test config); one that would outlast it is cut at its end and still metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_streams_finish_within_the_grace_period() {
    let options = MockOptions {
        tokens_per_sec: Some(20),
        ..MockOptions::default()
    };
    let mut gw = Harness::start_with(options, "").await;
    let stream = |tokens: u32| {
        let mut body = hello("gpt-4o-mini");
        body["stream"] = json!(true);
        body["mock"] = json!({"reply_tokens": tokens});
        let request = gw.post("/v1/chat/completions").json(&body);
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await
        })
    };
    let short = stream(16);
    let long = stream(400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    gw.stop().await;
    let stopped_after = stopping.elapsed();
    let short = short
        .await
        .unwrap()
        .expect("the short stream ends normally");
    assert_eq!(sse_data(&short).last().map(String::as_str), Some("[DONE]"));
    assert!(long.await.unwrap().is_err(), "the long stream is cut");
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(8)).contains(&stopped_after),
        "stopped after {stopped_after:?}"
    );
    let mut records = gw.usage_records(2).await;
    records.sort_by_key(|record| record.counted.output);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].outcome, Outcome::Completed);
    assert_eq!(records[0].counted.output, 16);
    assert_eq!(records[1].outcome, Outcome::ClientDisconnected);
    assert!(
        (50..400).contains(&records[1].counted.output),
        "{:?}",
        records[1].counted
    );
}

#[tokio::test]
async fn graceful_stop_flushes_every_record() {
    let mut gw = Harness::start().await;
    let mut handles = Vec::new();
    for i in 0..40 {
        let mut body = hello("gpt-4o-mini");
        body["stream"] = json!(i % 2 == 0);
        let request = gw.post("/v1/chat/completions").json(&body);
        handles.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            response.bytes().await.unwrap();
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    gw.stop().await;
    let records = gw.usage_records(40).await;
    assert_eq!(records.len(), 40);
    let billed: u64 = records.iter().map(|r| r.billed().output).sum();
    assert_eq!(
        billed,
        40 * 16,
        "the mock answers 16 one-token words by default"
    );
}

/// Hostile connections: half a request head, or a body that stops, no longer hold a
/// connection open indefinitely.
#[tokio::test]
async fn slow_heads_and_stalled_bodies_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Harness::start_with_server("header_read_timeout_ms = 300\nbody_idle_timeout_ms = 300")
        .await;
    let address = gw.url.trim_start_matches("http://").to_owned();

    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a half head is cut");
    assert!(started.elapsed() < Duration::from_secs(3));

    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":",
        gw.key
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a stalled body is cut");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

/// A flood of connections past `max_connections`: health checks and scrapes still answer, the
/// API says it is at its limit, connections past the headroom are closed at once, and all is
/// well again when the flood leaves.
#[tokio::test]
async fn a_connection_flood_leaves_health_checks_answering() {
    use tokio::io::AsyncReadExt;
    let gw = Harness::start_with_server("max_connections = 4").await;
    let address = gw.url.trim_start_matches("http://").to_owned();
    let mut flood = Vec::new();
    for _ in 0..10 {
        flood.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let health = fresh()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let refused = fresh()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&gw.key)
        .json(&hello("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "connection_limit");

    for _ in 0..70 {
        flood.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    let mut closed = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), closed.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed at once: {read:?}"
    );

    drop(flood);
    let mut answered = false;
    for _ in 0..100 {
        // Until the gateway has seen the flood's connections close, a new one may still be
        // past the bound, and closed at once.
        let response = fresh()
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&gw.key)
            .json(&hello("gpt-4o-mini"))
            .send()
            .await;
        if response.is_ok_and(|response| response.status() == 200) {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered, "served again once the flood left");
    let metrics = gw.metrics().await;
    assert!(metrics.contains("tollgate_connections_shed_total{action=\"ops_only\"}"));
    assert!(metrics.contains("tollgate_connections_shed_total{action=\"closed\"}"));
}

const FAULTS_CONFIG: &str = r#"
[upstreams.dead]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "TOLLGATE_TEST_PROVIDER_KEY"
connect_timeout_ms = 500

[models."dead-model"]
upstream = "dead"
tier = "deadtier"
encoding = "o200k_base"
input_per_mtok = 0.15
output_per_mtok = 0.60

[router]
virtual_model = "auto"
default = "shaky"
[router.tiers.shaky]
models = [{ model = "gpt-4o", weight = 1 }]
fallback_tier = "steady"
[router.tiers.steady]
models = [{ model = "gpt-4o-mini", weight = 1 }]
[router.tiers.deadtier]
models = [{ model = "dead-model", weight = 1 }]
fallback_tier = "steady"
[[router.rules]]
name = "to-the-dead"
target = "deadtier"
when = { any_keywords = ["deadly"] }
"#;

/// One row of the fault matrix: what the client saw and what the ledger kept.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    /// The error code, or for a 200 whether the stream reached its `[DONE]`.
    code: String,
    ledger_status: u16,
    outcome: Outcome,
    billed: bool,
}

/// Every upstream fault × (non-streaming, streaming, `auto` with a fallback): the client's
/// status and error, the ledger row, the key's limits settled (nothing reserved, its one
/// concurrency slot free again) and each request counted once in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_matrix() {
    let gw = Harness::start_with(MockOptions::default(), FAULTS_CONFIG).await;
    let key = gw
        .create_key(json!({"name": "faulty", "budget_usd": 1, "max_concurrency": 1}))
        .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    let completed = |code: &str, outcome: Outcome| Seen {
        status: 200,
        code: code.to_owned(),
        ledger_status: if code == "done" { 200 } else { 502 },
        outcome,
        billed: true,
    };
    // A stream that went silent: the client's stream is cut, the ledger says it timed out.
    let timed_out = || Seen {
        ledger_status: 504,
        ..completed("cut", Outcome::GatewayError)
    };
    let failed = |status: u16, code: &str, outcome: Outcome| Seen {
        status,
        code: code.to_owned(),
        ledger_status: status,
        outcome,
        billed: false,
    };
    let fallback = || completed("done", Outcome::Completed);
    // (fault, mock steering, model for the named cases, non-streaming, streaming, auto).
    let cases: Vec<(&str, Value, &str, Seen, Seen, Seen)> = vec![
        (
            "connection refused",
            json!({}),
            "dead-model",
            failed(502, "upstream_unreachable", Outcome::GatewayError),
            failed(502, "upstream_unreachable", Outcome::GatewayError),
            fallback(),
        ),
        (
            // Before any byte of the answer: the head of a stream has reached the client, so
            // a stream is not retried; a whole answer is, and falls back under `auto`.
            "reset before the answer",
            json!({"fail": "cut", "cut_after": 0}),
            "gpt-4o",
            failed(502, "upstream_unreachable", Outcome::GatewayError),
            completed("cut", Outcome::GatewayError),
            completed("cut", Outcome::GatewayError),
        ),
        (
            "429 with Retry-After",
            json!({"fail": "429", "retry_after": 0}),
            "gpt-4o",
            failed(429, "rate_limit_exceeded", Outcome::UpstreamError),
            failed(429, "rate_limit_exceeded", Outcome::UpstreamError),
            fallback(),
        ),
        (
            "500",
            json!({"fail": "500"}),
            "gpt-4o",
            failed(500, "server_error", Outcome::UpstreamError),
            failed(500, "server_error", Outcome::UpstreamError),
            fallback(),
        ),
        (
            "503",
            json!({"fail": "503"}),
            "gpt-4o",
            failed(503, "server_error", Outcome::UpstreamError),
            failed(503, "server_error", Outcome::UpstreamError),
            fallback(),
        ),
        (
            "hang before headers",
            json!({"fail": "hang"}),
            "gpt-4o",
            failed(504, "upstream_timeout", Outcome::GatewayError),
            failed(504, "upstream_timeout", Outcome::GatewayError),
            fallback(),
        ),
        (
            "hang mid-stream",
            json!({"fail": "stall", "cut_after": 3}),
            "gpt-4o",
            failed(504, "upstream_timeout", Outcome::GatewayError),
            timed_out(),
            timed_out(),
        ),
        (
            "reset mid-stream",
            json!({"fail": "cut", "cut_after": 3}),
            "gpt-4o",
            failed(502, "upstream_unreachable", Outcome::GatewayError),
            completed("cut", Outcome::GatewayError),
            completed("cut", Outcome::GatewayError),
        ),
        (
            "malformed answer",
            json!({"malformed": true}),
            "gpt-4o",
            failed(502, "upstream_error", Outcome::GatewayError),
            completed("done", Outcome::Completed),
            completed("done", Outcome::Completed),
        ),
        (
            "usage missing",
            json!({"no_usage": true}),
            "gpt-4o",
            completed("done", Outcome::Completed),
            completed("done", Outcome::Completed),
            completed("done", Outcome::Completed),
        ),
        (
            "401 from the provider",
            json!({"fail": "401"}),
            "gpt-4o",
            failed(502, "upstream_auth_failed", Outcome::UpstreamError),
            failed(502, "upstream_auth_failed", Outcome::UpstreamError),
            fallback(),
        ),
    ];
    let requests_counted = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with("tollgate_requests_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut mismatches = Vec::new();
    let mut recorded = gw.usage_records(0).await.len();
    for (fault, steering, model, plain, streamed, auto) in cases {
        for (mode, expected) in [
            ("non-streaming", plain),
            ("streaming", streamed),
            ("auto", auto),
        ] {
            let before = requests_counted(&gw.metrics().await);
            let stream = mode != "non-streaming";
            let mut steering = steering.clone();
            let (model, content) = match mode {
                "auto" => (
                    "auto",
                    if model == "dead-model" {
                        "deadly hello"
                    } else {
                        "hello"
                    },
                ),
                _ => (model, "hello"),
            };
            if mode == "auto" && model != "dead-model" && steering["fail"].is_string() {
                // Only the primary's attempts fail: the fallback model is asked afterwards.
                let attempts = if steering["fail"] == "401" { 1 } else { 2 };
                steering["fail_first"] = json!(attempts);
            }
            let body = json!({"model": model, "stream": stream, "max_tokens": 20,
                "messages": [{"role": "user", "content": content}], "mock": steering});
            let response = gw
                .http
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(&secret)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let request_id = response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned();
            let code = match status {
                200 => match response.text().await {
                    Ok(text) if text.trim_end().ends_with("data: [DONE]") || !stream => "done",
                    _ => "cut",
                }
                .to_owned(),
                _ => {
                    let error: Value = response.json().await.unwrap_or(Value::Null);
                    error["error"]["code"]
                        .as_str()
                        .unwrap_or("not an OpenAI error")
                        .to_owned()
                }
            };
            recorded += 1;
            let records = gw.usage_records(recorded).await;
            let record = records.iter().find(|r| r.request_id == request_id);
            let seen = Seen {
                status,
                code,
                ledger_status: record.map_or(0, |r| r.status),
                outcome: record.map_or(Outcome::Rejected, |r| r.outcome),
                billed: record.is_some_and(|r| r.charge.nanos() > 0),
            };
            if seen != expected {
                mismatches.push(format!(
                    "{fault} / {mode}: expected {expected:?}, saw {seen:?}"
                ));
            }
            let state: Value = gw
                .admin(reqwest::Method::GET, &format!("/admin/keys/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if state["reserved_usd"] != json!(0) {
                mismatches.push(format!("{fault} / {mode}: still reserved: {state}"));
            }
            let after = requests_counted(&gw.metrics().await);
            if after - before != 1.0 {
                mismatches.push(format!(
                    "{fault} / {mode}: counted {} times",
                    after - before
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// The client listener sends POSTs to the proxied paths straight to the proxy and everything
/// else through the router: both must answer as the router always did — another method gets
/// 405, a near-miss path 404, a query string does not hide the endpoint — and every answer
/// carries a request id.
#[tokio::test]
async fn proxied_paths_answer_the_same_whichever_way_they_are_dispatched() {
    let gw = Harness::start().await;
    let url = |path: &str| format!("{}{path}", gw.url);

    let get = gw
        .http
        .get(url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);
    assert!(get.headers().contains_key("x-request-id"));
    let error: Value = get.json().await.unwrap();
    assert_eq!(error["error"]["message"], "method not allowed on this path");

    let slash = gw
        .post("/v1/chat/completions/")
        .json(&hello("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(slash.status(), 404);
    assert!(slash.headers().contains_key("x-request-id"));

    let before = gw.mock.stats().requests;
    let query = gw
        .post("/v1/chat/completions?trace=1")
        .header("x-request-id", "with-a-query")
        .json(&hello("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 200);
    assert_eq!(query.headers()["x-request-id"], "with-a-query");
    assert_eq!(query.headers()["x-tollgate-route"], "direct");
    assert_eq!(gw.mock.stats().requests, before + 1);
}
