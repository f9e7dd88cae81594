//! The admin API for platform teams: keys (create, list, show, update, revoke), usage and
//! invoices. Guarded by `TOLLGATE_ADMIN_TOKEN`; with no token configured the admin API refuses
//! everything rather than running open. Store calls are blocking and run on the blocking pool.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::auth::{self, KeyRecord};
use crate::error::GatewayError;
use crate::limits::BudgetPeriod;
use crate::money::Money;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/admin/keys", get(list_keys).post(create_key))
        .route(
            "/admin/keys/{id}",
            get(show_key).patch(update_key).delete(revoke_key),
        )
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(expected) = app.admin_token.as_deref() else {
        return Err(GatewayError::AdminDisabled);
    };
    let presented = auth::bearer(headers).unwrap_or_default();
    let same: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
    if same {
        Ok(())
    } else {
        Err(GatewayError::InvalidAdminToken)
    }
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

async fn create_key(State(app): State<Arc<App>>, headers: HeaderMap, body: String) -> Response {
    let result = async {
        authorize(&app, &headers)?;
        let fields = parse_object(&body)?;
        let secret = auth::new_secret();
        let mut record = KeyRecord {
            id: auth::new_key_id(),
            name: String::new(),
            prefix: secret[..10].to_owned(),
            secret_hash: auth::hash_secret(&secret),
            owner: None,
            team: None,
            customer: None,
            budget_usd: None,
            budget_period: BudgetPeriod::Month,
            rpm: None,
            tpm: None,
            max_concurrency: None,
            models: None,
            plan: None,
            seats: 1,
            created_at_ms: crate::unix_ms(),
            revoked_at_ms: None,
        };
        apply_fields(&app, &mut record, &fields)?;
        if record.name.is_empty() {
            return Err(field_error("name", "a key needs a non-empty `name`"));
        }
        let store = app.key_store.clone();
        let stored = record.clone();
        blocking(move || store.insert(&stored).map_err(store_error)).await?;
        app.key_activated(record.clone(), None);
        let mut view = key_view(&app, &record);
        view["key"] = Value::String(secret);
        Ok::<_, GatewayError>((StatusCode::CREATED, axum::Json(view)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn list_keys(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let result = async {
        authorize(&app, &headers)?;
        let store = app.key_store.clone();
        let records = blocking(move || store.list().map_err(store_error)).await?;
        let data: Vec<Value> = records.iter().map(|r| key_view(&app, r)).collect();
        Ok::<_, GatewayError>(axum::Json(json!({"object": "list", "data": data})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
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
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        authorize(&app, &headers)?;
        let record = load_key(&app, id).await?;
        Ok::<_, GatewayError>(axum::Json(key_view(&app, &record)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn update_key(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: String,
) -> Response {
    let result = async {
        authorize(&app, &headers)?;
        let fields = parse_object(&body)?;
        let mut record = load_key(&app, id).await?;
        apply_fields(&app, &mut record, &fields)?;
        if record.name.is_empty() {
            return Err(field_error("name", "`name` cannot be empty"));
        }
        let store = app.key_store.clone();
        let stored = record.clone();
        blocking(move || store.update(&stored).map_err(store_error)).await?;
        app.key_activated(record.clone(), None);
        Ok::<_, GatewayError>(axum::Json(key_view(&app, &record)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn revoke_key(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        authorize(&app, &headers)?;
        let mut record = load_key(&app, id).await?;
        if record.revoked_at_ms.is_none() {
            record.revoked_at_ms = Some(crate::unix_ms());
            let store = app.key_store.clone();
            let stored = record.clone();
            blocking(move || store.update(&stored).map_err(store_error)).await?;
        }
        app.key_revoked(&record.id);
        Ok::<_, GatewayError>(axum::Json(key_view(&app, &record)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
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
            "budget_usd" => {
                record.budget_usd = match value {
                    Value::Null => None,
                    _ => {
                        let money: Money = serde_json::from_value(value.clone())
                            .map_err(|e| field_error("budget_usd", e.to_string()))?;
                        if money < Money::ZERO {
                            return Err(field_error("budget_usd", "must not be negative"));
                        }
                        Some(money)
                    }
                }
            }
            "budget_period" => {
                record.budget_period = serde_json::from_value(value.clone()).map_err(|_| {
                    field_error("budget_period", "must be one of day, week, month, total")
                })?
            }
            "rpm" => record.rpm = count(value, "rpm")?.map(|v| v.min(u64::from(u32::MAX)) as u32),
            "tpm" => record.tpm = count(value, "tpm")?,
            "max_concurrency" => {
                record.max_concurrency =
                    count(value, "max_concurrency")?.map(|v| v.min(u64::from(u32::MAX)) as u32)
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
                        let models: Vec<String> = serde_json::from_value(value.clone())
                            .map_err(|_| field_error("models", "must be a list of model names"))?;
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
            "plan" => record.plan = text(value, "plan")?,
            other => {
                return Err(GatewayError::bad_request(format!(
                    "unknown key field `{other}`"
                )))
            }
        }
    }
    Ok(())
}

fn text(value: &Value, field: &'static str) -> Result<Option<String>, GatewayError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.len() <= 256 => Ok(Some(s.trim().to_owned())),
        _ => Err(field_error(field, format!("`{field}` must be a string"))),
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

/// A key as the admin API shows it, with its live budget state.
fn key_view(app: &App, record: &KeyRecord) -> Value {
    let mut view = serde_json::to_value(record).unwrap_or_else(|_| json!({}));
    view["object"] = json!("key");
    view["revoked"] = json!(record.is_revoked());
    if let Value::Object(budget) = app.budget_view(record) {
        for (name, value) in budget {
            view[name] = value;
        }
    }
    view
}
