//! Talking to providers. One attempt is one HTTP request to one configured model's upstream,
//! with the provider key added and the client's key never forwarded; [`forward`] runs the
//! attempts: retries with jittered backoff on the same model, then fallback along the
//! candidate list, all before the first byte reaches the client and within a time budget.
//! Timeouts map to 504, connection failures to 502.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::header::{HeaderValue, CONTENT_TYPE};
use hyper::http::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use serde_json::value::RawValue;

mod connections;

pub use connections::Connections;

use crate::api::Endpoint;
use crate::api::X_REQUEST_ID;
use crate::config::{Model, RetryPolicy, Upstream, UpstreamKind};
use crate::error::GatewayError;
use crate::json::Members;
use crate::metrics::Metrics;
use crate::state::FallbackGate;

/// The pooled HTTP/1.1 and HTTP/2 client (rustls, Mozilla's roots) requests to providers go
/// through. hyper's own client rather than reqwest: reqwest re-parsed each request's URL for
/// its redirect policy even with redirects off, a sixteenth of the gateway's instructions.
pub type ProviderClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A provider's answer, its body not yet read.
pub type Reply = hyper::http::Response<hyper::body::Incoming>;

/// A client for one upstream. Redirects are never followed: a provider's redirect must not
/// take our provider key elsewhere.
pub fn provider_client(connect_timeout: Duration) -> ProviderClient {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// The upstream answer that will be sent to the client (success or the last error status).
pub struct Forwarded {
    pub model: Arc<Model>,
    pub response: Reply,
    pub strip_usage_chunk: bool,
}

/// Everything [`forward`] needs besides the candidates.
pub struct Attempt<'a> {
    pub endpoint: Endpoint,
    /// The client's body as received (already parsed and checked to be an object); for a
    /// Messages request, the chat completion it amounts to.
    pub body: &'a Bytes,
    /// A Messages request as the client sent it, for models whose upstream speaks that API.
    pub messages: Option<&'a Bytes>,
    /// The client's headers, of which Anthropic's version and beta flags reach an `anthropic`
    /// upstream.
    pub client_headers: &'a hyper::http::HeaderMap,
    /// Whether the body is small enough to splice on the serving lane.
    pub inline: bool,
    pub stream: bool,
    /// The model the body names, when it names no top-level member twice: a model whose
    /// upstream knows it by this name is then sent the body as it came.
    pub unique_members_model: Option<&'a str>,
    pub request_id: &'a HeaderValue,
    pub policy: &'a RetryPolicy,
    pub metrics: &'a Metrics,
}

/// How far forwarding got, kept by the caller so that a request abandoned part-way (the client
/// left) is recorded truthfully.
#[derive(Default)]
pub struct Progress {
    /// Every request sent, for the usage record.
    pub attempts: u32,
    /// The model whose provider holds the prompt and will bill it: set while a request is out
    /// and after a success status, cleared when an attempt fails (providers bill no errors).
    pub billing: Option<Arc<Model>>,
}

