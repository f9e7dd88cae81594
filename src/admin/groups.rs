//! `/admin/teams` and `/admin/customers`: the budget levels above keys (see `auth::group`).
//! Each shows its live spend, reservations and remaining budget with the projection a key
//! shows, and how many live keys name it. A group that live keys still name cannot be deleted
//! (409): its keys are moved or revoked first, so that no key silently loses a cap.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::StringRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};

use super::{
    blocking, dollars, field_error, hourly_paces, invoice_answer, key_invoice, limit, parse_object,
    period, plan, spend_rate, store_error, text, Month,
};
use crate::app::App;
use crate::auth::group::{change_id, members_spend, GroupRecord};
use crate::auth::store::GroupDeletion;
use crate::auth::KeyRecord;
use crate::error::{small_body, GatewayError};
use crate::limits::Level;
use crate::money::Money;

/// The two collections share their handlers, told apart by `CUSTOMER`.
const TEAMS: bool = false;
const CUSTOMERS: bool = true;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/admin/teams",
            get(list_of::<TEAMS>).post(create_in::<TEAMS>),
        )
        .route(
            "/admin/teams/{name}",
            get(show_one::<TEAMS>)
                .patch(update_one::<TEAMS>)
                .delete(delete_one::<TEAMS>),
        )
        .route("/admin/teams/{name}/invoice", get(invoice_of::<TEAMS>))
        .route(
            "/admin/customers",
            get(list_of::<CUSTOMERS>).post(create_in::<CUSTOMERS>),
        )
        .route(
            "/admin/customers/{name}",
            get(show_one::<CUSTOMERS>)
                .patch(update_one::<CUSTOMERS>)
                .delete(delete_one::<CUSTOMERS>),
        )
        .route(
            "/admin/customers/{name}/invoice",
            get(invoice_of::<CUSTOMERS>),
        )
}

fn level(customer: bool) -> Level {
    match customer {
        true => Level::Customer,
        false => Level::Team,
    }
}

type Body = Result<String, StringRejection>;
type InvoiceQuery =
    Result<axum::extract::Query<super::InvoiceQuery>, axum::extract::rejection::QueryRejection>;

async fn list_of<const CUSTOMER: bool>(
    State(app): State<Arc<App>>,
) -> Result<Response, GatewayError> {
    list(app, level(CUSTOMER)).await
}

async fn create_in<const CUSTOMER: bool>(
    State(app): State<Arc<App>>,
    body: Body,
) -> Result<Response, GatewayError> {
    create(app, level(CUSTOMER), body).await
}

