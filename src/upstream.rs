//! Talking to providers. One attempt is one HTTP request to one configured model's upstream,
//! with the provider key added and the client's key never forwarded; [`forward`] runs the
//! attempts: retries with jittered backoff on the same model, then fallback along the
//! candidate list, all before the first byte reaches the client and within a time budget.
//! Timeouts map to 504, connection failures to 502.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;

use crate::config::{Model, RetryPolicy};
use crate::error::GatewayError;
use crate::meter::record::Endpoint;
use crate::metrics::Metrics;

/// The upstream answer that will be sent to the client (success or the last error status).
pub struct Forwarded {
    pub model: Arc<Model>,
    pub response: reqwest::Response,
    pub strip_usage_chunk: bool,
}

/// Everything [`forward`] needs besides the candidates.
pub struct Attempt<'a> {
    pub endpoint: Endpoint,
    pub body: &'a Value,
    pub stream: bool,
    pub request_id: &'a HeaderValue,
    pub policy: &'a RetryPolicy,
    pub metrics: &'a Metrics,
}

/// Tries `candidates` in order. `attempts` counts every request sent, for the usage record.
/// On exhaustion the last upstream error status is returned as the answer (it passes through
/// to the client), or the last gateway error when no upstream ever answered.
pub async fn forward(
    candidates: &[Arc<Model>],
    attempt: &Attempt<'_>,
    attempts: &mut u32,
) -> Result<Forwarded, GatewayError> {
    let deadline = Instant::now() + attempt.policy.budget;
    let mut last: Result<Forwarded, GatewayError> = Err(GatewayError::UpstreamUnreachable(
        "no upstream to try".to_owned(),
    ));
    'models: for (index, model) in candidates.iter().enumerate() {
        if index > 0 {
            tracing::warn!(model = %model.name, "falling back");
            attempt
                .metrics
                .fallbacks
                .with_label_values(&[model.name.as_str()])
                .inc();
        }
        let (body, strip_usage_chunk) = upstream_body(
            attempt.body.clone(),
            model,
            attempt.endpoint,
            attempt.stream,
        )?;
        for try_on_model in 0..attempt.policy.attempts_per_model {
            if *attempts >= attempt.policy.max_attempts {
                break 'models;
            }
            *attempts += 1;
            let result = send(
                model,
                attempt.endpoint,
                body.clone(),
                attempt.request_id,
                attempt.metrics,
            )
            .await;
            let retry_after = match &result {
                Ok(response) if !retryable_status(response.status().as_u16()) => {
                    return result.map(|response| Forwarded {
                        model: model.clone(),
                        response,
                        strip_usage_chunk,
                    });
                }
                Ok(response) => retry_after(response.headers()),
                Err(_) => None,
            };
            last = result.map(|response| Forwarded {
                model: model.clone(),
                response,
                strip_usage_chunk,
            });
            let is_last_try = try_on_model + 1 >= attempt.policy.attempts_per_model;
            if is_last_try {
                continue 'models;
            }
            let delay = retry_after.unwrap_or_else(|| backoff(attempt.policy, try_on_model));
            if Instant::now() + delay > deadline {
                // Waiting would overrun the budget: the next model may answer now.
                continue 'models;
            }
            tracing::info!(model = %model.name, delay_ms = delay.as_millis() as u64, "retrying");
            tokio::time::sleep(delay).await;
        }
    }
    last
}

/// 429 and 5xx may succeed later or elsewhere; other statuses are the client's problem.
fn retryable_status(status: u16) -> bool {
    status == 429 || status >= 500
}

/// `Retry-After` in seconds (the HTTP-date form is rare from LLM providers and is ignored),
/// or OpenAI's `retry-after-ms`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header("retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Exponential backoff with full jitter, so retries from many requests do not synchronise.
fn backoff(policy: &RetryPolicy, try_on_model: u32) -> Duration {
    let ceiling = policy
        .backoff_initial
        .saturating_mul(2u32.saturating_pow(try_on_model))
        .min(policy.backoff_max);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

/// The body sent upstream: the client's, field for field, with the upstream's model name and,
/// for streams, `stream_options.include_usage` so the provider reports what it bills. Returns
/// whether the usage chunk must be removed again because the client did not ask for it.
fn upstream_body(
    mut body: Value,
    model: &Model,
    endpoint: Endpoint,
    stream: bool,
) -> Result<(Bytes, bool), GatewayError> {
    body["model"] = Value::String(model.upstream_model.clone());
    let mut strip_usage_chunk = false;
    if stream && endpoint != Endpoint::Embeddings {
        let options = &mut body["stream_options"];
        if !options.is_object() {
            *options = Value::Object(serde_json::Map::new());
        }
        strip_usage_chunk = options["include_usage"] != Value::Bool(true);
        options["include_usage"] = Value::Bool(true);
    }
    serde_json::to_vec(&body)
        .map(|bytes| (Bytes::from(bytes), strip_usage_chunk))
        .map_err(|error| GatewayError::Internal(format!("cannot encode the request: {error}")))
}

/// Sends one attempt and waits for the response headers (not the body).
async fn send(
    model: &Model,
    endpoint: Endpoint,
    body: Bytes,
    request_id: &HeaderValue,
    metrics: &Metrics,
) -> Result<reqwest::Response, GatewayError> {
    let upstream = &model.upstream;
    let mut request = upstream
        .client
        .post(upstream.url(endpoint))
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("x-request-id", request_id.clone())
        .body(body);
    if let Some(authorization) = &upstream.authorization {
        request = request.header(AUTHORIZATION, authorization.clone());
    }
    let started = Instant::now();
    let result = tokio::time::timeout(upstream.first_byte_timeout, request.send()).await;
    metrics
        .upstream_duration
        .with_label_values(&[upstream.name.as_str()])
        .observe(started.elapsed().as_secs_f64());
    let (label, outcome) = match result {
        Err(_) => ("timeout", Err(GatewayError::UpstreamTimeout)),
        Ok(Err(error)) if error.is_timeout() => ("timeout", Err(GatewayError::UpstreamTimeout)),
        Ok(Err(error)) => (
            "unreachable",
            Err(GatewayError::UpstreamUnreachable(describe(&error))),
        ),
        Ok(Ok(response)) => (status_label(response.status().as_u16()), Ok(response)),
    };
    metrics
        .upstream_attempts
        .with_label_values(&[upstream.name.as_str(), label])
        .inc();
    outcome
}

fn status_label(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A reqwest error without its URL: the URL is config, but the message goes to clients.
fn describe(error: &reqwest::Error) -> String {
    if error.is_connect() {
        "connection failed".to_owned()
    } else if error.is_request() {
        "request failed".to_owned()
    } else {
        "protocol error".to_owned()
    }
}