/// Tries `candidates` in order, noting its progress in `progress`; a fallback is tried only
/// when `fallback_gate` lets it (its own throttles). On exhaustion the last upstream error
/// status is returned as the answer (it passes through to the client), or the last gateway
/// error when no upstream ever answered.
pub async fn forward(
    candidates: &[Arc<Model>],
    attempt: &Attempt<'_>,
    progress: &mut Progress,
    fallback_gate: &mut FallbackGate<'_>,
) -> Result<Forwarded, GatewayError> {
    let deadline = Instant::now() + attempt.policy.budget;
    let mut last: Result<Forwarded, GatewayError> = Err(GatewayError::UpstreamUnreachable(
        "no upstream to try".to_owned(),
    ));
    'models: for (index, model) in candidates.iter().enumerate() {
        if index > 0 {
            if !fallback_gate.admit(model).await {
                tracing::warn!(model = %model.name, "fallback skipped: its throttle is full");
                continue;
            }
            tracing::warn!(model = %model.name, "falling back");
            attempt
                .metrics
                .fallbacks
                .with_label_values(&[model.name.as_str()])
                .inc();
        }
        let speaks = match attempt.endpoint {
            Endpoint::ChatCompletions | Endpoint::Messages => true,
            _ => model.upstream.kind == UpstreamKind::Openai,
        };
        if !speaks {
            last = Err(GatewayError::BadRequest {
                message: format!(
                    "the model `{}` is served through Anthropic's Messages API: send chat completions or /v1/messages",
                    model.name
                ),
                param: Some("model"),
            });
            continue;
        }
        let (body, strip_usage_chunk) = splice(attempt, model).await?;
        for try_on_model in 0..attempt.policy.attempts_per_model {
            if progress.attempts >= attempt.policy.max_attempts {
                break 'models;
            }
            progress.attempts += 1;
            progress.billing = Some(model.clone());
            let result = send(model, attempt, body.clone()).await;
            if !result.as_ref().is_ok_and(|r| r.status().is_success()) {
                progress.billing = None;
            }
            let retry_after = match &result {
                // The provider refused the gateway's own key: no retry here can succeed, but
                // another model's provider may.
                Ok(response) if matches!(response.status().as_u16(), 401 | 403) => {
                    last = result.map(|response| Forwarded {
                        model: model.clone(),
                        response,
                        strip_usage_chunk,
                    });
                    continue 'models;
                }
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
fn retry_after(headers: &hyper::http::HeaderMap) -> Option<Duration> {
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

/// [`upstream_body`] for `model`, on the blocking pool for a large body.
async fn splice(attempt: &Attempt<'_>, model: &Model) -> Result<(Bytes, bool), GatewayError> {
    if model.upstream.kind == UpstreamKind::Anthropic {
        // Anthropic streams always carry their usage: nothing to ask for.
        return match attempt.messages {
            Some(messages) => {
                upstream_body(messages, &model.upstream_model, Endpoint::Messages, false)
            }
            None => crate::anthropic::messages_request(
                attempt.body,
                &model.upstream_model,
                model.max_output_tokens,
            )
            .map(|body| (body, false)),
        };
    }
    let unchanged = !adds_usage_option(attempt.endpoint, attempt.stream)
        && attempt.unique_members_model == Some(model.upstream_model.as_str());
    if unchanged {
        return Ok((attempt.body.clone(), false));
    }
    if attempt.inline {
        return upstream_body(
            attempt.body,
            &model.upstream_model,
            attempt.endpoint,
            attempt.stream,
        );
    }
    let (client, upstream_model) = (attempt.body.clone(), model.upstream_model.clone());
    let (endpoint, stream) = (attempt.endpoint, attempt.stream);
    tokio::task::spawn_blocking(move || upstream_body(&client, &upstream_model, endpoint, stream))
        .await
        .map_err(|error| GatewayError::Internal(format!("cannot encode the request: {error}")))?
}

/// The body sent upstream: the client's bytes, member for member and in the client's order,
/// with the upstream's model name and, for streams, `stream_options.include_usage` (in place,
/// the client's other options kept as written) so the provider reports what it bills. Values
/// are copied as they arrived, never re-encoded, so numbers, escapes and fields this gateway
/// does not know reach the provider unchanged. Returns whether the usage chunk must be removed
/// again because the client did not ask for it.
pub(crate) fn upstream_body(
    client: &[u8],
    upstream_model: &str,
    endpoint: Endpoint,
    stream: bool,
) -> Result<(Bytes, bool), GatewayError> {
    let encode_error = |error: serde_json::Error| {
        GatewayError::Internal(format!("cannot encode the request: {error}"))
    };
    let members: Members = crate::json::from_slice(client).map_err(encode_error)?;
    let usage_option = adds_usage_option(endpoint, stream);
    let mut body = Vec::with_capacity(client.len() + upstream_model.len() + 48);
    body.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut body, upstream_model).map_err(encode_error)?;
    let mut strip_usage_chunk = false;
    let mut asked_for_usage = false;
    for (name, value) in members.distinct() {
        if name == "model" {
            continue;
        }
        if usage_option && name == "stream_options" {
            asked_for_usage = true;
            push_name(&mut body, name).map_err(encode_error)?;
            strip_usage_chunk = !with_usage(&mut body, value).map_err(encode_error)?;
        } else {
            push_member(&mut body, name, value).map_err(encode_error)?;
        }
    }
    if usage_option && !asked_for_usage {
        body.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
        strip_usage_chunk = true;
    }
    body.push(b'}');
    Ok((Bytes::from(body), strip_usage_chunk))
}

/// Whether a request goes upstream with `stream_options.include_usage` set. Responses streams
/// always end with their usage.
fn adds_usage_option(endpoint: Endpoint, stream: bool) -> bool {
    stream
        && matches!(
            endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Messages
        )
}

/// Writes the client's `stream_options` (an object or null, checked on arrival) with
/// `include_usage` set and its other members as written. Returns whether the client had asked
/// for usage itself.
fn with_usage(body: &mut Vec<u8>, options: &RawValue) -> Result<bool, serde_json::Error> {
    let members = match options.get() {
        "null" => Members::default(),
        text => serde_json::from_str(text)?,
    };
    let mut asked = false;
    body.extend_from_slice(b"{\"include_usage\":true");
    for (name, value) in members.distinct() {
        if name == "include_usage" {
            asked = value.get() == "true";
            continue;
        }
        push_member(body, name, value)?;
    }
    body.push(b'}');
    Ok(asked)
}

/// `,"name":` then the value as the client wrote it.
fn push_member(body: &mut Vec<u8>, name: &str, value: &RawValue) -> Result<(), serde_json::Error> {
    push_name(body, name)?;
    body.extend_from_slice(value.get().as_bytes());
    Ok(())
}

fn push_name(body: &mut Vec<u8>, name: &str) -> Result<(), serde_json::Error> {
    body.push(b',');
    serde_json::to_writer(&mut *body, name)?;
    body.push(b':');
    Ok(())
}

/// Sends one attempt and waits for the response headers (not the body).
async fn send(model: &Model, attempt: &Attempt<'_>, body: Bytes) -> Result<Reply, GatewayError> {
    let metrics = attempt.metrics;
    let upstream = &model.upstream;
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = upstream.uri(attempt.endpoint);
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_REQUEST_ID.clone(), attempt.request_id.clone());
    if let Some((name, value)) = &upstream.credentials {
        headers.insert(name.clone(), value.clone());
    }
    if upstream.kind == UpstreamKind::Anthropic {
        let version = attempt
            .client_headers
            .get("anthropic-version")
            .unwrap_or(&upstream.anthropic_version);
        headers.insert("anthropic-version", version.clone());
        if let Some(beta) = attempt.client_headers.get("anthropic-beta") {
            headers.insert("anthropic-beta", beta.clone());
        }
    }
    let started = Instant::now();
    let result = exchange(upstream, request).await;
    let hot = metrics.hot();
    hot.upstream_duration
        .with_label_values(&[upstream.name.as_str()])
        .observe(started.elapsed().as_secs_f64());
    let (label, outcome) = match result {
        Err(GatewayError::UpstreamTimeout) => ("timeout", Err(GatewayError::UpstreamTimeout)),
        Err(error) => ("unreachable", Err(error)),
        Ok(response) => (status_label(response.status().as_u16()), Ok(response)),
    };
    hot.upstream_attempts
        .with_label_values(&[upstream.name.as_str(), label])
        .inc();
    outcome
}

/// A request about something the provider stores (a Responses API response, by its path
/// under the upstream's base URL), without a body; not retried, not metered.
pub async fn relay(model: &Model, method: Method, path: &str) -> Result<Reply, GatewayError> {
    let upstream = &model.upstream;
    let uri: hyper::http::Uri = format!("{}{path}", upstream.base_url)
        .parse()
        .map_err(|_| GatewayError::bad_request("the id is not valid in a URL"))?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    if let Some((name, value)) = &upstream.credentials {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    exchange(upstream, request).await
}

/// Sends a request on this lane's own connection to a plain-HTTP upstream, or through the
/// pooled client to a TLS one, and waits for the response head, at most the upstream's
/// first-byte timeout. A connect timeout is a timeout (504), as a silent provider is; any
/// other failure leaves the upstream unreachable.
async fn exchange(
    upstream: &Upstream,
    request: Request<Full<Bytes>>,
) -> Result<Reply, GatewayError> {
    let sent = async {
        if let Some(connections) = upstream.connections() {
            return connections.send(request).await;
        }
        match upstream.client().request(request).await {
            Ok(response) => Ok(response),
            Err(error) if timed_out(&error) => Err(GatewayError::UpstreamTimeout),
            Err(error) if error.is_connect() => Err(unreachable(CONNECT_FAILED)),
            Err(_) => Err(unreachable(PROTOCOL_ERROR)),
        }
    };
    tokio::time::timeout(upstream.first_byte_timeout, sent)
        .await
        .unwrap_or(Err(GatewayError::UpstreamTimeout))
}

/// Only the kind of failure reaches clients: an error's own text names the provider's
/// address, which is config.
const CONNECT_FAILED: &str = "connection failed";
const PROTOCOL_ERROR: &str = "protocol error";

fn unreachable(kind: &str) -> GatewayError {
    GatewayError::UpstreamUnreachable(kind.to_owned())
}

fn status_label(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A connect timeout is answered as a timeout (504), as a silent provider is.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |error| error.source()).any(|error| {
        error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn rewrite(client: &str, endpoint: Endpoint, stream: bool) -> (String, bool) {
        let (body, strip) = upstream_body(client.as_bytes(), "gpt-4o-2024-08-06", endpoint, stream)
            .expect("a JSON object");
        (String::from_utf8(body.to_vec()).unwrap(), strip)
    }

    #[test]
    fn members_reach_the_provider_as_the_client_wrote_them() {
        let client = r#"{ "messages": [{"role": "user", "content": "caf\u00e9 \"x\""}],
            "model" : "auto", "temperature": 1.0, "seed": 123456789012345678901234567890,
            "logit_bias": {"50256": -100}, "x_\u0041": null }"#;
        let (body, strip) = rewrite(client, Endpoint::ChatCompletions, false);
        assert_eq!(
            body,
            r#"{"model":"gpt-4o-2024-08-06","messages":[{"role": "user", "content": "caf\u00e9 \"x\""}],"temperature":1.0,"seed":123456789012345678901234567890,"logit_bias":{"50256": -100},"x_A":null}"#
        );
        assert!(!strip);
    }

    #[test]
    fn a_repeated_member_is_sent_once_as_its_last_value() {
        let (body, _) = rewrite(
            r#"{"model":"a","max_tokens":5,"model":"b","max_tokens":7}"#,
            Endpoint::ChatCompletions,
            false,
        );
        assert_eq!(body, r#"{"model":"gpt-4o-2024-08-06","max_tokens":7}"#);
    }

    /// Hostile input: half a million distinct members (and repeats among them) used to take
    /// a pairwise scan, minutes of a serving lane; it is one pass now.
    #[test]
    fn a_body_of_many_members_is_rewritten_in_one_pass() {
        let mut client = String::from(r#"{"model":"m""#);
        for i in 0..500_000 {
            client.push_str(&format!(r#","x{i}":{i}"#));
        }
        client.push_str(r#","x7":"last","stream_options":{"include_usage":false}}"#);
        let (body, strip) = rewrite(&client, Endpoint::ChatCompletions, true);
        assert!(strip);
        let sent: serde_json::Map<String, Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(sent.len(), 500_000 + 2);
        assert_eq!(sent["x7"], "last");
        assert_eq!(sent["x499999"], 499_999);
        assert!(body.ends_with(r#","x7":"last","stream_options":{"include_usage":true}}"#));
    }

    #[test]
    fn streams_ask_for_usage_and_keep_the_clients_other_options() {
        let (body, strip) = rewrite(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false}}"#,
            Endpoint::ChatCompletions,
            true,
        );
        let sent: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"model": "gpt-4o-2024-08-06", "stream": true,
                "stream_options": {"include_usage": true, "include_obfuscation": false}})
        );
        assert!(strip, "the client did not ask for the usage chunk");

        let (body, strip) = rewrite(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            Endpoint::Completions,
            true,
        );
        assert_eq!(
            body,
            r#"{"model":"gpt-4o-2024-08-06","stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert!(!strip);
    }

    #[test]
    fn stream_options_change_in_place_and_only_in_include_usage() {
        let (body, strip) = rewrite(
            r#"{"model":"m","stream_options":{"x":1.50,"include_usage":false,"s":"caf\u00e9"},"stream":true}"#,
            Endpoint::ChatCompletions,
            true,
        );
        assert_eq!(
            body,
            r#"{"model":"gpt-4o-2024-08-06","stream_options":{"include_usage":true,"x":1.50,"s":"caf\u00e9"},"stream":true}"#
        );
        assert!(strip);
        let (body, strip) = rewrite(
            r#"{"model":"m","stream_options":null,"stream":true}"#,
            Endpoint::ChatCompletions,
            true,
        );
        assert_eq!(
            body,
            r#"{"model":"gpt-4o-2024-08-06","stream_options":{"include_usage":true},"stream":true}"#
        );
        assert!(strip);
    }

    #[test]
    fn stream_options_are_left_alone_where_usage_is_not_streamed() {
        let client = r#"{"model":"m","input":"hi","stream_options":{"include_usage":false}}"#;
        let expected = r#"{"model":"gpt-4o-2024-08-06","input":"hi","stream_options":{"include_usage":false}}"#;
        assert_eq!(
            rewrite(client, Endpoint::Embeddings, true),
            (expected.to_owned(), false)
        );
        assert_eq!(
            rewrite(client, Endpoint::ChatCompletions, false),
            (expected.to_owned(), false)
        );
    }
}
