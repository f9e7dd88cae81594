//! The PostgreSQL store against a real PostgreSQL (one server for this binary, a database per
//! test): keys, an idempotent ledger, migrations raced by several replicas, reports equal to
//! the SQLite ledger's for the same records, and `tollgate migrate --to postgres`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::Path;
use std::sync::{Arc, Barrier};

use common::services::Postgres;
use tollgate::api::Endpoint;
use tollgate::auth::group::GroupRecord;
use tollgate::auth::store::{GroupDeletion, KeyStore, SqliteKeyStore};
use tollgate::auth::{hash_secret, KeyRecord};
use tollgate::limits::{BudgetPeriod, Level};
use tollgate::meter::record::{MeterEvent, Outcome, OutcomeEvent, TokenUsage, UsageRecord};
use tollgate::meter::sink::Durability;
use tollgate::meter::sink::{SinkError, UsageWriter};
use tollgate::money::Money;
use tollgate::rating::ledger::{GroupBy, LedgerReader, LedgerWriter, SqliteLedgerReader};
use tollgate::store::PgStore;

const DAY_MS: i64 = 86_400_000;
/// 2026-11-14T00:00:00Z.
const START_MS: i64 = 1_794_614_400_000;

fn key(n: u32) -> KeyRecord {
    let secret = format!("tg-secret-{n}");
    let mut key = KeyRecord::new(&format!("key {n}"), &secret);
    key.id = format!("key_{n}");
    key.secret_hash = hash_secret(&secret);
    key.created_at_ms = START_MS + i64::from(n);
    key
}

fn record(n: u32) -> UsageRecord {
    let keys = [
        Some(("key_a", "Zeta")),
        Some(("key_B", "alpha")),
        Some(("key_ü", "Ünïcode")),
        None,
    ];
    let key = keys[n as usize % keys.len()];
    let models = [Some("gpt-4o"), Some("GPT-B"), None, Some("claude")];
    let answered = n % 7 != 3;
    UsageRecord {
        request_id: format!("req_{:05}", (n * 7919) % 1000),
        client_request_id: n.is_multiple_of(2).then(|| format!("client-{n}")),
        started_at_ms: START_MS + i64::from(n) * DAY_MS / 10,
        key_id: key.map(|(id, _)| id.into()),
        key_name: key.map(|(_, name)| name.into()),
        plan: n.is_multiple_of(3).then(|| "seats".into()),
        endpoint: [Endpoint::ChatCompletions, Endpoint::Embeddings][n as usize % 2],
        requested_model: ["auto", "gpt-4o"][n as usize % 2].into(),
        served_model: models[n as usize % models.len()].map(Into::into),
        upstream: Some("mock".into()),
        tier: (n % 2 == 1).then(|| "cheap".into()),
        route_rule: None,
        streamed: n.is_multiple_of(2),
        status: if answered { 200 } else { 429 },
        outcome: if answered {
            Outcome::Completed
        } else {
            Outcome::Rejected
        },
        finish_reason: answered.then(|| "stop".into()),
        reported: (n % 3 != 1).then_some(TokenUsage {
            input: 100 + u64::from(n),
            cached_input: u64::from(n % 5),
            output: 20 + u64::from(n),
            cache_write_input: 0,
        }),
        counted: TokenUsage {
            input: 90 + u64::from(n),
            cached_input: 0,
            output: 21 + u64::from(n),
            cache_write_input: 0,
        },
        attempts: 1 + n % 3,
        answered,
        latency_ms: 300 + u64::from(n),
        ttft_ms: n.is_multiple_of(2).then_some(40 + u64::from(n)),
        charge: Money(if answered {
            1_000_000 + i64::from(n) * 333
        } else {
            0
        }),
        list_cost: Money(if answered { 900_000 + i64::from(n) } else { 0 }),
        plan_cost: Money(if answered { 800_000 + i64::from(n) } else { 0 }),
        micro_credits: u64::from(n) * 3,
        response_id: None,
        counted_estimate: false,
    }
}

fn outcome(n: u32) -> OutcomeEvent {
    OutcomeEvent {
        idempotency_key: format!("outcome-{n}"),
        charge: Money(5_000_000 * i64::from(n)),
        key_id: ["key_a", "key_B"][n as usize % 2].to_owned(),
        plan: Some("seats".to_owned()),
        outcome_type: ["ticket_resolved", "Lead"][n as usize % 2].to_owned(),
        quantity: u64::from(n),
        request_id: None,
        at_ms: START_MS + i64::from(n) * DAY_MS / 3,
    }
}

