//! The `tollgate` binary: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use serde_json::Value;

use tollgate::cli::{
    AdminArgs, Cli, Command, ExportFormatArg, GroupsCommand, KeysCommand, StoreKind,
};
use tollgate::client::{render, AdminClient};
use tollgate::config::Config;
use tollgate::mock_upstream::{self, MockOptions};
use tollgate::server::{self, Gateway};

/// glibc's malloc was a tenth of the request path's instructions (many small, short-lived
/// JSON and header allocations across threads); mimalloc serves them from per-thread pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tollgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            println!(
                "{}: ok ({} models, {} upstreams)",
                config.display(),
                loaded.models.len(),
                loaded.upstreams.len()
            );
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            let mut loaded = Config::load(&config)?;
            if let Some(listen) = listen {
                loaded.server.listen = listen;
            }
            if let Some(data_dir) = data_dir {
                loaded.server.data_dir = data_dir;
            }
            init_logging(loaded.server.log_json);
            raise_open_file_limit();
            runtime()?.block_on(serve(loaded))
        }
        Command::Demo { config, listen } => {
            init_logging(false);
            raise_open_file_limit();
            runtime()?.block_on(tollgate::demo::run(&config, listen))
        }
        Command::MockUpstream {
            listen,
            latency_ms,
            tokens_per_sec,
            fail_rate,
            fail_mode,
            seed,
        } => {
            let options = MockOptions {
                latency: std::time::Duration::from_millis(latency_ms),
                tokens_per_sec,
                fail_rate,
                fail_mode: fail_mode.parse().map_err(|_| {
                    anyhow::anyhow!("--fail-mode `{fail_mode}` is not 500, 503, 429, hang or cut")
                })?,
                seed,
            };
            raise_open_file_limit();
            runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                println!(
                    "mock upstream listening on http://{}/v1",
                    listener.local_addr()?
                );
                mock_upstream::serve(listener, options, server::termination()).await?;
                Ok(())
            })
        }
        Command::Keys { admin, command } => runtime()?.block_on(keys(admin, command)),
        Command::Teams { admin, command } => {
            runtime()?.block_on(groups(admin, "/admin/teams", command))
        }
        Command::Customers { admin, command } => {
            runtime()?.block_on(groups(admin, "/admin/customers", command))
        }
        Command::Route { explain, config } => {
            let loaded = Config::load(&config)?;
            tollgate::route::explain::run(&loaded, &explain)
        }
        Command::Usage {
            admin,
            range,
            group_by,
            split_by,
            key_id,
        } => {
            let split = split_by.is_some();
            let mut query = vec![("group_by", group_by)];
            query.extend(split_by.map(|v| ("split_by", v)));
            query.extend(range.query());
            query.extend(key_id.map(|v| ("key_id", v)));
            let columns = [
                "group",
                "split",
                "key_name",
                "requests",
                "input_tokens",
                "cached_input_tokens",
                "output_tokens",
                "cost_usd",
            ];
            // The split column only when asked for.
            let columns: Vec<&str> = columns
                .into_iter()
                .filter(|column| split || *column != "split")
                .collect();
            runtime()?.block_on(report(
                admin,
                format!("/admin/usage?{}", encode_query(&query)),
                &columns,
                "data",
            ))
        }
        Command::Savings {
            admin,
            range,
            baseline_tier,
        } => {
            let mut query = range.query();
            query.extend(baseline_tier.map(|v| ("baseline_tier", v)));
            runtime()?.block_on(report(
                admin,
                format!("/admin/routing/savings?{}", encode_query(&query)),
                &["rule", "model", "requests", "cost_usd", "baseline_cost_usd"],
                "data",
            ))
        }
        Command::Export {
            config,
            data_dir,
            from,
            to,
            format,
        } => {
            use tollgate::rating::ledger::export::{export, ExportFormat};
            let mut loaded = Config::load(&config)?;
            if let Some(data_dir) = data_dir {
                loaded.server.data_dir = data_dir;
            }
            let instant = |text: &str, flag: &str| {
                tollgate::api::parse_instant(text).with_context(|| {
                    format!("{flag} `{text}` is not a date (YYYY-MM-DD) or an RFC 3339 time")
                })
            };
            let (from, to) = (instant(&from, "--from")?, instant(&to, "--to")?);
            let ledger = tollgate::server::ledger_reader(&loaded)?;
            let format = match format {
                ExportFormatArg::Csv => ExportFormat::Csv,
                ExportFormatArg::Jsonl => ExportFormat::JsonLines,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let written = export(ledger.as_ref(), from, to, format, &mut out)?;
            eprintln!("exported {written} usage records");
            Ok(())
        }
        Command::Migrate {
            to: StoreKind::Postgres,
            config,
            postgres_url,
        } => {
            let loaded = Config::load(&config)?;
            let url = postgres_url
                .context("give the target with --postgres-url or TOLLGATE_POSTGRES_URL")?;
            let data_dir = &loaded.server.data_dir;
            let copied = tollgate::store::migrate::to_postgres(data_dir, &url)?;
            println!(
                "copied {} into postgres:\n  keys      {:>9} ({} new)\n  groups    {:>9} ({} new)\n  usage     {:>9} ({} new)\n  outcomes  {:>9} ({} new)",
                data_dir.display(),
                copied.keys,
                copied.keys_new,
                copied.groups,
                copied.groups_new,
                copied.usage,
                copied.usage_new,
                copied.outcomes,
                copied.outcomes_new
            );
            Ok(())
        }
        Command::Invoice {
            admin,
            key_id,
            period,
        } => {
            let query = period
                .map(|p| format!("?{}", encode_query(&[("period", p)])))
                .unwrap_or_default();
            runtime()?.block_on(report(
                admin,
                format!("/admin/invoices/{key_id}{query}"),
                &["description", "quantity", "unit_price_usd", "amount_usd"],
                "lines",
            ))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let admin_token = std::env::var("TOLLGATE_ADMIN_TOKEN")
        .ok()
        .filter(|token| !token.is_empty());
    let gateway = Gateway::start(config, admin_token).await?;
    let listener = server::bind(listen).await?;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    println!("tollgate listening on http://{addr}");
    tracing::info!(%addr, "listening");
    for upstream in gateway.app.config().upstreams.values() {
        tracing::info!(
            upstream = %upstream.name,
            base_url = %upstream.base_url,
            provider_key = if upstream.credentials.is_some() { "set" } else { "not set" },
            "forwarding to upstream"
        );
    }
    gateway.serve(listener, server::termination()).await?;
    Ok(())
}

const KEY_COLUMNS: &[&str] = &[
    "id",
    "name",
    "prefix",
    "budget_usd",
    "budget_period",
    "spend_usd",
    "remaining_usd",
    "rpm",
    "tpm",
    "max_concurrency",
    "models",
    "plan",
    "revoked",
];

async fn keys(admin: AdminArgs, command: KeysCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let client = AdminClient::new(&admin)?;
    let answer = match &command {
        KeysCommand::Create(fields) => {
            let body = fields.to_json().map_err(anyhow::Error::msg)?;
            client
                .call(Method::POST, "/admin/keys", Some(&body))
                .await?
        }
        KeysCommand::List => client.call(Method::GET, "/admin/keys", None).await?,
        KeysCommand::Show { id } => {
            client
                .call(Method::GET, &format!("/admin/keys/{id}"), None)
                .await?
        }
        KeysCommand::Update { id, fields } => {
            let body = fields.to_json().map_err(anyhow::Error::msg)?;
            client
                .call(Method::PATCH, &format!("/admin/keys/{id}"), Some(&body))
                .await?
        }
        KeysCommand::Revoke { id } => {
            client
                .call(Method::DELETE, &format!("/admin/keys/{id}"), None)
                .await?
        }
    };
    let rows = match &answer["data"] {
        Value::Array(rows) => rows.clone(),
        _ => vec![answer.clone()],
    };
    print!("{}", render(&answer, &rows, KEY_COLUMNS, admin.format));
    if let (KeysCommand::Create(_), Some(secret)) = (&command, answer["key"].as_str()) {
        if admin.format != tollgate::cli::Format::Json {
            println!("\nsecret (shown once): {secret}");
        }
    }
    Ok(())
}

const GROUP_COLUMNS: &[&str] = &[
    "name",
    "keys",
    "budget_usd",
    "budget_period",
    "spend_usd",
    "reserved_usd",
    "remaining_usd",
    "projected_spend_usd",
    "rpm",
    "tpm",
    "max_usd_per_minute",
    "max_usd_per_hour",
    "soft_budget_usd",
];

/// `tollgate teams …` and `tollgate customers …`, on the admin API's collection at `base`.
async fn groups(admin: AdminArgs, base: &str, command: GroupsCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let client = AdminClient::new(&admin)?;
    let one = |name: &str| format!("{base}/{}", urlencoding_path(name));
    let answer = match &command {
        GroupsCommand::Create(fields) => {
            let body = fields.to_json().map_err(anyhow::Error::msg)?;
            client.call(Method::POST, base, Some(&body)).await?
        }
        GroupsCommand::List => client.call(Method::GET, base, None).await?,
        GroupsCommand::Show { name } => client.call(Method::GET, &one(name), None).await?,
        GroupsCommand::Update { name, fields } => {
            let body = fields.to_json().map_err(anyhow::Error::msg)?;
            client.call(Method::PATCH, &one(name), Some(&body)).await?
        }
        GroupsCommand::Delete { name } => client.call(Method::DELETE, &one(name), None).await?,
        GroupsCommand::Invoice { name, period } => {
            let query = encode_query(
                &period
                    .iter()
                    .map(|p| ("period", p.clone()))
                    .collect::<Vec<_>>(),
            );
            let path = format!("{}/invoice?{query}", one(name));
            let answer = client.call(Method::GET, &path, None).await?;
            let rows = answer["keys"].as_array().cloned().unwrap_or_default();
            print!(
                "{}",
                render(
                    &answer,
                    &rows,
                    &["key_id", "key_name", "plan", "total_usd"],
                    admin.format
                )
            );
            if admin.format == tollgate::cli::Format::Table {
                println!("\ntotal_usd  {}", answer["total_usd"]);
            }
            return Ok(());
        }
    };
    let rows = match &answer["data"] {
        Value::Array(rows) => rows.clone(),
        _ => vec![answer.clone()],
    };
    print!("{}", render(&answer, &rows, GROUP_COLUMNS, admin.format));
    Ok(())
}

/// A name as one segment of a URL path.
fn urlencoding_path(name: &str) -> String {
    let Ok(mut url) = reqwest::Url::parse("http://x/") else {
        return name.to_owned();
    };
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().push(name);
    }
    url.path().trim_start_matches('/').to_owned()
}

