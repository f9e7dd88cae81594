//! Durable keys: the `keys` table of the embedded SQLite store under the data dir. Calls are
//! blocking; async callers run them on the blocking pool. The trait is the seam for a shared
//! store (PostgreSQL, Redis) used by several replicas.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::KeyRecord;
use crate::limits::BudgetPeriod;
use crate::money::Money;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("key store: {0}")]
    Corrupt(String),
    #[error("key store lock poisoned")]
    Poisoned,
}

pub trait KeyStore: Send + Sync {
    fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    fn update(&self, record: &KeyRecord) -> Result<(), StoreError>;
    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key, revoked ones included, oldest first.
    fn list(&self) -> Result<Vec<KeyRecord>, StoreError>;
}

/// SQLite-backed keys. One connection behind a std mutex: only admin calls and start-up use
/// it, always from blocking threads, never across an await.
pub struct SqliteKeyStore {
    connection: Mutex<Connection>,
}

impl SqliteKeyStore {
    pub fn open(data_dir: &Path) -> Result<SqliteKeyStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Corrupt(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let connection = Connection::open(data_dir.join("keys.sqlite"))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS keys (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                prefix TEXT NOT NULL,
                secret_hash BLOB NOT NULL UNIQUE,
                owner TEXT, team TEXT, customer TEXT,
                budget_nanos INTEGER,
                budget_period TEXT NOT NULL,
                rpm INTEGER, tpm INTEGER, max_concurrency INTEGER,
                models TEXT,
                plan TEXT,
                seats INTEGER NOT NULL DEFAULT 1,
                created_at_ms INTEGER NOT NULL,
                revoked_at_ms INTEGER
            )",
        )?;
        Ok(SqliteKeyStore {
            connection: Mutex::new(connection),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let connection = self.connection.lock().map_err(|_| StoreError::Poisoned)?;
        f(&connection)
    }
}

const COLUMNS: &str = "id, name, prefix, secret_hash, owner, team, customer, budget_nanos, \
     budget_period, rpm, tpm, max_concurrency, models, plan, seats, created_at_ms, revoked_at_ms";

fn period_name(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Day => "day",
        BudgetPeriod::Week => "week",
        BudgetPeriod::Month => "month",
        BudgetPeriod::Total => "total",
    }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = row.get(3)?;
    let period: String = row.get(8)?;
    let models: Option<String> = row.get(12)?;
    let invalid = |index: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            what.to_owned().into(),
        )
    };
    Ok(KeyRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        prefix: row.get(2)?,
        secret_hash: hash
            .try_into()
            .map_err(|_| invalid(3, "secret hash length"))?,
        owner: row.get(4)?,
        team: row.get(5)?,
        customer: row.get(6)?,
        budget_usd: row.get::<_, Option<i64>>(7)?.map(Money::from_nanos),
        budget_period: match period.as_str() {
            "day" => BudgetPeriod::Day,
            "week" => BudgetPeriod::Week,
            "month" => BudgetPeriod::Month,
            "total" => BudgetPeriod::Total,
            _ => return Err(invalid(8, "budget period")),
        },
        rpm: row.get(9)?,
        tpm: row.get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64),
        max_concurrency: row.get(11)?,
        models: match models {
            Some(json) => Some(serde_json::from_str(&json).map_err(|_| invalid(12, "models"))?),
            None => None,
        },
        plan: row.get(13)?,
        seats: row.get(14)?,
        created_at_ms: row.get(15)?,
        revoked_at_ms: row.get(16)?,
    })
}

fn models_json(record: &KeyRecord) -> Option<String> {
    record
        .models
        .as_ref()
        .map(|models| serde_json::Value::from(models.clone()).to_string())
}

impl KeyStore for SqliteKeyStore {
    fn insert(&self, r: &KeyRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO keys ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"),
                params![
                    r.id, r.name, r.prefix, r.secret_hash.as_slice(), r.owner, r.team, r.customer,
                    r.budget_usd.map(Money::nanos), period_name(r.budget_period), r.rpm,
                    r.tpm.map(|v| i64::try_from(v).unwrap_or(i64::MAX)), r.max_concurrency,
                    models_json(r), r.plan, r.seats, r.created_at_ms, r.revoked_at_ms
                ],
            )?;
            Ok(())
        })
    }

    fn update(&self, r: &KeyRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE keys SET name = ?2, owner = ?3, team = ?4, customer = ?5, budget_nanos = ?6,
                 budget_period = ?7, rpm = ?8, tpm = ?9, max_concurrency = ?10, models = ?11,
                 plan = ?12, seats = ?13, revoked_at_ms = ?14 WHERE id = ?1",
                params![
                    r.id, r.name, r.owner, r.team, r.customer, r.budget_usd.map(Money::nanos),
                    period_name(r.budget_period), r.rpm,
                    r.tpm.map(|v| i64::try_from(v).unwrap_or(i64::MAX)), r.max_concurrency,
                    models_json(r), r.plan, r.seats, r.revoked_at_ms
                ],
            )?;
            Ok(())
        })
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {COLUMNS} FROM keys WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()?)
        })
    }

    fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(&format!(
                "SELECT {COLUMNS} FROM keys ORDER BY created_at_ms, id"
            ))?;
            let rows = statement.query_map([], from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{hash_secret, new_key_id, new_secret};

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("tollgate-keys-{}", new_key_id()));
        let secret = new_secret();
        let mut record = KeyRecord {
            id: new_key_id(),
            name: "agents".into(),
            prefix: secret[..10].to_owned(),
            secret_hash: hash_secret(&secret),
            owner: Some("ana".into()),
            team: None,
            customer: None,
            budget_usd: Some(Money::parse_usd("12.5").unwrap()),
            budget_period: BudgetPeriod::Week,
            rpm: Some(60),
            tpm: Some(100_000),
            max_concurrency: Some(4),
            models: Some(vec!["auto".into(), "gpt-4o-mini".into()]),
            plan: Some("team".into()),
            seats: 3,
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        {
            let store = SqliteKeyStore::open(&dir).unwrap();
            store.insert(&record).unwrap();
            record.rpm = None;
            record.revoked_at_ms = Some(5);
            store.update(&record).unwrap();
        }
        let store = SqliteKeyStore::open(&dir).unwrap();
        assert_eq!(store.get(&record.id).unwrap(), Some(record.clone()));
        assert_eq!(store.list().unwrap(), vec![record]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
