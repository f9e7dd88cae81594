//! Spend watch: keys spending much faster than they usually do, caught from the ledger, and
//! where each budget period ends at the current pace.
//!
//! Every `velocity_check_secs` each replica reads every key's spend over the last ten minutes
//! (raw rows) and over the seven days before the current hour (rollups). A key whose ten
//! minutes cost at least `velocity_min_usd` and more than `velocity_factor` times its average
//! ten minutes of that week — or, with `velocity_usd_per_hour`, more than that pace whatever
//! its history — is spiking. A spike is one episode while it lasts: claimed once across
//! replicas (`Admission::claim_episode`), logged, counted and sent to the alert webhook once.
//! It ends when two checks in a row find the key calm; the next spike is a new episode.
//!
//! Teams and customers are watched the same way, at the pace of their keys together.
//!
//! The same checks announce each key, team and customer whose period's spend reached its
//! `soft_budget_usd`, once per period (an episode that lasts until the period resets).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::app::App;
use crate::config::Velocity;
use crate::limits::Level;
use crate::money::Money;
use crate::rating::ledger::{GroupBy, LedgerError, LedgerReader};

/// The span a spike is measured over.
pub const WINDOW: Duration = Duration::from_secs(600);
const HISTORY_DAYS: i64 = 7;
const HOUR_MS: i64 = 3_600_000;
/// Ten-minute windows in the history.
const WINDOWS_IN_HISTORY: i64 = HISTORY_DAYS * 24 * 6;

/// One key's spend now and as usual.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pace {
    /// Spend over the last ten minutes.
    pub recent: Money,
    /// Average spend per ten minutes over the history.
    pub usual: Money,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Above `velocity_factor` times the usual.
    Factor,
    /// Above `velocity_usd_per_hour`.
    Fixed,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Factor => "factor",
            Trigger::Fixed => "fixed",
        }
    }
}

/// Whether a key's pace is a spike, and what made it one.
pub fn spike(pace: Pace, velocity: &Velocity) -> Option<Trigger> {
    let windows_per_hour = (HOUR_MS / WINDOW.as_millis() as i64) as i128;
    if let Some(per_hour) = velocity.per_hour {
        if i128::from(pace.recent.nanos()) * windows_per_hour > i128::from(per_hour.nanos()) {
            return Some(Trigger::Fixed);
        }
    }
    let factor = velocity.factor?;
    let above_usual = pace.recent.nanos() as f64 > factor * pace.usual.nanos() as f64;
    (pace.recent >= velocity.min && pace.recent > Money::ZERO && above_usual)
        .then_some(Trigger::Factor)
}

/// Every key's pace at `now_ms`, from the ledger.
pub fn paces(ledger: &dyn LedgerReader, now_ms: i64) -> Result<HashMap<String, Pace>, LedgerError> {
    let window_ms = WINDOW.as_millis() as i64;
    let recent = ledger.usage(now_ms - window_ms, now_ms, GroupBy::Key, None)?;
    let hour = now_ms - now_ms.rem_euclid(HOUR_MS);
    let history = ledger.usage(hour - HISTORY_DAYS * 24 * HOUR_MS, hour, GroupBy::Key, None)?;
    let usual: HashMap<String, Money> = history
        .into_iter()
        .map(|row| (row.group, Money(row.cost_usd.nanos() / WINDOWS_IN_HISTORY)))
        .collect();
    Ok(recent
        .into_iter()
        .map(|row| {
            let pace = Pace {
                recent: row.cost_usd,
                usual: usual.get(&row.group).copied().unwrap_or(Money::ZERO),
            };
            (row.group, pace)
        })
        .collect())
}

/// Checks every key's pace until the gateway is gone.
pub async fn watch(app: Weak<App>) {
    loop {
        let Some(every) = app
            .upgrade()
            .map(|app| app.config().budget_alerts.velocity.check_every)
        else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(app) = app.upgrade() else {
            return;
        };
        check(&app).await;
    }
}

/// One check: announces each spike that starts an episode, and each soft budget reached.
pub async fn check(app: &Arc<App>) {
    let config = app.config();
    check_velocity(app, &config).await;
    check_soft_budgets(app, &config).await;
}

