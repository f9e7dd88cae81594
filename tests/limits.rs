//! Keys, caps and throttles through the real gateway: exactness under concurrency, every
//! status and header of the contract, revocation, allow-lists, and the SDK's retry behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{run_python, Harness};
use futures_util::future::join_all;
use serde_json::{json, Value};
use tollgate::mock_upstream::MockOptions;

fn request(max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": max_tokens,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the gateway."}
        ],
        "mock": {"reply_tokens": 16}
    })
}

async fn send_as(gw: &Harness, key: &str, body: &Value) -> reqwest::Response {
    gw.http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn key_state(gw: &Harness, id: &str) -> Value {
    gw.admin(reqwest::Method::GET, &format!("/admin/keys/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

// One request: 21 input tokens (see tests/proxy.rs) and 16 output tokens at gpt-4o-mini's
// $0.15 / $0.60 per 1M: 21 × 150 + 16 × 600 = 12,750 nano-dollars. Reserved with
// max_tokens = 32: 21 × 150 + 32 × 600 = 22,350.
const ACTUAL: i64 = 12_750;
const RESERVED: i64 = 22_350;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_never_pass_the_cap() {
    let gw = Harness::start().await;
    let cap_nanos = 20 * ACTUAL;
    let created = gw
        .create_key(json!({"name": "agent-loop", "budget_usd": cap_nanos as f64 / 1e9, "budget_period": "day"}))
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let body = request(32);
    let responses = join_all((0..200).map(|_| send_as(&gw, &key, &body))).await;
    let mut admitted = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                assert_eq!(response.headers()["x-should-retry"], "false");
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "insufficient_quota");
                assert_eq!(error["error"]["type"], "insufficient_quota");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let state = key_state(&gw, created["id"].as_str().unwrap()).await;
    let spend = (state["spend_usd"].as_f64().unwrap() * 1e9).round() as i64;
    assert_eq!(
        spend,
        admitted * ACTUAL,
        "spend is exactly what was admitted"
    );
    assert!(
        spend <= cap_nanos,
        "spend {spend} passed the cap {cap_nanos}"
    );
    // Sequential sending admits 19 (it stops when less than one reservation remains); with
    // every request in flight at once, at least cap / reservation = 11 must get through.
    assert!(admitted >= cap_nanos / RESERVED, "only {admitted} admitted");
    assert_eq!(state["reserved_usd"].as_f64().unwrap(), 0.0);

    // Sequentially the remainder is used to the last whole reservation.
    let mut more = 0;
    while send_as(&gw, &key, &body).await.status() == 200 {
        more += 1;
    }
    assert_eq!(admitted + more, 19);
}

/// The reservation of `max_tokens × n` must not wrap around: 2^63 × 2 would be 0 tokens.
#[tokio::test]
async fn a_huge_max_tokens_cannot_wrap_the_reservation() {
    let gw = Harness::start().await;
    let created = gw
        .create_key(json!({"name": "wrap", "budget_usd": 1, "budget_period": "day"}))
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let mut body = request(32);
    body["max_tokens"] = json!(1u64 << 63);
    body["n"] = json!(2);
    let response = send_as(&gw, &key, &body).await;
    assert_eq!(response.status(), 429);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert_eq!(gw.mock.stats().requests, 0, "nothing reached the provider");
}

/// Both output limits, and counts written as floats, reserve the most the request may use.
#[tokio::test]
async fn the_larger_output_limit_is_reserved() {
    let gw = Harness::start().await;
    let created = gw.create_key(json!({"name": "both", "tpm": 1_000})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    let mut body = request(16);
    body["max_completion_tokens"] = json!(16);
    body["max_tokens"] = json!(2_000);
    let response = send_as(&gw, &key, &body).await;
    assert_eq!(
        response.status(),
        429,
        "21 + 2,000 tokens exceed 1,000 per minute"
    );
    let mut body = request(16);
    body["max_tokens"] = json!(100.0);
    body["n"] = json!(9.5);
    let response = send_as(&gw, &key, &body).await;
    assert_eq!(
        response.status(),
        429,
        "21 + 100 × 10 tokens exceed 1,000 per minute"
    );
    let mut body = request(16);
    body["max_tokens"] = json!(1e300);
    let response = send_as(&gw, &key, &body).await;
    assert_eq!(response.status(), 429);
    assert_eq!(gw.mock.stats().requests, 0);
    // None of the refused demands took anything: the whole minute is still there.
    let response = send_as(&gw, &key, &request(16)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "963");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_hold_under_concurrency() {
    let gw = Harness::start().await;
    // Each request asks for 21 input + 16 output = 37 tokens.
    let created = gw.create_key(json!({"name": "tpm", "tpm": 20 * 37})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    let body = request(16);
    let responses = join_all((0..200).map(|_| send_as(&gw, &key, &body))).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 20);
    let refused = responses.iter().find(|r| r.status() == 429).unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-should-retry"], "true");
    // The throttle headers come with the refusal, as OpenAI sends them on its 429s.
    assert_eq!(refused.headers()["x-ratelimit-limit-tokens"], "740");
    let remaining: u64 = refused.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 37, "{remaining} tokens left, yet refused");
    assert!(refused.headers().contains_key("x-ratelimit-reset-tokens"));
    assert!(!refused.headers().contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_capped() {
    // A paced mock keeps the first three streams open while the fourth arrives.
    let gw = Harness::start_with(
        MockOptions {
            tokens_per_sec: Some(20),
            ..MockOptions::default()
        },
        "",
    )
    .await;
    let created = gw
        .create_key(json!({"name": "conc", "max_concurrency": 3}))
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let mut body = request(16);
    body["stream"] = json!(true);
    // Hold three streams open, then try a fourth.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut slow = body.clone();
        slow["mock"] = json!({"reply_tokens": 16});
        let mut response = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .json(&slow)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.chunk().await.unwrap();
        open.push(response);
    }
    let fourth = send_as(&gw, &key, &request(16)).await;
    assert_eq!(fourth.status(), 429);
    assert_eq!(fourth.headers()["x-should-retry"], "true");
    let error: Value = fourth.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    // A finished stream frees its slot.
    let first = open.remove(0);
    first.bytes().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut short = request(1);
    short["mock"] = json!({"reply_tokens": 1});
    assert_eq!(send_as(&gw, &key, &short).await.status(), 200);
    drop(open);
}

#[tokio::test]
async fn every_proxied_response_carries_rate_limit_headers() {
    let gw = Harness::start().await;
    let created = gw
        .create_key(json!({"name": "hdr", "rpm": 5, "tpm": 1000}))
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let response = send_as(&gw, &key, &request(16)).await;
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "5");
    assert_eq!(h["x-ratelimit-remaining-requests"], "4");
    assert_eq!(h["x-ratelimit-reset-requests"], "12s");
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "963");
    assert_eq!(h["x-ratelimit-reset-tokens"], "2.22s");
    for _ in 0..4 {
        assert_eq!(send_as(&gw, &key, &request(16)).await.status(), 200);
    }
    let refused = send_as(&gw, &key, &request(16)).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((11..=12).contains(&wait), "retry-after {wait}");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "requests");
}

#[tokio::test]
async fn keys_are_checked_on_every_request() {
    let gw = Harness::start().await;
    let created = gw
        .create_key(json!({"name": "narrow", "models": ["gpt-4o-mini"]}))
        .await;
    assert!(created["key"].as_str().unwrap().starts_with("sk-"));
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();

    assert_eq!(send_as(&gw, "sk-wrong", &request(16)).await.status(), 401);
    let mut frontier = request(16);
    frontier["model"] = json!("gpt-4o");
    let forbidden = send_as(&gw, &key, &frontier).await;
    assert_eq!(forbidden.status(), 403);
    let error: Value = forbidden.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_allowed");
    assert_eq!(send_as(&gw, &key, &request(16)).await.status(), 200);

    // The secret is never shown again, and only a hash is stored.
    let listed: Value = gw
        .admin(reqwest::Method::GET, "/admin/keys")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!listed.to_string().contains(&key));
    let db = std::fs::read(gw.data_dir.join("keys.sqlite")).unwrap();
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()));

    let revoked = gw
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let after = send_as(&gw, &key, &request(16)).await;
    assert_eq!(after.status(), 401);
    let error: Value = after.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");

    let typo = gw
        .admin(reqwest::Method::POST, "/admin/keys")
        .json(&json!({"name": "x", "budget_usdd": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);
    let no_admin = gw
        .http
        .get(format!("{}/admin/keys", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(no_admin.status(), 401);
}

async fn patch_key(gw: &Harness, id: &str, changes: Value) -> Value {
    gw.admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"))
        .json(&changes)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn admin_shows_budget_state_and_updates_in_place() {
    let gw = Harness::start().await;
    let created = gw
        .create_key(json!({"name": "team", "budget_usd": 10, "budget_period": "month", "rpm": 100}))
        .await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["budget_usd"], json!(10));
    assert_eq!(created["spend_usd"], json!(0));
    assert_eq!(created["remaining_usd"], json!(10));
    assert!(created["period_start"]
        .as_str()
        .unwrap()
        .ends_with("-01T00:00:00Z"));
    assert!(created["resets_at"]
        .as_str()
        .unwrap()
        .ends_with("-01T00:00:00Z"));
    let key = created["key"].as_str().unwrap();
    assert_eq!(send_as(&gw, key, &request(16)).await.status(), 200);
    let updated: Value = patch_key(&gw, id, json!({"budget_usd": 20, "rpm": null})).await;
    assert_eq!(updated["budget_usd"], json!(20));
    assert_eq!(updated["rpm"], Value::Null);
    // The update kept the live spend of the request made before it.
    assert_eq!(updated["spend_usd"], json!(ACTUAL as f64 / 1e9));
    // Two more, then a new period at once: the second's record is still queued (the first
    // woke the writer, which then waits out its commit interval), and the period's spend read
    // back from the ledger includes it all the same.
    assert_eq!(send_as(&gw, key, &request(16)).await.status(), 200);
    assert_eq!(send_as(&gw, key, &request(16)).await.status(), 200);
    let daily: Value = patch_key(&gw, id, json!({"budget_period": "day"})).await;
    assert_eq!(daily["budget_period"], json!("day"));
    assert_eq!(daily["spend_usd"], json!((3 * ACTUAL) as f64 / 1e9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_does_not_retry_quota_but_retries_throttles() {
    // A paced upstream lets the script hold the throttled key's only slot with a stream.
    let gw = Harness::start_with(
        MockOptions {
            tokens_per_sec: Some(10),
            ..MockOptions::default()
        },
        "",
    )
    .await;
    let broke = gw
        .create_key(json!({"name": "broke", "budget_usd": 0, "budget_period": "total"}))
        .await;
    let throttled = gw
        .create_key(json!({"name": "throttled", "max_concurrency": 1}))
        .await;
    let base_url = format!("{}/v1", gw.url);
    let broke_key = broke["key"].as_str().unwrap().to_owned();
    let throttled_key = throttled["key"].as_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            "sdk_retries.py",
            &[&base_url, &broke_key, &throttled_key],
            &[],
        )
    })
    .await
    .unwrap();
    let seen: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["quota_error"], "RateLimitError");
    assert_eq!(seen["quota_code"], "insufficient_quota");
    assert_eq!(seen["throttled_then_ok"], true);
    // Retry-After is 1s, and the SDK waited for it before trying again.
    assert!(seen["throttled_wait_s"].as_f64().unwrap() >= 0.9);
    let metrics = gw.metrics().await;
    // One refusal only: the SDK did not retry insufficient_quota.
    assert!(
        metrics.contains("tollgate_rejections_total{reason=\"budget\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_rejections_total{reason=\"concurrency\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_alerts_reach_the_webhook_once_per_threshold() {
    let (hook, mut events_rx) = common::webhook_receiver().await;
    let extra = format!("[budgets]\nalert_thresholds_pct = [50, 80]\nalert_webhook = \"{hook}\"\n");
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    // Four actual requests' worth: the third crosses 50%, the fourth 80%... but only while a
    // reservation (max_tokens 16, so equal to the actual cost) still fits.
    let created = gw
        .create_key(json!({"name": "alerted", "budget_usd": (4 * ACTUAL) as f64 / 1e9}))
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    for _ in 0..4 {
        assert_eq!(send_as(&gw, &key, &request(16)).await.status(), 200);
    }
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), events_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(std::time::Duration::from_secs(5), events_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first["event"], "budget_threshold_crossed");
    assert_eq!(first["key_name"], "alerted");
    let mut thresholds = vec![
        first["threshold_pct"].as_u64().unwrap(),
        second["threshold_pct"].as_u64().unwrap(),
    ];
    thresholds.sort_unstable();
    assert_eq!(thresholds, vec![50, 80]);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), events_rx.recv())
            .await
            .is_err(),
        "each threshold is announced once"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("tollgate_budget_alerts_total{threshold=\"50\"} 1"));
}

