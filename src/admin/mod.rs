//! The admin API for platform teams: keys (create, list, show, update, revoke), teams and
//! customers ([`groups`]), usage, invoices and a health summary. Guarded by
//! `TOLLGATE_ADMIN_TOKEN` as a bearer token or by a console session made from it; with no
//! token configured the admin API refuses everything rather than running open. Store calls
//! are blocking and run on the blocking pool.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::StringRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::auth::{self, KeyRecord};
use crate::error::{small_body, GatewayError};
use crate::limits::{BudgetPeriod, Level};
use crate::money::Money;
use crate::rating::invoice;
use crate::rating::ledger::{regroup, GroupBy};

mod groups;
pub mod health;

/// The admin API, every route behind [`guard`].
pub fn routes(app: Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .merge(groups::routes())
        .route("/admin/keys", get(list_keys).post(create_key))
        .route(
            "/admin/keys/{id}",
            get(show_key).patch(update_key).delete(revoke_key),
        )
        .route("/admin/usage", get(usage))
        .route("/admin/routing/savings", get(routing_savings))
        .route("/admin/invoices/{key_id}", get(invoice))
        .route("/admin/health", get(health::summary))
        .route_layer(axum::middleware::from_fn_with_state(app, guard))
}

/// The admin token, or a console session (see [`crate::console::session`]).
async fn guard(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let session = app
        .console
        .authorize(request.method(), request.headers(), crate::unix_ms())
        .await;
    let allowed = match session {
        Ok(Some(session)) => crate::console::still_open(&app, &session).await,
        Ok(None) => Ok(()),
        Err(error) => Err(error),
    };
    match allowed {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    split_by: Option<String>,
    key_id: Option<String>,
}

/// A `group_by` or `split_by` value: a grouping of the ledger, or a label of keys.
fn grouping(name: &str, field: &'static str) -> Result<(GroupBy, Option<KeyLabel>), GatewayError> {
    Ok(match name {
        "key" => (GroupBy::Key, None),
        "model" => (GroupBy::Model, None),
        "tier" => (GroupBy::Tier, None),
        "rule" => (GroupBy::Rule, None),
        "day" => (GroupBy::Day, None),
        "hour" => (GroupBy::Hour, None),
        "team" => (GroupBy::Key, Some(KeyLabel::Team)),
        "customer" => (GroupBy::Key, Some(KeyLabel::Customer)),
        other => {
            return Err(field_error(
                field,
                format!("`{other}` is not key, model, tier, rule, day, hour, team or customer"),
            ))
        }
    })
}

fn parse_instant(text: &str, field: &'static str) -> Result<i64, GatewayError> {
    crate::api::parse_instant(text).ok_or_else(|| {
        field_error(
            field,
            format!("`{text}` is not a date (YYYY-MM-DD) or an RFC 3339 time"),
        )
    })
}

/// `GET /admin/usage?from=&to=&group_by=key|model|tier|rule|day|hour|team|customer
/// [&split_by=…][&key_id=]`: requests, tokens and cost, read from the rollups (see
/// `rating::ledger::rollup`); by team or customer, each key's usage is summed under its label
/// (usage without one under `""`); `split_by` splits each group by a second grouping (a day
/// by model, for a stacked chart).
/// `to` is exclusive; a bare date means that day's midnight, so `to=2026-11-26` includes the
/// 25th. Defaults: the last 30 days, grouped by key.
async fn usage(
    State(app): State<Arc<App>>,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, GatewayError> {
    let axum::extract::Query(query) =
        query.map_err(|e| GatewayError::bad_request(e.body_text()))?;
    let (from, to) = report_range(query.from.as_deref(), query.to.as_deref())?;
    let (group, label) = grouping(query.group_by.as_deref().unwrap_or("key"), "group_by")?;
    let split = match query.split_by.as_deref() {
        None => None,
        Some(name) => match grouping(name, "split_by")? {
            (split, None) if label.is_none() && split != group => Some(split),
            _ => {
                return Err(field_error(
                    "split_by",
                    "`split_by` is one of key, model, tier, rule, day and hour other than \
                     `group_by`, and neither may be team or customer",
                ))
            }
        },
    };
    let ledger = app.ledger.clone();
    let store = app.key_store.clone();
    let key_id = query.key_id.clone();
    let rows = blocking(move || {
        let rows = ledger
            .usage_by(from, to, group, split, key_id.as_deref())
            .map_err(store_error)?;
        let Some(label) = label else {
            return Ok(rows);
        };
        // A key's team or customer as it is now: usage follows a key that moves.
        let labels: HashMap<String, String> = store
            .list()
            .map_err(store_error)?
            .into_iter()
            .map(|key| {
                let name = match label {
                    KeyLabel::Team => key.team,
                    KeyLabel::Customer => key.customer,
                };
                (key.id, name.unwrap_or_default())
            })
            .collect();
        Ok(regroup(rows, |key| {
            labels.get(key).cloned().unwrap_or_default()
        }))
    })
    .await?;
    let totals = json!({
        "requests": rows.iter().map(|r| r.requests).sum::<u64>(),
        "input_tokens": rows.iter().map(|r| r.input_tokens).sum::<u64>(),
        "output_tokens": rows.iter().map(|r| r.output_tokens).sum::<u64>(),
        "cost_usd": rows.iter().map(|r| r.cost_usd).sum::<Money>(),
    });
    let group_name = query.group_by.unwrap_or_else(|| "key".to_owned());
    Ok(axum::Json(json!({
        "object": "usage",
        "group_by": group_name,
        "split_by": query.split_by,
        "from": from,
        "to": to,
        "data": rows,
        "totals": totals,
    }))
    .into_response())
}

/// A label of keys that usage can be grouped by.
#[derive(Debug, Clone, Copy)]
enum KeyLabel {
    Team,
    Customer,
}

/// A report's `from` and `to`: `to` is exclusive and defaults to now; `from` defaults to 30
/// days before `to`.
fn report_range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), GatewayError> {
    let to = match to {
        Some(text) => parse_instant(text, "to")?,
        None => crate::unix_ms() + 1,
    };
    let from = match from {
        Some(text) => parse_instant(text, "from")?,
        None => to - 30 * 86_400_000,
    };
    Ok((from, to))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavingsQuery {
    from: Option<String>,
    to: Option<String>,
    baseline_tier: Option<String>,
}

/// `GET /admin/routing/savings?from=&to=&baseline_tier=`: what the router's placements cost
/// at list prices against the same tokens on the baseline tier (default: the dearest), by
/// route rule and model, with the saving in dollars and percent.
async fn routing_savings(
    State(app): State<Arc<App>>,
    query: Result<axum::extract::Query<SavingsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, GatewayError> {
    let axum::extract::Query(query) =
        query.map_err(|e| GatewayError::bad_request(e.body_text()))?;
    let (from, to) = report_range(query.from.as_deref(), query.to.as_deref())?;
    let config = app.config();
    let tiers: Vec<String> = config
        .router
        .as_ref()
        .map(|router| router.tiers().map(|(name, _)| name.to_owned()).collect())
        .unwrap_or_default();
    let baseline = match query.baseline_tier {
        Some(tier) if tiers.contains(&tier) => tier,
        Some(tier) => {
            return Err(field_error(
                "baseline_tier",
                format!("`{tier}` is not a tier; tiers: {}", tiers.join(", ")),
            ))
        }
        None => crate::rating::savings::dearest_tier(&config).ok_or_else(|| {
            field_error("baseline_tier", "the router has no tier to compare with")
        })?,
    };
    let ledger = app.ledger.clone();
    let rows = blocking(move || {
        ledger
            .usage_by(from, to, GroupBy::Rule, Some(GroupBy::Model), None)
            .map_err(store_error)
    })
    .await?;
    let savings = crate::rating::savings::savings(&config, &rows, &baseline);
    let mut body =
        serde_json::to_value(savings).map_err(|error| GatewayError::Internal(error.to_string()))?;
    if let Value::Object(fields) = &mut body {
        fields.insert("object".to_owned(), json!("routing.savings"));
        fields.insert("from".to_owned(), json!(from));
        fields.insert("to".to_owned(), json!(to));
    }
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceQuery {
    period: Option<String>,
    format: Option<String>,
}

/// `GET /admin/invoices/{key_id}?period=YYYY-MM[&format=csv]` (default: the current month).
async fn invoice(
    State(app): State<Arc<App>>,
    Path(key_id): Path<String>,
    query: Result<axum::extract::Query<InvoiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, GatewayError> {
    let month = Month::of(query)?;
    let record = load_key(&app, key_id).await?;
    let (body, _) = key_invoice(&app, record, &month).await?;
    Ok(invoice_answer(&month, body))
}

/// An invoice's month: `YYYY-MM` and its bounds in Unix ms, and whether it is wanted as CSV.
struct Month {
    name: String,
    from: i64,
    to: i64,
    csv: bool,
}

/// An invoice as JSON, or as CSV for a spreadsheet: one row per line (per key's line for a
/// team or customer), then the total.
fn invoice_answer(month: &Month, body: Value) -> Response {
    if !month.csv {
        return axum::Json(body).into_response();
    }
    let mut csv =
        String::from("key_id,key_name,description,quantity,unit_price_usd,amount_usd\r\n");
    let single = [body.clone()];
    let invoices = body["keys"].as_array().map_or(&single[..], Vec::as_slice);
    for invoice in invoices {
        for line in invoice["lines"].as_array().into_iter().flatten() {
            let row = [
                csv_text(&invoice["key_id"]),
                csv_text(&invoice["key_name"]),
                csv_text(&line["description"]),
                csv_number(&line["quantity"]),
                csv_number(&line["unit_price_usd"]),
                csv_number(&line["amount_usd"]),
            ];
            csv.push_str(&row.join(","));
            csv.push_str("\r\n");
        }
    }
    csv.push_str(&format!(",,total,,,{}\r\n", csv_number(&body["total_usd"])));
    let file = format!("attachment; filename=\"invoice-{}.csv\"", month.name);
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (
                axum::http::header::CONTENT_DISPOSITION,
                axum::http::HeaderValue::from_str(&file)
                    .unwrap_or(axum::http::HeaderValue::from_static("attachment")),
            ),
        ],
        csv,
    )
        .into_response()
}

/// A text cell, quoted, with a leading `'` before what a spreadsheet would run as a formula
/// (key names are chosen by whoever creates keys).
fn csv_text(value: &Value) -> String {
    let text = value.as_str().unwrap_or_default();
    let guard = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        "'"
    } else {
        ""
    };
    format!("\"{guard}{}\"", text.replace('"', "\"\""))
}

fn csv_number(value: &Value) -> String {
    match value {
        Value::Number(number) => number.to_string(),
        _ => String::new(),
    }
}

impl Month {
    /// The `period` of an invoice query (default: the current month).
    fn of(
        query: Result<axum::extract::Query<InvoiceQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<Month, GatewayError> {
        let axum::extract::Query(query) =
            query.map_err(|e| GatewayError::bad_request(e.body_text()))?;
        let csv = match query.format.as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(other) => {
                return Err(field_error(
                    "format",
                    format!("`{other}` is not json or csv"),
                ))
            }
        };
        let name = query
            .period
            .unwrap_or_else(|| chrono::Utc::now().format("%Y-%m").to_string());
        let well_formed = name.len() == 7
            && name.as_bytes()[4] == b'-'
            && name
                .bytes()
                .enumerate()
                .all(|(i, b)| i == 4 || b.is_ascii_digit());
        let start = chrono::NaiveDate::parse_from_str(&format!("{name}-01"), "%Y-%m-%d")
            .ok()
            .filter(|_| well_formed)
            .ok_or_else(|| field_error("period", format!("`{name}` is not YYYY-MM")))?;
        let from = start
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or_default();
        let to = BudgetPeriod::Month.reset_ms(from).unwrap_or(from);
        Ok(Month {
            name,
            from,
            to,
            csv,
        })
    }
}

/// A key's invoice for a month, under its plan (its customer's when it has none), and its
/// total.
async fn key_invoice(
    app: &App,
    record: KeyRecord,
    month: &Month,
) -> Result<(Value, Money), GatewayError> {
    let record = app.effective(record);
    let ledger = app.ledger.clone();
    let id = record.id.clone();
    let (from, to) = (month.from, month.to);
    let usage = blocking(move || ledger.period_usage(&id, from, to).map_err(store_error)).await?;
    let config = app.config();
    let plan_name = record.plan.clone().unwrap_or_else(|| "list".to_owned());
    let plan = config.plan(record.plan.as_deref());
    let (lines, total, extra) = invoice::lines(plan, &usage, record.seats);
    let mut body = json!({
        "object": "invoice",
        "key_id": record.id,
        "key_name": record.name,
        "period": month.name,
        "plan": plan_name,
        "plan_kind": plan.kind(),
        "currency": "usd",
        "lines": lines,
        "total_usd": total,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    Ok((body, total))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, GatewayError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
}

fn store_error(error: impl std::fmt::Display) -> GatewayError {
    GatewayError::Internal(error.to_string())
}

async fn create_key(
    State(app): State<Arc<App>>,
    body: Result<String, StringRejection>,
) -> Result<Response, GatewayError> {
    let fields = parse_object(&small_body(body)?)?;
    let secret = auth::new_secret();
    let mut record = KeyRecord::new("", &secret);
    apply_fields(&app, &mut record, &fields)?;
    if record.name.is_empty() {
        return Err(field_error("name", "a key needs a non-empty `name`"));
    }
    let store = app.key_store.clone();
    let stored = record.clone();
    blocking(move || store.insert(&stored).map_err(store_error)).await?;
    app.key_activated(record.clone(), None);
    app.admission.publish_key_change(&record.id).await;
    let mut view = key_view(&app, &record).await;
    view["key"] = Value::String(secret);
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn list_keys(State(app): State<Arc<App>>) -> Result<Response, GatewayError> {
    let store = app.key_store.clone();
    let records = blocking(move || store.list().map_err(store_error)).await?;
    let paces = hourly_paces(&app, None).await;
    let views = records.iter().map(|r| key_view_at(&app, r, &paces));
    let data: Vec<Value> = futures_util::future::join_all(views).await;
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn load_key(app: &App, id: String) -> Result<KeyRecord, GatewayError> {
    let store = app.key_store.clone();
    let wanted = id.clone();
    blocking(move || store.get(&wanted).map_err(store_error))
        .await?
        .ok_or(GatewayError::NotFound(format!("key {id}")))
}

async fn show_key(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let record = load_key(&app, id).await?;
    Ok(axum::Json(key_view(&app, &record).await).into_response())
}

async fn update_key(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Result<String, StringRejection>,
) -> Result<Response, GatewayError> {
    let fields = parse_object(&small_body(body)?)?;
    let _writing = app.key_writes.lock().await;
    let before = load_key(&app, id.clone()).await?;
    let record = modify_key(&app, id, move |app, record| {
        apply_fields(app, record, &fields)?;
        match record.name.is_empty() {
            true => Err(field_error("name", "`name` cannot be empty")),
            false => Ok(()),
        }
    })
    .await?;
    let spent = period_spend_if_changed(&app, &record).await?;
    app.key_activated(record.clone(), spent);
    app.admission.publish_key_change(&record.id).await;
    groups::recount_moved(&app, &before, &record).await?;
    Ok(axum::Json(key_view(&app, &record).await).into_response())
}

/// Reads, changes and writes one key as one step of the store (see `KeyStore::modify`): two
/// concurrent PATCHes of different fields both land. `change` refusing leaves the key as it
/// was.
async fn modify_key(
    app: &Arc<App>,
    id: String,
    mut change: impl FnMut(&App, &mut KeyRecord) -> Result<(), GatewayError> + Send + 'static,
) -> Result<KeyRecord, GatewayError> {
    let store = app.key_store.clone();
    let changing = app.clone();
    blocking(move || {
        let mut refused = None;
        let modified = store
            .modify(&id, &mut |record| match change(&changing, record) {
                Ok(()) => true,
                Err(error) => {
                    refused = Some(error);
                    false
                }
            })
            .map_err(store_error)?;
        if let Some(error) = refused {
            return Err(error);
        }
        modified.ok_or(GatewayError::NotFound(format!("key {id}")))
    })
    .await
}

/// A budget that now runs over another period starts from that period's spend in the ledger;
/// one over the same period keeps its live spend and reservations.
async fn period_spend_if_changed(
    app: &App,
    record: &KeyRecord,
) -> Result<Option<Money>, GatewayError> {
    let period = app.budget_period(&app.effective(record.clone()));
    // Shared budgets are kept per period: a new period's spend is read when first needed.
    if app.admission.is_shared()
        || app.admission.budget_period(Level::Key, &record.id) == Some(period)
    {
        return Ok(None);
    }
    // Records still queued for a batched commit are part of the key's spend.
    app.usage.flushed().await;
    let ledger = app.ledger.clone();
    let id = record.id.clone();
    let from_ms = period.start_ms(crate::unix_ms());
    let spend = blocking(move || ledger.spend_since(from_ms).map_err(store_error)).await?;
    Ok(Some(spend.get(&id).copied().unwrap_or(Money::ZERO)))
}

async fn revoke_key(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let _writing = app.key_writes.lock().await;
    let record = modify_key(&app, id, |_, record| {
        record.revoked_at_ms.get_or_insert_with(crate::unix_ms);
        Ok(())
    })
    .await?;
    app.key_revoked(&record.id);
    app.admission.publish_key_change(&record.id).await;
    Ok(axum::Json(key_view(&app, &record).await).into_response())
}

fn parse_object(body: &str) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(GatewayError::bad_request("the body must be a JSON object")),
        Err(error) => Err(GatewayError::bad_request(format!(
            "We could not parse the JSON body of your request: {error}"
        ))),
    }
}

fn field_error(field: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::BadRequest {
        message: message.into(),
        param: Some(field),
    }
}

/// Applies a JSON object of key fields; `null` clears an optional field. Creation and update
/// share this, so both validate identically. Unknown fields are refused: a typo in
/// `budget_usd` must not silently create an uncapped key.
fn apply_fields(
    app: &App,
    record: &mut KeyRecord,
    fields: &Map<String, Value>,
) -> Result<(), GatewayError> {
    for (name, value) in fields {
        match name.as_str() {
            "name" => record.name = text(value, "name")?.unwrap_or_default(),
            "owner" => record.owner = text(value, "owner")?,
            "team" => record.team = text(value, "team")?,
            "customer" => record.customer = text(value, "customer")?,
            "budget_usd" => record.budget_usd = dollars(value, "budget_usd")?,
            "soft_budget_usd" => record.soft_budget_usd = dollars(value, "soft_budget_usd")?,
            "max_usd_per_minute" => {
                record.max_usd_per_minute = spend_rate(value, "max_usd_per_minute")?
            }
            "max_usd_per_hour" => record.max_usd_per_hour = spend_rate(value, "max_usd_per_hour")?,
            "budget_period" => record.budget_period = period(value)?,
            "rpm" => record.rpm = limit(value, "rpm")?.map(|v| v.min(u64::from(u32::MAX)) as u32),
            "tpm" => record.tpm = limit(value, "tpm")?,
            "max_concurrency" => {
                record.max_concurrency =
                    limit(value, "max_concurrency")?.map(|v| v.min(u64::from(u32::MAX)) as u32)
            }
            "seats" => {
                record.seats = count(value, "seats")?
                    .map_or(1, |v| v.min(u64::from(u32::MAX)) as u32)
                    .max(1)
            }
            "models" => {
                record.models = match value {
                    Value::Null => None,
                    _ => {
                        let mut models: Vec<String> = serde_json::from_value(value.clone())
                            .map_err(|_| field_error("models", "must be a list of model names"))?;
                        let mut seen = std::collections::HashSet::new();
                        models.retain(|model| seen.insert(model.clone()));
                        let config = app.config();
                        if let Some(unknown) =
                            models.iter().find(|m| !config.knows_model(m.as_str()))
                        {
                            return Err(field_error(
                                "models",
                                format!("unknown model `{unknown}`"),
                            ));
                        }
                        Some(models)
                    }
                }
            }
            "plan" => record.plan = plan(app, value)?,
            other => {
                return Err(GatewayError::bad_request(format!(
                    "unknown key field `{other}`"
                )))
            }
        }
    }
    Ok(())
}

/// A plan named in the config, or null for none.
fn plan(app: &App, value: &Value) -> Result<Option<String>, GatewayError> {
    let plan = text(value, "plan")?;
    match &plan {
        Some(name) if !app.config().plans.contains_key(name) => Err(field_error(
            "plan",
            format!("no plan named `{name}` in the config"),
        )),
        _ => Ok(plan),
    }
}

fn period(value: &Value) -> Result<BudgetPeriod, GatewayError> {
    value
        .as_str()
        .and_then(BudgetPeriod::parse)
        .ok_or_else(|| field_error("budget_period", "must be one of day, week, month, total"))
}

/// An amount of US dollars, not negative, or null for none.
fn dollars(value: &Value, field: &'static str) -> Result<Option<Money>, GatewayError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(_) => {
            let money: Money = serde_json::from_value(value.clone())
                .map_err(|e| field_error(field, e.to_string()))?;
            if money < Money::ZERO {
                return Err(field_error(field, "must not be negative"));
            }
            Ok(Some(money))
        }
        _ => Err(field_error(
            field,
            format!("`{field}` must be a number of US dollars, or null"),
        )),
    }
}

/// A spend-rate cap: above zero, like a throttle (a key is stopped with `budget_usd: 0`).
fn spend_rate(value: &Value, field: &'static str) -> Result<Option<Money>, GatewayError> {
    match dollars(value, field)? {
        Some(Money::ZERO) => Err(field_error(
            field,
            format!(
                "`{field}` must be above zero (or null for no limit); to stop a key, revoke it or set `budget_usd` to 0"
            ),
        )),
        other => Ok(other),
    }
}

fn text(value: &Value, field: &'static str) -> Result<Option<String>, GatewayError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.len() <= 256 => Ok(Some(s.trim().to_owned())),
        _ => Err(field_error(field, format!("`{field}` must be a string"))),
    }
}

/// A throttle: at least 1. Zero would read as "blocked" for some limits and "one a minute" or
/// "none" for others; a key is stopped by revoking it or by `budget_usd: 0`.
fn limit(value: &Value, field: &'static str) -> Result<Option<u64>, GatewayError> {
    match count(value, field)? {
        Some(0) => Err(field_error(
            field,
            format!(
                "`{field}` must be at least 1 (or null for no limit); to stop a key, revoke it or set `budget_usd` to 0"
            ),
        )),
        other => Ok(other),
    }
}

fn count(value: &Value, field: &'static str) -> Result<Option<u64>, GatewayError> {
    match value {
        Value::Null => Ok(None),
        _ => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| field_error(field, format!("`{field}` must be a whole number"))),
    }
}

