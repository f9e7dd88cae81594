//! Teams and customers, budget levels above keys, through the real gateway: a team's cap holds
//! under hundreds of concurrent requests over many keys, refusals name the level, a group's
//! spend survives a restart, and the admin API refuses what would lose a cap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::Harness;
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use tollgate::mock_upstream::MockOptions;

// One request: 21 input and 16 output tokens at gpt-4o-mini's $0.15 / $0.60 per 1M costs
// 12,750 nano-dollars; with max_tokens = 32 it reserves 22,350 (see tests/limits.rs).
const ACTUAL: i64 = 12_750;
const RESERVED: i64 = 22_350;

fn request() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": 32,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the gateway."}
        ],
        "mock": {"reply_tokens": 16}
    })
}

async fn send_as(gw: &Harness, key: &str) -> reqwest::Response {
    gw.http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(&request())
        .send()
        .await
        .unwrap()
}

async fn call(gw: &Harness, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut builder = gw.admin(method, path);
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn nanos(usd: &Value) -> i64 {
    (usd.as_f64().unwrap() * 1e9).round() as i64
}

fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_requests_over_twenty_keys_never_pass_the_team_cap() {
    let gw = Harness::start().await;
    let team_cap = 100 * ACTUAL;
    let key_cap = 8 * ACTUAL;
    let (status, team) = call(
        &gw,
        Method::POST,
        "/admin/teams",
        Some(json!({"name": "eng", "budget_usd": usd(team_cap), "budget_period": "day"})),
    )
    .await;
    assert_eq!(status, 201, "{team}");
    assert_eq!(team["object"], "team");
    assert_eq!(team["spend_usd"], 0.0);
    let mut keys = Vec::new();
    for i in 0..20 {
        let created = gw
            .create_key(
                json!({"name": format!("agent-{i}"), "team": "eng", "budget_usd": usd(key_cap)}),
            )
            .await;
        keys.push((
            created["id"].as_str().unwrap().to_owned(),
            created["key"].as_str().unwrap().to_owned(),
        ));
    }
    // Each key could spend 7 requests (140 in all); the team's cap allows 99.
    let sends = (0..300).map(|i| send_as(&gw, &keys[i % 20].1));
    let mut admitted = 0i64;
    let mut refused_by = std::collections::HashMap::<String, usize>::new();
    for response in join_all(sends).await {
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                assert_eq!(response.headers()["x-should-retry"], "false");
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "insufficient_quota");
                let message = error["error"]["message"].as_str().unwrap().to_owned();
                let level = if message.starts_with("Budget exhausted for team `eng` (key `agent-") {
                    "team"
                } else if message.starts_with("Budget exhausted for key `agent-") {
                    "key"
                } else {
                    panic!("{message}")
                };
                assert!(message.contains("; it resets at "), "{message}");
                *refused_by.entry(level.to_owned()).or_default() += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert!(refused_by["team"] > 0, "{refused_by:?}");
    let (_, team) = call(&gw, Method::GET, "/admin/teams/eng", None).await;
    let team_spend = nanos(&team["spend_usd"]);
    assert_eq!(team_spend, admitted * ACTUAL, "{team}");
    assert!(
        team_spend <= team_cap,
        "team spent {team_spend} of {team_cap}"
    );
    assert!(admitted >= team_cap / RESERVED, "only {admitted} admitted");
    assert_eq!(team["reserved_usd"], 0.0);
    assert_eq!(team["keys"], 20);
    let mut keys_spend = 0;
    for (id, _) in &keys {
        let (_, key) = call(&gw, Method::GET, &format!("/admin/keys/{id}"), None).await;
        let spend = nanos(&key["spend_usd"]);
        assert!(spend <= key_cap, "{key}");
        keys_spend += spend;
    }
    assert_eq!(keys_spend, team_spend);

    // Sequentially, the team's remainder is used to its last whole reservation: 99 in all.
    let mut more = 0;
    let mut refused_in_a_row = 0;
    let mut next = 0;
    while refused_in_a_row < keys.len() {
        match send_as(&gw, &keys[next % keys.len()].1)
            .await
            .status()
            .as_u16()
        {
            200 => {
                more += 1;
                refused_in_a_row = 0;
            }
            _ => refused_in_a_row += 1,
        }
        next += 1;
    }
    assert_eq!(admitted + more, 99);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_rejections_total{reason=\"team_budget\"}"),
        "{metrics}"
    );
    let gauge = |name: &str| {
        let sample = format!("tollgate_{name}{{level=\"team\",name=\"eng\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(sample.as_str()))
            .map(|value| value.parse::<f64>().unwrap())
    };
    let spent = usd(99 * ACTUAL);
    assert!(
        (gauge("group_spend_usd").unwrap() - spent).abs() < 1e-12,
        "{metrics}"
    );
    assert_eq!(gauge("group_reserved_usd"), Some(0.0));
    let left = usd(team_cap) - spent;
    assert!((gauge("group_budget_remaining_usd").unwrap() - left).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_throttles_and_spend_caps_name_the_team() {
    let gw = Harness::start().await;
    let (status, _) = call(
        &gw,
        Method::POST,
        "/admin/teams",
        Some(json!({"name": "search", "rpm": 3})),
    )
    .await;
    assert_eq!(status, 201);
    let a = gw.create_key(json!({"name": "a", "team": "search"})).await;
    let b = gw.create_key(json!({"name": "b", "team": "search"})).await;
    let (a, b) = (a["key"].as_str().unwrap(), b["key"].as_str().unwrap());
    for key in [a, b, a] {
        assert_eq!(send_as(&gw, key).await.status(), 200);
    }
    let refused = send_as(&gw, b).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Rate limit reached for requests per minute on team `search`."),
        "{message}"
    );

    // A spend-rate cap on a customer paces all its keys together.
    let (status, customer) = call(
        &gw,
        Method::POST,
        "/admin/customers",
        Some(json!({"name": "acme", "max_usd_per_minute": usd(3 * RESERVED)})),
    )
    .await;
    assert_eq!(status, 201, "{customer}");
    assert_eq!(customer["object"], "customer");
    let c = gw
        .create_key(json!({"name": "c", "customer": "acme"}))
        .await;
    let d = gw
        .create_key(json!({"name": "d", "customer": "acme"}))
        .await;
    let (c, d) = (c["key"].as_str().unwrap(), d["key"].as_str().unwrap());
    // Three worst cases fill the minute; what settled requests did not cost comes back, which
    // makes room for a fourth at most.
    let mut admitted = 0;
    let refused = loop {
        let response = send_as(&gw, [c, d][admitted % 2]).await;
        if response.status() != 200 {
            break response;
        }
        admitted += 1;
        assert!(
            admitted <= 4,
            "the customer's spend-rate cap let a fifth through"
        );
    };
    assert!(admitted >= 3, "only {admitted} admitted");
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for spend (at most $0.00006705 per minute) on customer `acme`."
        ),
        "{message}"
    );
    let metrics = gw.metrics().await;
    for reason in ["team_rpm", "customer_usd_per_minute"] {
        assert!(
            metrics.contains(&format!(
                "tollgate_rejections_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test]
async fn groups_are_administered_and_a_team_with_keys_is_not_deleted() {
    let plans = "[plans.plus]\nkind = \"per_token\"\nmarkup_pct = 100\n";
    let gw = Harness::start_with(MockOptions::default(), plans).await;
    let (status, team) = call(
        &gw,
        Method::POST,
        "/admin/teams",
        Some(json!({"name": "eng", "budget_usd": 1, "soft_budget_usd": 0.5, "tpm": 9000})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(team["budget_usd"], 1.0);
    assert_eq!(team["remaining_usd"], 1.0);
    assert_eq!(team["keys"], 0);
    assert!(team.get("plan").is_none(), "{team}");
    for (body, status_wanted, what) in [
        (json!({"name": "eng"}), 409, "exists already"),
        (json!({"name": ""}), 400, "non-empty"),
        (
            json!({"name": "x", "plan": "plus"}),
            400,
            "unknown team field `plan`",
        ),
        (
            json!({"name": "x", "budget_period": "year"}),
            400,
            "day, week, month, total",
        ),
        (json!({"name": "x", "rpm": 0}), 400, "at least 1"),
        (json!({"name": "x", "budget_usd": -1}), 400, "negative"),
    ] {
        let (status, error) = call(&gw, Method::POST, "/admin/teams", Some(body.clone())).await;
        assert_eq!(status, status_wanted, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(what), "{body}: {message}");
    }
    let (status, _) = call(&gw, Method::GET, "/admin/teams/nobody", None).await;
    assert_eq!(status, 404);
    let (status, changed) = call(
        &gw,
        Method::PATCH,
        "/admin/teams/eng",
        Some(json!({"budget_usd": 2, "tpm": null})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(changed["budget_usd"], 2.0);
    assert_eq!(changed["tpm"], Value::Null);

    let key = gw
        .create_key(json!({"name": "member", "team": "eng"}))
        .await;
    let id = key["id"].as_str().unwrap();
    let (status, error) = call(&gw, Method::DELETE, "/admin/teams/eng", None).await;
    assert_eq!(status, 409);
    assert_eq!(error["error"]["code"], "conflict");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("1 live key(s) still name the team `eng`"),
        "{message}"
    );
    let (status, _) = call(
        &gw,
        Method::PATCH,
        &format!("/admin/keys/{id}"),
        Some(json!({"team": null})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, deleted) = call(&gw, Method::DELETE, "/admin/teams/eng", None).await;
    assert_eq!((status, deleted["deleted"].clone()), (200, json!(true)));
    let (status, _) = call(&gw, Method::GET, "/admin/teams/eng", None).await;
    assert_eq!(status, 404);

    // A customer's plan rates its keys that have none of their own.
    let (status, error) = call(
        &gw,
        Method::POST,
        "/admin/customers",
        Some(json!({"name": "acme", "plan": "gold"})),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    let (status, customer) = call(
        &gw,
        Method::POST,
        "/admin/customers",
        Some(json!({"name": "acme", "plan": "plus"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(customer["plan"], "plus");
    let billed = gw
        .create_key(json!({"name": "billed", "customer": "acme"}))
        .await;
    assert_eq!(
        send_as(&gw, billed["key"].as_str().unwrap()).await.status(),
        200
    );
    let records = gw.usage_records(1).await;
    let record = records
        .iter()
        .find(|r| r.key_name.as_deref() == Some("billed"))
        .unwrap();
    assert_eq!(record.plan.as_deref(), Some("plus"));
    assert_eq!(record.charge.nanos(), 2 * ACTUAL);
    let (_, listed) = call(&gw, Method::GET, "/admin/customers", None).await;
    assert_eq!(listed["data"][0]["name"], "acme");
    assert_eq!(nanos(&listed["data"][0]["spend_usd"]), 2 * ACTUAL);
    // The customer's invoice is its keys' invoices, each under the plan it is rated by.
    let own = gw
        .create_key(json!({"name": "own-plan", "customer": "acme"}))
        .await;
    assert_eq!(
        send_as(&gw, own["key"].as_str().unwrap()).await.status(),
        200
    );
    assert_eq!(
        gw.usage_records(2).await.len(),
        2,
        "both requests are in the ledger"
    );
    let (status, invoice) = call(&gw, Method::GET, "/admin/customers/acme/invoice", None).await;
    assert_eq!(status, 200, "{invoice}");
    assert_eq!(
        (invoice["level"].as_str(), invoice["name"].as_str()),
        (Some("customer"), Some("acme"))
    );
    let keys = invoice["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{invoice}");
    assert!(keys.iter().all(|key| key["plan"] == "plus"), "{invoice}");
    assert_eq!(nanos(&invoice["total_usd"]), 4 * ACTUAL, "{invoice}");
    let (status, _) = call(
        &gw,
        Method::GET,
        "/admin/customers/acme/invoice?period=2026-13",
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(&gw, Method::GET, "/admin/teams/nobody/invoice", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_teams_spend_survives_a_restart() {
    let mut gw = Harness::start().await;
    let (status, _) = call(
        &gw,
        Method::POST,
        "/admin/teams",
        Some(json!({"name": "ops", "budget_usd": usd(4 * ACTUAL + RESERVED)})),
    )
    .await;
    assert_eq!(status, 201);
    let a = gw.create_key(json!({"name": "a", "team": "ops"})).await;
    let b = gw.create_key(json!({"name": "b", "team": "ops"})).await;
    for key in [&a, &b, &a] {
        assert_eq!(
            send_as(&gw, key["key"].as_str().unwrap()).await.status(),
            200
        );
    }
    gw.restart().await;
    let (_, team) = call(&gw, Method::GET, "/admin/teams/ops", None).await;
    assert_eq!(nanos(&team["spend_usd"]), 3 * ACTUAL, "{team}");
    // Room for exactly two more: 4 × actual + one reservation, less the three spent.
    let b = b["key"].as_str().unwrap();
    assert_eq!(send_as(&gw, b).await.status(), 200);
    assert_eq!(send_as(&gw, b).await.status(), 200);
    assert_eq!(send_as(&gw, b).await.status(), 429);
}

/// Four keys each spending under the spike floor make a team far above it: the team's spike
/// and its soft budget are each announced once, and no key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_spike_and_soft_budget_are_announced_once() {
    let (hook, mut events) = common::webhook_receiver().await;
    let extra = format!(
        "[budgets]\nalert_webhook = \"{hook}\"\nvelocity_check_secs = 1\nvelocity_min_usd = {}\n",
        usd(10 * ACTUAL)
    );
    let gw = Harness::start_with(MockOptions::default(), &extra).await;
    let (status, _) = call(
        &gw,
        Method::POST,
        "/admin/teams",
        Some(json!({"name": "eng", "budget_usd": 1, "soft_budget_usd": usd(6 * ACTUAL)})),
    )
    .await;
    assert_eq!(status, 201);
    let mut keys = Vec::new();
    for i in 0..4 {
        let key = gw
            .create_key(json!({"name": format!("k{i}"), "team": "eng"}))
            .await;
        keys.push(key["key"].as_str().unwrap().to_owned());
    }
    for _ in 0..3 {
        for key in &keys {
            assert_eq!(send_as(&gw, key).await.status(), 200);
        }
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
            .await
            .expect("the team's spike and soft budget are announced")
            .unwrap();
        assert_eq!(
            (event["level"].as_str(), event["name"].as_str()),
            (Some("team"), Some("eng")),
            "{event}"
        );
        assert_eq!(nanos(&event["budget"]["spend_usd"]), 12 * ACTUAL, "{event}");
        if event["event"] == "spend_velocity" {
            assert_eq!(nanos(&event["spend_usd"]), 12 * ACTUAL);
            assert_eq!(event["trigger"], "factor");
        }
        seen.push(event["event"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["soft_budget_reached", "spend_velocity"]);
    // Three more checks while the spike lasts: nothing more, for the team or its keys.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(events.try_recv().is_err(), "one announcement each");
    let metrics = gw.metrics().await;
    for sample in [
        "tollgate_velocity_alerts_total{trigger=\"factor\"} 1",
        "tollgate_soft_budget_alerts_total 1",
    ] {
        assert!(metrics.contains(sample), "{sample}: {metrics}");
    }
}
