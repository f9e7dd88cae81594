//! The ledger: rated usage records and outcome events in SQLite (WAL) under the data dir,
//! written in batched transactions on the usage thread, never from an async worker. A request
//! id (or outcome idempotency key) is unique, so a replay never charges twice.
//!
//! Durability: `batched` commits with `synchronous = NORMAL` — a killed process loses only
//! what was still queued, a power cut may also lose the last commits; `strict` commits with
//! `synchronous = FULL` and the request path waits for the commit before the client sees the
//! end of its response.
//!
//! [`LedgerReader`] is what the admin API and start-up read through, whichever store holds the
//! ledger; `sql` holds the rows and queries that SQLite and PostgreSQL (`store::postgres`)
//! share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::Serialize;

use crate::meter::record::{MeterEvent, OutcomeEvent, UsageRecord};
use crate::meter::sink::Durability;
use crate::meter::sink::{SinkError, UsageWriter};
use crate::money::Money;
use crate::rating::plan::Cursor;
use crate::store::row::{names, Column, Dialect, Kind};

pub mod export;
pub(crate) mod rollup;
pub(crate) mod sql;

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
    finish_reason TEXT,
    reported_input_tokens INTEGER,
    reported_cached_input_tokens INTEGER,
    reported_output_tokens INTEGER,
    counted_cached_input_tokens INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    ttft_ms INTEGER,
    client_request_id TEXT,
    answered INTEGER NOT NULL DEFAULT 1,
    plan_cost_nanos INTEGER NOT NULL DEFAULT 0,
    response_id TEXT,
    counted_estimate INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    reported_cache_write_input_tokens INTEGER
);
CREATE INDEX IF NOT EXISTS usage_time ON usage (at_ms);
CREATE INDEX IF NOT EXISTS usage_response ON usage (response_id) WHERE response_id IS NOT NULL;
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
CREATE INDEX IF NOT EXISTS outcomes_time ON outcomes (at_ms);
";

/// The rollup tables (see [`rollup`]), created with the rest of a new ledger's schema.
fn rollup_schema(dialect: Dialect) -> String {
    format!(
        "{}; {};",
        rollup::KEYS.create_sql(dialect),
        rollup::ROUTES.create_sql(dialect)
    )
}

/// One step of a ledger's schema history.
pub(crate) enum Migration {
    Sql(&'static str),
    /// Creates the rollups and fills them from the rows already written.
    Rollups,
}

impl Migration {
    pub(crate) fn sql(&self, dialect: Dialect) -> std::borrow::Cow<'static, str> {
        match self {
            Migration::Sql(sql) => std::borrow::Cow::Borrowed(sql),
            Migration::Rollups => std::borrow::Cow::Owned(format!(
                "{} {} {}",
                rollup_schema(dialect),
                rollup::KEYS.backfill_sql(dialect),
                rollup::ROUTES.backfill_sql(dialect)
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger: {0}")]
    Postgres(#[from] crate::store::PgError),
    #[error("ledger: {0}")]
    Io(#[from] std::io::Error),
}

/// Changes to a ledger written by an earlier version, in order; `PRAGMA user_version` counts
/// those applied. `SCHEMA` always creates the latest shape, so a new ledger starts counted.
const MIGRATIONS: &[Migration] = &[
    // Before this, a client's own `x-request-id` was the ledger's unique key.
    Migration::Sql("ALTER TABLE usage ADD COLUMN client_request_id TEXT"),
    // Before this, a refused or failed request's counted prompt stood in the billed token
    // columns (its charge was zero all the same, and the provider had billed nothing).
    Migration::Sql(
        "ALTER TABLE usage ADD COLUMN answered INTEGER NOT NULL DEFAULT 1;
     UPDATE usage SET answered = 0, input_tokens = 0, cached_input_tokens = 0, output_tokens = 0
         WHERE status >= 400 AND charge_nanos = 0 AND list_cost_nanos = 0",
    ),
    // Before this, a key's month totals were rebuilt from list prices, which a plan with
    // prices of its own does not charge; such rows keep list prices, the best known.
    Migration::Sql(
        "ALTER TABLE usage ADD COLUMN plan_cost_nanos INTEGER NOT NULL DEFAULT 0;
     UPDATE usage SET plan_cost_nanos = list_cost_nanos",
    ),
    // Before this, the ledger held no Responses API responses.
    Migration::Sql("ALTER TABLE usage ADD COLUMN response_id TEXT"),
    // Before this, every own count was tiktoken's exact count.
    Migration::Sql("ALTER TABLE usage ADD COLUMN counted_estimate INTEGER NOT NULL DEFAULT 0"),
    // Before this, no provider reported prompt-cache writes.
    Migration::Sql(
        "ALTER TABLE usage ADD COLUMN cache_write_input_tokens INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage ADD COLUMN reported_cache_write_input_tokens INTEGER",
    ),
    // Before this, every report summed the raw rows of its range: by key over time through
    // this index, which every insert paid for and the rollups no longer need.
    Migration::Sql("DROP INDEX IF EXISTS usage_key_time"),
    Migration::Rollups,
];

/// Creates the tables, or brings an older ledger up to date, in one transaction so that the
/// writer and a reader opening at once cannot both migrate. An up-to-date ledger is only read:
/// readers must not take the write lock from the usage writer.
fn prepare_schema(connection: &mut Connection) -> Result<(), LedgerError> {
    let version = connection.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))?;
    let has_usage: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage')",
        [],
        |row| row.get(0),
    )?;
    if has_usage && version == MIGRATIONS.len() as i64 {
        return Ok(());
    }
    let transaction =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let existed: bool = transaction.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage')",
        [],
        |row| row.get(0),
    )?;
    let applied = if existed {
        transaction.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize
    } else {
        MIGRATIONS.len()
    };
    for migration in MIGRATIONS.iter().skip(applied) {
        transaction.execute_batch(&migration.sql(Dialect::Sqlite))?;
    }
    transaction.execute_batch(SCHEMA)?;
    transaction.execute_batch(&rollup_schema(Dialect::Sqlite))?;
    transaction.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    transaction.commit()?;
    Ok(())
}

fn open(path: &Path, durability: Durability) -> Result<Connection, LedgerError> {
    let mut connection = Connection::open(path)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Batched => "NORMAL",
            Durability::Strict => "FULL",
        },
    )?;
    // 4 MiB of pages per connection: the writer's inserts touch the right edges of its
    // time-ordered indexes and a batch's few rollup rows, and the operating system's cache
    // holds the rest. Every page a batch writes stays cached until the cache is full, so the
    // cache's size is memory the process holds under load: 64 MiB took it past 150 MiB.
    connection.pragma_update(None, "cache_size", -4_096)?;
    connection.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    prepare_schema(&mut connection)?;
    Ok(connection)
}

