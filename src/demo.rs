//! `tollgate demo`: a newcomer's first run. Starts the mock upstream and the gateway on
//! loopback with the given config (every upstream pointed at the mock), creates a demo key in a
//! throwaway data dir, and prints lines that work when pasted.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use crate::auth::{self, KeyRecord};
use crate::config::Config;
use crate::limits::BudgetPeriod;
use crate::mock_upstream::{MockOptions, MockUpstream};
use crate::money::Money;
use crate::server::{self, Gateway};

pub async fn run(config_path: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the mock upstream")?;
    let mock = MockUpstream::start(
        mock_listener,
        MockOptions {
            tokens_per_sec: Some(40),
            ..MockOptions::default()
        },
    )
    .await
    .context("starting the mock upstream")?;
    let data_dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    let mock_url = mock.base_url();
    let demo_dir = data_dir.display().to_string();
    let mut config = Config::load_with(config_path, |raw| {
        raw.server.data_dir = demo_dir;
        for upstream in raw.upstreams.values_mut() {
            upstream.base_url = mock_url.clone();
            upstream.api_key_env = None;
        }
    })?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let admin_token = auth::new_secret().replace("sk-tg-", "adm-");
    let wanted = config.server.listen;
    let gateway = Gateway::start(config, Some(admin_token.clone())).await?;
    let listener = match server::bind(wanted).await {
        Ok(listener) => listener,
        Err(_) => server::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?,
    };
    let bound = listener.local_addr()?;
    // Bound to every interface (as in a container), it is reached through loopback or a
    // published port, never at 0.0.0.0.
    let everywhere = bound.ip().is_unspecified();
    let addr = if everywhere {
        SocketAddr::from(([127, 0, 0, 1], bound.port()))
    } else {
        bound
    };
    let secret = auth::new_secret();
    let key = KeyRecord {
        budget_usd: Some(Money::from_micros(5_000_000)),
        budget_period: BudgetPeriod::Day,
        rpm: Some(600),
        tpm: Some(1_000_000),
        max_concurrency: Some(16),
        ..KeyRecord::new("demo", &secret)
    };
    let store = gateway.app.key_store.clone();
    let stored = key.clone();
    tokio::task::spawn_blocking(move || store.insert(&stored))
        .await?
        .context("storing the demo key")?;
    gateway.app.key_activated(key, None);
    let model = gateway.app.config().demo_model();
    let mut printed = if everywhere {
        format!(
            "Listening on all interfaces ({bound}), as in a container: from the host, publish \
             the port (docker run -p {port}:{port} …) and use localhost:{port}.\n\n",
            port = bound.port()
        )
    } else {
        String::new()
    };
    printed += &instructions(
        addr,
        &mock.base_url(),
        &secret,
        &admin_token,
        &model,
        &data_dir,
    );
    // One write, and a reader that went away (a closed pipe) does not stop the demo.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(printed.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);
    gateway.serve(listener, server::termination()).await?;
    mock.shutdown().await;
    Ok(())
}

fn instructions(
    addr: SocketAddr,
    mock_url: &str,
    secret: &str,
    admin_token: &str,
    model: &str,
    data_dir: &Path,
) -> String {
    let base = format!("http://{addr}/v1");
    format!(
        r#"tollgate demo is running (Ctrl-C to stop)
  gateway        {base}
  mock upstream  {mock_url}
  demo key       {secret}   ($5/day budget, 600 rpm)
  admin token    {admin_token}
  console        http://{addr}/console   (sign in with the admin token)
  data dir       {data_dir}

Chat, as any OpenAI client would:
  curl -s {base}/chat/completions -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello, gateway!"}}]}}'

Streaming:
  curl -sN {base}/chat/completions -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Stream me a story"}}]}}'

Python (pip install openai):
  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="{base}", api_key="{secret}"); r = c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi"}}]); print(r.choices[0].message.content, r.usage)'

OpenAI's Responses API, plain and with the SDK:
  curl -s {base}/responses -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" -d '{{"model": "{model}", "input": "Hello, gateway!"}}'
  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="{base}", api_key="{secret}"); r = c.responses.create(model="{model}", input="Hi"); print(r.output_text, r.usage)'

Anthropic's Messages API, with the SDK (pip install anthropic):
  python3 -c 'import anthropic; c = anthropic.Anthropic(base_url="http://{addr}", api_key="{secret}"); m = c.messages.create(model="{model}", max_tokens=256, messages=[{{"role": "user", "content": "Hi"}}]); print(m.content[0].text, m.usage)'

The key's live budget, and the metrics:
  curl -s http://{addr}/admin/keys -H "Authorization: Bearer {admin_token}"
  curl -s http://{addr}/metrics | grep ^tollgate_requests_total
"#,
        data_dir = data_dir.display()
    )
}
