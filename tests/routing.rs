//! Routing rules, weighted choice, fallbacks and retries against the mock's failure injection,
//! and hot reload.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Harness;
use rand::SeedableRng;
use serde_json::{json, Value};
use tollgate::config::Config;
use tollgate::mock_upstream::{FailMode, MockOptions, MockUpstream};
use tollgate::reload::{reload, ReloadOutcome};
use tollgate::route::{KeyPolicy, RawRouter, Router};

fn catalog() -> Vec<(String, String)> {
    [
        ("mini", "cheap"),
        ("nano", "cheap"),
        ("big", "frontier"),
        ("huge", "frontier"),
    ]
    .iter()
    .map(|(m, t)| ((*m).to_owned(), (*t).to_owned()))
    .collect()
}

fn router(toml_text: &str) -> Router {
    let raw: RawRouter = toml::from_str(toml_text).unwrap();
    Router::build(&raw, &catalog()).unwrap()
}

fn chat(text: &str) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": text}]})
}

fn decide(router: &Router, body: &Value, tokens: u64) -> tollgate::route::Decision {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    router
        .decide(body, tokens, &KeyPolicy::default(), &mut rng)
        .unwrap()
}

#[test]
fn each_rule_kind_matches() {
    let r = router(
        r#"
default = "cheap"
[tiers.cheap]
models = [{ model = "mini" }]
fallback_tier = "frontier"
[tiers.frontier]
models = [{ model = "big" }, { model = "huge" }]
[[rules]]
name = "long"
target = "frontier"
when = { prompt_tokens_gt = 1000 }
[[rules]]
name = "tools"
target = "huge"
when = { has_tools = true }
[[rules]]
name = "keywords"
target = "frontier"
when = { any_keywords = ["kubernetes", "terraform"] }
[[rules]]
name = "regex"
target = "frontier"
when = { last_user_matches = "(?i)^urgent:" }
[[rules]]
name = "code-and-steps"
target = "frontier"
when = { has_code = true, numbered_steps_gt = 1 }
[[rules]]
name = "questions"
target = "frontier"
when = { questions_gt = 2, turns_gt = 0 }
[[rules]]
name = "scored"
target = "frontier"
when = { score_gt = 0.5 }
"#,
    );
    assert_eq!(decide(&r, &chat("hello"), 1001).rule, "long");
    let mut with_tools = chat("weather?");
    with_tools["tools"] = json!([{"type": "function", "function": {"name": "w"}}]);
    let decision = decide(&r, &with_tools, 5);
    assert_eq!(
        (decision.rule.as_str(), decision.model.as_str()),
        ("tools", "huge")
    );
    assert_eq!(decision.tier, "frontier");
    assert_eq!(decision.fallbacks, vec!["big"]);
    assert_eq!(
        decide(&r, &chat("Set up Kubernetes for me"), 5).rule,
        "keywords"
    );
    assert_eq!(decide(&r, &chat("URGENT: call back"), 5).rule, "regex");
    let code = "Fix these:\n1. the loop\n2. the return\n```\nfn main() {\n    loop {}\n}\n```";
    assert_eq!(decide(&r, &chat(code), 5).rule, "code-and-steps");
    assert_eq!(decide(&r, &chat("a? b? c?"), 5).rule, "questions");
    let heavy =
        "Prove it step by step, derive the bound, analyze the algorithm: ∑ x^2 over 3000 tokens";
    assert_eq!(decide(&r, &chat(heavy), 900).rule, "scored");
    let easy = decide(&r, &chat("hi"), 3);
    assert_eq!(
        (easy.rule.as_str(), easy.model.as_str()),
        ("default", "mini")
    );
    assert_eq!(
        easy.fallbacks,
        vec!["big", "huge"],
        "cheap falls back to frontier"
    );
}