/// Forty usage records over four days and six outcomes.
fn events() -> Vec<MeterEvent> {
    (0..40)
        .map(|n| MeterEvent::Usage(record(n)))
        .chain((1..=6).map(|n| MeterEvent::Outcome(outcome(n))))
        .collect()
}

fn sorted(mut records: Vec<UsageRecord>) -> Vec<String> {
    records.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    records.into_iter().map(|r| r.request_id).collect()
}

#[test]
fn keys_round_trip() {
    let store = PgStore::connect(&Postgres::shared().fresh_database("keys")).unwrap();
    let keys = store.key_store();
    let mut first = key(1);
    first.owner = Some("ana".into());
    first.budget_usd = Some(Money::parse_usd("12.5").unwrap());
    first.budget_period = BudgetPeriod::Week;
    first.rpm = Some(60);
    first.tpm = Some(u64::MAX);
    first.max_concurrency = Some(4);
    first.max_usd_per_minute = Some(Money::parse_usd("0.01").unwrap());
    first.max_usd_per_hour = Some(Money::parse_usd("0.3").unwrap());
    first.soft_budget_usd = Some(Money::parse_usd("10").unwrap());
    first.models = Some(vec!["auto".into(), "gpt-4o-mini".into()]);
    first.plan = Some("team".into());
    first.seats = 3;
    let second = key(2);
    keys.insert(&second).unwrap();
    keys.insert(&first).unwrap();
    assert!(keys.insert(&first).is_err(), "an id is unique");
    let mut same_secret = key(1);
    same_secret.id = "key_other".into();
    assert!(keys.insert(&same_secret).is_err(), "a secret is unique");
    assert!(!keys.insert_missing(&first).unwrap());

    first.rpm = None;
    first.models = None;
    first.revoked_at_ms = Some(START_MS + 5);
    first.max_usd_per_hour = None;
    let changed = keys.modify(&first.id, &mut |stored| {
        stored.rpm = None;
        stored.models = None;
        stored.max_usd_per_hour = None;
        stored.revoked_at_ms = Some(START_MS + 5);
        true
    });
    assert!(changed.unwrap().is_some());
    assert_eq!(keys.modify("key_9", &mut |_| true).unwrap(), None);
    let refused = keys.modify(&second.id, &mut |stored| {
        stored.name = "not kept".into();
        false
    });
    assert_eq!(refused.unwrap().unwrap().name, "not kept");

    // `u64::MAX` tokens a minute are stored as the largest BIGINT, as in SQLite.
    first.tpm = Some(i64::MAX as u64);
    assert_eq!(keys.get(&first.id).unwrap(), Some(first.clone()));
    assert_eq!(keys.get("key_9").unwrap(), None);
    assert_eq!(keys.list().unwrap(), vec![first, second]);
}