#[tokio::test]
async fn the_admin_api_can_live_on_its_own_listener() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let extra_server = format!("admin_listen = \"127.0.0.1:{port}\"\n");
    let gw = Harness::start_separate_admin(&extra_server).await;
    let on_client = gw
        .http
        .get(format!("{}/admin/keys", gw.url))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        on_client.status(),
        404,
        "the client listener has no admin API"
    );
    let on_admin = gw
        .http
        .get(format!("http://127.0.0.1:{port}/admin/keys"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(on_admin.status(), 200);
}

/// Hostile admin traffic: concurrent PATCHes of different fields of one key used to read the
/// key, change it and write all of it back, so one could undo another — a budget set at the
/// same moment as a team came back `null`, the key uncapped. Each now lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_of_one_key_all_land() {
    let gw = Harness::start().await;
    let patch = |id: String, body: Value| {
        let request = gw.admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"));
        async move {
            let response = request.json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    for trial in 0..30 {
        let key = gw
            .create_key(json!({"name": format!("pair-{trial}")}))
            .await;
        let id = key["id"].as_str().unwrap().to_owned();
        join_all([
            patch(id.clone(), json!({"budget_usd": 5})),
            patch(id.clone(), json!({"team": "platform"})),
        ])
        .await;
        let state = key_state(&gw, &id).await;
        assert_eq!(state["budget_usd"], json!(5), "trial {trial}: {state}");
        assert_eq!(state["team"], "platform", "trial {trial}: {state}");
    }
    let key = gw.create_key(json!({"name": "ten"})).await;
    let id = key["id"].as_str().unwrap().to_owned();
    let fields = [
        json!({"owner": "ana"}),
        json!({"team": "core"}),
        json!({"customer": "acme"}),
        json!({"budget_usd": 7}),
        json!({"budget_period": "week"}),
        json!({"rpm": 60}),
        json!({"tpm": 9000}),
        json!({"max_concurrency": 3}),
        json!({"seats": 4}),
        json!({"models": ["gpt-4o-mini"]}),
    ];
    join_all(fields.iter().map(|body| patch(id.clone(), body.clone()))).await;
    let state = key_state(&gw, &id).await;
    for body in &fields {
        let (field, value) = body.as_object().unwrap().iter().next().unwrap();
        assert_eq!(&state[field], value, "{field}: {state}");
    }
}

/// Hostile admin input, each refused clearly or stored sanely: a zero throttle (which meant
/// "blocked" for some limits and "one a minute" or "none" for others), a budget as a string,
/// a malformed invoice period, an allow-list of duplicates, an oversized body (a JSON 413).
#[tokio::test]
async fn hostile_admin_fields_are_refused_or_made_sane() {
    let gw = Harness::start().await;
    let key = gw.create_key(json!({"name": "target"})).await;
    let id = key["id"].as_str().unwrap().to_owned();
    let patch = |body: Value| {
        gw.admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"))
            .json(&body)
            .send()
    };
    for (field, body) in [
        ("rpm", json!({"rpm": 0})),
        ("tpm", json!({"tpm": 0})),
        ("max_concurrency", json!({"max_concurrency": 0})),
        ("budget_usd", json!({"budget_usd": "5"})),
        ("max_usd_per_minute", json!({"max_usd_per_minute": 0})),
        ("max_usd_per_hour", json!({"max_usd_per_hour": -1})),
    ] {
        let response = patch(body).await.unwrap();
        assert_eq!(response.status(), 400, "{field}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], field);
    }
    let duplicates: Vec<&str> = std::iter::repeat_n("gpt-4o-mini", 20_000)
        .chain(["auto"])
        .collect();
    let response = patch(json!({"models": duplicates})).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        key_state(&gw, &id).await["models"],
        json!(["gpt-4o-mini", "auto"])
    );

    let oversized = format!(r#"{{"name": "{}"}}"#, "x".repeat(3 * 1024 * 1024));
    // Its own connection: the gateway closes it after refusing the body.
    let response = reqwest::Client::new()
        .post(format!("{}/admin/keys", gw.url))
        .bearer_auth(common::ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_too_large");

    for period in ["-001-01", "2026-1", "20261-01", "2026-13"] {
        let response = gw
            .admin(
                reqwest::Method::GET,
                &format!("/admin/invoices/{id}?period={period}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{period}");
    }
}

/// A provider that refuses the gateway's own credentials is not the client's problem: the
/// client gets a 502 that says so, never the provider's "Incorrect API key" about a key it
/// never sent.
#[tokio::test]
async fn a_provider_refusing_the_gateways_key_is_a_gateway_error() {
    let gw = Harness::start().await;
    for status in ["401", "403"] {
        let mut body = request(16);
        body["mock"] = json!({"fail": status});
        let response = gw.chat(body).await;
        assert_eq!(response.status(), 502, "{status}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "upstream_auth_failed");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("your API key is fine"), "{message}");
        assert!(!message.contains("server had an error"), "{message}");
    }
}

/// A runaway loop on a key capped at $0.01 a minute: it spends the minute's cap at once, then
/// at the cap's pace (over a span T at most $0.01 × (1 + T / 60 s), GCRA's burst), and the
/// rest is refused with 429 `rate_limit_exceeded` and a `Retry-After` it can wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_rate_cap_slows_a_runaway_loop_to_a_known_worst_case() {
    let gw = Harness::start().await;
    let created = gw
        .create_key(json!({"name": "runaway", "max_usd_per_minute": 0.01}))
        .await;
    assert_eq!(created["max_usd_per_minute"], 0.01);
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let body = request(32);
    let start = std::time::Instant::now();
    let (mut ok, mut refused, mut waves_after_refusal) = (0u64, Vec::new(), 0);
    // Waves of 32 at once until some are refused, then three more waves; bounded either way.
    for _ in 0..100 {
        let responses = join_all((0..32).map(|_| send_as(&gw, &key, &body))).await;
        for response in responses {
            match response.status().as_u16() {
                200 => ok += 1,
                429 => refused.push(response),
                other => panic!("status {other}"),
            }
        }
        if !refused.is_empty() {
            waves_after_refusal += 1;
            if waves_after_refusal > 3 {
                break;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert!(!refused.is_empty(), "{ok} admitted, none refused");
    let state = key_state(&gw, &id).await;
    let spent = (state["spend_usd"].as_f64().unwrap() * 1e9).round() as i64;
    assert_eq!(spent, ok as i64 * ACTUAL, "{state}");
    let worst_case = 1e7 * (1.0 + elapsed / 60.0);
    assert!(
        (spent as f64) <= worst_case,
        "spent {spent} nano-dollars in {elapsed:.2} s, more than {worst_case}"
    );
    // The loop did reach the cap: what is left is at most the reservations of one wave.
    assert!(spent >= 10_000_000 - 32 * RESERVED, "spent {spent}");
    let refusal = refused.remove(0);
    assert_eq!(refusal.headers()["x-should-retry"], "true");
    let wait: u64 = refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    let error: Value = refusal.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("spend (at most $0.01 per minute)") && message.contains("`runaway`"),
        "{message}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            "tollgate_rejections_total{{reason=\"key_usd_per_minute\"}} {}",
            refused.len() + 1
        )),
        "{metrics}"
    );
    // A cap is changed in place and keeps what the minute already took; null removes it.
    let changed = patch_key(
        &gw,
        &id,
        json!({"max_usd_per_minute": null, "max_usd_per_hour": 1}),
    )
    .await;
    assert_eq!(changed["max_usd_per_minute"], Value::Null);
    assert_eq!(send_as(&gw, &key, &body).await.status(), 200);
}

/// A key spending far faster than it usually does (here: with no history at all) is
/// announced once per spike, however long the spike lasts; a key under the floor is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_spike_is_announced_once_per_episode() {
    let (hook, mut events) = common::webhook_receiver().await;
    let floor = 10 * ACTUAL;
    let extra = format!(
        "[budgets]\nalert_webhook = \"{hook}\"\nvelocity_check_secs = 1\nvelocity_min_usd = {}\n",
        floor as f64 / 1e9
    );
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    let calm = gw.create_key(json!({"name": "calm"})).await;
    let burst = gw
        .create_key(json!({"name": "burst", "budget_usd": 1}))
        .await;
    for _ in 0..9 {
        let key = calm["key"].as_str().unwrap();
        assert_eq!(send_as(&gw, key, &request(16)).await.status(), 200);
    }
    let burst_key = burst["key"].as_str().unwrap().to_owned();
    for _ in 0..12 {
        assert_eq!(send_as(&gw, &burst_key, &request(16)).await.status(), 200);
    }
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
        .await
        .expect("a spike is announced within a few checks")
        .unwrap();
    assert_eq!(event["event"], "spend_velocity");
    assert_eq!(event["key_name"], "burst");
    assert_eq!(event["trigger"], "factor");
    assert_eq!(event["window_minutes"], 10);
    assert_eq!(
        (event["spend_usd"].as_f64().unwrap() * 1e9).round() as i64,
        12 * ACTUAL
    );
    assert_eq!(event["usual_usd"], 0.0);
    assert_eq!(event["budget"]["budget_usd"], 1.0);
    // The spike goes on for three more checks: still one episode, one announcement.
    for _ in 0..3 {
        assert_eq!(send_as(&gw, &burst_key, &request(16)).await.status(), 200);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), events.recv())
            .await
            .is_err(),
        "one announcement per episode"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_velocity_alerts_total{trigger=\"factor\"} 1"),
        "{metrics}"
    );
    // The key's view projects its period: no whole hour of history yet, so no pace.
    let state = key_state(&gw, burst["id"].as_str().unwrap()).await;
    assert_eq!(state["pace_usd_per_hour"], 0.0);
    assert_eq!(state["projected_spend_usd"], state["spend_usd"]);
    assert_eq!(state["cap_reached_at"], Value::Null);
}

/// A soft budget refuses nothing: reaching it is announced once per period, and the key keeps
/// being served past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_budget_is_announced_once_and_refuses_nothing() {
    let (hook, mut events) = common::webhook_receiver().await;
    let extra = format!(
        "[budgets]\nalert_webhook = \"{hook}\"\nalert_thresholds_pct = [100]\nvelocity_factor = 0\nvelocity_check_secs = 1\n"
    );
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    let soft = 3 * ACTUAL;
    let created = gw
        .create_key(
            json!({"name": "soft", "soft_budget_usd": soft as f64 / 1e9, "budget_period": "day"}),
        )
        .await;
    assert_eq!(created["soft_budget_usd"].as_f64(), Some(soft as f64 / 1e9));
    let key = created["key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(send_as(&gw, &key, &request(16)).await.status(), 200);
    }
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
        .await
        .expect("the soft budget is announced")
        .unwrap();
    assert_eq!(event["event"], "soft_budget_reached");
    assert_eq!(event["key_name"], "soft");
    assert_eq!(
        (event["budget"]["spend_usd"].as_f64().unwrap() * 1e9).round() as i64,
        soft
    );
    for _ in 0..3 {
        assert_eq!(send_as(&gw, &key, &request(16)).await.status(), 200);
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(2_500), events.recv())
            .await
            .is_err(),
        "once per period"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_soft_budget_alerts_total 1"),
        "{metrics}"
    );
}