/// How long a soft budget's episode lasts: until its period resets (and an hour more).
fn until_reset(resets_at_ms: Option<i64>, now_ms: i64) -> Duration {
    const TOTAL_PERIOD_EPISODE: Duration = Duration::from_secs(400 * 86_400);
    resets_at_ms.map_or(TOTAL_PERIOD_EPISODE, |reset| {
        Duration::from_millis((reset - now_ms).max(0) as u64 + 3_600_000)
    })
}

async fn check_soft_budgets(app: &Arc<App>, config: &crate::config::Config) {
    let now_ms = crate::unix_ms();
    for group in app.groups.all() {
        let record = &group.record;
        let (Some(soft), Some(budget)) = (
            record.soft_budget_usd,
            app.admission
                .budget(record.level, &record.name, &group.limits)
                .await,
        ) else {
            continue;
        };
        let episode = format!(
            "soft_budget:{}:{}:{}",
            record.level.as_str(),
            record.name,
            budget.period_start_ms
        );
        let lasts = until_reset(budget.resets_at_ms, now_ms);
        if budget.spend_usd < soft || !app.admission.claim_episode(&episode, lasts).await {
            continue;
        }
        app.metrics
            .soft_budget_alerts
            .with_label_values::<&str>(&[])
            .inc();
        tracing::warn!(
            level = record.level.as_str(),
            name = %record.name,
            spend_usd = %budget.spend_usd.to_usd_string(),
            soft_budget_usd = %soft.to_usd_string(),
            "soft budget reached"
        );
        let event = serde_json::json!({"event": "soft_budget_reached", "soft_budget_usd": soft});
        app.post_group_alert(config, group.clone(), event);
    }
    for key in app.keys.filtered(|key| key.soft_budget_usd.is_some()) {
        let (Some(soft), Some(budget)) = (
            key.soft_budget_usd,
            app.admission
                .budget(Level::Key, &key.id, &app.key_limits(&key))
                .await,
        ) else {
            continue;
        };
        if budget.spend_usd < soft {
            continue;
        }
        let lasts = until_reset(budget.resets_at_ms, now_ms);
        let episode = format!("soft_budget:{}:{}", key.id, budget.period_start_ms);
        if !app.admission.claim_episode(&episode, lasts).await {
            continue;
        }
        app.metrics
            .soft_budget_alerts
            .with_label_values::<&str>(&[])
            .inc();
        tracing::warn!(
            key = %key.name,
            spend_usd = %budget.spend_usd.to_usd_string(),
            soft_budget_usd = %soft.to_usd_string(),
            "soft budget reached"
        );
        app.post_alert(
            config,
            key,
            serde_json::json!({"event": "soft_budget_reached", "soft_budget_usd": soft}),
        );
    }
}

async fn check_velocity(app: &Arc<App>, config: &crate::config::Config) {
    let velocity = config.budget_alerts.velocity;
    if velocity.factor.is_none() && velocity.per_hour.is_none() {
        return;
    }
    let ledger = app.ledger.clone();
    let now_ms = crate::unix_ms();
    let read = tokio::task::spawn_blocking(move || paces(ledger.as_ref(), now_ms)).await;
    let paces = match read
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        Ok(paces) => paces,
        Err(error) => {
            tracing::warn!(%error, "spend velocity not checked");
            return;
        }
    };
    // Two checks and a little: an episode survives one check that runs late.
    let lasts = velocity.check_every * 2 + velocity.check_every / 2;
    // A team's or customer's pace is its keys' together: twenty keys each a little above
    // their usual may be a team far above its own.
    for group in app.groups.all() {
        let record = &group.record;
        let members = app
            .keys
            .filtered(|key| key.label(record.level) == Some(record.name.as_str()));
        let pace = members.iter().filter_map(|key| paces.get(&key.id)).fold(
            Pace::default(),
            |total, pace| Pace {
                recent: total.recent + pace.recent,
                usual: total.usual + pace.usual,
            },
        );
        let Some(trigger) = spike(pace, &velocity) else {
            continue;
        };
        let episode = format!("velocity:{}:{}", record.level.as_str(), record.name);
        if app.admission.claim_episode(&episode, lasts).await {
            count_spike(app, record.level, &record.name, pace, trigger);
            app.post_group_alert(config, group.clone(), velocity_event(pace, trigger));
        }
    }
    for (key_id, pace) in paces {
        let Some(trigger) = spike(pace, &velocity) else {
            continue;
        };
        let Some(key) = app.keys.get(&key_id) else {
            continue;
        };
        if app
            .admission
            .claim_episode(&format!("velocity:{key_id}"), lasts)
            .await
        {
            announce(app, config, key, pace, trigger);
        }
    }
}

