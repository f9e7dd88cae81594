//! Stores shared by a fleet of replicas, beside the embedded SQLite ones under each replica's
//! data dir: PostgreSQL holds keys, the usage ledger and outcomes (`[store] backend =
//! "postgres"`). `row` is the codec both SQL stores map records through; `migrate` copies a
//! replica's SQLite stores into PostgreSQL.

pub mod migrate;
pub mod postgres;
pub mod row;

pub use self::postgres::{Inserted, PgError, PgKeyStore, PgLedgerReader, PgLedgerWriter, PgStore};
