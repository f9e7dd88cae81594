//! `GET /v1/models` and `GET /v1/models/{id}`: the models a key may use, including the virtual
//! routing model.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::app::App;
use crate::error::GatewayError;

/// `GET /v1/models`: the models this key may use, in the order the config declares them.
pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(key) = crate::auth::bearer(&headers).and_then(|secret| app.keys.authenticate(secret))
    else {
        return GatewayError::InvalidApiKey.into_response();
    };
    let config = app.config();
    let data: Vec<Value> = config
        .client_models()
        .filter(|name| key.allows_model(name))
        .map(model_object)
        .collect();
    axum::Json(serde_json::json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{id}`: one model, when this key may use it (the SDKs' `models.retrieve`).
pub async fn model(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(key) = crate::auth::bearer(&headers).and_then(|secret| app.keys.authenticate(secret))
    else {
        return GatewayError::InvalidApiKey.into_response();
    };
    if !app.config().knows_model(&id) || !key.allows_model(&id) {
        return GatewayError::UnknownModel(id).into_response();
    }
    axum::Json(model_object(&id)).into_response()
}

fn model_object(name: &str) -> Value {
    serde_json::json!({
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "tollgate",
    })
}