fn announce(
    app: &Arc<App>,
    config: &crate::config::Config,
    key: Arc<crate::auth::KeyRecord>,
    pace: Pace,
    trigger: Trigger,
) {
    count_spike(app, Level::Key, &key.name, pace, trigger);
    app.post_alert(config, key, velocity_event(pace, trigger));
}

fn count_spike(app: &App, level: Level, name: &str, pace: Pace, trigger: Trigger) {
    app.metrics
        .velocity_alerts
        .with_label_values(&[trigger.label()])
        .inc();
    tracing::warn!(
        level = level.as_str(),
        name,
        spend_usd = %pace.recent.to_usd_string(),
        usual_usd = %pace.usual.to_usd_string(),
        trigger = trigger.label(),
        "spend velocity alert"
    );
}

fn velocity_event(pace: Pace, trigger: Trigger) -> serde_json::Value {
    serde_json::json!({
        "event": "spend_velocity",
        "trigger": trigger.label(),
        "window_minutes": WINDOW.as_secs() / 60,
        "spend_usd": pace.recent,
        "usual_usd": pace.usual,
    })
}

/// Where a budget period ends at the current pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Projection {
    /// Spend per hour over the last 24 whole hours.
    pub pace_per_hour: Money,
    /// Spend at the period's end at that pace; `None` for a `total` budget (no end).
    pub spend_at_reset: Option<Money>,
    /// When the cap is reached at that pace, if before the period ends.
    pub cap_reached_ms: Option<i64>,
}

/// Projects a period from its spend so far, its cap, its end and the pace.
pub fn project(
    spent: Money,
    cap: Option<Money>,
    now_ms: i64,
    resets_at_ms: Option<i64>,
    pace_per_hour: Money,
) -> Projection {
    let pace = i128::from(pace_per_hour.nanos().max(0));
    let at = |ms: i64| {
        Money(
            spent
                .nanos()
                .saturating_add((pace * i128::from(ms) / i128::from(HOUR_MS)) as i64),
        )
    };
    let spend_at_reset = resets_at_ms.map(|reset| at((reset - now_ms).max(0)));
    let cap_reached_ms = cap.and_then(|cap| {
        if spent >= cap {
            return Some(now_ms);
        }
        if pace == 0 {
            return None;
        }
        let left = i128::from(cap.nanos() - spent.nanos());
        let ms = (left * i128::from(HOUR_MS) + pace - 1) / pace;
        let reached = now_ms.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX / 2));
        resets_at_ms
            .is_none_or(|reset| reached < reset)
            .then_some(reached)
    });
    Projection {
        pace_per_hour,
        spend_at_reset,
        cap_reached_ms,
    }
}

