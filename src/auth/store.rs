//! Durable keys: the `keys` table of the embedded SQLite store under the data dir. Calls are
//! blocking; async callers run them on the blocking pool. The trait is the seam for a shared
//! store used by several replicas (`store::postgres`), which maps keys to rows through the
//! same [`key_values`] and [`key_record`].

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params_from_iter, Connection, OptionalExtension};

use super::group::{
    group_delete_sql, group_insert_sql, group_members_sql, group_record, group_select,
    group_update_sql, group_update_values, group_values, GroupRecord, SQLITE_GROUPS_TABLE,
};
use super::KeyRecord;
use crate::limits::{BudgetPeriod, Level};
use crate::money::Money;
use crate::store::row::{Column, Dialect, RowSource};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("key store: {0}")]
    Postgres(#[from] crate::store::PgError),
    #[error("key store: {0}")]
    Corrupt(String),
    #[error("key store lock poisoned")]
    Poisoned,
}

pub trait KeyStore: Send + Sync {
    fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Changes one key atomically: `change` edits the record as stored, and the edit is
    /// written unless `change` returns false, with no other change to the key in between —
    /// across replicas too — so concurrent edits of different fields all land. `None` when
    /// there is no such key.
    fn modify(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StoreError>;
    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key, revoked ones included, oldest first.
    fn list(&self) -> Result<Vec<KeyRecord>, StoreError>;

    /// Adds a team or customer; false when one of that level and name exists.
    fn insert_group(&self, record: &GroupRecord) -> Result<bool, StoreError>;
    /// Changes one group atomically, as [`KeyStore::modify`] does a key.
    fn modify_group(
        &self,
        level: Level,
        name: &str,
        change: &mut dyn FnMut(&mut GroupRecord) -> bool,
    ) -> Result<Option<GroupRecord>, StoreError>;
    /// Every team and customer, by level and name.
    fn list_groups(&self) -> Result<Vec<GroupRecord>, StoreError>;
    /// Deletes a group unless live keys still name it, in one step with counting them.
    fn delete_group(&self, level: Level, name: &str) -> Result<GroupDeletion, StoreError>;
}

/// What deleting a group did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupDeletion {
    Deleted,
    NotFound,
    /// Refused: this many live keys name the group.
    HasKeys(i64),
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
                revoked_at_ms INTEGER,
                usd_per_minute_nanos INTEGER,
                usd_per_hour_nanos INTEGER,
                soft_budget_nanos INTEGER
            )",
        )?;
        add_missing_columns(&connection)?;
        connection.execute_batch(SQLITE_GROUPS_TABLE)?;
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

/// The `keys` table's columns, in the order of [`key_values`] and [`key_record`].
const KEY_COLUMNS: [&str; 20] = [
    "id",
    "name",
    "prefix",
    "secret_hash",
    "owner",
    "team",
    "customer",
    "budget_nanos",
    "budget_period",
    "rpm",
    "tpm",
    "max_concurrency",
    "models",
    "plan",
    "seats",
    "created_at_ms",
    "revoked_at_ms",
    "usd_per_minute_nanos",
    "usd_per_hour_nanos",
    "soft_budget_nanos",
];

/// What an update may change: every column but the id, the secret and the creation time.
const UPDATED_COLUMNS: [usize; 16] = [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19];

/// `KEY_COLUMNS` as a select or insert list.
pub(crate) fn key_columns() -> String {
    KEY_COLUMNS.join(", ")
}

/// The insert of one key.
pub(crate) fn key_insert_sql(dialect: Dialect) -> String {
    format!(
        "INSERT INTO keys ({}) VALUES ({})",
        key_columns(),
        dialect.params(KEY_COLUMNS.len())
    )
}

/// The update of one key by id: the id is the first parameter, then `UPDATED_COLUMNS`.
pub(crate) fn key_update_sql(dialect: Dialect) -> String {
    let set: Vec<String> = UPDATED_COLUMNS
        .iter()
        .enumerate()
        .map(|(n, &column)| format!("{} = {}", KEY_COLUMNS[column], dialect.param(n + 2)))
        .collect();
    format!(
        "UPDATE keys SET {} WHERE id = {}",
        set.join(", "),
        dialect.param(1)
    )
}

/// The parameters of [`key_update_sql`].
pub(crate) fn key_update_values(record: &KeyRecord) -> Vec<Column<'_>> {
    let values = key_values(record);
    std::iter::once(0)
        .chain(UPDATED_COLUMNS)
        .map(|column| values[column].clone())
        .collect()
}