#[test]
fn weighted_choice_follows_the_weights() {
    let r = router("[tiers.cheap]\nmodels = [{ model = \"mini\", weight = 3 }, { model = \"nano\", weight = 1 }]\n");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let draws = 20_000;
    let mini = (0..draws)
        .filter(|_| {
            r.decide(&chat("hi"), 3, &KeyPolicy::default(), &mut rng)
                .unwrap()
                .model
                == "mini"
        })
        .count();
    let share = mini as f64 / draws as f64;
    assert!((share - 0.75).abs() < 0.015, "mini got {share}");
}

#[test]
fn key_policy_pins_forbids_and_filters() {
    let r = router("[tiers.cheap]\nmodels = [{ model = \"mini\" }, { model = \"nano\" }]\nfallback_tier = \"frontier\"\n[tiers.frontier]\nmodels = [{ model = \"big\" }]\n");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let pinned = KeyPolicy {
        pinned_tier: Some("frontier".into()),
        ..KeyPolicy::default()
    };
    assert_eq!(
        r.decide(&chat("hi"), 1, &pinned, &mut rng).unwrap().model,
        "big"
    );
    let only_nano = KeyPolicy {
        allowed_models: Some(vec!["nano".into()]),
        ..KeyPolicy::default()
    };
    let decision = r.decide(&chat("hi"), 1, &only_nano, &mut rng).unwrap();
    assert_eq!(
        (decision.model.as_str(), decision.fallbacks.len()),
        ("nano", 0)
    );
    let no_frontier = KeyPolicy {
        forbidden_tiers: vec!["frontier".into()],
        ..KeyPolicy::default()
    };
    assert!(!r
        .decide(&chat("hi"), 1, &no_frontier, &mut rng)
        .unwrap()
        .fallbacks
        .contains(&"big".to_owned()));
}

#[test]
fn bad_router_configs_name_the_field() {
    let dir = common::temp_dir("badroute");
    let path = dir.join("routes.toml");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.toml"))
        .unwrap()
        .replace("default = \"cheap\"", "default = \"cheep\"");
    std::fs::write(&path, &text).unwrap();
    let error = Config::load(&path).unwrap_err().to_string();
    let line = text
        .lines()
        .position(|l| l.starts_with("default = \"cheep\""))
        .unwrap()
        + 1;
    assert!(
        error.contains(&format!(
            "routes.toml:{line}:1: router.default: `cheep` is neither a tier nor a model"
        )),
        "{error}"
    );
}

/// Two upstreams: `flaky` (a mock failing every request with 503) and `mock`.
const FALLBACK: &str = r#"
[upstreams.flaky]
base_url = "FLAKY_URL"
first_byte_timeout_ms = 300

[models."flaky-mini"]
upstream = "flaky"
tier = "cheap"
encoding = "o200k_base"
input_per_mtok = 0.15
output_per_mtok = 0.60

[router]
default = "cheap"
[router.tiers.cheap]
models = [{ model = "flaky-mini" }]
fallback_tier = "frontier"
[router.tiers.frontier]
models = [{ model = "gpt-4o-mini" }]
"#;

