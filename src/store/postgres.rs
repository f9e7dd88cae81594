//! PostgreSQL as the store a fleet of replicas shares: keys, the usage ledger and outcomes,
//! through the blocking `postgres` client. Every call blocks; callers are the usage thread
//! (the writer) and blocking threads (admin calls, start-up), never an async worker.
//!
//! The schema is migrated by [`PgStore::connect`] from versions embedded in the binary, under
//! an advisory lock, so replicas starting at once migrate once. Rows are mapped by the same
//! code as the SQLite stores (`auth::store`, `rating::ledger::sql`): a report or a record reads
//! the same from either.
//!
//! Connections are bounded in time: connecting gives up after [`CONNECT_TIMEOUT`], and the
//! kernel drops a connection whose peer stops acknowledging after [`TCP_USER_TIMEOUT`], so a
//! vanished server fails a call instead of hanging its thread.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Statement};

use crate::auth::group::{
    group_delete_sql, group_insert_sql, group_members_sql, group_record, group_select,
    group_update_sql, group_update_values, group_values, GroupRecord,
};
use crate::auth::store::{
    key_columns, key_insert_sql, key_record, key_update_sql, key_update_values, key_values,
    GroupDeletion, KeyStore, StoreError,
};
use crate::auth::KeyRecord;
use crate::limits::Level;
use crate::meter::record::{MeterEvent, OutcomeEvent, UsageRecord};
use crate::meter::sink::Durability;
use crate::meter::sink::{SinkError, UsageWriter};
use crate::money::Money;
use crate::rating::ledger::rollup::{self, Rollups};
use crate::rating::ledger::sql;
use crate::rating::ledger::{
    GroupBy, LedgerError, LedgerReader, Migration, PeriodUsage, Pruner, UsageRow,
};
use crate::rating::plan::Cursor;
use crate::store::row::{names, Column, Dialect, Kind, RowSource};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections kept open between calls for the key store and the ledger reader: admin calls
/// and start-up are few, so a handful covers their concurrency; more are opened when needed
/// and closed after.
const IDLE_CONNECTIONS: usize = 4;

