//! Rating through the real gateway: the ledger, usage reports, invoices, outcomes, and spend
//! that survives restarts and crashes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use common::{config_text, spawn_gateway, temp_dir, Harness, ADMIN_TOKEN};
use serde_json::{json, Value};
use tollgate::meter::record::UsageRecord;
use tollgate::mock_upstream::{MockOptions, MockUpstream};
use tollgate::rating::ledger::{LedgerReader, SqliteLedgerReader};

const PLANS: &str = r#"
[plans.support]
kind = "per_outcome"
platform_fee_usd = 10
outcomes = { resolution = 1.50 }

[plans.team]
kind = "per_seat"
seat_fee_usd = 80
included_tokens_per_seat = 20
overage_per_1k_tokens_usd = 0.02
"#;

fn request() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": 32,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the gateway."}
        ]
    })
}

async fn get(gw: &Harness, path: &str) -> Value {
    let response = gw.admin(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

async fn chat_as(gw: &Harness, key: &str) -> reqwest::Response {
    gw.http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(&request())
        .send()
        .await
        .unwrap()
}

/// A client may choose its `x-request-id`, and may reuse it: its own retries, or (by accident
/// or not) an id another tenant used. Each request reached the provider, so each is billed.
#[tokio::test]
async fn a_reused_client_request_id_is_billed_every_time() {
    let mut gw = Harness::start().await;
    let mut keys = Vec::new();
    for (name, requests) in [("first", 2), ("second", 1)] {
        let key = gw.create_key(json!({"name": name})).await;
        for _ in 0..requests {
            let response = gw
                .http
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(key["key"].as_str().unwrap())
                .header("x-request-id", "retry-7")
                .json(&request())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-request-id"], "retry-7");
        }
        keys.push((key["id"].as_str().unwrap().to_owned(), requests));
    }
    gw.stop().await;
    gw.restart().await;

    let records = gw.usage_records(3).await;
    let reused: Vec<_> = records
        .iter()
        .filter(|r| r.client_request_id.as_deref() == Some("retry-7"))
        .collect();
    assert_eq!(reused.len(), 3);
    let ids: std::collections::HashSet<_> = reused.iter().map(|r| &r.request_id).collect();
    assert_eq!(ids.len(), 3, "each request has its own ledger id");
    // gpt-4o-mini at list price: 21 input tokens × $0.15 + 16 output × $0.60 per 1M.
    for (id, requests) in keys {
        let expected = json!(requests as f64 * 12_750.0 / 1e9);
        let state = get(&gw, &format!("/admin/keys/{id}")).await;
        assert_eq!(state["spend_usd"], expected, "{id}");
        let usage = get(&gw, &format!("/admin/usage?group_by=key&key_id={id}")).await;
        assert_eq!(usage["data"][0]["requests"], requests);
        assert_eq!(usage["data"][0]["cost_usd"], expected);
    }
}

/// A request the provider did not answer is recorded with its counted prompt but bills
/// nothing: not in the usage report's tokens, not against a seat's allowance, before or after a
/// restart.
#[tokio::test]
async fn an_unanswered_request_uses_no_allowance() {
    let mut gw = Harness::start_with(MockOptions::default(), PLANS).await;
    let key = gw
        .create_key(json!({"name": "acme", "plan": "team", "seats": 1}))
        .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    let mut failing = request();
    failing["mock"] = json!({"fail": "500"});
    let failed = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&secret)
        .json(&failing)
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    assert_eq!(chat_as(&gw, &secret).await.status(), 200);
    gw.stop().await;
    gw.restart().await;

    let records = gw.usage_records(2).await;
    let unanswered = records.iter().find(|r| !r.answered).unwrap();
    assert!(unanswered.counted.input > 0);
    assert_eq!(unanswered.billed().input, 0);
    let usage = get(&gw, &format!("/admin/usage?group_by=key&key_id={id}")).await;
    assert_eq!(usage["data"][0]["requests"], 2);
    assert_eq!(usage["data"][0]["input_tokens"], 21);
    assert_eq!(usage["data"][0]["output_tokens"], 16);
    // One seat includes 20 tokens: 37 used, 17 over at $0.02 per 1k = $0.00034. The failed
    // request's 21 counted tokens must not have been taken from the allowance (after the
    // restart the month's totals are read back from the ledger).
    assert_eq!(chat_as(&gw, &secret).await.status(), 200);
    assert_eq!(
        gw.usage_records(3).await.len(),
        3,
        "the batched commit came"
    );
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let invoice = get(&gw, &format!("/admin/invoices/{id}?period={month}")).await;
    assert_eq!(invoice["used_tokens"], 74);
    assert_eq!(invoice["total_usd"], json!(80.00108));
}

#[tokio::test]
async fn usage_reports_invoices_and_spend_agree() {
    let mut gw = Harness::start_with(MockOptions::default(), PLANS).await;
    let key = gw
        .create_key(json!({"name": "acme", "plan": "team", "seats": 2}))
        .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(chat_as(&gw, &secret).await.status(), 200);
    }
    gw.stop().await;
    gw.restart().await;

    // 3 requests × (21 input + 16 output) = 111 tokens; 2 seats include 40; 71 over at
    // $0.02 per 1k = 20,000 nano-dollars each = $0.00142. Seats: 2 × $80.
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let invoice = get(&gw, &format!("/admin/invoices/{id}?period={month}")).await;
    assert_eq!(invoice["plan"], "team");
    assert_eq!(invoice["total_usd"], json!(160.00142));
    let lines = invoice["lines"].as_array().unwrap();
    assert_eq!(lines[0]["amount_usd"], json!(160));
    assert_eq!(lines[1]["quantity"], json!(40));
    assert_eq!(lines[2]["quantity"], json!(71));
    assert_eq!(lines[2]["amount_usd"], json!(0.00142));

    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(
        state["spend_usd"],
        json!(0.00142),
        "spend survives the restart and equals the usage charges"
    );

    let by_model = get(&gw, &format!("/admin/usage?group_by=model&key_id={id}")).await;
    let row = &by_model["data"][0];
    assert_eq!(row["group"], "gpt-4o-mini");
    assert_eq!(row["requests"], 3);
    assert_eq!(row["input_tokens"], 63);
    assert_eq!(row["output_tokens"], 48);
    assert_eq!(row["cost_usd"], json!(0.00142));
    assert_eq!(row["list_cost_usd"], json!(3.0 * 12_750.0 / 1e9));
    let by_day = get(&gw, "/admin/usage?group_by=day").await;
    assert_eq!(
        by_day["data"][0]["group"],
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );
    let bad = gw
        .admin(reqwest::Method::GET, "/admin/usage?group_by=planet")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// Under volume tiers a request that takes the month into a cheaper tier re-prices it lower:
/// its charge is negative, and the key's spend must fall with it to stay equal to the invoice.
#[tokio::test]
async fn a_volume_discount_lowers_spend_as_it_lowers_the_invoice() {
    let plans = r#"
[plans.bulk]
kind = "per_token"
tier_mode = "volume"
tiers = [{ up_to_tokens = 50, rate_pct = 100 }, { rate_pct = 10 }]
"#;
    let mut gw = Harness::start_with(MockOptions::default(), plans).await;
    let key = gw
        .create_key(json!({"name": "bulk", "plan": "bulk", "budget_usd": 1}))
        .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    assert_eq!(chat_as(&gw, &secret).await.status(), 200);
    // 21 input × $0.15/M + 16 output × $0.60/M = 12,750 nano-dollars at the full rate.
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(0.00001275));
    assert_eq!(chat_as(&gw, &secret).await.status(), 200);
    // 74 tokens pass the 50-token tier: the month is 2 × 12,750 at 10% = 2,550.
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(0.00000255));
    gw.stop().await;
    gw.restart().await;
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let invoice = get(&gw, &format!("/admin/invoices/{id}?period={month}")).await;
    assert_eq!(invoice["total_usd"], json!(0.00000255));
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(0.00000255));
}