/// In batched mode at most one commit per interval: under load a commit per request cost the
/// writer thread a core's worth of small transactions. This is also what a killed process can
/// lose beyond what was still queued.
pub(crate) const BATCHED_COMMIT_INTERVAL: std::time::Duration =
    std::time::Duration::from_millis(20);

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// The WAL can only start over from its beginning once a checkpoint has copied every frame,
/// and under steady writes the checkpointer's passes never catch up with the writer: the WAL
/// grew until this limit, where the writer's own checkpoint stalled commits for ~200 ms (at
/// 65,536 pages, a 256 MiB WAL under strict load). At 4,096 pages (16 MiB) the writer
/// checkpoints about twice a second under strict load, copying only what the checkpointer has
/// not yet copied, and the WAL file stays at 16 MiB.
const WRITER_CHECKPOINT_PAGES: i64 = 4_096;

/// Drops raw usage rows older than `[ledger] raw_retention_days` whole days, a chunk at a
/// time after the writer's commits, so that a backlog never holds up a batch for long.
/// Rollups, outcomes and so invoices are kept; a report whose range starts or ends inside a
/// dropped hour reads that partial hour as empty.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pruner {
    days: Option<u32>,
    next_ms: i64,
}

impl Pruner {
    /// Rows one prune deletes at most.
    pub(crate) const CHUNK: u64 = 5_000;

    pub(crate) fn new(days: Option<u32>) -> Pruner {
        Pruner { days, next_ms: 0 }
    }

    /// The time before which rows go, when a prune is due.
    pub(crate) fn due(&self, now_ms: i64) -> Option<i64> {
        let days = i64::from(self.days?);
        (now_ms >= self.next_ms).then(|| rollup::Grain::Day.floor(now_ms) - days * 86_400_000)
    }

    /// After a prune: the next chunk of a backlog a second later, otherwise an hour later.
    pub(crate) fn pruned(&mut self, now_ms: i64, result: Result<u64, String>) {
        let wait_ms = match result {
            Ok(deleted) if deleted >= Pruner::CHUNK => 1_000,
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::info!(deleted, "raw usage rows past their retention dropped");
                }
                3_600_000
            }
            Err(error) => {
                tracing::warn!(%error, "dropping raw usage rows past their retention failed");
                60_000
            }
        };
        self.next_ms = now_ms + wait_ms;
    }
}

/// The writing side; lives on the usage thread. Checkpoints mostly run on a thread of their
/// own so that a commit seldom waits for the WAL to be copied into the database file: with
/// SQLite's automatic checkpoints on the writer alone, every thousandth page stalled the whole
/// batch.
pub struct LedgerWriter {
    connection: Connection,
    durability: Durability,
    checkpointer: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    pruner: Pruner,
    statements: Statements,
}