/// A key as the store keeps it, in the order of `KEY_COLUMNS`: money as nano-dollars, the
/// allowed models as a JSON array.
pub(crate) fn key_values(r: &KeyRecord) -> [Column<'_>; 20] {
    [
        Column::text(&r.id),
        Column::text(&r.name),
        Column::text(&r.prefix),
        Column::Bytes(r.secret_hash.as_slice()),
        Column::optional_text(r.owner.as_deref()),
        Column::optional_text(r.team.as_deref()),
        Column::optional_text(r.customer.as_deref()),
        Column::Int(r.budget_usd.map(Money::nanos)),
        Column::text(r.budget_period.as_str()),
        Column::Int(r.rpm.map(i64::from)),
        Column::Int(r.tpm.map(|v| i64::try_from(v).unwrap_or(i64::MAX))),
        Column::Int(r.max_concurrency.map(i64::from)),
        Column::Text(
            r.models
                .as_ref()
                .map(|models| serde_json::Value::from(models.clone()).to_string().into()),
        ),
        Column::optional_text(r.plan.as_deref()),
        Column::int(i64::from(r.seats)),
        Column::int(r.created_at_ms),
        Column::Int(r.revoked_at_ms),
        Column::Int(r.max_usd_per_minute.map(Money::nanos)),
        Column::Int(r.max_usd_per_hour.map(Money::nanos)),
        Column::Int(r.soft_budget_usd.map(Money::nanos)),
    ]
}

/// Rebuilds a key from a row selected as [`key_columns`], in either store.
pub(crate) fn key_record<R: RowSource>(row: &R) -> Result<KeyRecord, R::Error> {
    let hash = row.bytes(3)?;
    let period = row.required_text(8)?;
    let models = row.text(12)?;
    Ok(KeyRecord {
        id: row.required_text(0)?,
        name: row.required_text(1)?,
        prefix: row.required_text(2)?,
        secret_hash: hash
            .try_into()
            .map_err(|_| row.invalid(3, "secret hash length".to_owned()))?,
        owner: row.text(4)?,
        team: row.text(5)?,
        customer: row.text(6)?,
        budget_usd: row.int(7)?.map(Money::from_nanos),
        budget_period: BudgetPeriod::parse(&period)
            .ok_or_else(|| row.invalid(8, format!("budget period `{period}`")))?,
        rpm: row.optional_number(9)?,
        tpm: row.int(10)?.map(|v| v.max(0) as u64),
        max_concurrency: row.optional_number(11)?,
        max_usd_per_minute: row.int(17)?.map(Money::from_nanos),
        max_usd_per_hour: row.int(18)?.map(Money::from_nanos),
        soft_budget_usd: row.int(19)?.map(Money::from_nanos),
        models: match models {
            Some(json) => Some(
                serde_json::from_str(&json).map_err(|_| row.invalid(12, "models".to_owned()))?,
            ),
            None => None,
        },
        plan: row.text(13)?,
        seats: row.number(14)?,
        created_at_ms: row.required_int(15)?,
        revoked_at_ms: row.int(16)?,
    })
}

/// Columns added after the table was first made, added to a store made before them.
const LATER_COLUMNS: [(&str, &str); 3] = [
    ("usd_per_minute_nanos", "INTEGER"),
    ("usd_per_hour_nanos", "INTEGER"),
    ("soft_budget_nanos", "INTEGER"),
];