/// Teams and customers in either store: unique by level and name, changed in place, and not
/// deleted while a live key names them.
fn groups_round_trip_in(keys: &dyn KeyStore) {
    let mut team = GroupRecord::new(Level::Team, "eng");
    team.budget_usd = Some(Money::parse_usd("100").unwrap());
    team.budget_period = BudgetPeriod::Week;
    team.rpm = Some(60);
    team.tpm = Some(i64::MAX as u64);
    team.max_usd_per_minute = Some(Money::parse_usd("0.25").unwrap());
    team.max_usd_per_hour = Some(Money::parse_usd("5").unwrap());
    team.soft_budget_usd = Some(Money::parse_usd("80").unwrap());
    team.created_at_ms = START_MS;
    let mut customer = GroupRecord::new(Level::Customer, "eng");
    customer.plan = Some("team".into());
    customer.created_at_ms = START_MS + 1;
    assert!(keys.insert_group(&team).unwrap());
    assert!(keys.insert_group(&customer).unwrap());
    assert!(
        !keys.insert_group(&team).unwrap(),
        "a level and a name are unique"
    );
    let changed = keys.modify_group(Level::Team, "eng", &mut |group| {
        group.rpm = None;
        true
    });
    team.rpm = None;
    assert_eq!(changed.unwrap(), Some(team.clone()));
    let refused = keys.modify_group(Level::Team, "eng", &mut |group| {
        group.tpm = None;
        false
    });
    assert!(refused.unwrap().is_some());
    assert_eq!(
        keys.modify_group(Level::Team, "none", &mut |_| true)
            .unwrap(),
        None
    );
    assert_eq!(keys.list_groups().unwrap(), vec![customer, team]);

    let mut member = key(7);
    member.team = Some("eng".into());
    keys.insert(&member).unwrap();
    let deleted = keys.delete_group(Level::Team, "eng").unwrap();
    assert_eq!(deleted, GroupDeletion::HasKeys(1));
    let deleted = keys.delete_group(Level::Customer, "eng").unwrap();
    assert_eq!(
        deleted,
        GroupDeletion::Deleted,
        "the key names the team, not the customer"
    );
    keys.modify(&member.id, &mut |key| {
        key.revoked_at_ms = Some(START_MS + 9);
        true
    })
    .unwrap();
    let deleted = keys.delete_group(Level::Team, "eng").unwrap();
    assert_eq!(
        deleted,
        GroupDeletion::Deleted,
        "a revoked key holds nothing back"
    );
    let deleted = keys.delete_group(Level::Team, "eng").unwrap();
    assert_eq!(deleted, GroupDeletion::NotFound);
    assert!(keys.list_groups().unwrap().is_empty());
}