async fn with_flaky(mode: FailMode) -> (Harness, MockUpstream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky = MockUpstream::start(
        listener,
        MockOptions {
            fail_rate: 1.0,
            fail_mode: mode,
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let extra = FALLBACK.replace("FLAKY_URL", &flaky.base_url());
    (
        Harness::start_with(MockOptions::default(), &extra).await,
        flaky,
    )
}

#[tokio::test]
async fn a_failing_model_falls_back_to_the_next_tier() {
    let (mut gw, flaky) = with_flaky(FailMode::Status(503)).await;
    let response = gw.chat(chat("hi")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(response.headers()["x-tollgate-route"], "default");
    assert_eq!(
        flaky.stats().requests,
        2,
        "two attempts on the failing model"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("tollgate_fallbacks_total{model=\"gpt-4o-mini\"} 1"));
    assert!(metrics.contains("tollgate_route_decisions_total{rule=\"default\",tier=\"cheap\"} 1"));
    gw.stop().await;
    let record = &gw.usage_records(1).await[0];
    assert_eq!(record.attempts, 3);
    assert_eq!(record.served_model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(record.requested_model, "auto");
}

#[tokio::test]
async fn a_hung_or_throttled_model_falls_back_too() {
    for mode in [
        FailMode::Hang,
        FailMode::RateLimited {
            retry_after_secs: 60,
        },
    ] {
        let (gw, _flaky) = with_flaky(mode).await;
        let started = Instant::now();
        let response = gw.chat(chat("hi")).await;
        assert_eq!(response.status(), 200, "{mode:?}");
        assert_eq!(response.headers()["x-tollgate-model"], "gpt-4o-mini");
        // A Retry-After beyond the budget means: do not wait, fall back.
        assert!(started.elapsed() < Duration::from_secs(10), "{mode:?}");
    }
}

#[tokio::test]
async fn a_fallback_model_keeps_its_own_throttle() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky = MockUpstream::start(
        listener,
        MockOptions {
            fail_rate: 1.0,
            fail_mode: FailMode::Status(503),
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let extra = FALLBACK.replace("FLAKY_URL", &flaky.base_url()).replace(
        "[router]",
        "[models.\"backup\"]\nupstream = \"mock\"\ntier = \"frontier\"\nencoding = \"o200k_base\"\ninput_per_mtok = 1\noutput_per_mtok = 4\nrpm = 1\n\n[router]",
    );
    let extra = extra.replace(
        "models = [{ model = \"gpt-4o-mini\" }]",
        "models = [{ model = \"backup\" }]",
    );
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    let first = gw.chat(chat("hi")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-tollgate-model"], "backup");
    // The backup's one request a minute is spent: the flaky model's own answer stands.
    let second = gw.chat(chat("hi")).await;
    assert_eq!(second.status(), 503);
    assert_eq!(gw.mock.stats().requests, 1, "the backup was asked once");
    assert_eq!(flaky.stats().requests, 4);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_fallbacks_total{model=\"backup\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"model_rpm\"} 1"), "{metrics}");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gw = Harness::start().await;
    let mut body = chat("hi");
    body["model"] = json!("gpt-4o-mini");
    body["mock"] = json!({"fail": "429", "retry_after": 1, "fail_first": 1});
    let started = Instant::now();
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "retried after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn no_retry_once_bytes_reached_the_client() {
    let gw = Harness::start().await;
    let mut body = chat("tell me a story");
    body["model"] = json!("gpt-4o-mini");
    body["stream"] = json!(true);
    body["mock"] = json!({"fail": "cut", "cut_after": 3, "fail_first": 5});
    let response = gw.chat(body).await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.is_err());
    assert_eq!(
        gw.mock.stats().requests,
        1,
        "a stream that started is never retried"
    );
}

#[tokio::test]
async fn hot_reload_applies_good_configs_and_keeps_the_old_on_bad_ones() {
    let gw = Harness::start().await;
    let path = gw.data_dir.join("routes.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let app = gw.app.clone();
    assert!(app
        .config()
        .router
        .as_ref()
        .is_some_and(|r| r.is_virtual("auto")));
    std::fs::write(
        &path,
        format!("{original}\n[router]\nvirtual_model = \"smart\"\n"),
    )
    .unwrap();
    assert!(matches!(reload(&app, &path), ReloadOutcome::Applied));
    assert!(app.config().knows_model("smart"));
    std::fs::write(&path, format!("{original}\n[router]\nvirtual_model = 7\n")).unwrap();
    match reload(&app, &path) {
        ReloadOutcome::Rejected(error) => {
            let text = error.to_string();
            assert!(
                text.contains("routes.toml:") && text.contains("virtual_model"),
                "{text}"
            );
        }
        ReloadOutcome::Applied => panic!("a bad config was applied"),
    }
    assert!(
        app.config().knows_model("smart"),
        "the previous config keeps serving"
    );
    let response = gw
        .chat(json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(response.status(), 200);

    // The watcher notices an edited file by itself.
    std::fs::write(
        &path,
        format!("{original}\n[router]\nvirtual_model = \"clever\"\n"),
    )
    .unwrap();
    let mut seen = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.config().knows_model("clever") {
            seen = true;
            break;
        }
    }
    assert!(seen, "the edited file was not reloaded");
}