/// Each key's spend per hour lately (one key's, with `key_id`), for budget projections; none
/// when the ledger cannot say.
async fn hourly_paces(app: &App, key_id: Option<&str>) -> HashMap<String, Money> {
    let ledger = app.ledger.clone();
    let key_id = key_id.map(str::to_owned);
    let now_ms = crate::unix_ms();
    let paces = blocking(move || {
        crate::spend_watch::hourly_paces(ledger.as_ref(), now_ms, key_id.as_deref())
            .map_err(store_error)
    });
    paces.await.unwrap_or_else(|error| {
        tracing::warn!(%error, "budget projections left out");
        HashMap::new()
    })
}

/// A key as the admin API shows it, with its live budget state and its projection.
async fn key_view(app: &App, record: &KeyRecord) -> Value {
    let pace = hourly_paces(app, Some(&record.id)).await;
    key_view_at(app, record, &pace).await
}

async fn key_view_at(app: &App, record: &KeyRecord, paces: &HashMap<String, Money>) -> Value {
    let mut view = serde_json::to_value(record).unwrap_or_else(|_| json!({}));
    view["object"] = json!("key");
    view["revoked"] = json!(record.is_revoked());
    let pace = paces.get(&record.id).copied().unwrap_or(Money::ZERO);
    if let Value::Object(budget) = app.budget_view(record, Some(pace)).await {
        for (name, value) in budget {
            view[name] = value;
        }
    }
    view
}