#[test]
fn groups_round_trip_in_both_stores() {
    let store = PgStore::connect(&Postgres::shared().fresh_database("groups")).unwrap();
    groups_round_trip_in(&store.key_store());
    let dir = common::temp_dir("sqlite-groups");
    groups_round_trip_in(&SqliteKeyStore::open(&dir).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_batch_written_twice_and_by_two_writers_leaves_one_row_per_id() {
    let store = PgStore::connect(&Postgres::shared().fresh_database("twice")).unwrap();
    let mut batched = store.ledger_writer(Durability::Batched).unwrap();
    let mut strict = store.ledger_writer(Durability::Strict).unwrap();
    assert_eq!(
        batched.commit_interval(),
        LedgerWriter::open(&common::temp_dir("interval"), Durability::Batched)
            .unwrap()
            .commit_interval()
    );
    assert_eq!(strict.commit_interval(), std::time::Duration::ZERO);
    let mut events = events();
    // The same record twice in one batch, too.
    events.push(events[0].clone());
    let first = batched.write_counted(&events).unwrap();
    assert_eq!((first.usage, first.outcomes), (40, 6));
    batched.write_batch(&events).unwrap();
    let again = strict.write_counted(&events).unwrap();
    assert_eq!((again.usage, again.outcomes), (0, 0));

    let reader = store.ledger_reader();
    let written = reader.records().unwrap();
    assert_eq!(written.len(), 40);
    let unique: std::collections::HashSet<_> = written.iter().map(|r| &r.request_id).collect();
    assert_eq!(unique.len(), 40);
    let quantities: u64 = ["key_a", "key_B"]
        .iter()
        .map(|key| {
            let period = reader.period_usage(key, 0, i64::MAX).unwrap();
            period.outcomes.iter().map(|(_, q, _)| q).sum::<u64>()
        })
        .sum();
    assert_eq!(quantities, 1 + 2 + 3 + 4 + 5 + 6);
}

#[test]
fn migrations_run_concurrently_from_three_threads_apply_once() {
    let url = Postgres::shared().fresh_database("race");
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                PgStore::connect(&url).map(|_| ())
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap().unwrap();
    }
    let database = url.rsplit('/').next().unwrap();
    let applied = Postgres::shared().psql(
        database,
        "SELECT count(*), count(DISTINCT version), min(version), max(version) FROM schema_migrations",
    );
    let counts: Vec<i64> = applied
        .trim()
        .split('|')
        .map(|n| n.parse().unwrap())
        .collect();
    let [rows, distinct, first, last] = counts[..] else {
        panic!("{applied}")
    };
    assert_eq!((rows, distinct, first), (last, last, 1), "{applied}");
    // And once more, at start-up of a later replica: nothing to do.
    PgStore::connect(&url).unwrap();
    assert_eq!(
        Postgres::shared().psql(database, "SELECT count(*) FROM schema_migrations"),
        format!("{rows}\n")
    );
}

#[test]
fn reports_equal_the_sqlite_ledgers_for_the_same_records() {
    let dir = common::temp_dir("pg-compare");
    let events = events();
    let mut sqlite_writer = LedgerWriter::open(&dir, Durability::Strict).unwrap();
    sqlite_writer.write_batch(&events).unwrap();
    drop(sqlite_writer);
    let sqlite = SqliteLedgerReader::new(&dir);
    let store = PgStore::connect(&Postgres::shared().fresh_database("compare")).unwrap();
    let mut pg_writer = store.ledger_writer(Durability::Batched).unwrap();
    // In two batches, the second overlapping the first.
    pg_writer.write_batch(&events[..30]).unwrap();
    pg_writer.write_batch(&events[20..]).unwrap();
    let pg = store.ledger_reader();

    let key_filters = [None, Some("key_a"), Some("key_ü"), Some("no such key")];
    let ranges = [
        (0, i64::MAX),
        (START_MS + DAY_MS, START_MS + 3 * DAY_MS),
        (START_MS + DAY_MS / 2, START_MS + DAY_MS / 2 + 1),
    ];
    let groups = [
        GroupBy::Key,
        GroupBy::Model,
        GroupBy::Tier,
        GroupBy::Rule,
        GroupBy::Day,
        GroupBy::Hour,
    ];
    for group in groups {
        for key_id in key_filters {
            for (from, to) in ranges {
                let expected = sqlite.usage(from, to, group, key_id).unwrap();
                assert_eq!(
                    pg.usage(from, to, group, key_id).unwrap(),
                    expected,
                    "{group:?} {key_id:?} {from}..{to}"
                );
            }
        }
    }
    for (group, split) in [
        (GroupBy::Day, GroupBy::Model),
        (GroupBy::Hour, GroupBy::Tier),
        (GroupBy::Key, GroupBy::Rule),
    ] {
        for (from, to) in ranges {
            let expected = sqlite.usage_by(from, to, group, Some(split), None).unwrap();
            assert_eq!(
                pg.usage_by(from, to, group, Some(split), None).unwrap(),
                expected,
                "{group:?} by {split:?} {from}..{to}"
            );
        }
    }
    let by_key = sqlite.usage(0, i64::MAX, GroupBy::Key, None).unwrap();
    let groups: Vec<&str> = by_key.iter().map(|row| row.group.as_str()).collect();
    assert_eq!(groups, ["", "key_B", "key_a", "key_ü"], "ordered by bytes");

    for from in [0, START_MS + 2 * DAY_MS, i64::MAX] {
        assert_eq!(
            pg.spend_since(from).unwrap(),
            sqlite.spend_since(from).unwrap()
        );
        assert_eq!(pg.cursors(from).unwrap(), sqlite.cursors(from).unwrap());
    }
    assert_eq!(sqlite.cursors(0).unwrap().len(), 3);
    for key_id in ["key_a", "key_B", "key_ü", "none"] {
        for (from, to) in ranges {
            assert_eq!(
                pg.period_usage(key_id, from, to).unwrap(),
                sqlite.period_usage(key_id, from, to).unwrap(),
                "{key_id} {from}..{to}"
            );
        }
    }
    assert!(!sqlite
        .period_usage("key_B", 0, i64::MAX)
        .unwrap()
        .outcomes
        .is_empty());
    let records = sqlite.records().unwrap();
    assert_eq!(records.len(), 40);
    assert_eq!(pg.records().unwrap(), records);
    for record in &records[..5] {
        assert_eq!(
            pg.record(&record.request_id).unwrap().as_ref(),
            Some(record)
        );
    }
    assert_eq!(pg.record("req_missing").unwrap(), None);
    let (from, to) = (START_MS + DAY_MS / 2, START_MS + 3 * DAY_MS);
    let first = sqlite.records_page(from, to, (from, ""), 7).unwrap();
    assert_eq!(first.len(), 7);
    assert_eq!(pg.records_page(from, to, (from, ""), 7).unwrap(), first);
    let last = first.last().unwrap();
    let after = (last.started_at_ms, last.request_id.as_str());
    let second = sqlite.records_page(from, to, after, 100).unwrap();
    assert_eq!(second.len(), 25 - 7);
    assert_eq!(pg.records_page(from, to, after, 100).unwrap(), second);
    // What was written is what reads back, in both.
    let written: Vec<UsageRecord> = (0..40).map(record).collect();
    assert_eq!(sorted(records), sorted(written));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every row of both rollup tables, in key order, as text.
fn rollups(url: &str) -> Vec<String> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let mut rows = Vec::new();
    for table in ["rollup_keys", "rollup_routes"] {
        let sql = format!("SELECT t::text FROM {table} t ORDER BY 1");
        for row in client.query(&sql, &[]).unwrap() {
            rows.push(row.get(0));
        }
    }
    rows
}

#[test]
fn the_rollup_migration_rebuilds_what_the_writer_kept() {
    let url = Postgres::shared().fresh_database("rollup-migration");
    let store = PgStore::connect(&url).unwrap();
    let mut writer = store.ledger_writer(Durability::Batched).unwrap();
    let events = events();
    writer.write_batch(&events[..25]).unwrap();
    writer.write_batch(&events[15..]).unwrap();
    drop(writer);
    let kept = rollups(&url);
    assert!(kept.len() > 100, "{}", kept.len());
    // As if the ledger predated rollups: the migration runs again on the next start.
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .execute("DELETE FROM schema_migrations WHERE version = 7", &[])
        .unwrap();
    client.execute("DELETE FROM rollup_keys", &[]).unwrap();
    PgStore::connect(&url).unwrap();
    assert_eq!(rollups(&url), kept);
}

#[test]
fn raw_rows_past_their_retention_go_and_their_rollups_stay() {
    let url = Postgres::shared().fresh_database("retention");
    let store = PgStore::connect(&url).unwrap();
    let mut writer = store
        .ledger_writer(Durability::Batched)
        .unwrap()
        .with_raw_retention(Some(3));
    let now = tollgate::api::unix_ms();
    let events: Vec<MeterEvent> = [(0, 10), (4, 4), (8, 2), (12, 0)]
        .into_iter()
        .map(|(n, days_ago)| {
            let mut record = record(n);
            record.started_at_ms = now - days_ago * DAY_MS;
            MeterEvent::Usage(record)
        })
        .collect();
    writer.write_batch(&events).unwrap();
    let reader = store.ledger_reader();
    let kept: Vec<i64> = reader
        .records()
        .unwrap()
        .iter()
        .map(|record| (now - record.started_at_ms) / DAY_MS)
        .collect();
    assert_eq!(kept, [2, 0]);
    let by_key = reader.usage(0, i64::MAX, GroupBy::Key, None).unwrap();
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].group, "key_a");
    assert_eq!(
        by_key[0].requests, 4,
        "the rollups still count every request"
    );
}