/// Outcomes: billed once per idempotency key (a repeat is answered with what the first
/// recorded), only of types the plan prices, and held against the key's cap like any charge.
#[tokio::test]
async fn outcomes_are_billed_once_priced_and_capped() {
    let mut gw = Harness::start_with(MockOptions::default(), PLANS).await;
    let key = gw
        .create_key(json!({"name": "helpdesk", "plan": "support", "budget_usd": 4}))
        .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    let report = |kind: &str, quantity: u64, idempotency: &str| {
        gw.http
            .post(format!("{}/v1/outcomes", gw.url))
            .bearer_auth(&secret)
            .json(&json!({"type": kind, "quantity": quantity, "request_id": "req_1", "idempotency_key": idempotency}))
            .send()
    };
    let first = report("resolution", 1, "ticket-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["charge_usd"], json!(1.5));
    let repeat = report("resolution", 5, "ticket-1").await.unwrap();
    assert_eq!(repeat.status(), 200);
    let repeat: Value = repeat.json().await.unwrap();
    assert_eq!(repeat["quantity"], 1, "the recorded report, not the repeat");
    assert_eq!(repeat["status"], "duplicate");
    assert_eq!(
        report("resolution", 1, "ticket-2").await.unwrap().status(),
        202
    );

    let typo = report("refund", 1, "ticket-3").await.unwrap();
    assert_eq!(typo.status(), 400);
    let typo: Value = typo.json().await.unwrap();
    assert_eq!(
        typo["error"]["message"],
        "unknown outcome type `refund`: plan `support` bills resolution"
    );
    assert_eq!(typo["error"]["param"], "type");
    let bad = report("resolution", 0, "ticket-4").await.unwrap();
    assert_eq!(bad.status(), 400);

    // $3 of the $4 cap is spent: a third resolution ($1.50) does not fit.
    let over = report("resolution", 1, "ticket-5").await.unwrap();
    assert_eq!(over.status(), 429);
    let over: Value = over.json().await.unwrap();
    assert_eq!(over["error"]["code"], "insufficient_quota");
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(3));

    let listed = gw.create_key(json!({"name": "tokens-only"})).await;
    let not_outcomes = gw
        .http
        .post(format!("{}/v1/outcomes", gw.url))
        .bearer_auth(listed["key"].as_str().unwrap())
        .json(&json!({"type": "resolution"}))
        .send()
        .await
        .unwrap();
    assert_eq!(not_outcomes.status(), 400);

    gw.stop().await;
    gw.restart().await;
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(
        state["spend_usd"],
        json!(3),
        "outcome spend survives a restart"
    );
    let invoice = get(&gw, &format!("/admin/invoices/{id}")).await;
    // $10 platform fee + 2 distinct resolutions × $1.50.
    assert_eq!(invoice["total_usd"], json!(13));
    let outcome_line = &invoice["lines"][1];
    assert_eq!(outcome_line["quantity"], 2);
    assert_eq!(outcome_line["unit_price_usd"], json!(1.5));
}