async fn show_one<const CUSTOMER: bool>(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Response, GatewayError> {
    show(app, level(CUSTOMER), name).await
}

async fn update_one<const CUSTOMER: bool>(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, GatewayError> {
    update(app, level(CUSTOMER), name, body).await
}

async fn delete_one<const CUSTOMER: bool>(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Response, GatewayError> {
    delete(app, level(CUSTOMER), name).await
}

async fn invoice_of<const CUSTOMER: bool>(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    query: InvoiceQuery,
) -> Result<Response, GatewayError> {
    group_invoice(app, level(CUSTOMER), name, query).await
}

async fn list(app: Arc<App>, level: Level) -> Result<Response, GatewayError> {
    let (groups, keys) = load_all(&app).await?;
    let paces = hourly_paces(&app, None).await;
    let views = groups
        .iter()
        .filter(|group| group.level == level)
        .map(|group| group_view(&app, group, &keys, &paces));
    let data: Vec<Value> = futures_util::future::join_all(views).await;
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn create(app: Arc<App>, level: Level, body: Body) -> Result<Response, GatewayError> {
    let fields = parse_object(&small_body(body)?)?;
    let name = match fields.get("name") {
        Some(value) => text(value, "name")?.unwrap_or_default(),
        None => String::new(),
    };
    if name.is_empty() {
        return Err(field_error(
            "name",
            format!("a {} needs a non-empty `name`", level.as_str()),
        ));
    }
    let mut record = GroupRecord::new(level, &name);
    apply_fields(&app, &mut record, &fields)?;
    let _writing = app.key_writes.lock().await;
    let store = app.key_store.clone();
    let stored = record.clone();
    let inserted = blocking(move || store.insert_group(&stored).map_err(store_error)).await?;
    if !inserted {
        return Err(GatewayError::Conflict(format!(
            "a {} named `{name}` exists already",
            level.as_str()
        )));
    }
    // Keys may name the group before it exists: their spend this period is its spend.
    let spent = group_spend(&app, &record).await?;
    activate(&app, record.clone(), spent).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(view_of(&app, &record).await?),
    )
        .into_response())
}

async fn show(app: Arc<App>, level: Level, name: String) -> Result<Response, GatewayError> {
    let record = load(&app, level, name).await?;
    Ok(axum::Json(view_of(&app, &record).await?).into_response())
}

async fn update(
    app: Arc<App>,
    level: Level,
    name: String,
    body: Body,
) -> Result<Response, GatewayError> {
    let fields = parse_object(&small_body(body)?)?;
    if fields.contains_key("name") {
        return Err(field_error(
            "name",
            "a group cannot be renamed: its keys name it; create another and move them",
        ));
    }
    let _writing = app.key_writes.lock().await;
    let store = app.key_store.clone();
    let changing = app.clone();
    let wanted = name.clone();
    let (before, record) = blocking(move || {
        let mut refused = None;
        let mut before = None;
        let modified = store
            .modify_group(level, &wanted, &mut |record| {
                before = Some(record.clone());
                match apply_fields(&changing, record, &fields) {
                    Ok(()) => true,
                    Err(error) => {
                        refused = Some(error);
                        false
                    }
                }
            })
            .map_err(store_error)?;
        if let Some(error) = refused {
            return Err(error);
        }
        Ok(before.zip(modified))
    })
    .await?
    .ok_or_else(|| GatewayError::NotFound(format!("{} {name}", level.as_str())))?;
    // A budget over another period starts from that period's spend in the ledger.
    let spent = match before.budget_period == record.budget_period || app.admission.is_shared() {
        true => None,
        false => group_spend(&app, &record).await?,
    };
    activate(&app, record.clone(), spent).await;
    Ok(axum::Json(view_of(&app, &record).await?).into_response())
}

async fn delete(app: Arc<App>, level: Level, name: String) -> Result<Response, GatewayError> {
    let _writing = app.key_writes.lock().await;
    let store = app.key_store.clone();
    let wanted = name.clone();
    let deleted = blocking(move || store.delete_group(level, &wanted).map_err(store_error)).await?;
    match deleted {
        GroupDeletion::NotFound => Err(GatewayError::NotFound(format!(
            "{} {name}",
            level.as_str()
        ))),
        GroupDeletion::HasKeys(count) => Err(GatewayError::Conflict(format!(
            "{count} live key(s) still name the {} `{name}`: move them to another {} (PATCH their `{}`) or revoke them first",
            level.as_str(),
            level.as_str(),
            level.as_str()
        ))),
        GroupDeletion::Deleted => {
            app.group_removed(level, &name);
            app.refresh_members(level, &name).await;
            app.admission
                .publish_key_change(&change_id(level, &name))
                .await;
            Ok(axum::Json(json!({
                "object": level.as_str(),
                "name": name,
                "deleted": true,
            }))
            .into_response())
        }
    }
}

/// `GET /admin/teams/{name}/invoice?period=YYYY-MM`: the invoice of each key that names the
/// group now (revoked ones included, as for its spend), each under its own plan, and their
/// total.
async fn group_invoice(
    app: Arc<App>,
    level: Level,
    name: String,
    query: InvoiceQuery,
) -> Result<Response, GatewayError> {
    let month = Month::of(query)?;
    let record = load(&app, level, name).await?;
    let (_, keys) = load_all(&app).await?;
    let mut invoices = Vec::new();
    let mut total = Money::ZERO;
    for key in keys {
        if key.label(level) != Some(record.name.as_str()) {
            continue;
        }
        let (invoice, key_total) = key_invoice(&app, key, &month).await?;
        total += key_total;
        invoices.push(invoice);
    }
    let body = json!({
        "object": "invoice",
        "level": level.as_str(),
        "name": record.name,
        "period": month.name,
        "currency": "usd",
        "keys": invoices,
        "total_usd": total,
    });
    Ok(invoice_answer(&month, body))
}

/// Serves a group from the next request on, here and on every replica.
async fn activate(app: &Arc<App>, record: GroupRecord, spent: Option<Money>) {
    let (level, name) = (record.level, record.name.clone());
    app.group_activated(record, spent);
    app.refresh_members(level, &name).await;
    app.admission
        .publish_key_change(&change_id(level, &name))
        .await;
}

/// After a key moved to another team or customer, the groups it left and joined recount their
/// spend from the ledger: a group's spend is that of the keys that name it now.
pub(super) async fn recount_moved(
    app: &Arc<App>,
    before: &KeyRecord,
    after: &KeyRecord,
) -> Result<(), GatewayError> {
    for level in [Level::Team, Level::Customer] {
        if before.label(level) == after.label(level) {
            continue;
        }
        for name in [before.label(level), after.label(level)]
            .into_iter()
            .flatten()
        {
            if let Some(group) = app.groups.get(level, name) {
                let spent = members_spend_now(app, &group.record).await?;
                app.admission
                    .recount(level, name, &group.limits, spent)
                    .await;
            }
        }
    }
    Ok(())
}

/// What the group's keys spent in its current budget period, from the ledger, for the
/// embedded backend (the shared one reads it when a period is first used).
async fn group_spend(app: &App, record: &GroupRecord) -> Result<Option<Money>, GatewayError> {
    if app.admission.is_shared() {
        return Ok(None);
    }
    members_spend_now(app, record).await.map(Some)
}

/// What the keys that name the group now spent in its current budget period.
async fn members_spend_now(app: &App, record: &GroupRecord) -> Result<Money, GatewayError> {
    // Records still queued for a batched commit are part of the spend.
    app.usage.flushed().await;
    let ledger = app.ledger.clone();
    let store = app.key_store.clone();
    let (level, name) = (record.level, record.name.clone());
    let from_ms = record.budget_period.start_ms(crate::unix_ms());
    blocking(move || {
        let spend = ledger.spend_since(from_ms).map_err(store_error)?;
        let keys = store.list().map_err(store_error)?;
        Ok(members_spend(&spend, &keys, level, &name))
    })
    .await
}

async fn load(app: &App, level: Level, name: String) -> Result<GroupRecord, GatewayError> {
    let (groups, _) = load_all(app).await?;
    groups
        .into_iter()
        .find(|group| group.level == level && group.name == name)
        .ok_or_else(|| GatewayError::NotFound(format!("{} {name}", level.as_str())))
}

async fn load_all(app: &App) -> Result<(Vec<GroupRecord>, Vec<KeyRecord>), GatewayError> {
    let store = app.key_store.clone();
    blocking(move || {
        let groups = store.list_groups().map_err(store_error)?;
        let keys = store.list().map_err(store_error)?;
        Ok((groups, keys))
    })
    .await
}

async fn view_of(app: &App, record: &GroupRecord) -> Result<Value, GatewayError> {
    let (_, keys) = load_all(app).await?;
    let paces = hourly_paces(app, None).await;
    Ok(group_view(app, record, &keys, &paces).await)
}

/// A group as the admin API shows it: its fields, its live budget with the projection at its
/// keys' pace, and how many live keys name it.
async fn group_view(
    app: &App,
    record: &GroupRecord,
    keys: &[KeyRecord],
    paces: &HashMap<String, Money>,
) -> Value {
    let mut view = serde_json::to_value(record).unwrap_or_else(|_| json!({}));
    view["object"] = json!(record.level.as_str());
    if record.level == Level::Team {
        if let Value::Object(fields) = &mut view {
            fields.remove("plan");
        }
    }
    let members = keys
        .iter()
        .filter(|key| key.label(record.level) == Some(record.name.as_str()));
    view["keys"] = json!(members.clone().filter(|key| !key.is_revoked()).count());
    let pace = members
        .filter_map(|key| paces.get(&key.id))
        .fold(Money::ZERO, |total, pace| total + *pace);
    if let Value::Object(budget) = app.group_budget_view(record, Some(pace)).await {
        for (name, value) in budget {
            view[name] = value;
        }
    }
    view
}

/// Applies a JSON object of group fields; `null` clears an optional field. Unknown fields are
/// refused, as for keys.
fn apply_fields(
    app: &App,
    record: &mut GroupRecord,
    fields: &Map<String, Value>,
) -> Result<(), GatewayError> {
    for (name, value) in fields {
        match name.as_str() {
            "name" => {}
            "budget_usd" => record.budget_usd = dollars(value, "budget_usd")?,
            "soft_budget_usd" => record.soft_budget_usd = dollars(value, "soft_budget_usd")?,
            "max_usd_per_minute" => {
                record.max_usd_per_minute = spend_rate(value, "max_usd_per_minute")?
            }
            "max_usd_per_hour" => record.max_usd_per_hour = spend_rate(value, "max_usd_per_hour")?,
            "budget_period" => record.budget_period = period(value)?,
            "rpm" => record.rpm = limit(value, "rpm")?.map(|v| v.min(u64::from(u32::MAX)) as u32),
            "tpm" => record.tpm = limit(value, "tpm")?,
            "plan" if record.level == Level::Customer => record.plan = plan(app, value)?,
            other => {
                return Err(GatewayError::bad_request(format!(
                    "unknown {} field `{other}`",
                    record.level.as_str()
                )))
            }
        }
    }
    Ok(())
}
