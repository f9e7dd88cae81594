//! The ledger: rated usage records and outcome events in SQLite (WAL) under the data dir,
//! written in batched transactions on the usage thread, never from an async worker. A request
//! id (or outcome idempotency key) is unique, so a replay never charges twice.
//!
//! Durability: `batched` commits with `synchronous = NORMAL` — a killed process loses only
//! what was still queued, a power cut may also lose the last commits; `strict` commits with
//! `synchronous = FULL` and the request path waits for the commit before the client sees the
//! end of its response.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::meter::record::{MeterEvent, UsageRecord};
use crate::meter::sink::{SinkError, UsageWriter};
use crate::money::Money;
use crate::rating::plan::Cursor;

pub const FILE: &str = "ledger.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    day TEXT NOT NULL,
    key_id TEXT,
    key_name TEXT,
    plan TEXT,
    endpoint TEXT NOT NULL,
    requested_model TEXT NOT NULL,
    served_model TEXT,
    upstream TEXT,
    tier TEXT,
    route_rule TEXT,
    streamed INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    counted_input_tokens INTEGER NOT NULL,
    counted_output_tokens INTEGER NOT NULL,
    charge_nanos INTEGER NOT NULL,
    list_cost_nanos INTEGER NOT NULL,
    micro_credits INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_time ON usage (key_id, at_ms);
CREATE INDEX IF NOT EXISTS usage_time ON usage (at_ms);
CREATE TABLE IF NOT EXISTS outcomes (
    idempotency_key TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    plan TEXT,
    outcome_type TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    request_id TEXT,
    charge_nanos INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_key_time ON outcomes (key_id, at_ms);
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Batched,
    Strict,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger: {0}")]
    Io(#[from] std::io::Error),
}

fn day_of(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn open(path: &Path, durability: Durability) -> Result<Connection, LedgerError> {
    let connection = Connection::open(path)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Batched => "NORMAL",
            Durability::Strict => "FULL",
        },
    )?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    connection.execute_batch(SCHEMA)?;
    Ok(connection)
}

/// The writing side; lives on the usage thread.
pub struct LedgerWriter {
    connection: Connection,
}

impl LedgerWriter {
    pub fn open(data_dir: &Path, durability: Durability) -> Result<LedgerWriter, LedgerError> {
        std::fs::create_dir_all(data_dir)?;
        Ok(LedgerWriter {
            connection: open(&data_dir.join(FILE), durability)?,
        })
    }
}

fn insert_usage(
    statement: &mut rusqlite::CachedStatement<'_>,
    record: &UsageRecord,
) -> rusqlite::Result<usize> {
    let billed = record.billed();
    let json = serde_json::to_string(record).unwrap_or_default();
    statement.execute(params![
        record.request_id,
        record.started_at_ms,
        day_of(record.started_at_ms),
        record.key_id,
        record.key_name,
        record.plan,
        record.endpoint.as_str(),
        record.requested_model,
        record.served_model,
        record.upstream,
        record.tier,
        record.route_rule,
        record.streamed,
        record.status,
        record.outcome.as_str(),
        billed.input as i64,
        billed.cached_input as i64,
        billed.output as i64,
        record.counted.input as i64,
        record.counted.output as i64,
        record.charge.nanos(),
        record.list_cost.nanos(),
        record.micro_credits as i64,
        json,
    ])
}

impl UsageWriter for LedgerWriter {
    fn write_batch(&mut self, events: &[MeterEvent]) -> Result<(), SinkError> {
        let transaction = self
            .connection
            .transaction()
            .map_err(|e| SinkError::Other(e.to_string()))?;
        {
            let mut usage = transaction
                .prepare_cached(
                    "INSERT OR IGNORE INTO usage VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)",
                )
                .map_err(|e| SinkError::Other(e.to_string()))?;
            let mut outcomes = transaction
                .prepare_cached(
                    "INSERT OR IGNORE INTO outcomes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(|e| SinkError::Other(e.to_string()))?;
            for event in events {
                let result = match event {
                    MeterEvent::Usage(record) => insert_usage(&mut usage, record),
                    MeterEvent::Outcome(outcome) => outcomes.execute(params![
                        outcome.idempotency_key,
                        outcome.at_ms,
                        day_of(outcome.at_ms),
                        outcome.key_id,
                        outcome.plan,
                        outcome.outcome_type,
                        outcome.quantity as i64,
                        outcome.request_id,
                        outcome.charge.nanos(),
                    ]),
                };
                result.map_err(|e| SinkError::Other(e.to_string()))?;
            }
        }
        transaction
            .commit()
            .map_err(|e| SinkError::Other(e.to_string()))
    }
}

/// The reading side: a connection per call, so reads never wait on the writer's transaction
/// (WAL readers see the last commit).
#[derive(Clone)]
pub struct LedgerReader {
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Model,
    Day,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    pub group: String,
    pub key_name: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Money,
    pub list_cost_usd: Money,
}

/// One key's usage in one period, by model, for invoices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeriodUsage {
    pub by_model: Vec<(String, u64, u64, u64, Money)>,
    pub tokens: u64,
    pub charge: Money,
    pub micro_credits: u64,
    pub outcomes: Vec<(String, u64, Money)>,
}

impl LedgerReader {
    pub fn new(data_dir: &Path) -> LedgerReader {
        LedgerReader {
            path: data_dir.join(FILE),
        }
    }

    fn connect(&self) -> Result<Connection, LedgerError> {
        let connection = Connection::open(&self.path)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        Ok(connection)
    }