/// Sends one request whose provider reports exactly `prompt` input and `output` output
/// tokens, and returns its ledger record (the ledger holds `recorded` rows before it).
async fn sized(
    gw: &Harness,
    secret: &str,
    prompt: u64,
    output: u64,
    recorded: usize,
) -> UsageRecord {
    let mut body = request();
    body["max_tokens"] = json!(output.max(1));
    body["mock"] = json!({"prompt_tokens": prompt, "reply_tokens": output});
    let response = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let records = gw.usage_records(recorded + 1).await;
    assert_eq!(records.len(), recorded + 1, "the batched commit came");
    let record = records
        .into_iter()
        .find(|r| r.request_id == request_id)
        .unwrap();
    assert_eq!(record.billed().input, prompt);
    assert_eq!(record.billed().output, output);
    record
}

fn charges(records: &[UsageRecord]) -> i64 {
    records.iter().map(|r| r.charge.nanos()).sum()
}

/// Audit item: a volume-tier plan with prices of its own rated the month after a restart from
/// list prices. The month's totals are kept at the plan's prices, so a restart changes nothing.
#[tokio::test]
async fn a_restart_leaves_volume_tiers_with_plan_prices_exact() {
    let plans = r#"
[plans.bulk]
kind = "per_token"
tier_mode = "volume"
tiers = [{ up_to_tokens = 2000, rate_pct = 100 }, { up_to_tokens = 5000, rate_pct = 70 }, { rate_pct = 50 }]
prices."gpt-4o-mini" = { input_per_mtok = 0.333, output_per_mtok = 1.111 }
"#;
    let mut gw = Harness::start_with(MockOptions::default(), plans).await;
    let key = gw.create_key(json!({"name": "bulk", "plan": "bulk"})).await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    let mut recorded = 0;
    for (prompt, output) in [(1000, 500), (400, 100), (1, 0)] {
        sized(&gw, &secret, prompt, output, recorded).await;
        recorded += 1;
    }
    gw.stop().await;
    gw.restart().await;
    sized(&gw, &secret, 2000, 999, recorded).await;
    let last = sized(&gw, &secret, 10, 1, recorded + 1).await;
    // Before it: 5,000 tokens costing 2,909,022 at 70% = 2,036,315.4 → 2,036,315. After it:
    // 5,011 tokens costing 2,913,463 at 50% = 1,456,731.5 → 1,456,732.
    assert_eq!(last.charge.nanos(), -579_583);
    let records = gw.usage_records(5).await;
    assert_eq!(charges(&records), 1_456_732);
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(0.001456732));
}

/// Audit item: under a 12.5% markup each request's exact amount is rounded once. One input
/// token of gpt-4o-mini is 150 nano-dollars, 168.75 marked up: 169 each, 6,760 for forty.
#[tokio::test]
async fn a_markup_rounds_each_request_once() {
    let plans = "[plans.plus]\nkind = \"per_token\"\nmarkup_pct = 12.5\n";
    let gw = Harness::start_with(MockOptions::default(), plans).await;
    let key = gw.create_key(json!({"name": "plus", "plan": "plus"})).await;
    let secret = key["key"].as_str().unwrap().to_owned();
    for recorded in 0..40 {
        assert_eq!(
            sized(&gw, &secret, 1, 0, recorded).await.charge.nanos(),
            169
        );
    }
    assert_eq!(charges(&gw.usage_records(40).await), 6_760);
}

/// Audit item: a hard-stop credit pack stops the key when its credits are gone, even when the
/// key's own budget is larger; and the invoice is the ledger's charges plus the pack's unused
/// part, so spend, ledger and invoice agree.
#[tokio::test]
async fn a_hard_stop_pack_stops_a_key_with_a_larger_budget() {
    let plans = r#"
[plans.pack]
kind = "credits"
pack_price_usd = 0.01
pack_credits = 3
credits_per_1k_tokens = { cheap = 1, frontier = 10 }
"#;
    let gw = Harness::start_with(MockOptions::default(), plans).await;
    let key = gw
        .create_key(json!({"name": "pack", "plan": "pack", "budget_usd": 1}))
        .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    let (mut answered, mut refused) = (0, 0);
    for _ in 0..40 {
        let mut body = request();
        // 21 prompt tokens and 88 output: the reservation is the request's true size.
        body["max_tokens"] = json!(88);
        body["mock"] = json!({"reply_tokens": 88});
        let response = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&secret)
            .json(&body)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => answered += 1,
            429 => {
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "insufficient_quota");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // 109 tokens burn 0.109 credits, worth $0.01 × 0.109 / 3 ≈ 363,333 nano-dollars; each is
    // admitted only while the pack holds its worst case (4 nano-dollars per micro-credit).
    assert_eq!((answered, refused), (27, 13));
    let records = gw.usage_records(40).await;
    let billed: Vec<_> = records.iter().filter(|r| r.answered).collect();
    assert_eq!(billed.len(), 27);
    assert!(
        billed.iter().all(|r| r.charge.nanos() > 0),
        "nothing given away"
    );
    let spent = charges(&records);
    // 27 × 0.109 = 2.943 credits of 3: $0.01 × 2.943 / 3 = 9,810,000 nano-dollars.
    assert_eq!(spent, 9_810_000);
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let invoice = get(&gw, &format!("/admin/invoices/{id}?period={month}")).await;
    assert_eq!(invoice["credits_used"], json!(2.943));
    let lines = invoice["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "no overage under hard stop: {lines:?}");
    assert_eq!(lines[0]["amount_usd"], json!(0.00981));
    assert_eq!(lines[1]["quantity"], json!(0.057));
    assert_eq!(lines[1]["amount_usd"], json!(0.00019));
    assert_eq!(invoice["total_usd"], json!(0.01));
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(0.00981));
    assert_eq!(state["budget_usd"], json!(0.01), "the pack caps the key");
}

