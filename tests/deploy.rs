//! What a deployment sets from outside the config file: `TOLLGATE_DATA_DIR` and
//! `TOLLGATE_LISTEN` let a container or unit keep the repository's `routes.toml`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_sets_the_data_dir_and_the_address() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let state = common::temp_dir("deploy").join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(root.join("routes.toml"))
        .env("TOLLGATE_DATA_DIR", &state)
        .env("TOLLGATE_LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let http = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let status = http
            .get(format!("{url}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    let created = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(common::ADMIN_TOKEN)
        .json(&serde_json::json!({"name": "deployed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        state.join("keys.sqlite").exists(),
        "the keys live in TOLLGATE_DATA_DIR"
    );
    assert!(state.join("ledger.sqlite").exists());
}