    pub fn usage(
        &self,
        from_ms: i64,
        to_ms: i64,
        group: GroupBy,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, LedgerError> {
        let column = match group {
            GroupBy::Key => "COALESCE(key_id, '')",
            GroupBy::Model => "COALESCE(served_model, requested_model)",
            GroupBy::Day => "day",
        };
        let connection = self.connect()?;
        let mut statement = connection.prepare(&format!(
            "SELECT {column}, MAX(key_name), COUNT(*), SUM(input_tokens), SUM(cached_input_tokens),
                    SUM(output_tokens), SUM(charge_nanos), SUM(list_cost_nanos)
             FROM usage WHERE at_ms >= ?1 AND at_ms < ?2 AND (?3 IS NULL OR key_id = ?3)
             GROUP BY 1 ORDER BY 1"
        ))?;
        let rows = statement.query_map(params![from_ms, to_ms, key_id], |row| {
            Ok(UsageRow {
                group: row.get(0)?,
                key_name: if group == GroupBy::Key {
                    row.get(1)?
                } else {
                    None
                },
                requests: row.get::<_, i64>(2)? as u64,
                input_tokens: row.get::<_, i64>(3)? as u64,
                cached_input_tokens: row.get::<_, i64>(4)? as u64,
                output_tokens: row.get::<_, i64>(5)? as u64,
                cost_usd: Money(row.get(6)?),
                list_cost_usd: Money(row.get(7)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What each key's requests were charged since `from_ms`, for budgets. Outcomes are billed
    /// after the fact and are not held against caps.
    pub fn spend_since(&self, from_ms: i64) -> Result<HashMap<String, Money>, LedgerError> {
        let connection = self.connect()?;
        let mut spend = HashMap::new();
        {
            let table = "usage";
            let mut statement = connection.prepare(&format!(
                "SELECT key_id, SUM(charge_nanos) FROM {table} WHERE at_ms >= ?1 AND key_id IS NOT NULL GROUP BY key_id"
            ))?;
            let rows = statement.query_map([from_ms], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (key, nanos) = row?;
                *spend.entry(key).or_insert(Money::ZERO) += Money(nanos);
            }
        }
        Ok(spend)
    }

    /// Every key's running totals for the month starting at `month_start_ms`.
    pub fn cursors(&self, month_start_ms: i64) -> Result<HashMap<String, Cursor>, LedgerError> {
        let connection = self.connect()?;
        let mut statement = connection.prepare(
            "SELECT key_id, SUM(input_tokens + output_tokens), SUM(list_cost_nanos), SUM(micro_credits)
             FROM usage WHERE at_ms >= ?1 AND key_id IS NOT NULL GROUP BY key_id",
        )?;
        let rows = statement.query_map([month_start_ms], |row| {
            Ok((
                row.get::<_, String>(0)?,
                Cursor {
                    tokens: row.get::<_, i64>(1)? as u64,
                    list_cost: Money(row.get(2)?),
                    micro_credits: row.get::<_, i64>(3)? as u64,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn period_usage(
        &self,
        key_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<PeriodUsage, LedgerError> {
        let connection = self.connect()?;
        let mut usage = PeriodUsage::default();
        let mut statement = connection.prepare(
            "SELECT COALESCE(served_model, requested_model), COUNT(*), SUM(input_tokens), SUM(output_tokens),
                    SUM(charge_nanos), SUM(micro_credits)
             FROM usage WHERE key_id = ?1 AND at_ms >= ?2 AND at_ms < ?3 GROUP BY 1 ORDER BY 1",
        )?;
        let rows = statement.query_map(params![key_id, from_ms, to_ms], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)? as u64,
                row.get::<_, i64>(2)? as u64,
                row.get::<_, i64>(3)? as u64,
                Money(row.get(4)?),
                row.get::<_, i64>(5)? as u64,
            ))
        })?;
        for row in rows {
            let (model, requests, input, output, charge, credits) = row?;
            usage.tokens += input + output;
            usage.charge += charge;
            usage.micro_credits += credits;
            usage
                .by_model
                .push((model, requests, input, output, charge));
        }
        let mut statement = connection.prepare(
            "SELECT outcome_type, SUM(quantity), SUM(charge_nanos) FROM outcomes
             WHERE key_id = ?1 AND at_ms >= ?2 AND at_ms < ?3 GROUP BY 1 ORDER BY 1",
        )?;
        let rows = statement.query_map(params![key_id, from_ms, to_ms], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)? as u64,
                Money(row.get(2)?),
            ))
        })?;
        usage.outcomes = rows.collect::<Result<_, _>>()?;
        Ok(usage)
    }

    /// One usage record by request id, as written.
    pub fn record(&self, request_id: &str) -> Result<Option<UsageRecord>, LedgerError> {
        let connection = self.connect()?;
        let json: Option<String> = connection
            .query_row(
                "SELECT record FROM usage WHERE request_id = ?1",
                [request_id],
                |row| row.get(0),
            )
            .optional()?;
        Ok(json.and_then(|text| serde_json::from_str(&text).ok()))
    }

    /// Every usage record in time order (tests and exports).
    pub fn records(&self) -> Result<Vec<UsageRecord>, LedgerError> {
        let connection = self.connect()?;
        let mut statement =
            connection.prepare("SELECT record FROM usage ORDER BY at_ms, request_id")?;
        let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
        let mut records = Vec::new();
        for row in rows {
            if let Ok(record) = serde_json::from_str(&row?) {
                records.push(record);
            }
        }
        Ok(records)
    }
}