/// Fetches an admin report and prints its `rows_field` as a table or CSV (or all as JSON),
/// with the report's totals after a table.
async fn report(
    admin: AdminArgs,
    path: String,
    columns: &[&str],
    rows_field: &str,
) -> anyhow::Result<()> {
    let client = AdminClient::new(&admin)?;
    let answer = client.call(reqwest::Method::GET, &path, None).await?;
    let rows = answer[rows_field].as_array().cloned().unwrap_or_default();
    print!("{}", render(&answer, &rows, columns, admin.format));
    if admin.format == tollgate::cli::Format::Table {
        if let Some(total) = answer.get("total_usd") {
            println!("\ntotal_usd  {total}");
        }
        if let Some(totals) = answer.get("totals") {
            println!("\ntotals  {totals}");
        }
    }
    Ok(())
}

fn encode_query(pairs: &[(&str, String)]) -> String {
    reqwest::Url::parse_with_params("http://x/", pairs)
        .ok()
        .and_then(|url| url.query().map(str::to_owned))
        .unwrap_or_default()
}

/// Every proxied request holds two sockets, and a soft limit of 1,024 open files (still a
/// common default) would refuse connections at ~500 concurrent requests: the soft limit is
/// raised to the hard one, as Go's runtime and nginx's `worker_rlimit_nofile` do.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
