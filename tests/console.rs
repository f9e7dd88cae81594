//! The operators' console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs), driven over WebDriver. Screenshots of every
//! page at 1280 and 390 px are written under `target/console-screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Harness, ADMIN_TOKEN, PROVIDER_KEY};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const ROUTES: &str = r#"
[router]
default = "cheap"
[router.tiers.cheap]
models = [{ model = "gpt-4o-mini" }]
[router.tiers.frontier]
models = [{ model = "gpt-4o" }]
[[router.rules]]
name = "code"
target = "frontier"
when = { has_code = true }
"#;

/// A chromedriver on an ephemeral port and a headless Chromium session through it; both end
/// when this is dropped.
struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) must be installed");
        let stdout = driver.stdout.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().unwrap();
                }
            }
            panic!("chromedriver did not say its port");
        })
        .await
        .unwrap();
        let profile = common::temp_dir("chromium");
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1280,900", format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        Browser {
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn page(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.page()
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` on the page: {e}"))
    }

    /// Clicks `css`, finding it again if a refresh replaced it in between.
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            if self.find(css).await.click().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("`{css}` could not be clicked");
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.wait_visible(css).await;
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn text(&self, css: &str) -> String {
        self.wait_text(css, |_| true).await
    }

    async fn visible(&self, css: &str) -> bool {
        match self.page().find(Locator::Css(css)).await {
            Ok(element) => element.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Waits up to 20 s for `css`'s text to satisfy `ready` (the console refreshes every 5 s).
    async fn wait_text(&self, css: &str, ready: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..200 {
            if let Ok(element) = self.page().find(Locator::Css(css)).await {
                last = element.text().await.unwrap_or_default();
                if ready(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("`{css}` never got ready; last text: {last:?}");
    }

    async fn wait_visible(&self, css: &str) {
        for _ in 0..200 {
            if self.visible(css).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("`{css}` never became visible");
    }

    /// Runs `fetch` in the page and answers `{status, body}`.
    async fn fetch(&self, url: &str, init: Value) -> Value {
        self.page()
            .execute_async(
                "const [url, init, done] = arguments;
                 fetch(url, init)
                   .then(async r => done({status: r.status, body: await r.text()}))
                   .catch(e => done({status: 0, body: String(e)}));",
                vec![json!(url), init],
            )
            .await
            .unwrap()
    }

    async fn screenshot(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.page().screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn sign_in(&self, url: &str, token: &str) {
        self.page().goto(&format!("{url}/console")).await.unwrap();
        self.type_into("#token", token).await;
        self.click("#signin-submit").await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = client.close().await;
                });
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn chat(harness: &Harness, key: &str, content: &str) -> reqwest::Response {
    harness
        .http
        .post(format!("{}/v1/chat/completions", harness.url))
        .bearer_auth(key)
        .json(&json!({"model": "auto", "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap()
}

async fn admin_get(harness: &Harness, path: &str) -> Value {
    harness
        .admin(reqwest::Method::GET, path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn key_named(harness: &Harness, name: &str) -> Value {
    let keys = admin_get(harness, "/admin/keys").await;
    keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn dollars(text: &str) -> f64 {
    text.split('$')
        .nth(1)
        .and_then(|rest| {
            let number: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
                .filter(|c| *c != ',')
                .collect();
            number.parse().ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_creates_a_key_watches_it_spend_caps_and_revokes_it() {
    let harness = Harness::start_with(Default::default(), ROUTES).await;
    let browser = Browser::start().await;

    browser.sign_in(&harness.url, ADMIN_TOKEN).await;
    browser.wait_visible("#app").await;
    assert_eq!(
        browser
            .find("#token")
            .await
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some(""),
        "the token does not stay in the form"
    );
    let stored: Value = browser
        .page()
        .execute(
            "return [localStorage.length, sessionStorage.length, location.href];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored[0], 0);
    assert_eq!(stored[1], 0);
    assert!(!stored[2].as_str().unwrap().contains(ADMIN_TOKEN));
    // Marks this document: if the page reloaded, the mark would be gone.
    browser
        .page()
        .execute("window.__sameDocument = true;", vec![])
        .await
        .unwrap();

    browser.click("#new-key").await;
    browser.type_into("#f-name", "support-bot").await;
    browser.type_into("#f-team", "support").await;
    browser.type_into("#f-budget", "5").await;
    browser
        .find("#f-period")
        .await
        .select_by_value("month")
        .await
        .unwrap();
    browser.type_into("#f-rpm", "600").await;
    browser.click("#key-save").await;
    let secret = browser
        .wait_text("#new-secret", |text| text.starts_with("sk-"))
        .await;
    browser.screenshot("keys-secret-1280").await;
    browser.click("#secret-done").await;
    let html: String = browser.page().source().await.unwrap();
    assert!(
        !html.contains(&secret),
        "the secret leaves the page once shown"
    );

    let created = key_named(&harness, "support-bot").await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["budget_usd"], json!(5));
    assert_eq!(created["team"], "support");
    let row = format!("#keys-table tr[data-key-id='{id}']");
    browser.find(&row).await;

    // Traffic through the gateway with the new key: a cheap answer and a frontier one.
    for content in [
        "Hello there",
        "Please fix this code:\n```python\ndef f(:\n```",
    ] {
        assert_eq!(chat(&harness, &secret, content).await.status(), 200);
    }
    let spend_cell = format!("{row} .key-spend");
    let spent = browser
        .wait_text(&spend_cell, |text| dollars(text) > 0.0)
        .await;
    let live = key_named(&harness, "support-bot").await;
    assert!(spent.contains("/ $5.00"), "{spent}");
    browser.screenshot("keys-1280").await;

    browser.click("#nav-spend").await;
    browser.wait_visible("#page-spend").await;
    browser
        .find("#burn-key")
        .await
        .select_by_value(&id)
        .await
        .unwrap();
    browser
        .wait_text("#spend-total", |text| dollars(text) > 0.0)
        .await;
    browser
        .wait_text("#burn-projection", |text| {
            text.contains("$") || text.contains("cap")
        })
        .await;
    browser.find("#chart-burn svg").await;
    browser.find("#chart-spend-model svg").await;
    let total_before = dollars(&browser.text("#spend-total").await);
    let burn_before = browser.find("#chart-burn").await.html(true).await.unwrap();
    assert!(chat(&harness, &secret, "One more, please").await.status() == 200);
    browser
        .wait_text("#spend-total", |text| dollars(text) > total_before)
        .await;
    let mut burn_moved = false;
    for _ in 0..100 {
        let burn = browser.find("#chart-burn").await.html(true).await.unwrap();
        if burn != burn_before {
            burn_moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        burn_moved,
        "the burn-down follows the new spend without a reload"
    );
    browser.screenshot("spend-1280").await;

    browser.click("#nav-routing").await;
    let first_saving = browser
        .wait_text("#routing-saving", |text| text.contains('%'))
        .await;
    let code = "Refactor this code:\n```rust\nfn main() {}\n```";
    assert_eq!(chat(&harness, &secret, code).await.status(), 200);
    let saving = browser
        .wait_text("#routing-saving", |text| {
            text.contains('%') && text != first_saving
        })
        .await;
    let savings = admin_get(&harness, "/admin/routing/savings").await;
    assert!(
        saving.contains(&format!("${}", savings["saving_usd"])),
        "{saving} vs {savings}"
    );
    let percent: f64 = saving
        .split(" %")
        .next()
        .and_then(|before| before.rsplit('(').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(f64::NAN);
    assert_eq!(percent, savings["saving_pct"].as_f64().unwrap(), "{saving}");
    browser.find("#chart-route-rule svg").await;
    browser.screenshot("routing-1280").await;

    browser.click("#nav-health").await;
    browser
        .wait_text("#ledger-written", |text| {
            text.trim()
                .replace(',', "")
                .parse::<u64>()
                .is_ok_and(|n| n > 0)
        })
        .await;
    browser.screenshot("health-1280").await;

    browser.click("#nav-invoices").await;
    browser
        .find("#invoice-key")
        .await
        .select_by_value(&id)
        .await
        .unwrap();
    browser.click("#invoice-show").await;
    let total = browser
        .wait_text("#invoice-total", |text| dollars(text) > 0.0)
        .await;
    let csv_href = browser
        .find("#invoice-csv")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(csv_href.contains("format=csv"), "{csv_href}");
    let csv = browser.fetch(&csv_href, json!({})).await;
    assert_eq!(csv["status"], 200);
    assert!(csv["body"]
        .as_str()
        .unwrap()
        .starts_with("key_id,key_name,description"));
    assert!(total.contains('$'));
    browser.screenshot("invoices-1280").await;

    // Every page at a phone's width.
    browser.page().set_window_size(390, 844).await.unwrap();
    for page in ["keys", "spend", "routing", "health", "invoices"] {
        browser.click(&format!("#nav-{page}")).await;
        browser.wait_visible(&format!("#page-{page}")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.screenshot(&format!("{page}-390")).await;
    }
    browser.page().set_window_size(1280, 900).await.unwrap();

    // Nothing the console fetched shows a secret.
    let fetched: Value = browser
        .page()
        .execute(
            "return [location.href.split('#')[0]].concat(performance.getEntriesByType('resource').map(e => e.name));",
            vec![],
        )
        .await
        .unwrap();
    let mut urls: Vec<String> = fetched
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    urls.sort();
    urls.dedup();
    assert!(urls.iter().any(|u| u.contains("/admin/keys")), "{urls:?}");
    assert!(
        urls.iter()
            .any(|u| u.contains("/console/assets/console.js")),
        "{urls:?}"
    );
    for url in &urls {
        let answer = browser.fetch(url, json!({})).await;
        let body = answer["body"].as_str().unwrap();
        for secret in [secret.as_str(), ADMIN_TOKEN, PROVIDER_KEY] {
            assert!(!body.contains(secret), "{url} shows a secret");
        }
    }

    // Edit the cap in the console: the gateway enforces the new one.
    browser.click("#nav-keys").await;
    browser.click(&format!("{row} .edit-key")).await;
    browser.type_into("#f-budget", "0.0000001").await;
    browser.click("#key-save").await;
    for _ in 0..100 {
        if key_named(&harness, "support-bot").await["budget_usd"] == json!(0.0000001) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        key_named(&harness, "support-bot").await["budget_usd"],
        json!(0.0000001)
    );
    let refused = chat(&harness, &secret, "Over the cap now").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-should-retry"], "false");

    // The refusal shows on the health page, in the totals and in this minute's bar.
    browser.click("#nav-health").await;
    browser
        .wait_text("#refusal-totals", |text| text.contains("budget"))
        .await;
    let charted: Value = browser
        .page()
        .execute(
            "return [...document.querySelectorAll('#chart-refusals svg title')].some(t => t.textContent.includes('budget'));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(charted, json!(true), "the budget refusal is in the chart");
    browser.click("#nav-keys").await;

    // Revoke it with the confirmation: its next request is refused.
    browser.click(&format!("{row} .revoke-key")).await;
    browser.wait_visible("#confirm-dialog").await;
    browser.click("#confirm-yes").await;
    browser
        .wait_text(&format!("{row} .key-status"), |text| {
            text.contains("revoked")
        })
        .await;
    assert_eq!(chat(&harness, &secret, "Still there?").await.status(), 401);
    let same_document: Value = browser
        .page()
        .execute("return window.__sameDocument === true;", vec![])
        .await
        .unwrap();
    assert_eq!(
        same_document,
        json!(true),
        "everything above happened without a reload"
    );
    assert!(live["spend_usd"].as_f64().unwrap() > 0.0);

    // Sign out: the session is over, in the page and for the API, even for a copy of the
    // cookie the browser no longer sends.
    let cookie = browser
        .page()
        .get_named_cookie("tollgate_console")
        .await
        .unwrap();
    browser.click("#signout").await;
    browser.wait_visible("#signin-view").await;
    let after = browser.fetch("/admin/keys", json!({})).await;
    assert_eq!(after["status"], 401);
    let session = browser.fetch("/console/session", json!({})).await;
    assert_eq!(session["status"], 401);
    let replayed = harness
        .http
        .get(format!("{}/admin/keys", harness.url))
        .header("cookie", format!("tollgate_console={}", cookie.value()))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 401);
    let body: Value = replayed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_expired_sessions_missing_csrf_and_other_origins_are_refused() {
    let harness = Harness::start_with_server("console_session_secs = 8").await;
    let browser = Browser::start().await;

    browser.sign_in(&harness.url, "not-the-token").await;
    let error = browser
        .wait_text("#signin-error", |text| !text.is_empty())
        .await;
    assert!(error.contains("invalid admin token"), "{error}");
    assert!(!browser.visible("#app").await);

    // By keyboard alone: the token and Enter, then a key made through the dialog.
    browser.wait_visible("#token").await;
    let field = browser.find("#token").await;
    field.clear().await.unwrap();
    field
        .send_keys(&format!("{ADMIN_TOKEN}{}", char::from(Key::Enter)))
        .await
        .unwrap();
    browser.wait_visible("#app").await;
    let signed_in = std::time::Instant::now();
    browser
        .find("#new-key")
        .await
        .send_keys(&char::from(Key::Enter).to_string())
        .await
        .unwrap();
    browser.wait_visible("#key-dialog").await;
    let focused: Value = browser
        .page()
        .execute("return document.activeElement.id;", vec![])
        .await
        .unwrap();
    assert_eq!(
        focused, "f-name",
        "the dialog puts the focus on its first field"
    );
    browser
        .page()
        .active_element()
        .await
        .unwrap()
        .send_keys(&format!("keyboard{}", char::from(Key::Enter)))
        .await
        .unwrap();
    browser
        .wait_text("#new-secret", |text| text.starts_with("sk-"))
        .await;
    browser
        .page()
        .active_element()
        .await
        .unwrap()
        .send_keys(&char::from(Key::Escape).to_string())
        .await
        .unwrap();
    for _ in 0..50 {
        if !browser.visible("#secret-dialog").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !browser.visible("#secret-dialog").await,
        "Escape closes the dialog"
    );
    assert_eq!(
        browser
            .page()
            .find(Locator::Css("#new-secret"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        ""
    );
    assert!(key_named(&harness, "keyboard").await.is_object());
    let session: Value = serde_json::from_str(
        browser.fetch("/console/session", json!({})).await["body"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let csrf = session["csrf_token"].as_str().unwrap().to_owned();
    let cookie = browser
        .page()
        .get_named_cookie("tollgate_console")
        .await
        .unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");

    // A state change without the CSRF token.
    let create = json!({
        "method": "POST",
        "headers": {"Content-Type": "application/json"},
        "body": "{\"name\": \"sneaky\"}",
    });
    let refused = browser.fetch("/admin/keys", create.clone()).await;
    assert_eq!(refused["status"], 403);
    assert!(refused["body"]
        .as_str()
        .unwrap()
        .contains("csrf_token_invalid"));
    let mut with_csrf = create.clone();
    with_csrf["headers"]["X-CSRF-Token"] = json!(csrf);
    with_csrf["body"] = json!("{\"name\": \"allowed\"}");
    assert_eq!(browser.fetch("/admin/keys", with_csrf).await["status"], 201);

    // Another origin: the cookie with a good CSRF token, sent from a page elsewhere.
    let session_cookie = format!("tollgate_console={}", cookie.value());
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let answer = harness
            .http
            .post(format!("{}/admin/keys", harness.url))
            .header("cookie", &session_cookie)
            .header("x-csrf-token", &csrf)
            .header(name, value)
            .json(&json!({"name": "cross"}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 403, "{name}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "cross_origin");
    }
    // And a real cross-origin page in the browser (the mock upstream's origin).
    browser.page().goto(&harness.mock.base_url()).await.unwrap();
    browser
        .fetch(
            &format!("{}/admin/keys", harness.url),
            json!({"method": "POST", "mode": "no-cors", "credentials": "include",
                   "headers": {"Content-Type": "text/plain"}, "body": "{\"name\": \"foreign\"}"}),
        )
        .await;
    let read = browser
        .fetch(
            &format!("{}/admin/keys", harness.url),
            json!({"credentials": "include"}),
        )
        .await;
    assert_eq!(
        read["status"], 0,
        "another origin cannot read the admin API: {read}"
    );
    assert!(!read["body"].as_str().unwrap().contains("allowed"));
    for name in ["sneaky", "cross", "foreign"] {
        assert_eq!(
            key_named(&harness, name).await,
            Value::Null,
            "{name} was created"
        );
    }
    assert!(key_named(&harness, "allowed").await.is_object());

    // The session expires: the page notices by itself, and the API refuses the cookie.
    browser
        .page()
        .goto(&format!("{}/console", harness.url))
        .await
        .unwrap();
    browser.wait_visible("#app").await;
    let left = Duration::from_secs(9).saturating_sub(signed_in.elapsed());
    tokio::time::sleep(left).await;
    browser.wait_visible("#signin-view").await;
    let answer = harness
        .http
        .get(format!("{}/admin/keys", harness.url))
        .header("cookie", &session_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_ended");
}

#[tokio::test]
async fn console_answers_carry_a_strict_content_security_policy() {
    let harness = Harness::start().await;
    for path in [
        "/console",
        "/console/",
        "/console/assets/console.js",
        "/console/assets/console.css",
    ] {
        let answer = harness
            .http
            .get(format!("{}{path}", harness.url))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        let csp = answer.headers()["content-security-policy"]
            .to_str()
            .unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"));
        assert_eq!(answer.headers()["x-content-type-options"], "nosniff");
        assert_eq!(answer.headers()["x-frame-options"], "DENY");
        let body = answer.text().await.unwrap();
        assert!(!body.contains(ADMIN_TOKEN) && !body.contains(PROVIDER_KEY));
    }
    let page = harness
        .http
        .get(format!("{}/console", harness.url))
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains(" onclick="),
        "no inline script"
    );

    let sign_in = |token: &str, tls: bool| {
        let mut request = harness
            .http
            .post(format!("{}/console/session", harness.url))
            .json(&json!({"token": token}));
        if tls {
            request = request.header("x-forwarded-proto", "https");
        }
        request.send()
    };
    let wrong = sign_in("nope", false).await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let plain = sign_in(ADMIN_TOKEN, false).await.unwrap();
    assert_eq!(plain.status(), 200);
    let cookie = plain.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        cookie.contains("Max-Age=28800") && !cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(!cookie.contains(ADMIN_TOKEN));
    let tls = sign_in(ADMIN_TOKEN, true).await.unwrap();
    assert!(tls.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("; Secure"));
    let form = harness
        .http
        .post(format!("{}/console/session", harness.url))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        form.status(),
        400,
        "a cross-site form cannot sign anyone in"
    );

    // The CSV invoice the console links to, with the bearer token too.
    let keys = admin_get(&harness, "/admin/keys").await;
    let id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        harness
            .chat(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}))
            .await
            .status(),
        200
    );
    harness.usage_records(1).await;
    let csv = harness
        .admin(
            reqwest::Method::GET,
            &format!("/admin/invoices/{id}?format=csv"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await.unwrap();
    let json = admin_get(&harness, &format!("/admin/invoices/{id}")).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "key_id,key_name,description,quantity,unit_price_usd,amount_usd"
    );
    assert_eq!(
        lines.len(),
        json["lines"].as_array().unwrap().len() + 2,
        "{text}"
    );
    assert_eq!(
        lines.last().unwrap(),
        &format!(",,total,,,{}", json["total_usd"])
    );
    assert!(
        lines[1].starts_with(&format!("\"{id}\",\"test\",")),
        "{text}"
    );
}