/// The writer's statements, spelled once: each batch looks them up in the connection's cache.
struct Statements {
    usage: String,
    outcomes: String,
    rollup_keys: String,
    rollup_routes: String,
}

impl Statements {
    fn new() -> Statements {
        Statements {
            usage: insert_or_ignore("usage", &sql::USAGE_COLUMNS),
            outcomes: insert_or_ignore("outcomes", &sql::OUTCOME_COLUMNS),
            rollup_keys: upsert(&rollup::KEYS),
            rollup_routes: upsert(&rollup::ROUTES),
        }
    }
}

impl LedgerWriter {
    pub fn open(data_dir: &Path, durability: Durability) -> Result<LedgerWriter, LedgerError> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(FILE);
        let connection = open(&path, durability)?;
        connection.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        let checkpoints = open(&path, durability)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ledger-checkpoint".to_owned())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_INTERVAL)
                {
                    checkpoint(&checkpoints, "PASSIVE");
                }
                checkpoint(&checkpoints, "TRUNCATE");
            })?;
        Ok(LedgerWriter {
            connection,
            durability,
            checkpointer: Some((stop, thread)),
            pruner: Pruner::default(),
            statements: Statements::new(),
        })
    }

    /// Keeps raw usage rows `days` whole days (all of them when `None`).
    pub fn with_raw_retention(mut self, days: Option<u32>) -> LedgerWriter {
        self.pruner = Pruner::new(days);
        self
    }

    /// Drops a chunk of raw rows past their retention, when one is due.
    fn prune(&mut self) {
        let now = crate::unix_ms();
        if let Some(before) = self.pruner.due(now) {
            let deleted = self
                .connection
                .execute(&sql::prune_sql(Dialect::Sqlite), params![before])
                .map(|deleted| deleted as u64)
                .map_err(|error| error.to_string());
            self.pruner.pruned(now, deleted);
        }
    }
}

fn checkpoint(connection: &Connection, mode: &str) {
    let pragma = format!("PRAGMA wal_checkpoint({mode})");
    if let Err(error) = connection.query_row(&pragma, [], |_| Ok(())) {
        tracing::warn!(%error, "ledger checkpoint failed; the writer will checkpoint by itself");
    }
}

impl Drop for LedgerWriter {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.checkpointer.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// SQLite's failures of the storage (I/O, a full or read-only disk, a lock held past the busy
/// timeout) may pass, and the batch is worth writing again; any other refuses the batch itself.
fn sink_error(error: rusqlite::Error) -> SinkError {
    use rusqlite::ErrorCode;
    match error.sqlite_error_code() {
        Some(
            ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::OutOfMemory,
        ) => SinkError::Storage(error.to_string()),
        _ => SinkError::Refused(error.to_string()),
    }
}

/// One row into `table` unless its unique key is already there.
fn insert_or_ignore(table: &str, columns: &[(&str, Kind)]) -> String {
    format!(
        "INSERT OR IGNORE INTO {table} ({}) VALUES ({})",
        names(columns),
        Dialect::Sqlite.params(columns.len())
    )
}

impl UsageWriter for LedgerWriter {
    fn commit_interval(&self) -> std::time::Duration {
        match self.durability {
            Durability::Batched => BATCHED_COMMIT_INTERVAL,
            Durability::Strict => std::time::Duration::ZERO,
        }
    }