/// Each key's spend per hour over the last 24 whole hours (one key's, with `key_id`).
pub fn hourly_paces(
    ledger: &dyn LedgerReader,
    now_ms: i64,
    key_id: Option<&str>,
) -> Result<HashMap<String, Money>, LedgerError> {
    let hour = now_ms - now_ms.rem_euclid(HOUR_MS);
    let rows = ledger.usage(hour - 24 * HOUR_MS, hour, GroupBy::Key, key_id)?;
    Ok(rows
        .into_iter()
        .map(|row| (row.group, Money(row.cost_usd.nanos() / 24)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn velocity(factor: Option<f64>, per_hour: Option<Money>) -> Velocity {
        Velocity {
            factor,
            min: Money::from_micros(1_000_000),
            per_hour,
            check_every: Duration::from_secs(60),
        }
    }

    const DOLLAR: i64 = 1_000_000_000;

    #[test]
    fn a_spike_is_many_times_the_usual_and_above_the_floor() {
        let five = velocity(Some(5.0), None);
        let pace = |recent, usual| Pace {
            recent: Money(recent),
            usual: Money(usual),
        };
        assert_eq!(
            spike(pace(6 * DOLLAR, DOLLAR), &five),
            Some(Trigger::Factor)
        );
        assert_eq!(spike(pace(5 * DOLLAR, DOLLAR), &five), None, "not above 5×");
        assert_eq!(
            spike(pace(DOLLAR / 2, 0), &five),
            None,
            "under the $1 floor"
        );
        assert_eq!(
            spike(pace(DOLLAR, 0), &five),
            Some(Trigger::Factor),
            "no history"
        );
        let fixed = velocity(None, Some(Money(30 * DOLLAR)));
        // $6 in ten minutes is $36 an hour.
        assert_eq!(
            spike(pace(6 * DOLLAR, 6 * DOLLAR), &fixed),
            Some(Trigger::Fixed)
        );
        assert_eq!(spike(pace(5 * DOLLAR, 0), &fixed), None, "exactly $30/h");
        assert_eq!(spike(pace(100 * DOLLAR, 0), &velocity(None, None)), None);
    }

    #[test]
    fn steady_traffic_is_calm_and_a_burst_over_the_same_history_spikes() {
        use crate::meter::record::MeterEvent;
        use crate::meter::sink::{Durability, UsageWriter};
        use crate::rating::ledger::{LedgerWriter, SqliteLedgerReader};
        let dir = std::env::temp_dir().join(format!("tollgate-watch-{}", crate::unix_ms()));
        let now = 2_000_000 * HOUR_MS + 30 * 60_000;
        let ten_minutes = WINDOW.as_millis() as i64;
        let charge = Money(DOLLAR / 2);
        let mut events = Vec::new();
        let mut add = |key: &str, at_ms: i64| {
            let mut record = crate::rating::ledger::tests::record(&format!("{key}-{at_ms}"), None);
            record.key_id = Some(key.into());
            record.started_at_ms = at_ms;
            record.charge = charge;
            events.push(MeterEvent::Usage(record));
        };
        // A week of one request each ten minutes for both keys, up to now.
        let start = now - now.rem_euclid(HOUR_MS) - HISTORY_DAYS * 24 * HOUR_MS;
        for at in (start..now).step_by(ten_minutes as usize) {
            add("key_steady", at);
            add("key_burst", at);
        }
        // Then the burst: ten more in the last ten minutes.
        for n in 0..10 {
            add("key_burst", now - 1_000 - n);
        }
        let mut writer = LedgerWriter::open(&dir, Durability::Strict).unwrap();
        writer.write_batch(&events).unwrap();
        drop(writer);
        let paces = paces(&SqliteLedgerReader::new(&dir), now).unwrap();
        let five = velocity(Some(5.0), None);
        assert_eq!(paces["key_steady"].usual, charge);
        assert_eq!(paces["key_steady"].recent, charge);
        assert_eq!(spike(paces["key_steady"], &five), None);
        assert_eq!(paces["key_burst"].recent, Money(11 * charge.nanos()));
        assert_eq!(spike(paces["key_burst"], &five), Some(Trigger::Factor));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_projection_runs_the_pace_to_the_reset_and_finds_the_cap() {
        let now = 1_000 * HOUR_MS;
        let reset = now + 10 * HOUR_MS;
        let projection = project(
            Money(2 * DOLLAR),
            Some(Money(10 * DOLLAR)),
            now,
            Some(reset),
            Money(DOLLAR),
        );
        assert_eq!(projection.spend_at_reset, Some(Money(12 * DOLLAR)));
        assert_eq!(projection.cap_reached_ms, Some(now + 8 * HOUR_MS));
        let slow = project(
            Money(2 * DOLLAR),
            Some(Money(100 * DOLLAR)),
            now,
            Some(reset),
            Money(DOLLAR),
        );
        assert_eq!(slow.cap_reached_ms, None, "not before the reset");
        let total = project(
            Money(2 * DOLLAR),
            Some(Money(3 * DOLLAR)),
            now,
            None,
            Money(DOLLAR / 2),
        );
        assert_eq!(total.spend_at_reset, None);
        assert_eq!(total.cap_reached_ms, Some(now + 2 * HOUR_MS));
        let idle = project(
            Money(2 * DOLLAR),
            Some(Money(3 * DOLLAR)),
            now,
            None,
            Money::ZERO,
        );
        assert_eq!(idle.cap_reached_ms, None);
        let over = project(
            Money(3 * DOLLAR),
            Some(Money(3 * DOLLAR)),
            now,
            None,
            Money::ZERO,
        );
        assert_eq!(over.cap_reached_ms, Some(now));
    }
}
