//! `POST /v1/outcomes`: an application reports a billable outcome (a resolved ticket, say) for
//! per-outcome plans. The event joins usage records on the same channel into rating, where its
//! idempotency key is unique in the ledger, so a retried report is billed once.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::App;
use crate::error::GatewayError;
use crate::meter::record::{MeterEvent, OutcomeEvent};
use crate::money::Money;

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

pub async fn report(State(app): State<Arc<App>>, headers: HeaderMap, body: String) -> Response {
    match accept(&app, &headers, &body) {
        Ok(event) => {
            let answer = serde_json::json!({
                "object": "outcome",
                "id": event.idempotency_key,
                "type": event.outcome_type,
                "quantity": event.quantity,
                "request_id": event.request_id,
                "status": "accepted",
            });
            if app.usage.submit(MeterEvent::Outcome(event)) {
                (StatusCode::ACCEPTED, axum::Json(answer)).into_response()
            } else {
                GatewayError::Internal("the usage pipeline is full; retry later".to_owned())
                    .into_response()
            }
        }
        Err(error) => error.into_response(),
    }
}

fn accept(app: &App, headers: &HeaderMap, body: &str) -> Result<OutcomeEvent, GatewayError> {
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
    let charge = app
        .config()
        .plan(key.plan.as_deref())
        .outcome_price(outcome_type)
        .map_or(Money::ZERO, |price| price.times(request.quantity));
    Ok(OutcomeEvent {
        charge,
        idempotency_key: format!("{}:{idempotency_key}", key.id),
        key_id: key.id.clone(),
        plan: key.plan.clone(),
        outcome_type: outcome_type.to_owned(),
        quantity: request.quantity,
        request_id: request.request_id,
        at_ms: crate::unix_ms(),
    })
}