    fn write_batch(&mut self, events: &[MeterEvent]) -> Result<(), SinkError> {
        let transaction = self.connection.transaction().map_err(sink_error)?;
        {
            let statements = &self.statements;
            let mut usage = transaction
                .prepare_cached(&statements.usage)
                .map_err(sink_error)?;
            let mut outcomes = transaction
                .prepare_cached(&statements.outcomes)
                .map_err(sink_error)?;
            let mut rollups = rollup::Rollups::default();
            // A statement keeps its bindings from one execution to the next, and a batch's
            // records mostly share their key, plan, model and route: a value equal to the
            // previous record's is left bound (a text bind is a copy into SQLite's memory).
            let mut bound: Option<[Column<'_>; sql::USAGE_COLUMNS.len()]> = None;
            for event in events {
                match event {
                    MeterEvent::Usage(record) => {
                        let values = sql::usage_values(record);
                        for (index, value) in values.iter().enumerate() {
                            if bound.as_ref().is_none_or(|bound| bound[index] != *value) {
                                usage
                                    .raw_bind_parameter(index + 1, value)
                                    .map_err(sink_error)?;
                            }
                        }
                        let inserted = usage.raw_execute().map_err(sink_error)?;
                        bound = Some(values);
                        // A replayed record is already summed.
                        if inserted == 1 {
                            rollups.add(record);
                        }
                    }
                    MeterEvent::Outcome(outcome) => {
                        outcomes
                            .execute(params_from_iter(sql::outcome_values(outcome)))
                            .map_err(sink_error)?;
                    }
                }
            }
            upsert_rows(&transaction, &statements.rollup_keys, rollups.key_rows())?;
            upsert_rows(
                &transaction,
                &statements.rollup_routes,
                rollups.route_rows(),
            )?;
        }
        transaction.commit().map_err(sink_error)?;
        self.prune();
        Ok(())
    }
}

/// Runs an upsert for each of a batch's rollup rows.
fn upsert_rows<'a>(
    transaction: &rusqlite::Transaction<'_>,
    sql: &str,
    rows: impl Iterator<Item = Vec<crate::store::row::Column<'a>>>,
) -> Result<(), SinkError> {
    let mut upsert = transaction.prepare_cached(sql).map_err(sink_error)?;
    for row in rows {
        upsert.execute(params_from_iter(row)).map_err(sink_error)?;
    }
    Ok(())
}

/// Adds one group's sums to a rollup table.
fn upsert(table: &rollup::Table) -> String {
    let columns = table.columns();
    format!(
        "INSERT INTO {} ({}) VALUES ({}) {}",
        table.name,
        names(&columns),
        Dialect::Sqlite.params(columns.len()),
        table.on_conflict()
    )
}

/// The reading side of a ledger, whatever stores it. Every method blocks: callers run it on a
/// blocking thread (the admin API through `spawn_blocking`, start-up), never an async worker.
pub trait LedgerReader: Send + Sync {
    /// Usage between `from_ms` (inclusive) and `to_ms` (exclusive), one row per group in
    /// group order, optionally for one key only.
    fn usage(
        &self,
        from_ms: i64,
        to_ms: i64,
        group: GroupBy,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, LedgerError> {
        self.usage_by(from_ms, to_ms, group, None, key_id)
    }

    /// [`LedgerReader::usage`], each group split by a second grouping when given (a day's
    /// usage by model, say), in group then split order.
    fn usage_by(
        &self,
        from_ms: i64,
        to_ms: i64,
        group: GroupBy,
        split: Option<GroupBy>,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, LedgerError>;

    /// What each key's requests were charged since `from_ms`, for budgets. Outcomes are billed
    /// after the fact and are not held against caps.
    fn spend_since(&self, from_ms: i64) -> Result<HashMap<String, Money>, LedgerError>;

    /// Every key's running totals for the month starting at `month_start_ms`.
    fn cursors(&self, month_start_ms: i64) -> Result<HashMap<String, Cursor>, LedgerError>;

    /// One key's usage and outcomes in one period, for invoices.
    fn period_usage(
        &self,
        key_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<PeriodUsage, LedgerError>;

    /// One usage record by request id, as written.
    fn record(&self, request_id: &str) -> Result<Option<UsageRecord>, LedgerError>;

    /// The record of the request that was served a Responses API response.
    fn response(&self, response_id: &str) -> Result<Option<UsageRecord>, LedgerError>;

    /// The outcome recorded under an idempotency key, as first reported.
    fn outcome(&self, idempotency_key: &str) -> Result<Option<OutcomeEvent>, LedgerError>;

    /// Every usage record in time order (tests).
    fn records(&self) -> Result<Vec<UsageRecord>, LedgerError>;

    /// Up to `limit` usage records in `[from_ms, to_ms)` after `after` (a record's time and
    /// request id; the range's start and `""` for the first page), in time order: exports
    /// page through a range without holding it in memory.
    fn records_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: (i64, &str),
        limit: u32,
    ) -> Result<Vec<UsageRecord>, LedgerError>;
}

/// The SQLite reading side: a connection per call, so reads never wait on the writer's
/// transaction (WAL readers see the last commit).
#[derive(Clone)]
pub struct SqliteLedgerReader {
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Model,
    Tier,
    Rule,
    Day,
    /// The UTC hour, for time series.
    Hour,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRow {
    pub group: String,
    /// The group's part in a split report (`split_by`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    pub key_name: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Money,
    pub list_cost_usd: Money,
    /// Requests that ended in an error after the provider had billed them (a stream it cut
    /// mid-answer): they are charged their prompt and the output delivered.
    pub errors_billed: u64,
}

/// Usage rows by key summed again under each key's `label` (a team, a customer), in label
/// order.
pub fn regroup(rows: Vec<UsageRow>, label: impl Fn(&str) -> String) -> Vec<UsageRow> {
    let mut groups: std::collections::BTreeMap<String, UsageRow> = Default::default();
    for row in rows {
        let name = label(&row.group);
        let sum = groups.entry(name.clone()).or_insert_with(|| UsageRow {
            group: name,
            ..UsageRow::default()
        });
        sum.requests += row.requests;
        sum.input_tokens += row.input_tokens;
        sum.cached_input_tokens += row.cached_input_tokens;
        sum.output_tokens += row.output_tokens;
        sum.cost_usd += row.cost_usd;
        sum.list_cost_usd += row.list_cost_usd;
        sum.errors_billed += row.errors_billed;
    }
    groups.into_values().collect()
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

impl SqliteLedgerReader {
    pub fn new(data_dir: &Path) -> SqliteLedgerReader {
        SqliteLedgerReader {
            path: data_dir.join(FILE),
        }
    }

    fn connect(&self) -> Result<Connection, LedgerError> {
        let mut connection = Connection::open(&self.path)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        prepare_schema(&mut connection)?;
        Ok(connection)
    }

    /// Every usage record in time order, handed to `each` in batches of at most `size`, so
    /// that copying a large ledger to another store never holds all of it in memory.
    pub fn records_in_batches<E: From<LedgerError>>(
        &self,
        size: usize,
        mut each: impl FnMut(Vec<UsageRecord>) -> Result<(), E>,
    ) -> Result<(), E> {
        let connection = self.connect()?;
        let mut statement = connection
            .prepare(&sql::records_sql())
            .map_err(LedgerError::from)?;
        let mut rows = statement
            .query_map([], |row| sql::usage_record(row))
            .map_err(LedgerError::from)?;
        loop {
            let batch = rows
                .by_ref()
                .take(size.max(1))
                .collect::<Result<Vec<_>, _>>()
                .map_err(LedgerError::from)?;
            if batch.is_empty() {
                return Ok(());
            }
            each(batch)?;
        }
    }

    /// Every outcome in time order, for copying the ledger to another store.
    pub fn outcomes(&self) -> Result<Vec<OutcomeEvent>, LedgerError> {
        let connection = self.connect()?;
        let mut statement = connection.prepare(&format!(
            "SELECT {} FROM outcomes ORDER BY at_ms, idempotency_key",
            names(&sql::OUTCOME_COLUMNS)
        ))?;
        let outcomes = statement
            .query_map([], |row| sql::outcome_event(row))?
            .collect::<Result<_, _>>()?;
        Ok(outcomes)
    }
}

impl rollup::Lines for Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn lines(
        &self,
        sql: &str,
        params: &[crate::store::row::Column<'_>],
        buckets: &[bool],
    ) -> Result<Vec<rollup::Line>, LedgerError> {
        let mut statement = self.prepare(sql)?;
        let lines = statement
            .query_map(params_from_iter(params), |row| {
                rollup::Line::read(row, buckets)
            })?
            .collect::<Result<_, _>>()?;
        Ok(lines)
    }
}

impl LedgerReader for SqliteLedgerReader {
    fn usage_by(
        &self,
        from_ms: i64,
        to_ms: i64,
        group: GroupBy,
        split: Option<GroupBy>,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, LedgerError> {
        rollup::usage(&self.connect()?, from_ms, to_ms, group, split, key_id)
    }

    fn spend_since(&self, from_ms: i64) -> Result<HashMap<String, Money>, LedgerError> {
        let connection = self.connect()?;
        let usage = rollup::by_key_since(&connection, from_ms)?;
        let mut statement = connection.prepare(&sql::outcome_spend_sql(Dialect::Sqlite))?;
        let outcomes = statement
            .query_map([from_ms], |row| sql::spend_row(row))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(sql::spend_by_key(usage, outcomes))
    }

    fn cursors(&self, month_start_ms: i64) -> Result<HashMap<String, Cursor>, LedgerError> {
        let connection = self.connect()?;
        Ok(sql::cursors(rollup::by_key_since(
            &connection,
            month_start_ms,
        )?))
    }

    fn period_usage(
        &self,
        key_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<PeriodUsage, LedgerError> {
        let connection = self.connect()?;
        let models = rollup::grouped_by(&connection, from_ms, to_ms, GroupBy::Model, Some(key_id))?;
        let outcomes = connection
            .prepare(&sql::period_outcomes_sql(Dialect::Sqlite))?
            .query_map(params![key_id, from_ms, to_ms], |row| {
                sql::outcome_line(row)
            })?
            .collect::<Result<_, _>>()?;
        Ok(sql::period_usage(
            models
                .into_iter()
                .map(|(model, (_, totals))| (model, totals)),
            outcomes,
        ))
    }

    fn record(&self, request_id: &str) -> Result<Option<UsageRecord>, LedgerError> {
        let connection = self.connect()?;
        Ok(connection
            .query_row(&sql::record_sql(Dialect::Sqlite), [request_id], |row| {
                sql::usage_record(row)
            })
            .optional()?)
    }

    fn response(&self, response_id: &str) -> Result<Option<UsageRecord>, LedgerError> {
        let connection = self.connect()?;
        Ok(connection
            .query_row(&sql::response_sql(Dialect::Sqlite), [response_id], |row| {
                sql::usage_record(row)
            })
            .optional()?)
    }

    fn outcome(&self, idempotency_key: &str) -> Result<Option<OutcomeEvent>, LedgerError> {
        let connection = self.connect()?;
        Ok(connection
            .query_row(
                &sql::outcome_sql(Dialect::Sqlite),
                [idempotency_key],
                |row| sql::outcome_event(row),
            )
            .optional()?)
    }

    fn records(&self) -> Result<Vec<UsageRecord>, LedgerError> {
        let connection = self.connect()?;
        let mut statement = connection.prepare(&sql::records_sql())?;
        let records = statement
            .query_map([], |row| sql::usage_record(row))?
            .collect::<Result<_, _>>()?;
        Ok(records)
    }

    fn records_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: (i64, &str),
        limit: u32,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let connection = self.connect()?;
        let mut statement = connection.prepare(&sql::records_page_sql(Dialect::Sqlite))?;
        let records = statement
            .query_map(params![from_ms, to_ms, after.0, after.1, limit], |row| {
                sql::usage_record(row)
            })?
            .collect::<Result<_, _>>()?;
        Ok(records)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::Endpoint;
    use crate::meter::record::{Outcome, TokenUsage};

    pub(crate) fn record(request_id: &str, reported: Option<TokenUsage>) -> UsageRecord {
        UsageRecord {
            request_id: request_id.to_owned(),
            client_request_id: Some(format!("client-{request_id}")),
            started_at_ms: 1_795_000_000_123,
            key_id: Some("key_1".into()),
            key_name: Some("team-a".into()),
            plan: Some("seats".into()),
            endpoint: Endpoint::ChatCompletions,
            requested_model: "auto".into(),
            served_model: Some("gpt-4o-mini".into()),
            upstream: Some("openai".into()),
            tier: Some("cheap".into()),
            route_rule: Some("short".into()),
            streamed: true,
            status: 200,
            outcome: Outcome::ClientDisconnected,
            finish_reason: None,
            reported,
            counted: TokenUsage {
                input: 12,
                cached_input: 0,
                output: 7,
                cache_write_input: 0,
            },
            attempts: 2,
            answered: true,
            latency_ms: 840,
            ttft_ms: Some(95),
            charge: Money(1_234_567),
            list_cost: Money(1_000_000),
            plan_cost: Money(900_000),
            micro_credits: 42,
            response_id: None,
            counted_estimate: false,
        }
    }

    #[test]
    fn records_of_one_batch_read_back_whole_whatever_they_share() {
        let dir =
            std::env::temp_dir().join(format!("tollgate-ledger-share-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut writer = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        let first = record("req_1", None);
        // Values that differ from the record before (to NULL, to another text, another
        // number), then back: each must be bound again, not left from the previous row.
        let second = UsageRecord {
            request_id: "req_2".to_owned(),
            key_id: None,
            served_model: Some("gpt-4o".into()),
            finish_reason: Some("length".into()),
            ttft_ms: None,
            streamed: false,
            attempts: 1,
            charge: Money(7),
            ..first.clone()
        };
        let third = record("req_3", None);
        let events = [first.clone(), second.clone(), third.clone()].map(MeterEvent::Usage);
        writer.write_batch(&events).unwrap();
        let reader = SqliteLedgerReader::new(&dir);
        assert_eq!(reader.records().unwrap(), vec![first, second, third]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_read_back_as_written_and_a_replay_is_ignored() {
        let dir = std::env::temp_dir().join(format!("tollgate-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut writer = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        let counted_only = record("req_a", None);
        let reported = record(
            "req_b",
            Some(TokenUsage {
                input: 13,
                cached_input: 8,
                output: 9,
                cache_write_input: 0,
            }),
        );
        let events = [
            MeterEvent::Usage(counted_only.clone()),
            MeterEvent::Usage(reported.clone()),
        ];
        writer.write_batch(&events).unwrap();
        writer.write_batch(&events).unwrap();
        let reader = SqliteLedgerReader::new(&dir);
        assert_eq!(
            reader.records().unwrap(),
            vec![counted_only, reported.clone()]
        );
        assert_eq!(reader.record("req_b").unwrap(), Some(reported));
        assert_eq!(reader.record("req_c").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ledger_from_an_earlier_version_is_migrated() {
        let dir = std::env::temp_dir().join(format!("tollgate-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut refused = record("req_refused", None);
        refused.status = 429;
        refused.outcome = Outcome::Rejected;
        refused.charge = Money::ZERO;
        refused.list_cost = Money::ZERO;
        refused.plan_cost = Money::ZERO;
        refused.micro_credits = 0;
        // Written as the earlier version did: answered, its counted prompt in the billed columns.
        let mut earlier = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        earlier
            .write_batch(&[MeterEvent::Usage(refused.clone())])
            .unwrap();
        drop(earlier);
        let old = Connection::open(dir.join(FILE)).unwrap();
        old.execute_batch(
            "ALTER TABLE usage DROP COLUMN answered;
             ALTER TABLE usage DROP COLUMN client_request_id;
             ALTER TABLE usage DROP COLUMN plan_cost_nanos;
             DROP INDEX usage_response;
             ALTER TABLE usage DROP COLUMN response_id;
             ALTER TABLE usage DROP COLUMN counted_estimate;
             ALTER TABLE usage DROP COLUMN cache_write_input_tokens;
             ALTER TABLE usage DROP COLUMN reported_cache_write_input_tokens;
             PRAGMA user_version = 0",
        )
        .unwrap();
        drop(old);
        let mut writer = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        let written = record("req_a", None);
        writer
            .write_batch(&[MeterEvent::Usage(written.clone())])
            .unwrap();
        refused.answered = false;
        refused.client_request_id = None;
        let reader = SqliteLedgerReader::new(&dir);
        assert_eq!(reader.records().unwrap(), vec![written.clone(), refused]);
        let cursor = reader.cursors(0).unwrap()["key_1"];
        assert_eq!(
            cursor.tokens,
            12 + 7,
            "the refused request's prompt is not in the totals"
        );
        assert_eq!(cursor.plan_cost, written.plan_cost);
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raw_rows_past_their_retention_go_and_their_rollups_stay() {
        let dir = std::env::temp_dir().join(format!("tollgate-retain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let day = 86_400_000;
        let now = crate::unix_ms();
        let mut writer = LedgerWriter::open(&dir, Durability::Batched)
            .unwrap()
            .with_raw_retention(Some(3));
        let events: Vec<MeterEvent> = [("old_1", 10), ("old_2", 4), ("new_1", 2), ("new_2", 0)]
            .into_iter()
            .map(|(id, days_ago)| {
                let mut record = record(id, None);
                record.started_at_ms = now - days_ago * day;
                MeterEvent::Usage(record)
            })
            .collect();
        writer.write_batch(&events).unwrap();
        let reader = SqliteLedgerReader::new(&dir);
        let kept: Vec<String> = reader
            .records()
            .unwrap()
            .into_iter()
            .map(|record| record.request_id)
            .collect();
        assert_eq!(kept, ["new_1", "new_2"]);
        let by_key = reader.usage(0, i64::MAX, GroupBy::Key, None).unwrap();
        assert_eq!(
            by_key[0].requests, 4,
            "the rollups still count every request"
        );
        assert_eq!(by_key[0].cost_usd, Money(4 * 1_234_567));
        let invoice = reader
            .period_usage("key_1", now - 20 * day, now + day)
            .unwrap();
        assert_eq!(invoice.charge, Money(4 * 1_234_567));
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_export_pages_through_a_period_in_time_order() {
        use export::{export, ExportFormat};
        let dir = std::env::temp_dir().join(format!("tollgate-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut writer = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        let base = 1_795_000_000_000;
        // Three records a millisecond: pages end between records of the same time.
        let records: Vec<UsageRecord> = (0..12_001)
            .map(|n| {
                let mut record = record(&format!("req_{:05}", 12_001 - n), None);
                record.started_at_ms = base + n / 3;
                record.key_name = Some("team, \"a\"".into());
                record
            })
            .collect();
        let events: Vec<MeterEvent> = records.iter().cloned().map(MeterEvent::Usage).collect();
        writer.write_batch(&events).unwrap();
        let (from, to) = (base + 10, base + 3_900);
        let mut expected: Vec<UsageRecord> = records
            .into_iter()
            .filter(|r| (from..to).contains(&r.started_at_ms))
            .collect();
        expected.sort_by(|a, b| {
            (a.started_at_ms, &a.request_id).cmp(&(b.started_at_ms, &b.request_id))
        });
        let reader = SqliteLedgerReader::new(&dir);

        let mut out = Vec::new();
        let written = export(&reader, from, to, ExportFormat::JsonLines, &mut out).unwrap();
        let exported: Vec<UsageRecord> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(written, 11_670);
        assert_eq!(exported, expected);

        let mut out = Vec::new();
        export(&reader, from, to, ExportFormat::Csv, &mut out).unwrap();
        let csv = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 1 + 11_670);
        assert_eq!(lines[0], names(&sql::USAGE_COLUMNS).replace(", ", ","));
        assert!(lines[1].starts_with(&format!(
            "{},{},2026-11-18,key_1,\"team, \"\"a\"\"\",seats,",
            expected[0].request_id, expected[0].started_at_ms
        )));
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_wal_starts_over_under_a_commit_per_record() {
        let dir = std::env::temp_dir().join(format!("tollgate-wal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut writer = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        // Each commit appends several pages (the row, its index entries and its three hours',
        // days' and months' rollup rows), so 3,000 commits write well over 15,000 frames:
        // far past the writer's checkpoint threshold.
        for n in 0..3_000 {
            let event = MeterEvent::Usage(record(&format!("req_{n:06}"), None));
            writer.write_batch(&[event]).unwrap();
        }
        let wal = std::fs::metadata(dir.join(format!("{FILE}-wal")))
            .unwrap()
            .len();
        assert!(wal <= 20 << 20, "the WAL grew to {wal} bytes");
        assert_eq!(
            SqliteLedgerReader::new(&dir).records().unwrap().len(),
            3_000
        );
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A failing disk under the real ledger: the first `failures` writes fail, and every
    /// write holding the request id `refused` is refused.
    struct FailingDisk {
        ledger: LedgerWriter,
        failures: usize,
        refused: &'static str,
    }

    impl UsageWriter for FailingDisk {
        fn write_batch(&mut self, events: &[MeterEvent]) -> Result<(), SinkError> {
            let refused = events.iter().any(
                |event| matches!(event, MeterEvent::Usage(record) if record.request_id == self.refused),
            );
            if self.failures > 0 {
                self.failures -= 1;
                return Err(SinkError::Storage("disk I/O error".to_owned()));
            }
            if refused {
                return Err(SinkError::Refused("a record the ledger refuses".to_owned()));
            }
            self.ledger.write_batch(events)
        }
    }

    #[tokio::test]
    async fn a_failed_batch_is_retried_and_a_refused_record_loses_only_itself() {
        let dir =
            std::env::temp_dir().join(format!("tollgate-ledger-retry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let disk = FailingDisk {
            ledger: LedgerWriter::open(&dir, Durability::Strict).unwrap(),
            failures: 2,
            refused: "req_bad",
        };
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let pipeline =
            crate::meter::sink::UsagePipeline::start(Box::new(disk), 16, metrics.clone()).unwrap();
        let sender = pipeline.sender();
        let [first, refused, second] = ["req_1", "req_bad", "req_2"]
            .map(|id| sender.submit_acked(MeterEvent::Usage(record(id, None))));
        assert!(first.await.is_ok());
        assert!(refused.await.is_err());
        assert!(second.await.is_ok());
        pipeline.close().await;

        let written: Vec<String> = SqliteLedgerReader::new(&dir)
            .records()
            .unwrap()
            .into_iter()
            .map(|record| record.request_id)
            .collect();
        assert_eq!(written, ["req_1", "req_2"]);
        let events = |result: &str| {
            metrics
                .hot()
                .usage_events
                .with_label_values(&[result])
                .get()
        };
        assert_eq!((events("written"), events("failed")), (2, 1));
        // Only the storage's failures are retried; a refused batch is split at once.
        assert_eq!(metrics.usage_batch_retries.get(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    /// A batched writer that has seen a record looks for the next ones itself rather than
    /// being woken by them: each must still reach the ledger within a commit interval or so,
    /// and a close must find and write what is queued.
    #[tokio::test]
    async fn a_batched_writer_finds_records_itself_between_requests_and_writes_all_at_close() {
        let dir =
            std::env::temp_dir().join(format!("tollgate-ledger-polling-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ledger = LedgerWriter::open(&dir, Durability::Batched).unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let pipeline =
            crate::meter::sink::UsagePipeline::start(Box::new(ledger), 16, metrics).unwrap();
        let sender = pipeline.sender();
        let reader = SqliteLedgerReader::new(&dir);
        let committed = |id: &str| {
            let (reader, id) = (&reader, id.to_owned());
            async move {
                for _ in 0..500 {
                    if reader.record(&id).unwrap().is_some() {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                false
            }
        };
        // The first wakes a writer waiting on the channel; the second finds it polling.
        assert!(sender.submit(MeterEvent::Usage(record("req_1", None))));
        assert!(
            committed("req_1").await,
            "the first record was never committed"
        );
        assert!(sender.submit(MeterEvent::Usage(record("req_2", None))));
        assert!(
            committed("req_2").await,
            "a record queued while polling was never committed"
        );
        assert!(sender.submit(MeterEvent::Usage(record("req_3", None))));
        pipeline.close().await;

        let written: Vec<String> = reader
            .records()
            .unwrap()
            .into_iter()
            .map(|record| record.request_id)
            .collect();
        assert_eq!(written, ["req_1", "req_2", "req_3"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