fn add_missing_columns(connection: &Connection) -> Result<(), StoreError> {
    for (column, kind) in LATER_COLUMNS {
        let present: bool = connection.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('keys') WHERE name = ?1)",
            [column],
            |row| row.get(0),
        )?;
        if !present {
            connection.execute_batch(&format!("ALTER TABLE keys ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

impl KeyStore for SqliteKeyStore {
    fn insert(&self, r: &KeyRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &key_insert_sql(Dialect::Sqlite),
                params_from_iter(key_values(r)),
            )?;
            Ok(())
        })
    }

    fn modify(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            let stored = transaction
                .query_row(
                    &format!("SELECT {} FROM keys WHERE id = ?1", key_columns()),
                    [id],
                    |row| key_record(row),
                )
                .optional()?;
            let Some(mut record) = stored else {
                return Ok(None);
            };
            if change(&mut record) {
                transaction.execute(
                    &key_update_sql(Dialect::Sqlite),
                    params_from_iter(key_update_values(&record)),
                )?;
                transaction.commit()?;
            }
            Ok(Some(record))
        })
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {} FROM keys WHERE id = ?1", key_columns()),
                [id],
                |row| key_record(row),
            )
            .optional()?)
        })
    }

    fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(&format!(
                "SELECT {} FROM keys ORDER BY created_at_ms, id",
                key_columns()
            ))?;
            let rows = statement.query_map([], |row| key_record(row))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn insert_group(&self, record: &GroupRecord) -> Result<bool, StoreError> {
        self.with(|c| {
            let inserted = c.execute(
                &group_insert_sql(Dialect::Sqlite),
                params_from_iter(group_values(record)),
            )?;
            Ok(inserted == 1)
        })
    }

    fn modify_group(
        &self,
        level: Level,
        name: &str,
        change: &mut dyn FnMut(&mut GroupRecord) -> bool,
    ) -> Result<Option<GroupRecord>, StoreError> {
        self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            let stored = transaction
                .query_row(
                    &group_select("WHERE level = ?1 AND name = ?2"),
                    [level.as_str(), name],
                    |row| group_record(row),
                )
                .optional()?;
            let Some(mut record) = stored else {
                return Ok(None);
            };
            if change(&mut record) {
                transaction.execute(
                    &group_update_sql(Dialect::Sqlite),
                    params_from_iter(group_update_values(&record)),
                )?;
                transaction.commit()?;
            }
            Ok(Some(record))
        })
    }

    fn list_groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(&group_select("ORDER BY level, name"))?;
            let rows = statement.query_map([], |row| group_record(row))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn delete_group(&self, level: Level, name: &str) -> Result<GroupDeletion, StoreError> {
        self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            let members: i64 = transaction.query_row(
                &group_members_sql(level, Dialect::Sqlite),
                [name],
                |row| row.get(0),
            )?;
            if members > 0 {
                return Ok(GroupDeletion::HasKeys(members));
            }
            let deleted =
                transaction.execute(&group_delete_sql(Dialect::Sqlite), [level.as_str(), name])?;
            transaction.commit()?;
            Ok(match deleted {
                0 => GroupDeletion::NotFound,
                _ => GroupDeletion::Deleted,
            })
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
            max_usd_per_minute: Some(Money::parse_usd("0.25").unwrap()),
            max_usd_per_hour: None,
            soft_budget_usd: Some(Money::parse_usd("10").unwrap()),
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
            let modified = store.modify(&record.id, &mut |stored| {
                stored.rpm = None;
                stored.revoked_at_ms = Some(5);
                true
            });
            assert_eq!(modified.unwrap(), Some(record.clone()));
            let refused = store.modify(&record.id, &mut |stored| {
                stored.rpm = Some(1);
                false
            });
            assert_eq!(
                refused.unwrap().unwrap().rpm,
                Some(1),
                "what was refused is shown…"
            );
            assert_eq!(store.modify("key_none", &mut |_| true).unwrap(), None);
        }
        let store = SqliteKeyStore::open(&dir).unwrap();
        assert_eq!(
            store.get(&record.id).unwrap(),
            Some(record.clone()),
            "…never stored"
        );
        assert_eq!(store.list().unwrap(), vec![record]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_store_made_before_spend_rates_gains_their_columns() {
        let dir = std::env::temp_dir().join(format!("tollgate-keys-{}", new_key_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = Connection::open(dir.join("keys.sqlite")).unwrap();
        old.execute_batch(
            "CREATE TABLE keys (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL,
                secret_hash BLOB NOT NULL UNIQUE, owner TEXT, team TEXT, customer TEXT,
                budget_nanos INTEGER, budget_period TEXT NOT NULL,
                rpm INTEGER, tpm INTEGER, max_concurrency INTEGER, models TEXT, plan TEXT,
                seats INTEGER NOT NULL DEFAULT 1, created_at_ms INTEGER NOT NULL,
                revoked_at_ms INTEGER
            );
            INSERT INTO keys (id, name, prefix, secret_hash, budget_period, created_at_ms)
            VALUES ('key_old', 'old', 'sk-tg-0000', zeroblob(32), 'month', 7);",
        )
        .unwrap();
        drop(old);
        let mut record = KeyRecord::new("new", &new_secret());
        record.max_usd_per_hour = Some(Money::parse_usd("3").unwrap());
        for _ in 0..2 {
            let store = SqliteKeyStore::open(&dir).unwrap();
            let old = store.get("key_old").unwrap().unwrap();
            assert_eq!((old.max_usd_per_minute, old.max_usd_per_hour), (None, None));
            if store.get(&record.id).unwrap().is_none() {
                store.insert(&record).unwrap();
            }
            assert_eq!(store.get(&record.id).unwrap(), Some(record.clone()));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