#[test]
fn a_lost_connection_is_retried_and_a_bad_record_refused() {
    let postgres = Postgres::shared();
    let url = postgres.fresh_database("lost");
    let database = url.rsplit('/').next().unwrap().to_owned();
    let store = PgStore::connect(&url).unwrap();
    let mut writer = store.ledger_writer(Durability::Strict).unwrap();
    let reader = store.ledger_reader();
    let events = events();
    writer.write_batch(&events[..10]).unwrap();
    assert_eq!(reader.records().unwrap().len(), 10);

    // The server ends every session of the store: the writer's and the reader's idle one.
    let terminated = postgres.psql(
        &database,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'tollgate'",
    );
    assert_eq!(terminated.trim(), "2");
    match writer.write_batch(&events[10..20]) {
        Ok(()) => {}
        Err(SinkError::Storage(_)) => writer.write_batch(&events[10..20]).unwrap(),
        Err(other) => panic!("a lost connection is not the batch's fault: {other}"),
    }
    assert_eq!(reader.records().unwrap().len(), 20);

    let mut bad = record(100);
    bad.served_model = Some("nul\0byte".into());
    match writer.write_batch(&[MeterEvent::Usage(bad)]) {
        Err(SinkError::Refused(_)) => {}
        other => panic!("a value the server rejects refuses the batch: {other:?}"),
    }
    writer.write_batch(&events[20..]).unwrap();
    assert_eq!(reader.records().unwrap().len(), 40);
}

