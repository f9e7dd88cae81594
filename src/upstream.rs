//! Talking to providers: one attempt is one HTTP request to one configured model's upstream,
//! with the provider key added and the client's key never forwarded. Timeouts map to 504,
//! connection failures to 502.

use std::time::Instant;

use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use crate::config::Model;
use crate::error::GatewayError;
use crate::meter::record::Endpoint;
use crate::metrics::Metrics;

/// Sends one attempt and waits for the response headers (not the body).
pub async fn send(
    model: &Model,
    endpoint: Endpoint,
    body: Bytes,
    request_id: &HeaderValue,
    metrics: &Metrics,
) -> Result<reqwest::Response, GatewayError> {
    let upstream = &model.upstream;
    let url = format!("{}{}", upstream.base_url, endpoint.upstream_path());
    let mut request = upstream
        .client
        .post(url)
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
