//! What SREs read: the Prometheus exposition (parsed by a real parser, counters checked against
//! the traffic sent), and the dashboard and alert rules (every metric they use is exported;
//! `promtool check rules` passes where promtool is installed, as `.ci/run` does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{python, Harness};
use serde_json::{json, Value};
use tollgate::metrics::Metrics;

fn parse_exposition(text: &str) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(python())
        .arg(root.join("tests/python/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn sample(families: &Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}"))
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .and_then(|s| s[2].as_f64())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_parses_and_counts_the_traffic() {
    let gw = Harness::start().await;
    let capped = gw
        .create_key(json!({"name": "capped", "budget_usd": 1, "rpm": 100}))
        .await;
    let key = capped["key"].as_str().unwrap().to_owned();
    let first_request = std::time::Instant::now();
    for i in 0..5 {
        let body = json!({"model": "gpt-4o-mini", "stream": i % 2 == 0, "messages": [{"role": "user", "content": "Say hello to the gateway."}]});
        let response = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let unknown = gw.chat(json!({"model": "nope", "messages": []})).await;
    assert_eq!(unknown.status(), 404);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let text = gw.metrics().await;
    assert!(!text.contains(&key), "no secret in metrics");
    let families = parse_exposition(&text);
    assert_eq!(families["tollgate_requests"]["type"], "counter");
    let ok = sample(
        &families,
        "tollgate_requests",
        "tollgate_requests_total",
        &[("model", "gpt-4o-mini"), ("status", "2xx")],
    );
    assert_eq!(ok, 5.0);
    // 5 × (3 + 1 + 6 + 3) input tokens and 5 × 16 output tokens.
    assert_eq!(
        sample(
            &families,
            "tollgate_input_tokens",
            "tollgate_input_tokens_total",
            &[("model", "gpt-4o-mini")]
        ),
        65.0
    );
    assert_eq!(
        sample(
            &families,
            "tollgate_output_tokens",
            "tollgate_output_tokens_total",
            &[("model", "gpt-4o-mini")]
        ),
        80.0
    );
    assert_eq!(
        sample(
            &families,
            "tollgate_rejections",
            "tollgate_rejections_total",
            &[("reason", "model_not_found")]
        ),
        1.0
    );
    assert_eq!(
        families["tollgate_request_duration_seconds"]["type"],
        "histogram"
    );
    assert_eq!(
        sample(
            &families,
            "tollgate_time_to_first_token_seconds",
            "tollgate_time_to_first_token_seconds_count",
            &[("model", "gpt-4o-mini")]
        ),
        3.0
    );
    // 5 × (13 × 150 + 16 × 600) nano-dollars = $0.00005775.
    let cost = sample(
        &families,
        "tollgate_cost_usd",
        "tollgate_cost_usd_total",
        &[("model", "gpt-4o-mini")],
    );
    assert!((cost - 0.000_057_75).abs() < 1e-12, "{cost}");
    assert_eq!(
        sample(
            &families,
            "tollgate_key_spend_usd",
            "tollgate_key_spend_usd",
            &[("key", "capped")]
        ),
        0.000_057_75
    );
    // Read at the scrape: five of the minute's 100 taken, and one more back for every 0.6 s
    // since the first was.
    let remaining = sample(
        &families,
        "tollgate_key_remaining_requests",
        "tollgate_key_remaining_requests",
        &[("key", "capped")],
    );
    let refilled = (first_request.elapsed().as_secs_f64() / 0.6).floor();
    assert!(
        (95.0..=95.0 + refilled).contains(&remaining),
        "{remaining} after {refilled} refills"
    );
    // Five answered requests and the refused one: every authenticated request is recorded.
    assert_eq!(
        sample(
            &families,
            "tollgate_usage_events",
            "tollgate_usage_events_total",
            &[("result", "written")]
        ),
        6.0
    );
}

/// The per-key gauges are read from the live limits at each scrape: a key's budget shows
/// before its first request, and a revoked key's series are gone at the next scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_gauges_follow_the_keys_at_each_scrape() {
    let gw = Harness::start().await;
    let created = gw
        .create_key(json!({"name": "watched", "budget_usd": 2, "rpm": 60, "tpm": 1000}))
        .await;
    let families = parse_exposition(&gw.metrics().await);
    let watched = [("key", "watched")];
    let gauge = |family: &str| sample(&families, family, family, &watched);
    assert_eq!(gauge("tollgate_key_spend_usd"), 0.0);
    assert_eq!(gauge("tollgate_key_budget_remaining_usd"), 2.0);
    assert_eq!(gauge("tollgate_key_budget_used_ratio"), 0.0);
    assert_eq!(gauge("tollgate_key_remaining_requests"), 60.0);
    assert_eq!(gauge("tollgate_key_remaining_tokens"), 1000.0);

    let id = created["id"].as_str().unwrap();
    let revoked = gw
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());
    let text = gw.metrics().await;
    assert!(!text.contains("key=\"watched\""), "{text}");
}

fn names_in(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let pattern = regex::Regex::new(r"tollgate_[a-z_]+").unwrap();
    pattern
        .find_iter(&text)
        .map(|m| {
            let name = m.as_str();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
                .to_owned()
        })
        .collect()
}