fn migrate(config: &Path, flag_url: Option<&str>, env_url: Option<&str>) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(["migrate", "--to", "postgres", "--config"])
        .arg(config)
        .env_remove("TOLLGATE_POSTGRES_URL");
    if let Some(url) = flag_url {
        command.args(["--postgres-url", url]);
    }
    if let Some(url) = env_url {
        command.env("TOLLGATE_POSTGRES_URL", url);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Columns are aligned with spaces; one space between words is easier to match.
    stdout.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn migrate_to_postgres_copies_a_sqlite_store() {
    let dir = common::temp_dir("pg-migrate");
    let data_dir = dir.join("data");
    let config = dir.join("routes.toml");
    std::fs::write(
        &config,
        common::config_text("http://127.0.0.1:9/v1", &data_dir, ""),
    )
    .unwrap();
    let sqlite_keys = SqliteKeyStore::open(&data_dir).unwrap();
    let mut revoked = key(2);
    revoked.revoked_at_ms = Some(START_MS + 10);
    revoked.models = Some(vec!["gpt-4o".into()]);
    for key in [key(1), revoked, key(3)] {
        sqlite_keys.insert(&key).unwrap();
    }
    let mut team = GroupRecord::new(Level::Team, "eng");
    team.budget_usd = Some(Money::parse_usd("50").unwrap());
    sqlite_keys.insert_group(&team).unwrap();
    let mut writer = LedgerWriter::open(&data_dir, Durability::Strict).unwrap();
    writer.write_batch(&events()).unwrap();
    drop(writer);

    let url = Postgres::shared().fresh_database("migrate");
    let first = migrate(&config, Some(&url), None);
    for line in [
        "keys 3 (3 new)",
        "groups 1 (1 new)",
        "usage 40 (40 new)",
        "outcomes 6 (6 new)",
    ] {
        assert!(first.contains(line), "{first}");
    }
    // Again, through the environment: nothing is new.
    let second = migrate(&config, None, Some(&url));
    for line in [
        "keys 3 (0 new)",
        "groups 1 (0 new)",
        "usage 40 (0 new)",
        "outcomes 6 (0 new)",
    ] {
        assert!(second.contains(line), "{second}");
    }

    let store = PgStore::connect(&url).unwrap();
    assert_eq!(
        store.key_store().list().unwrap(),
        sqlite_keys.list().unwrap()
    );
    assert_eq!(store.key_store().list_groups().unwrap(), vec![team]);
    let (pg, sqlite) = (store.ledger_reader(), SqliteLedgerReader::new(&data_dir));
    assert_eq!(pg.records().unwrap(), sqlite.records().unwrap());
    for key_id in ["key_a", "key_B"] {
        assert_eq!(
            pg.period_usage(key_id, 0, i64::MAX).unwrap(),
            sqlite.period_usage(key_id, 0, i64::MAX).unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Concurrent changes of different fields of one key, from connections that stand for
/// different replicas: the row lock orders them, and every one lands.
#[test]
fn concurrent_changes_of_one_key_all_land() {
    let url = Postgres::shared().fresh_database("modify");
    let store = PgStore::connect(&url).unwrap();
    store.key_store().insert(&key(1)).unwrap();
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8u32)
        .map(|n| {
            let url = url.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let keys = PgStore::connect(&url).unwrap().key_store();
                start.wait();
                keys.modify("key_1", &mut |stored| {
                    match n {
                        0 => stored.owner = Some("ana".into()),
                        1 => stored.team = Some("core".into()),
                        2 => stored.customer = Some("acme".into()),
                        3 => stored.budget_usd = Some(Money::parse_usd("7").unwrap()),
                        4 => stored.rpm = Some(60),
                        5 => stored.tpm = Some(9_000),
                        6 => stored.max_concurrency = Some(3),
                        _ => stored.seats = 4,
                    }
                    true
                })
                .unwrap();
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stored = store.key_store().get("key_1").unwrap().unwrap();
    assert_eq!(stored.owner.as_deref(), Some("ana"));
    assert_eq!(stored.team.as_deref(), Some("core"));
    assert_eq!(stored.customer.as_deref(), Some("acme"));
    assert_eq!(stored.budget_usd, Some(Money::parse_usd("7").unwrap()));
    assert_eq!(
        (stored.rpm, stored.tpm, stored.max_concurrency),
        (Some(60), Some(9_000), Some(3))
    );
    assert_eq!(stored.seats, 4);
}
