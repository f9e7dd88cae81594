//! The `tollgate` command line: one subcommand per job, each a thin call into the library.
//! Administrative commands (`keys`, `teams`, `customers`, `usage`, `invoice`) talk to a
//! running gateway's admin API;
//! `migrate` works on the stores directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An LLM inference gateway with built-in metering"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; the size difference between commands costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file.
        #[arg(long, default_value = "routes.toml")]
        config: PathBuf,
        /// Listen address, overriding `server.listen`.
        #[arg(long, env = "TOLLGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Data dir (keys and ledger), overriding `server.data_dir`; relative to the working
        /// directory. A container's config can then stay the repository's.
        #[arg(long, env = "TOLLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Run the gateway, a mock upstream and a demo key on loopback, and print how to call it.
    Demo {
        #[arg(long, default_value = "routes.toml")]
        config: PathBuf,
        /// Gateway address; by default `server.listen`, or any free port if that is taken.
        #[arg(long, env = "TOLLGATE_LISTEN")]
        listen: Option<SocketAddr>,
    },
    /// Run a deterministic OpenAI-compatible upstream for tests, benches and demos.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9099")]
        listen: SocketAddr,
        /// Delay before the first byte of every answer.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Streaming pace; unlimited when absent.
        #[arg(long)]
        tokens_per_sec: Option<u32>,
        /// Share of requests (0 to 1) that fail with `--fail-mode`.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// How injected failures fail: 500, 503, 429, hang or cut.
        #[arg(long, default_value = "500")]
        fail_mode: String,
        /// Seed of the failure injection, for repeatable runs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Validate a configuration file; errors name the file, line and field.
    Check {
        #[arg(long, default_value = "routes.toml")]
        config: PathBuf,
    },
    /// Show which model a request would be routed to, by which rule, with its signals.
    Route {
        /// A chat request JSON file, or `-` for one request per line on stdin.
        #[arg(long)]
        explain: PathBuf,
        #[arg(long, default_value = "routes.toml")]
        config: PathBuf,
    },
    /// Usage over a time range, grouped by key, model, tier, route rule, day, hour, team or
    /// customer.
    Usage {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        range: ReportRange,
        /// key, model, tier, rule, day, hour, team or customer.
        #[arg(long, default_value = "key")]
        group_by: String,
        /// Split each group by a second grouping: key, model, tier, rule, day or hour.
        #[arg(long)]
        split_by: Option<String>,
        /// Only this key.
        #[arg(long)]
        key_id: Option<String>,
    },
    /// What routing saved: the router's placements at list prices against the same tokens on
    /// a baseline tier (default: the dearest), by route rule and model.
    Savings {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        range: ReportRange,
        /// The tier to compare with.
        #[arg(long)]
        baseline_tier: Option<String>,
    },
    /// A key's invoice preview for a month.
    Invoice {
        #[command(flatten)]
        admin: AdminArgs,
        key_id: String,
        /// YYYY-MM (default: the current month).
        #[arg(long)]
        period: Option<String>,
    },
    /// Manage client keys through the admin API.
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage teams, budget levels above the keys that name them, through the admin API.
    Teams {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// Manage customers, budget levels above the keys that name them, through the admin API.
    Customers {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// Write a period's raw usage rows from the ledger (the configured store) to stdout, e.g.
    /// before `[ledger] raw_retention_days` drops them.
    Export {
        #[arg(long, default_value = "routes.toml")]
        config: PathBuf,
        /// Data dir of an embedded ledger, overriding `server.data_dir`.
        #[arg(long, env = "TOLLGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Start, inclusive: YYYY-MM-DD or RFC 3339.
        #[arg(long)]
        from: String,
        /// End, exclusive: YYYY-MM-DD or RFC 3339.
        #[arg(long)]
        to: String,
        /// csv (the ledger's columns) or jsonl (one record per line).
        #[arg(long, value_enum, default_value_t = ExportFormatArg::Jsonl)]
        format: ExportFormatArg,
    },
    /// Copy this replica's SQLite key store and ledger (under `server.data_dir`) into a shared
    /// store. Rows already there are kept, so running it again copies only what is missing.
    Migrate {
        /// The store to copy into.
        #[arg(long, value_enum)]
        to: StoreKind,
        #[arg(long, default_value = "routes.toml")]
        config: PathBuf,
        /// The PostgreSQL to copy into: postgres://user:password@host:port/database.
        #[arg(long, env = "TOLLGATE_POSTGRES_URL", hide_env_values = true)]
        postgres_url: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormatArg {
    Csv,
    Jsonl,
}

/// A report's time range, as the admin API takes it.
#[derive(Debug, Clone, Args)]
pub struct ReportRange {
    /// Start, inclusive: YYYY-MM-DD or RFC 3339 (default: 30 days before `--to`).
    #[arg(long)]
    pub from: Option<String>,
    /// End, exclusive: YYYY-MM-DD or RFC 3339 (default: now).
    #[arg(long)]
    pub to: Option<String>,
}

impl ReportRange {
    /// The range as query parameters.
    pub fn query(self) -> Vec<(&'static str, String)> {
        let from = self.from.map(|v| ("from", v));
        from.into_iter().chain(self.to.map(|v| ("to", v))).collect()
    }
}

/// A shared store to migrate into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Postgres,
}

/// Where the admin API is and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// The gateway's (admin) base URL.
    #[arg(
        long,
        env = "TOLLGATE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The admin token.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create(KeyFields),
    /// List keys.
    List,
    /// Show one key with its live budget.
    Show { id: String },
    /// Change a key's fields.
    Update {
        id: String,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Revoke a key; it fails from its next request on.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Create a team or customer.
    Create(LimitFields),
    /// List them with their live spend.
    List,
    /// Show one with its live budget and projection.
    Show { name: String },
    /// Change its limits.
    Update {
        name: String,
        #[command(flatten)]
        fields: LimitFields,
    },
    /// Delete one that no live key names.
    Delete { name: String },
    /// The invoices of its keys for a month, and their total.
    Invoice {
        name: String,
        /// YYYY-MM (default: the current month).
        #[arg(long)]
        period: Option<String>,
    },
}

/// The fields a key, a team and a customer share.
#[derive(Debug, Clone, Args)]
pub struct LimitFields {
    #[arg(long)]
    pub name: Option<String>,
    /// Budget cap in USD (e.g. 25 or 0.5); a team's or customer's covers all its keys.
    #[arg(long)]
    pub budget_usd: Option<String>,
    /// day, week, month or total.
    #[arg(long)]
    pub budget_period: Option<String>,
    #[arg(long)]
    pub rpm: Option<u64>,
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Spend (USD) announced once per period to the alert webhook; refuses nothing.
    #[arg(long)]
    pub soft_budget_usd: Option<String>,
    /// Most USD it may reserve per minute (e.g. 0.5).
    #[arg(long)]
    pub max_usd_per_minute: Option<String>,
    /// Most USD it may reserve per hour.
    #[arg(long)]
    pub max_usd_per_hour: Option<String>,
    /// A plan from the config; a customer's rates its keys that have none.
    #[arg(long)]
    pub plan: Option<String>,
}

impl LimitFields {
    /// The JSON body for the admin API: only the fields given on the command line.
    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        let mut body = serde_json::Map::new();
        put_dollars(
            &mut body,
            [
                ("budget_usd", "--budget-usd", &self.budget_usd),
                (
                    "soft_budget_usd",
                    "--soft-budget-usd",
                    &self.soft_budget_usd,
                ),
                (
                    "max_usd_per_minute",
                    "--max-usd-per-minute",
                    &self.max_usd_per_minute,
                ),
                (
                    "max_usd_per_hour",
                    "--max-usd-per-hour",
                    &self.max_usd_per_hour,
                ),
            ],
        )?;
        for (name, value) in [("rpm", self.rpm), ("tpm", self.tpm)] {
            if let Some(v) = value {
                body.insert(name.to_owned(), v.into());
            }
        }
        for (name, value) in [
            ("name", &self.name),
            ("budget_period", &self.budget_period),
            ("plan", &self.plan),
        ] {
            if let Some(v) = value {
                body.insert(name.to_owned(), v.clone().into());
            }
        }
        Ok(serde_json::Value::Object(body))
    }
}

/// Amounts of dollars given as flags, as JSON numbers (never through a float).
fn put_dollars<const N: usize>(
    body: &mut serde_json::Map<String, serde_json::Value>,
    flags: [(&str, &str, &Option<String>); N],
) -> Result<(), String> {
    for (name, flag, value) in flags {
        if let Some(v) = value {
            let number: serde_json::Number = v
                .parse()
                .map_err(|_| format!("{flag} `{v}` is not a number"))?;
            body.insert(name.to_owned(), serde_json::Value::Number(number));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct KeyFields {
    #[command(flatten)]
    pub limits: LimitFields,
    #[arg(long)]
    pub max_concurrency: Option<u64>,
    /// Allowed models, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    #[arg(long)]
    pub seats: Option<u64>,
    #[arg(long)]
    pub owner: Option<String>,
    /// The team it belongs to (a budget level when the team exists, see `tollgate teams`).
    #[arg(long)]
    pub team: Option<String>,
    /// The customer it belongs to (a budget level when it exists, see `tollgate customers`).
    #[arg(long)]
    pub customer: Option<String>,
}

impl KeyFields {
    /// The JSON body for the admin API: only the fields given on the command line.
    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        let mut body = match self.limits.to_json()? {
            serde_json::Value::Object(body) => body,
            _ => serde_json::Map::new(),
        };
        for (name, value) in [
            ("max_concurrency", self.max_concurrency),
            ("seats", self.seats),
        ] {
            if let Some(v) = value {
                body.insert(name.to_owned(), v.into());
            }
        }
        if let Some(v) = &self.models {
            body.insert("models".to_owned(), v.clone().into());
        }
        for (name, value) in [
            ("owner", &self.owner),
            ("team", &self.team),
            ("customer", &self.customer),
        ] {
            if let Some(v) = value {
                body.insert(name.to_owned(), v.clone().into());
            }
        }
        Ok(serde_json::Value::Object(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_body(args: &[&str]) -> Result<serde_json::Value, String> {
        let cli = Cli::try_parse_from([&["tollgate", "keys", "create"], args].concat())
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Keys {
                command: KeysCommand::Create(fields),
                ..
            } => fields.to_json(),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn key_flags_become_the_admin_apis_fields() {
        let body = key_body(&[
            "--name",
            "agent",
            "--budget-usd",
            "25",
            "--soft-budget-usd",
            "20",
            "--max-usd-per-minute",
            "0.01",
            "--max-usd-per-hour",
            "0.5",
            "--rpm",
            "60",
        ])
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "name": "agent",
                "budget_usd": 25,
                "soft_budget_usd": 20,
                "max_usd_per_minute": 0.01,
                "max_usd_per_hour": 0.5,
                "rpm": 60,
            })
        );
        let refused = key_body(&["--max-usd-per-minute", "a cent"]).unwrap_err();
        assert_eq!(refused, "--max-usd-per-minute `a cent` is not a number");
    }

    #[test]
    fn group_flags_become_the_admin_apis_fields() {
        let cli = Cli::try_parse_from([
            "tollgate",
            "customers",
            "update",
            "acme",
            "--budget-usd",
            "500",
            "--budget-period",
            "week",
            "--max-usd-per-hour",
            "2.5",
            "--tpm",
            "90000",
            "--plan",
            "pro",
        ])
        .unwrap();
        let Command::Customers {
            command: GroupsCommand::Update { name, fields },
            ..
        } = cli.command
        else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(name, "acme");
        assert_eq!(
            fields.to_json().unwrap(),
            serde_json::json!({
                "budget_usd": 500,
                "budget_period": "week",
                "max_usd_per_hour": 2.5,
                "tpm": 90000,
                "plan": "pro",
            })
        );
    }
}