#[test]
fn dashboards_and_alerts_use_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exported: BTreeSet<String> = Metrics::new().family_names().into_iter().collect();
    for file in [
        "deploy/grafana/tollgate-dashboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = names_in(&root.join(file));
        assert!(used.len() >= 5, "{file} uses {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the gateway does not export: {missing:?}"
        );
    }
}

/// The alert rules are valid, and each fires on the synthetic series it guards
/// (`deploy/prometheus/alerts.test.yml`, `deploy/compose/alerts-shared-state.test.yml`): a
/// rule that can never fire fails here.
#[test]
fn alert_rules_pass_promtool() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for (command, file) in [
        ("check", "prometheus/alerts.yml"),
        ("test", "prometheus/alerts.test.yml"),
        ("check", "compose/alerts-shared-state.yml"),
        ("test", "compose/alerts-shared-state.test.yml"),
    ] {
        let Ok(output) = Command::new("promtool")
            .args([command, "rules"])
            .arg(deploy.join(file))
            .output()
        else {
            eprintln!("promtool is not installed (.ci/run installs it); rules not checked here");
            return;
        };
        assert!(
            output.status.success(),
            "promtool {command} rules {file}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Started under a soft limit of 256 open files (hard limit higher), the binary raises its soft
/// limit to the hard one before it listens: each proxied request holds two sockets.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(4))
        .unwrap()
        .to_owned();
    if hard == "unlimited" || hard.parse::<u64>().unwrap() <= 256 {
        return;
    }
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} mock-upstream --listen 127.0.0.1:0",
            env!("CARGO_BIN_EXE_tollgate")
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut banner,
    )
    .unwrap();
    assert!(banner.contains("listening"), "{banner}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let soft = open_files.split_whitespace().nth(3).unwrap();
    assert_eq!(soft, hard, "{open_files}");
}

/// No secret leaves the gateway: with logs at trace level, the provider key, the admin token
/// and a client's secret appear in no log line, no `/metrics` sample, no error body and no
/// admin answer — through success, streaming, refusals, a provider refusing the gateway's key
/// (whose body quotes that key) and bad input. The one place a secret appears is the answer
/// that creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_or_answers() {
    use common::{config_text, temp_dir, ADMIN_TOKEN, PROVIDER_KEY};
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = tollgate::mock_upstream::MockUpstream::start(mock_listener, Default::default())
        .await
        .unwrap();
    let dir = temp_dir("secrets");
    let config = dir.join("routes.toml");
    std::fs::write(&config, config_text(&mock.base_url(), &dir, "")).unwrap();
    let log_path = dir.join("gateway.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
        .env("TOLLGATE_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    let http = reqwest::Client::new();
    let mut seen = String::new();
    let record = |response: reqwest::Response| async move {
        let mut text = format!("{} {:?}\n", response.status(), response.headers());
        text.push_str(&response.text().await.unwrap_or_default());
        text
    };

    let created = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "secretive", "budget_usd": 0.00002}))
        .send()
        .await
        .unwrap();
    let created: Value = created.json().await.unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let chat = |body: Value, key: String| {
        http.post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let hello = |extra: Value| {
        let mut body = json!({"model": "gpt-4o-mini", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]});
        for (name, value) in extra.as_object().unwrap() {
            body[name] = value.clone();
        }
        body
    };
    for body in [
        hello(json!({})),
        hello(json!({"stream": true})),
        hello(json!({"mock": {"fail": "401"}})),
        hello(json!({"mock": {"fail": "500"}})),
        hello(json!({"max_tokens": 100000})),
        json!({"model": "nope", "messages": []}),
        json!({"messages": "not a list"}),
    ] {
        seen.push_str(&record(chat(body, secret.clone()).await.unwrap()).await);
    }
    let near_miss = format!("{}x", &secret[..secret.len() - 1]);
    seen.push_str(&record(chat(hello(json!({})), near_miss).await.unwrap()).await);
    for path in [
        format!("/admin/keys/{id}"),
        "/admin/keys".to_owned(),
        "/admin/usage?group_by=key".to_owned(),
        format!("/admin/invoices/{id}"),
    ] {
        let response = http
            .get(format!("{url}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        seen.push_str(&record(response).await);
    }
    let wrong_admin = http
        .get(format!("{url}/admin/keys"))
        .bearer_auth(format!("{ADMIN_TOKEN}x"))
        .send()
        .await
        .unwrap();
    seen.push_str(&record(wrong_admin).await);
    seen.push_str(&record(http.get(format!("{url}/metrics")).send().await.unwrap()).await);

    // SIGTERM, so every log line is written.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("the provider refused the gateway's credentials"));
    assert!(
        log.contains("[provider key]"),
        "the quoted key was redacted"
    );
    for (what, secret) in [
        ("provider key", PROVIDER_KEY),
        ("admin token", ADMIN_TOKEN),
        ("client secret", secret.as_str()),
    ] {
        assert!(!log.contains(secret), "{what} in the log");
        assert!(!seen.contains(secret), "{what} in an answer or /metrics");
    }
    let _ = std::fs::remove_dir_all(dir);
}
