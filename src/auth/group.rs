//! Teams and customers: budget levels above keys. A key names at most one team and one
//! customer; when a group of that name exists, every request of the key is admitted against
//! the group's limits too (see `limits`). A label with no group behind it stays a label only,
//! for usage reports. The index is the hot path's view, updated by every admin change.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::limits::{BudgetPeriod, KeyLimits, Level, SpendRate, UNCAPPED};
use crate::money::Money;
use crate::store::row::{Column, Dialect, RowSource};

/// A team or a customer as stored and administered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    #[serde(skip, default = "team")]
    pub level: Level,
    pub name: String,
    pub budget_usd: Option<Money>,
    pub budget_period: BudgetPeriod,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_usd_per_minute: Option<Money>,
    pub max_usd_per_hour: Option<Money>,
    pub soft_budget_usd: Option<Money>,
    /// A customer's plan: its keys without a plan of their own are rated under it.
    pub plan: Option<String>,
    pub created_at_ms: i64,
}

fn team() -> Level {
    Level::Team
}

impl GroupRecord {
    /// A new group with no limits and a monthly budget period.
    pub fn new(level: Level, name: &str) -> GroupRecord {
        GroupRecord {
            level,
            name: name.to_owned(),
            budget_usd: None,
            budget_period: BudgetPeriod::Month,
            rpm: None,
            tpm: None,
            max_usd_per_minute: None,
            max_usd_per_hour: None,
            soft_budget_usd: None,
            plan: None,
            created_at_ms: crate::unix_ms(),
        }
    }

    /// The group's limits as admission takes them; an uncapped group gets an unreachable cap
    /// so that its spend is tracked.
    pub fn limits(&self) -> KeyLimits {
        KeyLimits {
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrency: None,
            budget: Some((self.budget_usd.unwrap_or(UNCAPPED), self.budget_period)),
            spend_rate: SpendRate {
                per_minute: self.max_usd_per_minute,
                per_hour: self.max_usd_per_hour,
            },
        }
    }
}

/// The group a key's label names, if it is a level: the record, and its limits and shared
/// state's id computed once.
pub struct Group {
    pub record: GroupRecord,
    pub limits: KeyLimits,
    pub shared_id: String,
}

/// Every team and customer, by name.
#[derive(Default)]
pub struct GroupIndex {
    teams: DashMap<String, Arc<Group>>,
    customers: DashMap<String, Arc<Group>>,
}

impl GroupIndex {
    fn of(&self, level: Level) -> &DashMap<String, Arc<Group>> {
        match level {
            Level::Customer => &self.customers,
            _ => &self.teams,
        }
    }

    pub fn put(&self, record: GroupRecord) {
        let group = Group {
            limits: record.limits(),
            shared_id: crate::state::redis::owner_of(record.level, &record.name),
            record,
        };
        self.of(group.record.level)
            .insert(group.record.name.clone(), Arc::new(group));
    }

    pub fn remove(&self, level: Level, name: &str) {
        self.of(level).remove(name);
    }

    /// Every team, then every customer.
    pub fn all(&self) -> Vec<Arc<Group>> {
        self.teams
            .iter()
            .chain(self.customers.iter())
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// The names of every group of a level.
    pub fn names(&self, level: Level) -> Vec<String> {
        self.of(level)
            .iter()
            .map(|entry| entry.key().clone())
            .collect()
    }

    pub fn get(&self, level: Level, name: &str) -> Option<Arc<Group>> {
        // Cloned out so no map guard outlives this call.
        self.of(level).get(name).map(|entry| entry.value().clone())
    }

    /// A key's team and customer, where they are levels.
    pub fn above(&self, team: Option<&str>, customer: Option<&str>) -> Levels {
        Levels {
            team: team.and_then(|name| self.get(Level::Team, name)),
            customer: customer.and_then(|name| self.get(Level::Customer, name)),
        }
    }
}

/// The groups above one key, held for one request.
#[derive(Default)]
pub struct Levels {
    pub team: Option<Arc<Group>>,
    pub customer: Option<Arc<Group>>,
}

impl Levels {
    pub fn above(&self) -> crate::limits::Above<'_> {
        crate::limits::Above {
            team: self.team.as_deref().map(Group::level_ref),
            customer: self.customer.as_deref().map(Group::level_ref),
        }
    }

    pub fn get(&self, level: Level) -> Option<&GroupRecord> {
        match level {
            Level::Key => None,
            Level::Team => self.team.as_deref().map(|group| &group.record),
            Level::Customer => self.customer.as_deref().map(|group| &group.record),
        }
    }
}

impl Group {
    fn level_ref(&self) -> crate::limits::LevelRef<'_> {
        crate::limits::LevelRef {
            name: &self.record.name,
            limits: &self.limits,
            shared_id: &self.shared_id,
        }
    }
}

/// What its keys spent, from each key's spend: a group's spend is that of the keys that name
/// it now, revoked ones included (usage follows a key that moves, as in usage reports).
pub fn members_spend(
    spend: &HashMap<String, Money>,
    keys: &[crate::auth::KeyRecord],
    level: Level,
    name: &str,
) -> Money {
    keys.iter()
        .filter(|key| key.label(level) == Some(name))
        .filter_map(|key| spend.get(&key.id))
        .fold(Money::ZERO, |total, spent| total + *spent)
}