/// Audit item: a credit pack's spend is the pack's value of the credits used, and its invoice
/// is that plus the pack's unused part — the pack billed whole, spend equal to the ledger.
#[tokio::test]
async fn a_credit_pack_invoice_is_its_ledger_charges_plus_the_unused_part() {
    let plans = r#"
[plans.pack]
kind = "credits"
pack_price_usd = 5
pack_credits = 7
credits_per_1k_tokens = { cheap = 1, frontier = 10 }
"#;
    let gw = Harness::start_with(MockOptions::default(), plans).await;
    let key = gw.create_key(json!({"name": "pack", "plan": "pack"})).await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let id = key["id"].as_str().unwrap().to_owned();
    // 999 cheap tokens burn 0.999 credits: $5 × 0.999 / 7 = 713,571,428.57 → 713,571,429.
    let record = sized(&gw, &secret, 900, 99, 0).await;
    assert_eq!(record.charge.nanos(), 713_571_429);
    assert_eq!(record.micro_credits, 999_000);
    let state = get(&gw, &format!("/admin/keys/{id}")).await;
    assert_eq!(state["spend_usd"], json!(0.713571429));
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let invoice = get(&gw, &format!("/admin/invoices/{id}?period={month}")).await;
    let lines = invoice["lines"].as_array().unwrap();
    assert_eq!(lines[0]["amount_usd"], json!(0.713571429), "{invoice}");
    assert_eq!(lines[1]["amount_usd"], json!(4.286428571));
    assert_eq!(invoice["total_usd"], json!(5));
    assert_eq!(invoice["credits_remaining"], json!(6.001));
}