/// The advisory lock every replica takes to migrate ("tollgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// The schema, one version a step; `schema_migrations` records those applied. Append only:
/// a released step never changes. Text is compared and sorted by bytes (`COLLATE "C"`), as in
/// SQLite, so reports group and order the same in both stores; integers are SQLite's 64 bits
/// and money is nano-dollars.
const MIGRATIONS: &[Migration] = &[
    // 1: keys, the usage ledger and outcomes, as in SQLite.
    Migration::Sql(
        r#"
    CREATE TABLE keys (
        id TEXT COLLATE "C" PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL,
        prefix TEXT COLLATE "C" NOT NULL,
        secret_hash BYTEA NOT NULL UNIQUE,
        owner TEXT COLLATE "C",
        team TEXT COLLATE "C",
        customer TEXT COLLATE "C",
        budget_nanos BIGINT,
        budget_period TEXT COLLATE "C" NOT NULL,
        rpm BIGINT,
        tpm BIGINT,
        max_concurrency BIGINT,
        models TEXT COLLATE "C",
        plan TEXT COLLATE "C",
        seats BIGINT NOT NULL DEFAULT 1,
        created_at_ms BIGINT NOT NULL,
        revoked_at_ms BIGINT
    );
    CREATE TABLE usage (
        request_id TEXT COLLATE "C" PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        day TEXT COLLATE "C" NOT NULL,
        key_id TEXT COLLATE "C",
        key_name TEXT COLLATE "C",
        plan TEXT COLLATE "C",
        endpoint TEXT COLLATE "C" NOT NULL,
        requested_model TEXT COLLATE "C" NOT NULL,
        served_model TEXT COLLATE "C",
        upstream TEXT COLLATE "C",
        tier TEXT COLLATE "C",
        route_rule TEXT COLLATE "C",
        streamed BOOLEAN NOT NULL,
        status BIGINT NOT NULL,
        outcome TEXT COLLATE "C" NOT NULL,
        input_tokens BIGINT NOT NULL,
        cached_input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        counted_input_tokens BIGINT NOT NULL,
        counted_output_tokens BIGINT NOT NULL,
        charge_nanos BIGINT NOT NULL,
        list_cost_nanos BIGINT NOT NULL,
        micro_credits BIGINT NOT NULL,
        finish_reason TEXT COLLATE "C",
        reported_input_tokens BIGINT,
        reported_cached_input_tokens BIGINT,
        reported_output_tokens BIGINT,
        counted_cached_input_tokens BIGINT NOT NULL,
        attempts BIGINT NOT NULL,
        latency_ms BIGINT NOT NULL,
        ttft_ms BIGINT,
        client_request_id TEXT COLLATE "C",
        answered BOOLEAN NOT NULL DEFAULT TRUE
    );
    CREATE INDEX usage_key_time ON usage (key_id, at_ms);
    CREATE INDEX usage_time ON usage (at_ms);
    CREATE TABLE outcomes (
        idempotency_key TEXT COLLATE "C" PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        day TEXT COLLATE "C" NOT NULL,
        key_id TEXT COLLATE "C" NOT NULL,
        plan TEXT COLLATE "C",
        outcome_type TEXT COLLATE "C" NOT NULL,
        quantity BIGINT NOT NULL,
        request_id TEXT COLLATE "C",
        charge_nanos BIGINT NOT NULL
    );
    CREATE INDEX outcomes_key_time ON outcomes (key_id, at_ms);
    "#,
    ),
    // 2: a key's month totals at its plan's prices (see the SQLite ledger's migrations).
    Migration::Sql(
        r#"
    ALTER TABLE usage ADD COLUMN plan_cost_nanos BIGINT NOT NULL DEFAULT 0;
    UPDATE usage SET plan_cost_nanos = list_cost_nanos;
    "#,
    ),
    // 3: Responses API responses, by id (see the SQLite ledger's migrations).
    Migration::Sql(
        r#"
    ALTER TABLE usage ADD COLUMN response_id TEXT COLLATE "C";
    CREATE INDEX usage_response ON usage (response_id) WHERE response_id IS NOT NULL;
    "#,
    ),
    // 4: own counts that are estimates (see the SQLite ledger's migrations).
    Migration::Sql(
        r#"
    ALTER TABLE usage ADD COLUMN counted_estimate BOOLEAN NOT NULL DEFAULT FALSE;
    "#,
    ),
    // 5: prompt-cache writes (see the SQLite ledger's migrations).
    Migration::Sql(
        r#"
    ALTER TABLE usage ADD COLUMN cache_write_input_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN reported_cache_write_input_tokens BIGINT;
    "#,
    ),
    // 6: outcomes by time, for the spend restored at start; usage by key and time is read
    // from the rollups, and its index no longer pays for what every insert costs.
    Migration::Sql(
        "CREATE INDEX outcomes_time ON outcomes (at_ms);
         DROP INDEX IF EXISTS usage_key_time;",
    ),
    // 7: rollups (see `rating::ledger::rollup`), filled from the rows already written.
    Migration::Rollups,
    // 8: spend-rate caps and soft budgets on keys.
    Migration::Sql(
        "ALTER TABLE keys ADD COLUMN usd_per_minute_nanos BIGINT;
         ALTER TABLE keys ADD COLUMN usd_per_hour_nanos BIGINT;
         ALTER TABLE keys ADD COLUMN soft_budget_nanos BIGINT;",
    ),
    // 9: teams and customers, budget levels above keys (see `auth::group`).
    Migration::Sql(
        r#"
    CREATE TABLE groups (
        level TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        budget_nanos BIGINT,
        budget_period TEXT COLLATE "C" NOT NULL,
        rpm BIGINT,
        tpm BIGINT,
        usd_per_minute_nanos BIGINT,
        usd_per_hour_nanos BIGINT,
        soft_budget_nanos BIGINT,
        plan TEXT COLLATE "C",
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (level, name)
    );
    CREATE INDEX keys_team ON keys (team);
    CREATE INDEX keys_customer ON keys (customer);
    "#,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Client(#[from] postgres::Error),
    #[error("postgres: column {column}: {what}")]
    Invalid { column: usize, what: String },
    #[error("postgres: migration {version}: {source}")]
    Migration {
        version: i32,
        #[source]
        source: postgres::Error,
    },
}

impl RowSource for postgres::Row {
    type Error = PgError;

    fn int(&self, column: usize) -> Result<Option<i64>, PgError> {
        Ok(self.try_get(column)?)
    }

    fn text(&self, column: usize) -> Result<Option<String>, PgError> {
        Ok(self.try_get(column)?)
    }

    fn boolean(&self, column: usize) -> Result<bool, PgError> {
        Ok(self.try_get(column)?)
    }

    fn bytes(&self, column: usize) -> Result<Vec<u8>, PgError> {
        Ok(self.try_get(column)?)
    }

    fn invalid(&self, column: usize, what: String) -> PgError {
        PgError::Invalid { column, what }
    }
}

/// Columns as the client's parameter list.
fn params<'a>(values: &'a [Column<'_>]) -> Vec<&'a (dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value as &(dyn ToSql + Sync))
        .collect()
}

/// A connected and migrated PostgreSQL; hands out the key store, the ledger's reader and
/// writers, which share its connection settings.
pub struct PgStore {
    pool: Arc<Pool>,
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`, or key=value pairs)
    /// and brings the schema up to this binary's version. Fails if the server cannot be
    /// reached, refuses the login, or a migration fails.
    pub fn connect(url: &str) -> Result<PgStore, PgError> {
        let mut config: Config = url.parse()?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(TCP_USER_TIMEOUT)
            .application_name("tollgate");
        let pool = Pool {
            config,
            idle: Mutex::new(Vec::new()),
        };
        // A connection of its own: ending it releases the advisory lock whatever happened.
        let mut client = pool.connect()?;
        migrate(&mut client)?;
        drop(client);
        Ok(PgStore {
            pool: Arc::new(pool),
        })
    }

    pub fn key_store(&self) -> PgKeyStore {
        PgKeyStore {
            pool: self.pool.clone(),
        }
    }

    pub fn ledger_reader(&self) -> PgLedgerReader {
        PgLedgerReader {
            pool: self.pool.clone(),
        }
    }

    /// A writer with a connection of its own, for the usage thread.
    pub fn ledger_writer(&self, durability: Durability) -> Result<PgLedgerWriter, PgError> {
        let session = Session::open(&self.pool.config, durability)?;
        Ok(PgLedgerWriter {
            config: self.pool.config.clone(),
            durability,
            session: Some(session),
            pruner: Pruner::default(),
        })
    }
}

/// Applies the missing migrations in order, each in its own transaction, while holding the
/// advisory lock: a replica that waited finds them applied and does nothing.
fn migrate(client: &mut Client) -> Result<(), PgError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    for (version, migration) in (1..).zip(MIGRATIONS) {
        if applied.contains(&version) {
            continue;
        }
        let mut transaction = client.transaction()?;
        transaction
            .batch_execute(&migration.sql(Dialect::Postgres))
            .map_err(|source| PgError::Migration { version, source })?;
        transaction.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())",
            &[&version],
        )?;
        transaction.commit()?;
        tracing::info!(version, "postgres schema migrated");
    }
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])?;
    Ok(())
}

/// Connections for calls that come and go (admin calls, start-up). A std mutex guards only
/// the idle list, never a call in progress, and is never held across an await.
struct Pool {
    config: Config,
    idle: Mutex<Vec<Client>>,
}

impl Drop for Pool {
    /// The blocking client closes its connection through a runtime of its own, which cannot
    /// start on an async worker — where the gateway's state is dropped at shutdown — so idle
    /// connections are closed on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(PoisonError::into_inner));
        if idle.is_empty() {
            return;
        }
        let closing = std::thread::Builder::new()
            .name("pg-close".to_owned())
            .spawn(move || drop(idle));
        if let Err(error) = closing {
            tracing::warn!(%error, "cannot close idle PostgreSQL connections cleanly");
        }
    }
}

impl Pool {
    fn connect(&self) -> Result<Client, PgError> {
        Ok(self.config.connect(NoTls)?)
    }

    /// Runs `call` on an idle connection or a new one. A connection found closed by its call
    /// (the server restarted, or dropped it while idle) failed before the server ran anything,
    /// so the call is made once more on a new connection.
    fn with<T>(
        &self,
        mut call: impl FnMut(&mut Client) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let (mut client, reused) = match idle {
            Some(client) if !client.is_closed() => (client, true),
            _ => (self.connect()?, false),
        };
        let mut result = call(&mut client);
        if reused && result.is_err() && client.is_closed() {
            client = self.connect()?;
            result = call(&mut client);
        }
        if !client.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(client);
            }
        }
        result
    }
}

/// Keys in PostgreSQL, with the same semantics as `SqliteKeyStore`: an insert of an existing
/// id or secret fails, an update of a missing id changes nothing.
pub struct PgKeyStore {
    pool: Arc<Pool>,
}

impl PgKeyStore {
    /// Inserts a key unless one with its id or secret is already there; answers whether it
    /// was inserted. For copying keys idempotently.
    pub fn insert_missing(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        let values = key_values(record);
        let sql = format!(
            "{} ON CONFLICT DO NOTHING",
            key_insert_sql(Dialect::Postgres)
        );
        let inserted = self
            .pool
            .with(|client| Ok(client.execute(&sql, &params(&values))?))?;
        Ok(inserted == 1)
    }
}

impl KeyStore for PgKeyStore {
    fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let values = key_values(record);
        self.pool.with(|client| {
            client.execute(&key_insert_sql(Dialect::Postgres), &params(&values))?;
            Ok(())
        })?;
        Ok(())
    }

    fn modify(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StoreError> {
        // The row lock holds every other replica's change to this key until the commit.
        let select = format!(
            "SELECT {} FROM keys WHERE id = $1 FOR UPDATE",
            key_columns()
        );
        let update = key_update_sql(Dialect::Postgres);
        Ok(self.pool.with(|client| {
            let mut transaction = client.transaction()?;
            let Some(row) = transaction.query_opt(&select, &[&id])? else {
                return Ok(None);
            };
            let mut record = key_record(&row)?;
            if change(&mut record) {
                let values = key_update_values(&record);
                transaction.execute(&update, &params(&values))?;
                transaction.commit()?;
            }
            Ok(Some(record))
        })?)
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("SELECT {} FROM keys WHERE id = $1", key_columns());
        Ok(self.pool.with(|client| {
            client
                .query_opt(&sql, &[&id])?
                .map(|row| key_record(&row))
                .transpose()
        })?)
    }

    fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM keys ORDER BY created_at_ms, id",
            key_columns()
        );
        Ok(self
            .pool
            .with(|client| client.query(&sql, &[])?.iter().map(key_record).collect())?)
    }

    fn insert_group(&self, record: &GroupRecord) -> Result<bool, StoreError> {
        let values = group_values(record);
        let inserted = self.pool.with(|client| {
            Ok(client.execute(&group_insert_sql(Dialect::Postgres), &params(&values))?)
        })?;
        Ok(inserted == 1)
    }

    fn modify_group(
        &self,
        level: Level,
        name: &str,
        change: &mut dyn FnMut(&mut GroupRecord) -> bool,
    ) -> Result<Option<GroupRecord>, StoreError> {
        // The row lock holds every other replica's change to this group until the commit.
        let select = group_select("WHERE level = $1 AND name = $2 FOR UPDATE");
        let update = group_update_sql(Dialect::Postgres);
        Ok(self.pool.with(|client| {
            let mut transaction = client.transaction()?;
            let Some(row) = transaction.query_opt(&select, &[&level.as_str(), &name])? else {
                return Ok(None);
            };
            let mut record = group_record(&row)?;
            if change(&mut record) {
                let values = group_update_values(&record);
                transaction.execute(&update, &params(&values))?;
                transaction.commit()?;
            }
            Ok(Some(record))
        })?)
    }

    fn list_groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        let sql = group_select("ORDER BY level, name");
        Ok(self
            .pool
            .with(|client| client.query(&sql, &[])?.iter().map(group_record).collect())?)
    }

    fn delete_group(&self, level: Level, name: &str) -> Result<GroupDeletion, StoreError> {
        // The group's row is locked first, so a replica deleting it and one counting its
        // members take turns.
        let lock = group_select("WHERE level = $1 AND name = $2 FOR UPDATE");
        let members = group_members_sql(level, Dialect::Postgres);
        let delete = group_delete_sql(Dialect::Postgres);
        Ok(self.pool.with(|client| {
            let mut transaction = client.transaction()?;
            if transaction
                .query_opt(&lock, &[&level.as_str(), &name])?
                .is_none()
            {
                return Ok(GroupDeletion::NotFound);
            }
            let count: i64 = transaction.query_one(&members, &[&name])?.get(0);
            if count > 0 {
                return Ok(GroupDeletion::HasKeys(count));
            }
            transaction.execute(&delete, &[&level.as_str(), &name])?;
            transaction.commit()?;
            Ok(GroupDeletion::Deleted)
        })?)
    }
}

/// The ledger's reading side in PostgreSQL: the same queries as SQLite's, in its dialect.
pub struct PgLedgerReader {
    pool: Arc<Pool>,
}

impl PgLedgerReader {
    /// Every row of `sql`, each read by `map`.
    fn rows<T>(
        &self,
        sql: &str,
        values: &[&(dyn ToSql + Sync)],
        map: impl Fn(&postgres::Row) -> Result<T, PgError>,
    ) -> Result<Vec<T>, LedgerError> {
        Ok(self
            .pool
            .with(|client| client.query(sql, values)?.iter().map(&map).collect())?)
    }
}

impl rollup::Lines for PgLedgerReader {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn lines(
        &self,
        sql: &str,
        params: &[Column<'_>],
        buckets: &[bool],
    ) -> Result<Vec<rollup::Line>, LedgerError> {
        let values: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|param| param as &(dyn ToSql + Sync))
            .collect();
        self.rows(sql, &values, |row| rollup::Line::read(row, buckets))
    }
}

impl LedgerReader for PgLedgerReader {
    fn usage_by(
        &self,
        from_ms: i64,
        to_ms: i64,
        group: GroupBy,
        split: Option<GroupBy>,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, LedgerError> {
        rollup::usage(self, from_ms, to_ms, group, split, key_id)
    }

    fn spend_since(
        &self,
        from_ms: i64,
    ) -> Result<std::collections::HashMap<String, Money>, LedgerError> {
        let usage = rollup::by_key_since(self, from_ms)?;
        let outcomes = self.rows(
            &sql::outcome_spend_sql(Dialect::Postgres),
            &[&from_ms],
            sql::spend_row,
        )?;
        Ok(sql::spend_by_key(usage, outcomes))
    }

    fn cursors(
        &self,
        month_start_ms: i64,
    ) -> Result<std::collections::HashMap<String, Cursor>, LedgerError> {
        Ok(sql::cursors(rollup::by_key_since(self, month_start_ms)?))
    }

    fn period_usage(
        &self,
        key_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<PeriodUsage, LedgerError> {
        let models = rollup::grouped_by(self, from_ms, to_ms, GroupBy::Model, Some(key_id))?;
        let values: [&(dyn ToSql + Sync); 3] = [&key_id, &from_ms, &to_ms];
        let outcomes = self.rows(
            &sql::period_outcomes_sql(Dialect::Postgres),
            &values,
            sql::outcome_line,
        )?;
        Ok(sql::period_usage(
            models
                .into_iter()
                .map(|(model, (_, totals))| (model, totals)),
            outcomes,
        ))
    }

    fn record(&self, request_id: &str) -> Result<Option<UsageRecord>, LedgerError> {
        let records = self.rows(
            &sql::record_sql(Dialect::Postgres),
            &[&request_id],
            sql::usage_record,
        )?;
        Ok(records.into_iter().next())
    }

    fn response(&self, response_id: &str) -> Result<Option<UsageRecord>, LedgerError> {
        let records = self.rows(
            &sql::response_sql(Dialect::Postgres),
            &[&response_id],
            sql::usage_record,
        )?;
        Ok(records.into_iter().next())
    }

    fn outcome(&self, idempotency_key: &str) -> Result<Option<OutcomeEvent>, LedgerError> {
        let outcomes = self.rows(
            &sql::outcome_sql(Dialect::Postgres),
            &[&idempotency_key],
            sql::outcome_event,
        )?;
        Ok(outcomes.into_iter().next())
    }

    fn records(&self) -> Result<Vec<UsageRecord>, LedgerError> {
        self.rows(&sql::records_sql(), &[], sql::usage_record)
    }

    fn records_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: (i64, &str),
        limit: u32,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let limit = i64::from(limit);
        self.rows(
            &sql::records_page_sql(Dialect::Postgres),
            &[&from_ms, &to_ms, &after.0, &after.1, &limit],
            sql::usage_record,
        )
    }
}

/// `INSERT … SELECT FROM UNNEST(arrays) {conflict}`: one statement, prepared once, writes a
/// whole batch's rows of a table, one array per column.
fn batch_insert(table: &str, columns: &[(&str, Kind)], conflict: &str) -> String {
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, (_, kind))| format!("${}::{}", n + 1, kind.pg_array()))
        .collect();
    format!(
        "INSERT INTO {table} ({}) SELECT * FROM UNNEST({}) {conflict}",
        names(columns),
        arrays.join(", ")
    )
}

/// Rows turned into one array of values per column, for [`batch_insert`].
fn by_column<'a, R: IntoIterator<Item = Column<'a>>>(
    width: usize,
    rows: impl Iterator<Item = R>,
) -> Vec<Vec<Column<'a>>> {
    let mut columns: Vec<Vec<Column<'a>>> = (0..width).map(|_| Vec::new()).collect();
    for row in rows {
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    columns
}

/// A statement's parameters: one array per column.
fn arrays<'a>(columns: &'a [Vec<Column<'_>>]) -> Vec<&'a (dyn ToSql + Sync)> {
    columns
        .iter()
        .map(|column| column as &(dyn ToSql + Sync))
        .collect()
}

/// How many rows of a batch were new (the others were already written).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inserted {
    pub usage: u64,
    pub outcomes: u64,
}

/// The writer's connection with its statements prepared.
struct Session {
    client: Client,
    usage: Statement,
    outcomes: Statement,
    rollup_keys: Statement,
    rollup_routes: Statement,
}

impl Session {
    fn open(config: &Config, durability: Durability) -> Result<Session, postgres::Error> {
        let mut client = config.connect(NoTls)?;
        // Batched mirrors SQLite's `synchronous = NORMAL`: a commit is acknowledged before its
        // WAL reaches the disk, so a crash of the server (not of the gateway) may lose the
        // last fraction of a second of commits; strict waits for the flush.
        client.batch_execute(match durability {
            Durability::Batched => "SET synchronous_commit = off",
            Durability::Strict => "SET synchronous_commit = on",
        })?;
        // A row already written (a retried batch, or the same record from another replica) is
        // skipped; the usage insert answers the ids it wrote, so that only those are summed.
        let usage = client.prepare(&batch_insert(
            "usage",
            &sql::USAGE_COLUMNS,
            "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
        ))?;
        let outcomes = client.prepare(&batch_insert(
            "outcomes",
            &sql::OUTCOME_COLUMNS,
            "ON CONFLICT (idempotency_key) DO NOTHING",
        ))?;
        let [rollup_keys, rollup_routes] = [&rollup::KEYS, &rollup::ROUTES].map(|table| {
            client.prepare(&batch_insert(
                table.name,
                &table.columns(),
                &table.on_conflict(),
            ))
        });
        Ok(Session {
            client,
            usage,
            outcomes,
            rollup_keys: rollup_keys?,
            rollup_routes: rollup_routes?,
        })
    }

    /// Writes a batch and its rollups in one transaction; answers how many rows were new.
    fn write(&mut self, events: &[MeterEvent]) -> Result<Inserted, postgres::Error> {
        let records: Vec<&UsageRecord> = events
            .iter()
            .filter_map(|event| match event {
                MeterEvent::Usage(record) => Some(record),
                MeterEvent::Outcome(_) => None,
            })
            .collect();
        let outcomes: Vec<&OutcomeEvent> = events
            .iter()
            .filter_map(|event| match event {
                MeterEvent::Outcome(outcome) => Some(outcome),
                MeterEvent::Usage(_) => None,
            })
            .collect();
        let mut transaction = self.client.transaction()?;
        let mut inserted = Inserted::default();
        if !records.is_empty() {
            let columns = by_column(
                sql::USAGE_COLUMNS.len(),
                records.iter().map(|record| sql::usage_values(record)),
            );
            let mut written: std::collections::HashSet<String> = transaction
                .query(&self.usage, &arrays(&columns))?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            inserted.usage = written.len() as u64;
            let mut rollups = Rollups::default();
            // `remove`: a record twice in one batch was written, and is summed, once.
            for record in records {
                if written.remove(&record.request_id) {
                    rollups.add(record);
                }
            }
            if !rollups.is_empty() {
                let width = rollup::KEYS.columns().len();
                let keys = by_column(width, rollups.key_rows());
                transaction.execute(&self.rollup_keys, &arrays(&keys))?;
                let width = rollup::ROUTES.columns().len();
                let routes = by_column(width, rollups.route_rows());
                transaction.execute(&self.rollup_routes, &arrays(&routes))?;
            }
        }
        if !outcomes.is_empty() {
            let columns = by_column(
                sql::OUTCOME_COLUMNS.len(),
                outcomes.iter().map(|outcome| sql::outcome_values(outcome)),
            );
            inserted.outcomes = transaction.execute(&self.outcomes, &arrays(&columns))?;
        }
        transaction.commit()?;
        Ok(inserted)
    }
}

/// Writes batches of usage records and outcomes on the usage thread, one transaction a batch.
/// A connection lost on the way is opened again for the next try, so the pipeline's retries
/// ride out a restart or a failover of the server.
pub struct PgLedgerWriter {
    config: Config,
    durability: Durability,
    session: Option<Session>,
    pruner: Pruner,
}

/// The server's failures that may pass (connection lost, server shutting down or out of
/// resources, a conflict between transactions, a read-only standby after a failover) leave the
/// batch worth writing again; any other (a constraint, a value out of range, a missing table)
/// refuses the batch itself. A failure without a server error is the connection's.
fn sink_error(error: &postgres::Error) -> SinkError {
    let retryable = match error.code() {
        None => true,
        Some(state) => {
            let code = state.code();
            matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58"))
                || matches!(code, "55P03" | "55006" | "25006")
        }
    };
    match retryable {
        true => SinkError::Storage(error.to_string()),
        false => SinkError::Refused(error.to_string()),
    }
}

impl UsageWriter for PgLedgerWriter {
    fn commit_interval(&self) -> Duration {
        match self.durability {
            Durability::Batched => crate::rating::ledger::BATCHED_COMMIT_INTERVAL,
            Durability::Strict => Duration::ZERO,
        }
    }

    fn write_batch(&mut self, events: &[MeterEvent]) -> Result<(), SinkError> {
        self.write_counted(events).map(|_| ())
    }
}

impl PgLedgerWriter {
    /// [`UsageWriter::write_batch`], answering how many rows were new: for copying a ledger.
    pub fn write_counted(&mut self, events: &[MeterEvent]) -> Result<Inserted, SinkError> {
        let mut session = match self.session.take() {
            Some(session) if !session.client.is_closed() => session,
            _ => Session::open(&self.config, self.durability)
                .map_err(|error| SinkError::Storage(error.to_string()))?,
        };
        let result = session.write(events);
        if result.is_ok() {
            let now = crate::unix_ms();
            if let Some(before) = self.pruner.due(now) {
                let deleted = session
                    .client
                    .execute(&sql::prune_sql(Dialect::Postgres), &[&before])
                    .map_err(|error| error.to_string());
                self.pruner.pruned(now, deleted);
            }
        }
        // A connection that failed without the server's answer (lost, or not yet seen closed:
        // the client notices a terminated session only later) is dropped here and opened
        // again by the next try; one kept would fail that try as well.
        let lost = result
            .as_ref()
            .is_err_and(|error| error.as_db_error().is_none());
        if !lost && !session.client.is_closed() {
            self.session = Some(session);
        }
        result.map_err(|error| sink_error(&error))
    }

    /// Keeps raw usage rows `days` whole days (all of them when `None`). Every replica prunes;
    /// a row is deleted once, whoever gets there first.
    pub fn with_raw_retention(mut self, days: Option<u32>) -> PgLedgerWriter {
        self.pruner = Pruner::new(days);
        self
    }
}
