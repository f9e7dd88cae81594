//! `tollgate migrate --to postgres`: copies a replica's embedded SQLite key store and ledger
//! (under `server.data_dir`) into PostgreSQL. Every row is inserted only if missing (by key
//! id or secret, group level and name, request id, outcome idempotency key), so a copy
//! interrupted or run twice, or run from several replicas' data dirs into one database, never
//! duplicates a row.
//!
//! Usage records travel as records through the same writer the gateway uses, so their billed
//! token columns and day are derived exactly as the gateway writes them.

use std::path::Path;

use super::postgres::{Inserted, PgError, PgStore};
use crate::auth::store::{KeyStore, SqliteKeyStore, StoreError};
use crate::meter::record::MeterEvent;
use crate::meter::sink::Durability;
use crate::meter::sink::SinkError;
use crate::rating::ledger::{LedgerError, SqliteLedgerReader};

/// Records a PostgreSQL transaction carries: large enough to amortise the round trips, small
/// enough that a copy's memory stays flat.
const BATCH: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    Keys(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("writing the ledger to postgres: {0}")]
    Write(#[from] SinkError),
}

/// What a copy read, and how much of it was new to the target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub keys: u64,
    pub keys_new: u64,
    pub groups: u64,
    pub groups_new: u64,
    pub usage: u64,
    pub usage_new: u64,
    pub outcomes: u64,
    pub outcomes_new: u64,
}

/// Copies the SQLite stores under `data_dir` into the PostgreSQL at `url`, migrating its
/// schema first. Blocking: run it on a thread of its own, not an async worker.
pub fn to_postgres(data_dir: &Path, url: &str) -> Result<Copied, MigrateError> {
    let store = PgStore::connect(url)?;
    let mut copied = Copied::default();

    let keys = store.key_store();
    for key in SqliteKeyStore::open(data_dir)?.list()? {
        copied.keys += 1;
        copied.keys_new += u64::from(keys.insert_missing(&key)?);
    }
    for group in SqliteKeyStore::open(data_dir)?.list_groups()? {
        copied.groups += 1;
        copied.groups_new += u64::from(keys.insert_group(&group)?);
    }

    // Strict, so that the copy is on the server's disk when the command says it is done.
    let mut writer = store.ledger_writer(Durability::Strict)?;
    let mut write = |events: Vec<MeterEvent>, copied: &mut Copied| {
        let Inserted { usage, outcomes } = writer.write_counted(&events)?;
        copied.usage_new += usage;
        copied.outcomes_new += outcomes;
        Ok::<(), MigrateError>(())
    };
    let ledger = SqliteLedgerReader::new(data_dir);
    ledger.records_in_batches(BATCH, |records| {
        copied.usage += records.len() as u64;
        write(
            records.into_iter().map(MeterEvent::Usage).collect(),
            &mut copied,
        )
    })?;
    for outcomes in ledger.outcomes()?.chunks(BATCH) {
        copied.outcomes += outcomes.len() as u64;
        let events = outcomes.iter().cloned().map(MeterEvent::Outcome).collect();
        write(events, &mut copied)?;
    }
    Ok(copied)
}