/// Audit item: a key without a cap reserved nothing, so nothing it is charged overshoots.
#[tokio::test]
async fn an_uncapped_key_never_overshoots() {
    let gw = Harness::start().await;
    let key = gw.create_key(json!({"name": "open"})).await;
    let secret = key["key"].as_str().unwrap().to_owned();
    assert_eq!(chat_as(&gw, &secret).await.status(), 200);
    let capped = gw
        .create_key(json!({"name": "capped", "budget_usd": 1}))
        .await;
    let secret = capped["key"].as_str().unwrap().to_owned();
    assert_eq!(sized(&gw, &secret, 21, 16, 1).await.charge.nanos(), 12_750);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_budget_overshoot_usd_total 0\n"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("overshoot"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// What a crash under load left: each request the client saw complete, with how long before
/// the kill it completed, and the request ids in the ledger after a restart.
struct Crash {
    completed: Vec<(String, Duration)>,
    ledger_ids: std::collections::HashSet<String>,
}

async fn crash_under_load(durability: &str) -> Crash {
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = MockUpstream::start(mock_listener, MockOptions::default())
        .await
        .unwrap();
    let data_dir = temp_dir("crash");
    let extra = format!("[ledger]\ndurability = \"{durability}\"\n");
    let path = data_dir.join("routes.toml");
    std::env::set_var("TOLLGATE_TEST_PROVIDER_KEY", common::PROVIDER_KEY);
    std::fs::write(&path, config_text(&mock.base_url(), &data_dir, &extra)).unwrap();
    let (mut child, url) = spawn_gateway(&path);
    let http = reqwest::Client::new();
    let key: Value = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "load"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = key["key"].as_str().unwrap().to_owned();
    let completed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (http, url, secret) = (http.clone(), url.clone(), secret.clone());
            let (completed, stop) = (completed.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let id = format!("crash-{worker}-{n}");
                    let mut body = request();
                    body["stream"] = json!(n % 2 == 0);
                    let sent = http
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(&secret)
                        .header("x-request-id", &id)
                        .json(&body)
                        .send()
                        .await;
                    let Ok(response) = sent else { break };
                    let Ok(text) = response.text().await else {
                        break;
                    };
                    if text.contains("chat.completion")
                        && (n % 2 == 1 || text.ends_with("data: [DONE]\n\n"))
                    {
                        completed.lock().unwrap().push((id, Instant::now()));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = Instant::now();
    child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    // Restart once (crash leftovers are handled at start-up), then read the ledger.
    let (mut child, _) = spawn_gateway(&path);
    child.kill().unwrap();
    child.wait().unwrap();
    let records = SqliteLedgerReader::new(&data_dir).records().unwrap();
    let ledger_ids: Vec<String> = records
        .into_iter()
        .filter_map(|r| r.client_request_id)
        .collect();
    let unique: std::collections::HashSet<String> = ledger_ids.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        ledger_ids.len(),
        "a request was charged twice"
    );
    let completed = completed
        .lock()
        .unwrap()
        .iter()
        .map(|(id, at)| (id.clone(), killed_at.saturating_duration_since(*at)))
        .collect();
    Crash {
        completed,
        ledger_ids: unique,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_loses_no_completed_request_in_a_crash() {
    let crash = crash_under_load("strict").await;
    assert!(
        crash.completed.len() > 20,
        "only {} requests completed before the kill",
        crash.completed.len()
    );
    for (id, _) in &crash.completed {
        assert!(
            crash.ledger_ids.contains(id),
            "{id} completed for the client but is not in the ledger"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_loses_at_most_the_stated_window() {
    let crash = crash_under_load("batched").await;
    assert!(
        crash.completed.len() > 20,
        "only {} requests completed before the kill",
        crash.completed.len()
    );
    // The README's window is the 20 ms commit interval plus the batch being written; the
    // rest of this allowance is scheduling slack on a loaded 2-core machine. A lost record
    // older than that would mean a committed batch went missing.
    let window = Duration::from_millis(100);
    for (id, before_kill) in &crash.completed {
        assert!(
            crash.ledger_ids.contains(id) || *before_kill <= window,
            "{id} completed {before_kill:?} before the kill and is not in the ledger"
        );
    }
}

/// Strict durability never hands out an answer whose usage record was not committed: with the
/// ledger's table dropped under the running gateway, a non-streamed answer becomes a 503, a
/// stream is cut before its end, and the replica reports itself not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_withholds_an_answer_it_could_not_record() {
    let gw = Harness::start_with(
        MockOptions::default(),
        "[ledger]\ndurability = \"strict\"\n",
    )
    .await;
    assert_eq!(gw.chat(request()).await.status(), 200);
    // An answer too long to count on the async worker waits for its commit all the same.
    let long_stream = || {
        let mut streamed = request();
        streamed["stream"] = json!(true);
        streamed["mock"] = json!({"reply_tokens": 3000});
        streamed
    };
    let long = gw.chat(long_stream()).await.text().await.unwrap();
    assert!(long.len() > 8192 && long.ends_with("data: [DONE]\n\n"));
    let ready = gw
        .http
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let ledger = rusqlite::Connection::open(gw.data_dir.join("ledger.sqlite")).unwrap();
    ledger.execute_batch("DROP TABLE usage").unwrap();

    let refused = gw.chat(request()).await;
    assert_eq!(refused.status(), 503);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "usage_not_recorded");

    // A provider that ends its stream without `[DONE]`, or a long one, gets the same treatment.
    for (no_done, reply_tokens) in [(false, 8), (true, 8), (false, 3000)] {
        let mut streamed = request();
        streamed["stream"] = json!(true);
        streamed["mock"] = json!({"no_done": no_done, "reply_tokens": reply_tokens});
        let cut = gw.chat(streamed).await;
        assert_eq!(cut.status(), 200);
        match cut.text().await {
            Err(_) => {}
            Ok(text) => panic!(
                "the stream ended normally (no_done: {no_done}, {reply_tokens} tokens): {text}"
            ),
        }
    }

    // A load balancer should take this replica out while it cannot record usage.
    let unready = gw
        .http
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unready.status(), 503);
    let body: Value = unready.json().await.unwrap();
    assert_eq!(body["checks"]["usage_recording"], "failing");
}

/// The rules of the README's Rating section, written out plainly and apart from the gateway's
/// rating module, to check every charge it writes against.
mod documented {
    /// `value × numerator / denominator`, rounded half up; all non-negative here.
    pub fn round(value: i128, numerator: i128, denominator: i128) -> i64 {
        ((2 * value * numerator + denominator) / (2 * denominator)) as i64
    }

    #[derive(Clone, Copy)]
    pub struct Prices {
        pub input: i64,
        pub cached: i64,
        pub output: i64,
    }

    #[derive(Clone, Copy)]
    pub struct Tokens {
        pub input: u64,
        pub cached: u64,
        pub output: u64,
    }

    impl Prices {
        pub fn cost(&self, t: Tokens) -> i64 {
            (t.input - t.cached) as i64 * self.input
                + t.cached as i64 * self.cached
                + t.output as i64 * self.output
        }
    }

    pub enum Plan {
        /// Tiers as (tokens up to, rate in basis points); the last has no bound.
        Graduated {
            markup_bp: i64,
            tiers: Vec<(Option<u64>, i64)>,
        },
        Volume {
            markup_bp: i64,
            tiers: Vec<(Option<u64>, i64)>,
        },
        Seats {
            included: u64,
            nanos_per_token: i64,
        },
        Credits {
            pack_nanos: i64,
            pack_micro: u64,
            overage_nanos_per_credit: Option<i64>,
        },
        Outcomes,
    }

    /// A key's month so far.
    #[derive(Default)]
    pub struct Month {
        pub tokens: u64,
        pub plan_cost: i64,
        pub micro: u64,
    }

    fn volume_charge(markup_bp: i64, tiers: &[(Option<u64>, i64)], month: &Month) -> i64 {
        let rate = tiers
            .iter()
            .find(|(up_to, _)| up_to.is_none_or(|limit| month.tokens <= limit))
            .map_or(10_000, |(_, rate)| *rate);
        round(
            month.plan_cost as i128 * rate as i128,
            (10_000 + markup_bp) as i128,
            100_000_000,
        )
    }

    fn credits_charge(pack_nanos: i64, pack_micro: u64, overage: Option<i64>, micro: u64) -> i64 {
        let within = micro.min(pack_micro);
        let beyond = micro - within;
        round(within as i128, pack_nanos as i128, pack_micro as i128)
            + overage.map_or(0, |price| round(beyond as i128, price as i128, 1_000_000))
    }

    impl Plan {
        /// One request's charge, moving the month on. `micro_per_token` is its tier's burn.
        pub fn charge(
            &self,
            month: &mut Month,
            prices: Prices,
            t: Tokens,
            micro_per_token: u64,
        ) -> i64 {
            let tokens = t.input + t.output;
            let cost = prices.cost(t);
            let before = Month { ..*month };
            month.tokens += tokens;
            month.plan_cost += cost;
            month.micro += tokens * micro_per_token;
            match self {
                Plan::Graduated { markup_bp, tiers } => {
                    // Cached input takes the next places, then the rest of the input, then
                    // the output; each token at its price and its place's tier rate.
                    let mut place = before.tokens;
                    let mut exact: i128 = 0;
                    for (count, price) in [
                        (t.cached, prices.cached),
                        (t.input - t.cached, prices.input),
                        (t.output, prices.output),
                    ] {
                        for _ in 0..count {
                            let rate = tiers
                                .iter()
                                .find(|(up_to, _)| up_to.is_none_or(|limit| place < limit))
                                .map_or(10_000, |(_, rate)| *rate);
                            exact += price as i128 * rate as i128;
                            place += 1;
                        }
                    }
                    round(exact, (10_000 + markup_bp) as i128, 100_000_000)
                }
                Plan::Volume { markup_bp, tiers } => {
                    volume_charge(*markup_bp, tiers, month)
                        - volume_charge(*markup_bp, tiers, &before)
                }
                Plan::Seats {
                    included,
                    nanos_per_token,
                } => {
                    let over = |tokens: u64| tokens.saturating_sub(*included) as i64;
                    (over(month.tokens) - over(before.tokens)) * nanos_per_token
                }
                Plan::Credits {
                    pack_nanos,
                    pack_micro,
                    overage_nanos_per_credit,
                } => {
                    credits_charge(
                        *pack_nanos,
                        *pack_micro,
                        *overage_nanos_per_credit,
                        month.micro,
                    ) - credits_charge(
                        *pack_nanos,
                        *pack_micro,
                        *overage_nanos_per_credit,
                        before.micro,
                    )
                }
                Plan::Outcomes => 0,
            }
        }
    }
}

const AUDIT_PLANS: &str = r#"
[plans.graduated]
kind = "per_token"
markup_pct = 12.5
tiers = [{ up_to_tokens = 3000, rate_pct = 100 }, { up_to_tokens = 9000, rate_pct = 80 }, { rate_pct = 55.5 }]
prices."gpt-4o" = { input_per_mtok = 2.123, cached_input_per_mtok = 1.001, output_per_mtok = 9.999 }

[plans.volume]
kind = "per_token"
tier_mode = "volume"
markup_pct = 7.25
tiers = [{ up_to_tokens = 4000, rate_pct = 100 }, { up_to_tokens = 12000, rate_pct = 70 }, { rate_pct = 50 }]
prices."gpt-4o-mini" = { input_per_mtok = 0.333, output_per_mtok = 1.111 }

[plans.seats]
kind = "per_seat"
seat_fee_usd = 80
included_tokens_per_seat = 5000
overage_per_1k_tokens_usd = 0.02

[plans.flex]
kind = "credits"
pack_price_usd = 0.05
pack_credits = 7
credits_per_1k_tokens = { cheap = 1, frontier = 10.5 }
at_zero = "overage"
overage_per_credit_usd = 0.0123

[plans.pack]
kind = "credits"
pack_price_usd = 50
pack_credits = 700
credits_per_1k_tokens = { cheap = 1, frontier = 10.5 }

[plans.support]
kind = "per_outcome"
platform_fee_usd = 10
outcomes = { resolution = 1.50, escalation = 0.35 }
"#;

fn usd_nanos(value: &Value) -> i64 {
    (value.as_f64().unwrap() * 1e9).round() as i64
}

/// Property: random request sequences (sizes, cached input, models, streaming, keys on every
/// plan kind, outcomes, restarts at random points) are charged by the gateway exactly what the
/// documented rules give, and each key's spend, ledger sum and invoice agree.
#[tokio::test]
async fn random_months_are_billed_as_documented() {
    use documented::{Month, Plan, Prices, Tokens};
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    let list = |model: &str| match model {
        "gpt-4o" => Prices {
            input: 2_500,
            cached: 1_250,
            output: 10_000,
        },
        _ => Prices {
            input: 150,
            cached: 75,
            output: 600,
        },
    };
    let plans: Vec<(&str, Plan, u32)> = vec![
        (
            "list",
            Plan::Graduated {
                markup_bp: 0,
                tiers: vec![],
            },
            1,
        ),
        (
            "graduated",
            Plan::Graduated {
                markup_bp: 1_250,
                tiers: vec![(Some(3_000), 10_000), (Some(9_000), 8_000), (None, 5_550)],
            },
            1,
        ),
        (
            "volume",
            Plan::Volume {
                markup_bp: 725,
                tiers: vec![(Some(4_000), 10_000), (Some(12_000), 7_000), (None, 5_000)],
            },
            1,
        ),
        (
            "seats",
            Plan::Seats {
                included: 5_000,
                nanos_per_token: 20_000,
            },
            3,
        ),
        (
            "flex",
            Plan::Credits {
                pack_nanos: 50_000_000,
                pack_micro: 7_000_000,
                overage_nanos_per_credit: Some(12_300_000),
            },
            1,
        ),
        (
            "pack",
            Plan::Credits {
                pack_nanos: 50_000_000_000,
                pack_micro: 700_000_000,
                overage_nanos_per_credit: None,
            },
            1,
        ),
        ("support", Plan::Outcomes, 1),
    ];
    let prices_under = |plan: &str, model: &str| match (plan, model) {
        ("graduated", "gpt-4o") => Prices {
            input: 2_123,
            cached: 1_001,
            output: 9_999,
        },
        ("volume", "gpt-4o-mini") => Prices {
            input: 333,
            cached: 333,
            output: 1_111,
        },
        _ => list(model),
    };

    for seed in [7_u64, 2026] {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut gw = Harness::start_with(MockOptions::default(), AUDIT_PLANS).await;
        let mut keys = Vec::new();
        for (name, _, seats) in &plans {
            let mut body = json!({"name": format!("audit-{name}"), "seats": seats});
            if *name != "list" {
                body["plan"] = json!(name);
            }
            let key = gw.create_key(body).await;
            keys.push((
                key["key"].as_str().unwrap().to_owned(),
                key["id"].as_str().unwrap().to_owned(),
            ));
        }
        let mut months: Vec<Month> = plans.iter().map(|_| Month::default()).collect();
        let mut expected: HashMap<String, i64> = HashMap::new();
        let mut outcome_charges = vec![0i64; plans.len()];
        let mut recorded = 0;
        let surely_restarted_at = rng.random_range(20..50);
        for step in 0..70 {
            if step == surely_restarted_at || (step > 0 && rng.random_range(0..25) == 0) {
                gw.stop().await;
                gw.restart().await;
            }
            let k = rng.random_range(0..plans.len());
            let (secret, _) = &keys[k];
            if plans[k].0 == "support" && rng.random_bool(0.4) {
                let (kind, price) = match rng.random_bool(0.5) {
                    true => ("resolution", 1_500_000_000),
                    false => ("escalation", 350_000_000),
                };
                let quantity = rng.random_range(1..4u64);
                let idempotency = format!("t-{}", rng.random_range(0..6));
                let response = gw
                    .http
                    .post(format!("{}/v1/outcomes", gw.url))
                    .bearer_auth(secret)
                    .json(&json!({"type": kind, "quantity": quantity, "idempotency_key": idempotency}))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    202 => outcome_charges[k] += price * quantity as i64,
                    200 => {}
                    other => panic!("outcome answered {other}"),
                }
                continue;
            }
            let model = if rng.random_bool(0.5) {
                "gpt-4o"
            } else {
                "gpt-4o-mini"
            };
            let input = rng.random_range(1..2_500u64);
            let tokens = Tokens {
                input,
                cached: if rng.random_bool(0.3) {
                    rng.random_range(0..=input)
                } else {
                    0
                },
                output: rng.random_range(0..1_500u64),
            };
            let stream = rng.random_bool(0.5);
            let mut body = json!({
                "model": model,
                "max_tokens": tokens.output.max(1),
                "stream": stream,
                "messages": [{"role": "user", "content": "Count for the audit."}],
                "mock": {"prompt_tokens": tokens.input, "cached_tokens": tokens.cached,
                         "reply_tokens": tokens.output},
            });
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = gw
                .http
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let request_id = response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned();
            response.bytes().await.unwrap();
            let micro_per_token = match model {
                "gpt-4o" => 10_500,
                _ => 1_000,
            };
            let (plan_name, plan, seats) = &plans[k];
            let plan_prices = prices_under(plan_name, model);
            let plan = match plan {
                Plan::Seats {
                    nanos_per_token, ..
                } => &Plan::Seats {
                    included: 5_000 * u64::from(*seats),
                    nanos_per_token: *nanos_per_token,
                },
                other => other,
            };
            let charge = plan.charge(&mut months[k], plan_prices, tokens, micro_per_token);
            expected.insert(request_id, charge);
            recorded += 1;
            assert_eq!(
                gw.usage_records(recorded).await.len(),
                recorded,
                "the commit came"
            );
        }

        let records = gw.usage_records(recorded).await;
        for record in &records {
            assert_eq!(
                Some(&record.charge.nanos()),
                expected.get(&record.request_id),
                "seed {seed}: {} on plan {:?}: {:?}",
                record.request_id,
                record.plan,
                record.billed()
            );
        }
        let month = chrono::Utc::now().format("%Y-%m").to_string();
        for (k, (name, _, seats)) in plans.iter().enumerate() {
            let id = &keys[k].1;
            let ledger: i64 = records
                .iter()
                .filter(|r| r.key_id.as_deref() == Some(id.as_str()))
                .map(|r| r.charge.nanos())
                .sum();
            let charged = ledger + outcome_charges[k];
            let state = get(&gw, &format!("/admin/keys/{id}")).await;
            assert_eq!(
                usd_nanos(&state["spend_usd"]),
                charged,
                "seed {seed}: spend of {name}"
            );
            let invoice = get(&gw, &format!("/admin/invoices/{id}?period={month}")).await;
            let fixed = match *name {
                "seats" => 80_000_000_000 * i64::from(*seats),
                "flex" => 50_000_000,
                "pack" => 50_000_000_000,
                "support" => 10_000_000_000,
                _ => 0,
            };
            // A credit pack is billed whole: the ledger's charges hold the pack's value of the
            // credits used, and the invoice adds the unused rest.
            let pack_used = match &plans[k].1 {
                Plan::Credits {
                    pack_nanos,
                    pack_micro,
                    ..
                } => documented::round(
                    months[k].micro.min(*pack_micro) as i128,
                    *pack_nanos as i128,
                    *pack_micro as i128,
                ),
                _ => 0,
            };
            assert_eq!(
                usd_nanos(&invoice["total_usd"]),
                fixed - pack_used + charged,
                "seed {seed}: invoice of {name}: {invoice}"
            );
        }
        gw.stop().await;
    }
}

/// Traffic through the gateway is reported by team, customer, route rule, tier and hour from
/// the rollups, and `tollgate export` writes exactly the records the ledger holds.
#[tokio::test]
async fn usage_groups_by_labels_rules_tiers_and_hours_and_export_writes_the_ledger() {
    let mut harness = Harness::start().await;
    let prompts = [
        "Say hello.",
        "Write a Rust function that parses ```fn main() {}``` and explain it step by step.",
        "Think carefully and prove, step by step, that the square root of two is irrational.",
    ];
    for prompt in prompts.iter().cycle().take(7) {
        let response = harness
            .chat(json!({"model": "auto", "messages": [{"role": "user", "content": prompt}]}))
            .await;
        assert_eq!(response.status(), 200);
    }
    // Keys in teams and customers: usage groups by each key's labels.
    for (team, customer, requests) in [
        (Some("red"), Some("acme"), 2),
        (Some("red"), Some("beta"), 1),
        (Some("blue"), None, 1),
    ] {
        let key = harness
            .create_key(json!({"name": "labelled", "team": team, "customer": customer}))
            .await;
        for _ in 0..requests {
            let response = chat_as(&harness, key["key"].as_str().unwrap()).await;
            assert_eq!(response.status(), 200);
        }
    }
    let records = harness.usage_records(11).await;
    assert_eq!(records.len(), 11);
    for (group, expected) in [
        ("team", json!({"": 7, "blue": 1, "red": 3})),
        ("customer", json!({"": 8, "acme": 2, "beta": 1})),
    ] {
        let report = get(
            &harness,
            &format!("/admin/usage?group_by={group}&from=2000-01-01"),
        )
        .await;
        let requests: serde_json::Map<String, Value> = report["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["group"].as_str().unwrap().to_owned(),
                    row["requests"].clone(),
                )
            })
            .collect();
        assert_eq!(Value::Object(requests), expected, "group_by={group}");
        assert_eq!(report["totals"]["requests"], 11);
    }
    for (group, field) in [
        ("rule", "route_rule"),
        ("tier", "tier"),
        ("hour", "started_at_ms"),
    ] {
        let report = get(
            &harness,
            &format!("/admin/usage?group_by={group}&from=2000-01-01"),
        )
        .await;
        let mut expected: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for record in &records {
            let name = match field {
                "route_rule" => record.route_rule.as_deref().unwrap_or_default().to_owned(),
                "tier" => record.tier.as_deref().unwrap_or_default().to_owned(),
                _ => chrono::DateTime::from_timestamp_millis(record.started_at_ms)
                    .unwrap()
                    .format("%Y-%m-%dT%H:00:00Z")
                    .to_string(),
            };
            let line = expected.entry(name).or_default();
            line.0 += 1;
            line.1 += record.billed().input;
        }
        let reported: std::collections::BTreeMap<String, (u64, u64)> = report["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                let group = row["group"].as_str().unwrap().to_owned();
                let requests = row["requests"].as_u64().unwrap();
                (group, (requests, row["input_tokens"].as_u64().unwrap()))
            })
            .collect();
        assert_eq!(reported, expected, "group_by={group}");
        if group == "rule" {
            assert!(
                expected.len() >= 2,
                "the prompts take several rules: {expected:?}"
            );
        }
    }
    // What routing saved against sending every `auto` request to the dearest tier (frontier:
    // gpt-4o, $2.50 / $1.25 cached / $10 per million tokens).
    let savings = get(&harness, "/admin/routing/savings?from=2000-01-01").await;
    assert_eq!(savings["baseline_tier"], "frontier");
    // The labelled keys' requests named their model: the router did not place them.
    let routed: Vec<&UsageRecord> = records
        .iter()
        .filter(|r| r.route_rule.as_deref() != Some("direct"))
        .collect();
    assert_eq!(routed.len(), 7);
    assert_eq!(savings["requests"], 7);
    let cost: i64 = routed.iter().map(|r| r.list_cost.nanos()).sum();
    let frontier: i64 = routed
        .iter()
        .map(|r| {
            let billed = r.billed();
            let plain = (billed.input - billed.cached_input) as i64;
            plain * 2_500 + billed.cached_input as i64 * 1_250 + billed.output as i64 * 10_000
        })
        .sum();
    let money = |nanos: i64| serde_json::to_value(tollgate::money::Money(nanos)).unwrap();
    assert_eq!(savings["cost_usd"], money(cost));
    assert_eq!(savings["baseline_cost_usd"], money(frontier));
    assert_eq!(savings["saving_usd"], money(frontier - cost));
    assert!(frontier > cost && cost > 0, "{frontier} {cost}");
    let lines: u64 = savings["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(lines, 7);
    let unknown = harness
        .admin(
            reqwest::Method::GET,
            "/admin/routing/savings?baseline_tier=platinum",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);

    // A time series split by a second grouping: each hour by model.
    let series = get(
        &harness,
        "/admin/usage?group_by=hour&split_by=model&from=2000-01-01",
    )
    .await;
    let mut expected: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for record in &records {
        let hour = chrono::DateTime::from_timestamp_millis(record.started_at_ms)
            .unwrap()
            .format("%Y-%m-%dT%H:00:00Z")
            .to_string();
        let model = record.served_model.as_deref().unwrap().to_owned();
        *expected.entry((hour, model)).or_default() += 1;
    }
    let reported: std::collections::BTreeMap<(String, String), u64> = series["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let hour = row["group"].as_str().unwrap().to_owned();
            let model = row["split"].as_str().unwrap().to_owned();
            ((hour, model), row["requests"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(reported, expected);
    assert_eq!(series["split_by"], "model");
    for split in ["team", "hour", "planet"] {
        let response = harness
            .admin(
                reqwest::Method::GET,
                &format!("/admin/usage?group_by=hour&split_by={split}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "split_by={split}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "split_by");
    }
    harness.stop().await;

    let export = |format: &str, from: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["export", "--config"])
            .arg(harness.data_dir.join("routes.toml"))
            .args(["--from", from, "--to", "2100-01-01", "--format", format])
            .output()
            .unwrap()
    };
    let jsonl = export("jsonl", "2000-01-01");
    assert!(jsonl.status.success(), "{jsonl:?}");
    let exported: Vec<UsageRecord> = String::from_utf8(jsonl.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(exported, records);
    assert_eq!(
        String::from_utf8_lossy(&jsonl.stderr).trim(),
        "exported 11 usage records"
    );
    let csv = export("csv", "2000-01-01");
    let text = String::from_utf8(csv.stdout).unwrap();
    assert!(text.starts_with("request_id,at_ms,day,key_id,"), "{text}");
    assert_eq!(text.lines().count(), 1 + 11);
    let refused = export("csv", "yesterday");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("--from `yesterday` is not a date (YYYY-MM-DD) or an RFC 3339 time"));
}
