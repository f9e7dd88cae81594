//! `POST /v1/outcomes`: an application reports a billable outcome (a resolved ticket, say) for
//! per-outcome plans. The event joins usage records on the same channel into rating, where its
//! idempotency key is unique in the ledger, so a retried report is billed once, and the retry
//! is answered with what the first report recorded.

use std::sync::Arc;

use axum::extract::rejection::StringRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde::Deserialize;

use crate::app::App;
use crate::auth::KeyRecord;
use crate::error::{small_body, GatewayError};
use crate::meter::record::{MeterEvent, OutcomeEvent};
use crate::rating::plan::Plan;
use crate::state::{Charge, Once};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeRequest {
    #[serde(rename = "type")]
    outcome_type: String,
    #[serde(default = "one")]
    quantity: u64,
    request_id: Option<String>,
    idempotency_key: Option<String>,
}

fn one() -> u64 {
    1
}

pub async fn report(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<String, StringRejection>,
) -> Response {
    let body = match small_body(body) {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let (key, event) = match accept(&app, &headers, &body) {
        Ok(accepted) => accepted,
        Err(error) => return error.into_response(),
    };
    if let Some(first) = recorded(&app, &event.idempotency_key).await {
        return answer(StatusCode::OK, &first, "duplicate");
    }
    if let Some(first) = app.outcomes.first(&event) {
        return answer(StatusCode::OK, &first, "duplicate");
    }
    // An outcome is spend like any request's charge: the key's cap covers it.
    let limits = app.key_limits(&key);
    let levels = app.levels(&key);
    let record = serde_json::to_string(&event).unwrap_or_default();
    let once = Once {
        id: &event.idempotency_key,
        record: &record,
    };
    match app
        .admission
        .charge(&key.id, &limits, levels.above(), event.charge, once)
        .await
    {
        Ok(Charge::Done(alerts)) => {
            let config = app.config();
            for alert in alerts {
                crate::proxy::settle::announce(&app, &config, &key, alert);
            }
        }
        Ok(Charge::Repeat(first)) => {
            app.outcomes.forget(&event.idempotency_key);
            let first = serde_json::from_str(&first).unwrap_or(event);
            return answer(StatusCode::OK, &first, "duplicate");
        }
        Err(refusal) => {
            app.outcomes.forget(&event.idempotency_key);
            return crate::proxy::refusal_error(&refusal, &key, &levels).into_response();
        }
    }
    let accepted = answer(StatusCode::ACCEPTED, &event, "accepted");
    if app.usage.submit(MeterEvent::Outcome(event)) {
        accepted
    } else {
        GatewayError::Internal("the usage pipeline is full; retry later".to_owned()).into_response()
    }
}

/// The outcome the ledger holds under this idempotency key, if any.
async fn recorded(app: &App, idempotency_key: &str) -> Option<OutcomeEvent> {
    let ledger = app.ledger.clone();
    let idempotency_key = idempotency_key.to_owned();
    tokio::task::spawn_blocking(move || ledger.outcome(&idempotency_key))
        .await
        .ok()?
        .unwrap_or_else(|error| {
            tracing::error!(%error, "outcome lookup failed; treated as new");
            None
        })
}

fn answer(status: StatusCode, event: &OutcomeEvent, state: &str) -> Response {
    let id = event
        .idempotency_key
        .split_once(':')
        .map_or(event.idempotency_key.as_str(), |(_, id)| id);
    let body = serde_json::json!({
        "object": "outcome",
        "id": id,
        "type": event.outcome_type,
        "quantity": event.quantity,
        "request_id": event.request_id,
        "charge_usd": event.charge,
        "status": state,
    });
    (status, axum::Json(body)).into_response()
}

/// Outcomes reported lately, by idempotency key: a repeat that arrives before the first
/// report reached the ledger is still answered with the first.
#[derive(Default)]
pub struct Recent(DashMap<String, OutcomeEvent>);

const RECENT_MS: i64 = 60_000;
const RECENT_MAX: usize = 10_000;

impl Recent {
    /// A report refused by its budget: a retry is a new report.
    fn forget(&self, idempotency_key: &str) {
        self.0.remove(idempotency_key);
    }

    /// Remembers `event` and returns `None`, or returns the report that came first.
    fn first(&self, event: &OutcomeEvent) -> Option<OutcomeEvent> {
        if self.0.len() >= RECENT_MAX {
            self.0
                .retain(|_, seen| seen.at_ms > event.at_ms - RECENT_MS);
            if self.0.len() >= RECENT_MAX {
                self.0.clear();
            }
        }
        match self.0.entry(event.idempotency_key.clone()) {
            Entry::Occupied(first) => Some(first.get().clone()),
            Entry::Vacant(slot) => {
                slot.insert(event.clone());
                None
            }
        }
    }
}

fn accept(
    app: &App,
    headers: &HeaderMap,
    body: &str,
) -> Result<(Arc<KeyRecord>, OutcomeEvent), GatewayError> {
    let key = crate::auth::bearer(headers)
        .and_then(|secret| app.keys.authenticate(secret))
        .ok_or(GatewayError::InvalidApiKey)?;
    let request: OutcomeRequest = serde_json::from_str(body)
        .map_err(|error| GatewayError::bad_request(format!("invalid outcome report: {error}")))?;
    let outcome_type = request.outcome_type.trim();
    if outcome_type.is_empty() || outcome_type.len() > 64 {
        return Err(GatewayError::BadRequest {
            message: "`type` must be a name of 1 to 64 characters".to_owned(),
            param: Some("type"),
        });
    }
    if request.quantity == 0 || request.quantity > 1_000_000 {
        return Err(GatewayError::BadRequest {
            message: "`quantity` must be between 1 and 1000000".to_owned(),
            param: Some("quantity"),
        });
    }
    // Without a client key the report is still deduplicated per request, which is the common
    // case of "this request resolved a ticket"; with neither, each report is new.
    let idempotency_key = match (&request.idempotency_key, &request.request_id) {
        (Some(key), _) if !key.is_empty() && key.len() <= 256 => key.clone(),
        (Some(_), _) => {
            return Err(GatewayError::BadRequest {
                message: "`idempotency_key` must be 1 to 256 characters".to_owned(),
                param: Some("idempotency_key"),
            })
        }
        (None, Some(request_id)) => format!("{request_id}:{outcome_type}"),
        (None, None) => format!("out_{:032x}", rand::random::<u128>()),
    };
    let config = app.config();
    let plan_name = key.plan.as_deref().unwrap_or("list");
    let price = match config.plan(key.plan.as_deref()) {
        Plan::PerOutcome { outcomes, .. } => {
            outcomes.get(outcome_type).copied().ok_or_else(|| {
                let known: Vec<&str> = outcomes.keys().map(String::as_str).collect();
                GatewayError::BadRequest {
                    message: format!(
                        "unknown outcome type `{outcome_type}`: plan `{plan_name}` bills {}",
                        known.join(", ")
                    ),
                    param: Some("type"),
                }
            })?
        }
        _ => {
            return Err(GatewayError::BadRequest {
                message: format!("plan `{plan_name}` of this key bills no outcomes"),
                param: Some("type"),
            })
        }
    };
    let charge = price.times(request.quantity);
    let event = OutcomeEvent {
        charge,
        idempotency_key: format!("{}:{idempotency_key}", key.id),
        key_id: key.id.clone(),
        plan: key.plan.clone(),
        outcome_type: outcome_type.to_owned(),
        quantity: request.quantity,
        request_id: request.request_id,
        at_ms: crate::unix_ms(),
    };
    Ok((key, event))
}
