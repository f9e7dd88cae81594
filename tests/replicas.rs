//! Several replicas, one truth: three real gateway processes sharing a real Redis (throttles,
//! reservations, rating totals, key changes) and a real PostgreSQL (keys, ledger), with a
//! client spreading requests over them. Nothing here is mocked but the paid provider.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::services::{Postgres, Redis};
use common::{config_text, temp_dir, ADMIN_TOKEN};
use futures_util::future::join_all;
use serde_json::{json, Value};
use tollgate::mock_upstream::{MockOptions, MockUpstream};

struct Replica {
    child: Child,
    url: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three gateways on one config, each with its own (unused) data dir.
struct Fleet {
    _mock: MockUpstream,
    replicas: Vec<Replica>,
    http: reqwest::Client,
}

fn spawn_replica(config: &std::path::Path) -> Replica {
    let (child, url) = common::spawn_gateway(config);
    Replica { child, url }
}

impl Fleet {
    async fn start(redis: &Redis, postgres_url: &str, extra: &str) -> Fleet {
        Fleet::start_with(redis, postgres_url, "", extra, MockOptions::default(), 3).await
    }

    /// `state` adds lines to `[state]`, `extra` whole sections.
    async fn start_with(
        redis: &Redis,
        postgres_url: &str,
        state: &str,
        extra: &str,
        options: MockOptions,
        count: usize,
    ) -> Fleet {
        let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock = MockUpstream::start(mock_listener, options).await.unwrap();
        let dir = temp_dir("fleet");
        let shared = format!(
            "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nlease_secs = 3\nreplicas = 3\n{state}\n\
             [store]\nbackend = \"postgres\"\npostgres_url = \"{postgres_url}\"\n{extra}",
            redis.url()
        );
        let text = config_text(&mock.base_url(), &dir, &shared);
        let config = dir.join("routes.toml");
        std::fs::write(&config, text).unwrap();
        let replicas = (0..count).map(|_| spawn_replica(&config)).collect();
        Fleet {
            _mock: mock,
            replicas,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, i: usize) -> &str {
        &self.replicas[i % self.replicas.len()].url
    }

    async fn admin(&self, i: usize, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.http
            .request(method, format!("{}{path}", self.url(i)))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    async fn create_key(&self, i: usize, body: Value) -> (String, String) {
        let response = self
            .http
            .post(format!("{}/admin/keys", self.url(i)))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let key: Value = response.json().await.unwrap();
        (
            key["id"].as_str().unwrap().to_owned(),
            key["key"].as_str().unwrap().to_owned(),
        )
    }

    async fn key(&self, i: usize, id: &str) -> Value {
        self.admin(i, reqwest::Method::GET, &format!("/admin/keys/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Waits (up to 5 s) until a key has nothing reserved: every lease settled, released,
    /// expired or given back. Panics with the key's view, and `why`, if it never happens.
    async fn nothing_reserved(&self, id: &str, why: &str) {
        let done = within(Duration::from_secs(5), async || {
            self.key(0, id).await["reserved_usd"].as_f64() == Some(0.0)
        })
        .await;
        assert!(done.is_some(), "{why}: {}", self.key(0, id).await);
    }

    /// Waits until every replica knows a key just created (the change feed's delay).
    async fn known_everywhere(&self, secret: &str) {
        for i in 0..self.replicas.len() {
            let known = within(Duration::from_secs(2), async || {
                self.http
                    .get(format!("{}/v1/models", self.url(i)))
                    .bearer_auth(secret)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    == 200
            })
            .await;
            assert!(known.is_some(), "replica {i} learned the key within 2 s");
        }
    }

    async fn chat(&self, i: usize, secret: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url(i)))
            .bearer_auth(secret)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `count` requests at once, dealt to the replicas in turn; their statuses.
    async fn spread(&self, count: usize, secret: &str, body: &Value) -> Vec<u16> {
        let sent =
            (0..count).map(|i| async move { self.chat(i, secret, body).await.status().as_u16() });
        join_all(sent).await
    }

    /// Usage rows for a key, as the admin API reports them (from the shared ledger).
    async fn usage_requests(&self, i: usize, key_id: &str) -> u64 {
        let usage: Value = self
            .admin(
                i,
                reqwest::Method::GET,
                "/admin/usage?from=2000-01-01&to=2100-01-01&group_by=key",
            )
            .await
            .json()
            .await
            .unwrap();
        usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["group"] == key_id)
            .map_or(0, |row| row["requests"].as_u64().unwrap())
    }

    /// A counter's value summed over every replica's `/metrics`.
    async fn counter(&self, sample: &str) -> f64 {
        let mut total = 0.0;
        for i in 0..self.replicas.len() {
            let text = self
                .http
                .get(format!("{}/metrics", self.url(i)))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            total += text
                .lines()
                .find_map(|line| line.strip_prefix(sample))
                .map_or(0.0, |value| value.trim().parse::<f64>().unwrap());
        }
        total
    }
}

fn hello(max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hello to the replicas"}],
    })
}

/// The invoice preview of this month, as one replica answers it.
async fn invoice(url: &str, key_id: &str) -> Value {
    let month = chrono::Utc::now().format("%Y-%m");
    reqwest::Client::new()
        .get(format!("{url}/admin/invoices/{key_id}?period={month}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (up to 5 s: the ledger writes in batches) until a key's invoice for this month
/// totals its spend, to the nano-dollar.
async fn invoiced_as_spent(url: &str, key_id: &str, spend: f64) {
    let total = async || {
        invoice(url, key_id).await["total_usd"]
            .as_f64()
            .unwrap_or_default()
    };
    let agreed = within(Duration::from_secs(5), async || {
        (total().await - spend).abs() < 1e-9
    })
    .await;
    assert!(
        agreed.is_some(),
        "invoice {}, spend {spend}",
        invoice(url, key_id).await
    );
}

/// Polls `check` until it holds or `within` passes; returns how long it took.
async fn within(within: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hold_one_cap_and_count_each_request_once() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("cap");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    // Each request's worst case is about $0.0000614 (a few prompt tokens, 100 output tokens at
    // $0.60/M): a cap of $0.002 admits about 32 of them at once, far fewer than 300.
    let (id, secret) = fleet
        .create_key(
            0,
            json!({"name": "capped", "budget_usd": 0.002, "budget_period": "day"}),
        )
        .await;
    fleet.known_everywhere(&secret).await;
    let statuses = fleet.spread(300, &secret, &hello(100)).await;
    let served = statuses.iter().filter(|s| **s == 200).count() as u64;
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(served as usize + refused, 300, "{statuses:?}");
    assert!(served > 0 && refused > 0, "served {served}");

    // Settlements finish on each replica's runtime just after the answers.
    fleet
        .nothing_reserved(&id, "every reservation was settled")
        .await;
    let mut views = Vec::new();
    for i in 0..3 {
        views.push(fleet.key(i, &id).await);
    }
    let spend = &views[0]["spend_usd"];
    for view in &views {
        assert_eq!(
            &view["spend_usd"], spend,
            "every replica reports the same spend"
        );
    }
    assert!(spend.as_f64().unwrap() <= 0.002, "{spend}");
    assert!(spend.as_f64().unwrap() > 0.0);
    let recorded = within(Duration::from_secs(5), async || {
        fleet.usage_requests(1, &id).await == 300
    })
    .await;
    assert!(
        recorded.is_some(),
        "each request recorded once: {} rows",
        fleet.usage_requests(1, &id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_across_three_replicas_admits_exactly_the_limit() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("rpm");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    let (_, secret) = fleet
        .create_key(2, json!({"name": "paced", "rpm": 30}))
        .await;
    // The key was created on replica 2; the others learn of it from the change feed.
    fleet.known_everywhere(&secret).await;
    let statuses = fleet.spread(120, &secret, &hello(5)).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 30);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_created_and_revoked_on_one_replica_reach_the_others() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("feed");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    let (id, secret) = fleet.create_key(0, json!({"name": "travels"})).await;
    for i in 1..3 {
        let took = within(Duration::from_secs(2), async || {
            fleet.chat(i, &secret, &hello(1)).await.status() == 200
        })
        .await;
        assert!(took.is_some(), "replica {i} learned the new key within 2 s");
    }
    let revoked = fleet
        .admin(1, reqwest::Method::DELETE, &format!("/admin/keys/{id}"))
        .await;
    assert_eq!(revoked.status(), 200);
    for i in [0, 2] {
        let took = within(Duration::from_secs(1), async || {
            fleet.chat(i, &secret, &hello(1)).await.status() == 401
        })
        .await;
        assert!(
            took.is_some(),
            "replica {i} refused the revoked key within 1 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_session_opens_on_every_replica_and_signing_out_ends_it_on_all() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("console");
    let fleet = Fleet::start_with(&redis, &postgres, "", "", MockOptions::default(), 2).await;
    let signed_in = fleet
        .http
        .post(format!("{}/console/session", fleet.url(0)))
        .json(&json!({"token": ADMIN_TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 200);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let csrf = signed_in.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let keys = |i: usize| {
        fleet
            .http
            .get(format!("{}/admin/keys", fleet.url(i)))
            .header("cookie", &cookie)
            .send()
    };
    for i in 0..2 {
        assert_eq!(
            keys(i).await.unwrap().status(),
            200,
            "replica {i} takes the session"
        );
    }
    let created = fleet
        .http
        .post(format!("{}/admin/keys", fleet.url(1)))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .json(&json!({"name": "from-the-console"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "and its CSRF token");
    let signed_out = fleet
        .http
        .delete(format!("{}/console/session", fleet.url(0)))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 200);
    for i in 0..2 {
        let refused = keys(i).await.unwrap();
        assert_eq!(
            refused.status(),
            401,
            "replica {i} refuses the signed-out session"
        );
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "session_ended");
    }
}

/// One client's view of a request: its id, and whether the whole answer arrived.
struct Seen {
    replica: usize,
    request_id: String,
    complete: bool,
}

/// Sends requests to `replica` one after another until `stop`.
async fn load(
    http: reqwest::Client,
    url: String,
    replica: usize,
    secret: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let sent = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&hello(20))
            .send()
            .await;
        let Ok(response) = sent else { continue };
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let ok = response.status() == 200;
        let complete = ok && response.bytes().await.is_ok();
        seen.push(Seen {
            replica,
            request_id,
            complete,
        });
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_answered_request_and_frees_its_leases() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("kill");
    let options = MockOptions {
        latency: Duration::from_millis(30),
        ..MockOptions::default()
    };
    let mut fleet = Fleet::start_with(
        &redis,
        &postgres,
        "",
        "[ledger]\ndurability = \"strict\"\n",
        options,
        3,
    )
    .await;
    let (id, secret) = fleet
        .create_key(
            0,
            json!({"name": "crash", "budget_usd": 0.05, "max_concurrency": 12}),
        )
        .await;
    fleet.known_everywhere(&secret).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..9)
        .map(|i| {
            let replica = i % 3;
            tokio::spawn(load(
                fleet.http.clone(),
                fleet.url(replica).to_owned(),
                replica,
                secret.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut victim = fleet.replicas.remove(0);
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(client.await.unwrap());
    }
    let survivors_served = seen.iter().filter(|s| s.replica != 0 && s.complete).count();
    assert!(
        survivors_served > 20,
        "the others kept serving: {survivors_served}"
    );

    // The dead replica stopped renewing its leases: they expire within the lease (3 s).
    fleet.nothing_reserved(&id, "leases freed").await;
    let spend = fleet.key(1, &id).await["spend_usd"].as_f64().unwrap();
    assert!(spend > 0.0 && spend <= 0.05, "{spend}");

    // Strict durability: every answer a client received whole was committed first.
    let answered: Vec<String> = seen
        .iter()
        .filter(|s| s.complete)
        .map(|s| s.request_id.clone())
        .collect();
    let missing = tokio::task::spawn_blocking(move || {
        use tollgate::rating::ledger::LedgerReader;
        // The blocking client runs its own runtime: it lives on this blocking thread.
        let ledger = tollgate::store::PgStore::connect(&postgres)
            .unwrap()
            .ledger_reader();
        answered
            .into_iter()
            .filter(|id| ledger.record(id).unwrap().is_none())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        missing.is_empty(),
        "answered but not in the ledger: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_away_fails_closed_then_recovers_without_a_restart() {
    let mut redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("away");
    let fleet = Fleet::start_with(&redis, &postgres, "", "", MockOptions::default(), 1).await;
    let (_, secret) = fleet.create_key(0, json!({"name": "steady"})).await;
    assert_eq!(fleet.chat(0, &secret, &hello(5)).await.status(), 200);
    redis.stop();
    // The replica learns of the loss from its key-change subscription; until then it may
    // still spend the allowance Redis granted it.
    let not_ready = within(Duration::from_secs(3), async || {
        fleet
            .http
            .get(format!("{}/readyz", fleet.url(0)))
            .send()
            .await
            .unwrap()
            .status()
            == 503
    })
    .await;
    assert!(not_ready.is_some(), "not ready while Redis is away");
    let refused = fleet.chat(0, &secret, &hello(5)).await;
    assert_eq!(refused.status(), 503);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "state_unavailable");
    redis.restart();
    let back = within(Duration::from_secs(5), async || {
        fleet.chat(0, &secret, &hello(5)).await.status() == 200
    })
    .await;
    assert!(back.is_some(), "service recovered once Redis was back");
    // Each thread's connection learns on its next call that Redis is back.
    let ready = within(Duration::from_secs(3), async || {
        fleet
            .http
            .get(format!("{}/readyz", fleet.url(0)))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    assert!(ready.is_some(), "ready again");
    // A shared-state replica stops cleanly on SIGTERM (its store's blocking clients are closed
    // off the runtime).
    let mut fleet = fleet;
    let mut replica = fleet.replicas.remove(0);
    let pid = replica.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || replica.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_away_fails_open_to_a_share_of_each_limit() {
    let mut redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("open");
    // One replica of three, so it enforces a third of rpm 30 on its own.
    let fleet = Fleet::start_with(
        &redis,
        &postgres,
        "on_unavailable = \"fail_open\"",
        "",
        MockOptions::default(),
        1,
    )
    .await;
    let (_, secret) = fleet
        .create_key(0, json!({"name": "open", "rpm": 30}))
        .await;
    redis.stop();
    let statuses = fleet.spread(20, &secret, &hello(5)).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10);
    let ready = fleet
        .http
        .get(format!("{}/readyz", fleet.url(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "fail_open stays ready");
    redis.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_tier_plan_spread_over_replicas_bills_as_one() {
    let plan = "[plans.bulk]\nkind = \"per_token\"\ntier_mode = \"volume\"\n\
                tiers = [{ up_to_tokens = 200, rate_pct = 100 }, { up_to_tokens = 400, rate_pct = 70 }, { rate_pct = 50 }]\n\
                prices.\"gpt-4o-mini\" = { input_per_mtok = 0.333, output_per_mtok = 1.111 }\n";
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("tiers");
    let fleet = Fleet::start(&redis, &postgres, plan).await;
    let (id, secret) = fleet
        .create_key(0, json!({"name": "bulk", "plan": "bulk"}))
        .await;
    fleet.known_everywhere(&secret).await;
    let bodies: Vec<Value> = (1..=12).map(|i| hello(i * 7)).collect();
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(fleet.chat(i, &secret, body).await.status(), 200);
    }
    // The same requests through one embedded gateway, in the same order.
    let single = common::Harness::start_with(MockOptions::default(), plan).await;
    let one = single
        .create_key(json!({"name": "bulk", "plan": "bulk"}))
        .await;
    let one_secret = one["key"].as_str().unwrap();
    for body in &bodies {
        let response = single
            .http
            .post(format!("{}/v1/chat/completions", single.url))
            .bearer_auth(one_secret)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    single.app.usage.flushed().await;
    let recorded = within(Duration::from_secs(5), async || {
        fleet.usage_requests(1, &id).await == 12
    })
    .await;
    assert!(recorded.is_some());
    let spread = invoice(fleet.url(2), &id).await;
    let alone = invoice(&single.url, one["id"].as_str().unwrap()).await;
    assert_eq!(
        spread["total_usd"], alone["total_usd"],
        "{spread} vs {alone}"
    );
    assert_eq!(spread["lines"], alone["lines"]);
    assert!(spread["total_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowances_admit_locally_far_from_the_limits_and_never_past_them() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("allowance");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    // With three replicas an allowance is at most 1/12 of what remains and must cover eight
    // requests: RPM 600 and $0.02 (about 325 worst cases of $0.0000614) leave room for slices
    // at first, and none near the end, where each request is admitted in Redis.
    let (id, secret) = fleet
        .create_key(
            0,
            json!({"name": "sliced", "rpm": 600, "budget_usd": 0.02, "budget_period": "day"}),
        )
        .await;
    fleet.known_everywhere(&secret).await;
    let started = Instant::now();
    let mut served = 0;
    for _ in 0..15 {
        let statuses = fleet.spread(60, &secret, &hello(100)).await;
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 429),
            "{statuses:?}"
        );
        served += statuses.iter().filter(|s| **s == 200).count() as u64;
    }
    // GCRA refills 10 requests a second: the RPM bound over the run.
    let rpm_bound = 600 + (started.elapsed().as_secs_f64() * 10.0).ceil() as u64;
    assert!(served <= rpm_bound, "served {served}, bound {rpm_bound}");
    let local = fleet
        .counter("tollgate_state_admissions_total{decided_by=\"allowance\"}")
        .await;
    let in_redis = fleet
        .counter("tollgate_state_admissions_total{decided_by=\"redis\"}")
        .await;
    assert!(
        local > 0.0,
        "admitted from allowances: {local}, in Redis: {in_redis}"
    );
    assert!(
        local + in_redis <= 900.0 && local + in_redis >= served as f64,
        "{local} + {in_redis} admissions for {served} served"
    );

    // Idle allowances are given back within two ticks: nothing stays reserved, and every
    // replica reports one spend, within the cap, equal to the ledger's.
    fleet.nothing_reserved(&id, "allowances given back").await;
    let spend = fleet.key(0, &id).await["spend_usd"].as_f64().unwrap();
    assert!(spend > 0.0 && spend <= 0.02, "spend {spend}");
    for i in 1..3 {
        assert_eq!(fleet.key(i, &id).await["spend_usd"].as_f64(), Some(spend));
    }
    // Refusals are recorded too: each request once.
    let recorded = within(Duration::from_secs(5), async || {
        fleet.usage_requests(1, &id).await == 900
    })
    .await;
    assert!(
        recorded.is_some(),
        "{} rows",
        fleet.usage_requests(1, &id).await
    );
    invoiced_as_spent(fleet.url(2), &id, spend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowances_never_spend_past_the_cap() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("allowance_cap");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    // $0.008 is about 130 worst cases of $0.0000614: slices of the budget at first (1/12 of
    // what remains covers eight), none once less than about $0.006 remains.
    let cap = 0.008;
    let (id, secret) = fleet
        .create_key(
            0,
            json!({"name": "sliced budget", "budget_usd": cap, "budget_period": "day"}),
        )
        .await;
    fleet.known_everywhere(&secret).await;
    // Until a whole wave is refused: what remains is then less than one request's worst case.
    let mut exhausted = false;
    for _ in 0..60 {
        let statuses = fleet.spread(60, &secret, &hello(100)).await;
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 429),
            "{statuses:?}"
        );
        if statuses.iter().all(|s| *s == 429) {
            exhausted = true;
            break;
        }
    }
    assert!(
        exhausted,
        "the cap was reached: {}",
        fleet.key(0, &id).await
    );
    let local = fleet
        .counter("tollgate_state_admissions_total{decided_by=\"allowance\"}")
        .await;
    assert!(local > 0.0, "admitted from allowances: {local}");
    fleet.nothing_reserved(&id, "allowances given back").await;
    let spend = fleet.key(1, &id).await["spend_usd"].as_f64().unwrap();
    // What may be left unspent: less than a worst case in Redis, and per replica what its
    // requests still settling had reserved when the last wave came. Budget idle in an
    // allowance is given back by the first refusal, so it strands nothing.
    assert!(
        spend > cap - 3.0 * 0.0000614 - 0.0000614 && spend <= cap,
        "spend {spend}"
    );
    invoiced_as_spent(fleet.url(2), &id, spend).await;
}

/// A spend-rate cap held by three replicas at once: the fleet admits what one gateway would
/// (the minute's cap at once, then its pace) and refuses the rest with `rate_limit_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spend_rate_cap_holds_across_replicas() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("spend_rate");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    let cap = 0.002;
    let (id, secret) = fleet
        .create_key(0, json!({"name": "runaway", "max_usd_per_minute": cap}))
        .await;
    fleet.known_everywhere(&secret).await;
    let start = Instant::now();
    let mut waves_after_refusal = 0;
    for _ in 0..60 {
        let statuses = fleet.spread(60, &secret, &hello(100)).await;
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 429),
            "{statuses:?}"
        );
        if statuses.contains(&429) {
            waves_after_refusal += 1;
            if waves_after_refusal > 3 {
                break;
            }
        }
    }
    assert!(
        waves_after_refusal > 0,
        "never refused: {}",
        fleet.key(0, &id).await
    );
    // Settled waves give back what they reserved beyond their cost: one by one, requests
    // spend that room until the cap refuses again.
    let mut refused = fleet.chat(1, &secret, &hello(100)).await;
    for _ in 0..1_000 {
        if refused.status() != 200 {
            break;
        }
        refused = fleet.chat(1, &secret, &hello(100)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    fleet.nothing_reserved(&id, "every request settled").await;
    let spend = fleet.key(2, &id).await["spend_usd"].as_f64().unwrap();
    assert!(
        spend <= cap * (1.0 + elapsed / 60.0) + 1e-12,
        "spent {spend} in {elapsed:.2} s"
    );
    // The fleet did reach the cap: less than a wave's worst cases ($0.0000614 each) is left.
    assert!(spend >= cap - 60.0 * 0.0000614, "spent {spend}");
    invoiced_as_spent(fleet.url(0), &id, spend).await;
}

/// Three replicas watch the same shared ledger: a spike is announced by one of them, once,
/// however many checks it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spend_spike_is_announced_once_by_the_fleet() {
    let (hook, mut events) = common::webhook_receiver().await;
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("velocity");
    let budgets = format!(
        "[budgets]\nalert_webhook = \"{hook}\"\nvelocity_check_secs = 1\nvelocity_min_usd = 0.0001\n"
    );
    let fleet = Fleet::start(&redis, &postgres, &budgets).await;
    let (_, secret) = fleet.create_key(0, json!({"name": "burst"})).await;
    fleet.known_everywhere(&secret).await;
    let statuses = fleet.spread(60, &secret, &hello(100)).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("a spike is announced")
        .unwrap();
    assert_eq!(event["event"], "spend_velocity");
    assert_eq!(event["key_name"], "burst");
    // Three more checks on each replica while the spike lasts.
    for _ in 0..3 {
        fleet.spread(3, &secret, &hello(100)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), events.recv())
            .await
            .is_err(),
        "announced by one replica, once"
    );
    let announced = fleet
        .counter("tollgate_velocity_alerts_total{trigger=\"factor\"}")
        .await;
    assert_eq!(announced, 1.0);
}

/// Outcomes reported through different replicas: each idempotency key is charged once across
/// them (a repeat on another replica is answered with the first report), and the charges are
/// held against one cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcomes_through_several_replicas_are_charged_once_against_one_cap() {
    let plan = "[plans.support]\nkind = \"per_outcome\"\noutcomes = { resolution = 1.50 }\n";
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("outcomes");
    let fleet = Fleet::start(&redis, &postgres, plan).await;
    let (id, secret) = fleet
        .create_key(
            0,
            json!({"name": "desk", "plan": "support", "budget_usd": 4}),
        )
        .await;
    fleet.known_everywhere(&secret).await;
    let report = |i: usize, quantity: u64, idempotency: &str| {
        fleet
            .http
            .post(format!("{}/v1/outcomes", fleet.url(i)))
            .bearer_auth(&secret)
            .json(&json!({"type": "resolution", "quantity": quantity, "idempotency_key": idempotency}))
            .send()
    };
    assert_eq!(report(0, 1, "t-1").await.unwrap().status(), 202);
    let repeat = report(1, 2, "t-1").await.unwrap();
    assert_eq!(repeat.status(), 200);
    let repeat: Value = repeat.json().await.unwrap();
    assert_eq!(repeat["quantity"], 1, "the first report, as recorded");
    assert_eq!(report(2, 1, "t-2").await.unwrap().status(), 202);
    let over = report(1, 1, "t-3").await.unwrap();
    assert_eq!(
        over.status(),
        429,
        "$3 of $4 spent: $1.50 more does not fit"
    );
    for i in 0..3 {
        assert_eq!(fleet.key(i, &id).await["spend_usd"], json!(3));
    }
}

/// A Responses API conversation started on one replica continues on another, with the same
/// model, and its stored response is reachable there by its key only: the owner of a response
/// is in the shared ledger (strict durability commits it before the answer ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_made_on_one_replica_is_continued_on_another() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("responses");
    let fleet = Fleet::start_with(
        &redis,
        &postgres,
        "",
        "[ledger]\ndurability = \"strict\"\n[router]\nvirtual_model = \"auto\"\ndefault = \"cheap\"\n",
        MockOptions::default(),
        2,
    )
    .await;
    let (_, secret) = fleet.create_key(0, json!({"name": "talker"})).await;
    let (_, other) = fleet.create_key(0, json!({"name": "other"})).await;
    fleet.known_everywhere(&secret).await;
    fleet.known_everywhere(&other).await;
    let respond = |i: usize, key: &str, body: Value| {
        fleet
            .http
            .post(format!("{}/v1/responses", fleet.url(i)))
            .bearer_auth(key.to_owned())
            .json(&body)
            .send()
    };
    let first = respond(0, &secret, json!({"model": "auto", "input": "Hello"}))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let model = first.headers()["x-tollgate-model"]
        .to_str()
        .unwrap()
        .to_owned();
    let id = first.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..4 {
        let next = respond(
            1,
            &secret,
            json!({"model": "auto", "input": "More", "previous_response_id": id}),
        )
        .await
        .unwrap();
        assert_eq!(next.status(), 200);
        assert_eq!(next.headers()["x-tollgate-model"], model.as_str());
        assert_eq!(next.headers()["x-tollgate-route"], "previous_response");
    }
    let stolen = respond(
        1,
        &other,
        json!({"model": "auto", "input": "More", "previous_response_id": id}),
    )
    .await
    .unwrap();
    assert_eq!(stolen.status(), 404);
    let retrieved = fleet
        .http
        .get(format!("{}/v1/responses/{id}", fleet.url(1)))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(retrieved.status(), 200);
}

/// A team's cap over three replicas: twenty keys of one team, each under its own cap, send
/// 300 requests at once; the team never passes its cap, every replica reports the same team
/// spend, and it is the sum of its keys' spends and of the ledger's rows for the team.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_cap_holds_over_twenty_keys_and_three_replicas() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("team");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    let team_cap = 0.001;
    let created = fleet
        .http
        .post(format!("{}/admin/teams", fleet.url(0)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "eng", "budget_usd": team_cap, "budget_period": "day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let mut keys = Vec::new();
    for i in 0..20 {
        let key = json!({"name": format!("agent-{i}"), "team": "eng", "budget_usd": 0.0002});
        keys.push(fleet.create_key(i, key).await);
    }
    for (_, secret) in &keys {
        fleet.known_everywhere(secret).await;
    }
    let body = hello(100);
    let sent = (0..300).map(|i| {
        let (fleet, body, secret) = (&fleet, &body, &keys[i % 20].1);
        async move { fleet.chat(i, secret, body).await }
    });
    let mut served = 0;
    let mut by_team = 0;
    for response in join_all(sent).await {
        match response.status().as_u16() {
            200 => served += 1,
            429 => {
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "insufficient_quota");
                let message = error["error"]["message"].as_str().unwrap();
                by_team += usize::from(message.starts_with("Budget exhausted for team `eng`"));
            }
            other => panic!("status {other}"),
        }
    }
    assert!(
        served > 0 && by_team > 0,
        "served {served}, refused by the team {by_team}"
    );
    let team = async |i: usize| -> Value {
        fleet
            .admin(i, reqwest::Method::GET, "/admin/teams/eng")
            .await
            .json()
            .await
            .unwrap()
    };
    let settled = within(Duration::from_secs(5), async || {
        team(0).await["reserved_usd"].as_f64() == Some(0.0)
    })
    .await;
    assert!(settled.is_some(), "{}", team(0).await);
    let spend = team(0).await["spend_usd"].as_f64().unwrap();
    for i in 1..3 {
        assert_eq!(team(i).await["spend_usd"].as_f64(), Some(spend));
    }
    assert!(spend > 0.0 && spend <= team_cap, "team spent {spend}");
    let mut keys_spend = 0.0;
    for (id, _) in &keys {
        let key_spend = fleet.key(0, id).await["spend_usd"].as_f64().unwrap();
        assert!(key_spend <= 0.0002, "{key_spend}");
        keys_spend += key_spend;
    }
    assert!(
        (keys_spend - spend).abs() < 1e-12,
        "keys {keys_spend}, team {spend}"
    );
    let ledger_cost = async || -> f64 {
        let usage: Value = fleet
            .admin(
                2,
                reqwest::Method::GET,
                "/admin/usage?from=2000-01-01&to=2100-01-01&group_by=team",
            )
            .await
            .json()
            .await
            .unwrap();
        usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["group"] == "eng")
            .map_or(0.0, |row| row["cost_usd"].as_f64().unwrap())
    };
    let recorded = within(Duration::from_secs(5), async || {
        (ledger_cost().await - spend).abs() < 1e-12
    })
    .await;
    assert!(
        recorded.is_some(),
        "ledger {}, team {spend}",
        ledger_cost().await
    );
}

/// A team far from its cap takes allowances like a key, and its keys admit from them; near the
/// cap every request goes to Redis, and the team's spend ends within a few worst cases of its
/// cap, never past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_takes_allowances_and_never_spends_past_its_cap() {
    let redis = Redis::start();
    let postgres = Postgres::shared().fresh_database("team_allowance");
    let fleet = Fleet::start(&redis, &postgres, "").await;
    let cap = 0.008;
    let created = fleet
        .http
        .post(format!("{}/admin/teams", fleet.url(0)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "ops", "budget_usd": cap, "budget_period": "day"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let (a, a_secret) = fleet
        .create_key(0, json!({"name": "a", "team": "ops"}))
        .await;
    let (b, b_secret) = fleet
        .create_key(1, json!({"name": "b", "team": "ops"}))
        .await;
    fleet.known_everywhere(&a_secret).await;
    fleet.known_everywhere(&b_secret).await;
    let body = hello(100);
    let mut exhausted = false;
    for _ in 0..60 {
        let sent = (0..60).map(|i| {
            let (fleet, body) = (&fleet, &body);
            let secret = if i % 2 == 0 { &a_secret } else { &b_secret };
            async move { fleet.chat(i, secret, body).await.status().as_u16() }
        });
        let statuses = join_all(sent).await;
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 429),
            "{statuses:?}"
        );
        if statuses.iter().all(|s| *s == 429) {
            exhausted = true;
            break;
        }
    }
    assert!(exhausted, "the team's cap was reached");
    let local = fleet
        .counter("tollgate_state_admissions_total{decided_by=\"allowance\"}")
        .await;
    assert!(local > 0.0, "admitted from allowances: {local}");
    let team = async || -> Value {
        fleet
            .admin(2, reqwest::Method::GET, "/admin/teams/ops")
            .await
            .json()
            .await
            .unwrap()
    };
    let settled = within(Duration::from_secs(5), async || {
        team().await["reserved_usd"].as_f64() == Some(0.0)
    })
    .await;
    assert!(settled.is_some(), "allowances given back: {}", team().await);
    let spend = team().await["spend_usd"].as_f64().unwrap();
    assert!(
        spend > cap - 4.0 * 0.0000614 && spend <= cap,
        "team spend {spend}"
    );
    let keys_spend = fleet.key(0, &a).await["spend_usd"].as_f64().unwrap()
        + fleet.key(0, &b).await["spend_usd"].as_f64().unwrap();
    assert!(
        (keys_spend - spend).abs() < 1e-12,
        "keys {keys_spend}, team {spend}"
    );
}