/// How a change of a group is announced to the other replicas, on the channel that carries
/// key ids (which never hold a colon).
pub fn change_id(level: Level, name: &str) -> String {
    format!("{}:{name}", level.as_str())
}

/// The group an announced change is about, if it is about one.
pub fn group_change(id: &str) -> Option<(Level, &str)> {
    let (level, name) = id.split_once(':')?;
    match level {
        "team" => Some((Level::Team, name)),
        "customer" => Some((Level::Customer, name)),
        _ => None,
    }
}

/// The `groups` table's columns, in the order of [`group_values`] and [`group_record`].
const GROUP_COLUMNS: [&str; 11] = [
    "level",
    "name",
    "budget_nanos",
    "budget_period",
    "rpm",
    "tpm",
    "usd_per_minute_nanos",
    "usd_per_hour_nanos",
    "soft_budget_nanos",
    "plan",
    "created_at_ms",
];

/// The table in SQLite; PostgreSQL's is the same in its migration 9.
pub(crate) const SQLITE_GROUPS_TABLE: &str = "CREATE TABLE IF NOT EXISTS groups (
    level TEXT NOT NULL,
    name TEXT NOT NULL,
    budget_nanos INTEGER,
    budget_period TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    usd_per_minute_nanos INTEGER,
    usd_per_hour_nanos INTEGER,
    soft_budget_nanos INTEGER,
    plan TEXT,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (level, name)
)";

pub(crate) fn group_select(filter: &str) -> String {
    format!("SELECT {} FROM groups {filter}", GROUP_COLUMNS.join(", "))
}

/// Inserts a group unless one of that level and name exists.
pub(crate) fn group_insert_sql(dialect: Dialect) -> String {
    format!(
        "INSERT INTO groups ({}) VALUES ({}) ON CONFLICT (level, name) DO NOTHING",
        GROUP_COLUMNS.join(", "),
        dialect.params(GROUP_COLUMNS.len())
    )
}

/// Rewrites every column of a group but its level, name and creation time; the level and name
/// are the first two parameters.
pub(crate) fn group_update_sql(dialect: Dialect) -> String {
    let set: Vec<String> = (2..GROUP_COLUMNS.len() - 1)
        .map(|n| format!("{} = {}", GROUP_COLUMNS[n], dialect.param(n + 1)))
        .collect();
    format!(
        "UPDATE groups SET {} WHERE level = {} AND name = {}",
        set.join(", "),
        dialect.param(1),
        dialect.param(2)
    )
}

/// Deletes a group that no live key names; `group_members_sql` counts those that do.
pub(crate) fn group_delete_sql(dialect: Dialect) -> String {
    format!(
        "DELETE FROM groups WHERE level = {} AND name = {}",
        dialect.param(1),
        dialect.param(2)
    )
}

/// The live keys that name a group: `team` or `customer` is the level's column.
pub(crate) fn group_members_sql(level: Level, dialect: Dialect) -> String {
    format!(
        "SELECT COUNT(*) FROM keys WHERE {} = {} AND revoked_at_ms IS NULL",
        level_column(level),
        dialect.param(1)
    )
}

/// The keys' column that names a group of this level.
pub(crate) fn level_column(level: Level) -> &'static str {
    match level {
        Level::Customer => "customer",
        _ => "team",
    }
}

pub(crate) fn group_values(r: &GroupRecord) -> [Column<'_>; 11] {
    [
        Column::text(r.level.as_str()),
        Column::text(&r.name),
        Column::Int(r.budget_usd.map(Money::nanos)),
        Column::text(r.budget_period.as_str()),
        Column::Int(r.rpm.map(i64::from)),
        Column::Int(r.tpm.map(|v| i64::try_from(v).unwrap_or(i64::MAX))),
        Column::Int(r.max_usd_per_minute.map(Money::nanos)),
        Column::Int(r.max_usd_per_hour.map(Money::nanos)),
        Column::Int(r.soft_budget_usd.map(Money::nanos)),
        Column::optional_text(r.plan.as_deref()),
        Column::int(r.created_at_ms),
    ]
}

/// The parameters of [`group_update_sql`].
pub(crate) fn group_update_values(r: &GroupRecord) -> Vec<Column<'_>> {
    let values = group_values(r);
    let last = values.len() - 1;
    values.into_iter().take(last).collect()
}

pub(crate) fn group_record<R: RowSource>(row: &R) -> Result<GroupRecord, R::Error> {
    let level = row.required_text(0)?;
    let period = row.required_text(3)?;
    Ok(GroupRecord {
        level: match level.as_str() {
            "team" => Level::Team,
            "customer" => Level::Customer,
            _ => return Err(row.invalid(0, format!("group level `{level}`"))),
        },
        name: row.required_text(1)?,
        budget_usd: row.int(2)?.map(Money::from_nanos),
        budget_period: BudgetPeriod::parse(&period)
            .ok_or_else(|| row.invalid(3, format!("budget period `{period}`")))?,
        rpm: row.optional_number(4)?,
        tpm: row.int(5)?.map(|v| v.max(0) as u64),
        max_usd_per_minute: row.int(6)?.map(Money::from_nanos),
        max_usd_per_hour: row.int(7)?.map(Money::from_nanos),
        soft_budget_usd: row.int(8)?.map(Money::from_nanos),
        plan: row.text(9)?,
        created_at_ms: row.required_int(10)?,
    })
}
