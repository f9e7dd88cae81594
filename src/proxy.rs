//! A proxied request's life, top to bottom: accept (request id, body limit, JSON) →
//! authenticate → admit → route → count input → forward → meter the answer → hand the usage
//! record to rating. Each phase is a call into its own module; this file only orders them and
//! carries the request's facts ([`Exchange`]) from one phase to the next.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Extension;
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyDataStream, BodyExt};
use hyper::body::Incoming;
use serde_json::Value;
use std::future::Future;

use crate::app::App;
use crate::auth::KeyRecord;
use crate::config::{Config, Model};
use crate::error::GatewayError;
use crate::limits::{AlertCrossing, Demand, RateLimitHeaders, Refusal, Ticket};
use crate::meter::answer::Answer;
use crate::meter::record::{Endpoint, MeterEvent, Outcome, TokenUsage, UsageRecord};
use crate::meter::sink::WrittenAck;
use crate::meter::tokenizer::{Encoding, OutputCounter, Tokenizer};
use crate::metrics::status_class;
use crate::money::Money;
use crate::rating::ledger::Durability;
use crate::rating::plan::Rated;
use crate::route::KeyPolicy;
use crate::server::{ClientChoseRequestId, X_REQUEST_ID};
use crate::stream::{Gathered, SseTap};
use crate::upstream;
use tokio::sync::oneshot;

static X_TOLLGATE_MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
static X_TOLLGATE_ROUTE: HeaderName = HeaderName::from_static("x-tollgate-route");

/// The route of a proxied endpoint: every one takes the same path through the gateway.
pub fn endpoint(endpoint: Endpoint) -> MethodRouter<Arc<App>> {
    post(
        move |State(app): State<Arc<App>>,
              client_chose_id: Option<Extension<ClientChoseRequestId>>,
              headers: HeaderMap,
              body: Body| {
            handle(app, endpoint, client_chose_id.is_some(), headers, body)
        },
    )
}

async fn handle(
    app: Arc<App>,
    endpoint: Endpoint,
    client_chose_id: bool,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Set by the server's request-id layer before any handler runs.
    let request_id = headers
        .get(&X_REQUEST_ID)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("req_unknown"));
    let mut exchange = Exchange::accept(app, endpoint, request_id, client_chose_id);
    match proxy(&mut exchange, &headers, body).await {
        Ok(response) => response,
        Err(error) => {
            exchange.reject(&error);
            let mut response = error.into_response();
            // Once a model was chosen, an error says which, as the proxied answers do.
            if !exchange.route_rule.is_empty() {
                exchange.decorate(&mut response);
            }
            response
        }
    }
}

/// The phases, in order. Errors before the upstream answers become gateway errors; from the
/// upstream's answer on, the response is the upstream's.
async fn proxy(
    exchange: &mut Exchange,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let config = exchange.config.clone();
    let key = crate::auth::bearer(headers)
        .and_then(|secret| exchange.app.keys.authenticate(secret))
        .ok_or(GatewayError::InvalidApiKey)?;
    exchange.key = Some(key.clone());
    let bytes = read_body(headers, body, config.server.max_body_bytes).await?;
    let request = parse_request(&bytes)?;
    exchange.requested_model = request.model.clone();
    exchange.streamed = request.stream;

    if !config.knows_model(&request.model) {
        return Err(GatewayError::UnknownModel(request.model));
    }
    if !key.allows_model(&request.model) {
        return Err(GatewayError::ModelNotAllowed(request.model));
    }
    let direct = config.model(&request.model).cloned();
    if direct.is_none() && exchange.endpoint != Endpoint::ChatCompletions {
        // The routing rules judge chat conversations, and the tiers are chat models: a
        // completion or embedding sent to one would be refused by the provider.
        return Err(GatewayError::BadRequest {
            message: format!(
                "`{}` routes chat completions only; name a model for this endpoint",
                request.model
            ),
            param: Some("model"),
        });
    }
    let inline = bytes.len() <= config.server.inline_count_max_bytes;
    // The routing model's prompt is measured with o200k_base, the encoding of every current
    // OpenAI family; it is recounted below if the chosen model uses another.
    let encoding = direct.as_ref().map_or(Encoding::O200kBase, |m| m.encoding);
    let (body, input_tokens) = count_input(
        &exchange.app.tokenizer,
        exchange.endpoint,
        encoding,
        request.body,
        inline,
    )
    .await?;
    exchange.counted.input = input_tokens;

    let candidates = match direct {
        Some(model) => {
            exchange.route_rule = "direct".to_owned();
            vec![model]
        }
        None => exchange.route(&config, &key, &body)?,
    };
    let chosen = candidates[0].clone();
    exchange.model = Some(chosen.clone());
    let body = if chosen.encoding == encoding {
        body
    } else {
        let (body, tokens) = count_input(
            &exchange.app.tokenizer,
            exchange.endpoint,
            chosen.encoding,
            body,
            inline,
        )
        .await?;
        exchange.counted.input = tokens;
        body
    };
    exchange.admit(&key, &candidates, &body)?;

    let attempt = upstream::Attempt {
        endpoint: exchange.endpoint,
        body: &bytes,
        stream: request.stream,
        request_id: &exchange.request_id,
        policy: &config.retry,
        metrics: &exchange.app.metrics,
    };
    let (app, ticket) = (&exchange.app, &mut exchange.ticket);
    let mut admit_fallback = |model: &Model| {
        let Some(ticket) = ticket.as_mut() else {
            return true;
        };
        match app.limiter.fall_back_to(ticket, &model.name) {
            Ok(()) => true,
            Err(refusal) => {
                app.metrics
                    .rejections
                    .with_label_values(&[refusal.reason()])
                    .inc();
                false
            }
        }
    };
    let forwarded = upstream::forward(
        &candidates,
        &attempt,
        &mut exchange.progress,
        &mut admit_fallback,
    )
    .await?;
    exchange.model = Some(forwarded.model);

    if !forwarded.response.status().is_success() {
        return Ok(exchange.pass_through_error(forwarded.response).await);
    }
    // The answer's type decides, not the request's flag: a provider may answer a stream
    // request with one JSON body (embeddings have no streaming at all).
    if request.stream && !is_json(forwarded.response.headers()) {
        return Ok(exchange
            .take()
            .stream(forwarded.response, forwarded.strip_usage_chunk));
    }
    exchange.streamed = false;
    exchange.buffered(forwarded.response).await
}

impl Drop for Exchange {
    /// The client went away while its request was in the gateway (the server dropped the
    /// handler): a provider holding the prompt bills it whether or not anyone reads the answer,
    /// so the request is recorded and that prompt billed as counted, at that model's prices.
    fn drop(&mut self) {
        if !self.settled && self.key.is_some() {
            let billing = self.progress.billing.take();
            let answered = billing.is_some();
            if billing.is_some() {
                self.model = billing;
            }
            self.settle(Ending {
                answered,
                status: 499,
                outcome: Outcome::ClientDisconnected,
                reported: None,
                finish_reason: None,
                ttft: None,
            });
        }
    }
}

/// A provider's error that an OpenAI client could not read — a body that is not JSON (a
/// proxy's HTML page, plain text, nothing) or a redirect we do not follow — as a gateway error
/// in OpenAI's shape. Plain text is quoted, cut to a line: it is usually the reason.
fn unreadable_answer(
    status: StatusCode,
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> Option<GatewayError> {
    let reason = status.canonical_reason().unwrap_or("");
    if status.is_redirection() {
        return Some(GatewayError::UpstreamAnswer {
            status,
            message: format!(
                "the upstream answered {} {reason}, a redirect the gateway does not follow",
                status.as_u16()
            ),
        });
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        return None;
    }
    let plain = content_type
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/plain"));
    let quoted = std::str::from_utf8(body)
        .ok()
        .filter(|_| plain)
        .and_then(|text| text.lines().map(str::trim).find(|line| !line.is_empty()))
        .map(|line| format!(": {}", line.chars().take(200).collect::<String>()))
        .unwrap_or_default();
    Some(GatewayError::UpstreamAnswer {
        status,
        message: format!(
            "the upstream answered {} {reason} without a JSON error{quoted}",
            status.as_u16()
        ),
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("application/json"))
}

struct ParsedRequest {
    body: Value,
    model: String,
    stream: bool,
}

/// The body, refused with 413 before keeping more than the limit (and before any parsing).
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        discard(body, declared).await;
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame
            .map_err(|_| GatewayError::bad_request("the request body could not be read"))?
            .into_data()
        else {
            continue;
        };
        length += data.len();
        if length > limit {
            discard(body, None).await;
            return Err(GatewayError::BodyTooLarge { limit });
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 | 1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// How much of a refused body is still read and dropped, and for how long: a server that
/// closes a connection with unread data resets it, and a client still sending then sees a
/// broken pipe instead of the 413 (as nginx's lingering close avoids). Past either bound the
/// connection is cut.
const DISCARD_MAX_BYTES: u64 = 64 * 1024 * 1024;
const DISCARD_MAX_TIME: Duration = Duration::from_secs(5);

async fn discard(mut body: Body, declared: Option<u64>) {
    if declared.is_some_and(|length| length > DISCARD_MAX_BYTES) {
        return;
    }
    let drain = async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |data| data.len() as u64);
            if read > DISCARD_MAX_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_MAX_TIME, drain).await;
}

fn parse_request(bytes: &[u8]) -> Result<ParsedRequest, GatewayError> {
    let body: Value = serde_json::from_slice(bytes).map_err(|error| {
        GatewayError::bad_request(format!(
            "We could not parse the JSON body of your request: {error}"
        ))
    })?;
    if !body.is_object() {
        return Err(GatewayError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let model = match &body["model"] {
        Value::String(model) if !model.is_empty() => model.clone(),
        Value::Null => {
            return Err(GatewayError::BadRequest {
                message: "you must provide a model parameter".to_owned(),
                param: Some("model"),
            })
        }
        _ => {
            return Err(GatewayError::BadRequest {
                message: "`model` must be a non-empty string".to_owned(),
                param: Some("model"),
            })
        }
    };
    let stream = match &body["stream"] {
        Value::Bool(stream) => *stream,
        Value::Null => false,
        _ => {
            return Err(GatewayError::BadRequest {
                message: "`stream` must be a boolean".to_owned(),
                param: Some("stream"),
            })
        }
    };
    if !matches!(&body["stream_options"], Value::Object(_) | Value::Null) {
        return Err(GatewayError::BadRequest {
            message: "`stream_options` must be an object".to_owned(),
            param: Some("stream_options"),
        });
    }
    Ok(ParsedRequest {
        body,
        model,
        stream,
    })
}

/// Counts the prompt with the served model's encoding. Large prompts are counted on the
/// blocking pool so a megabyte of text never stalls an async worker.
async fn count_input(
    tokenizer: &Tokenizer,
    endpoint: Endpoint,
    encoding: Encoding,
    body: Value,
    inline: bool,
) -> Result<(Value, u64), GatewayError> {
    let count = move |tokenizer: &Tokenizer, body: &Value| match endpoint {
        Endpoint::ChatCompletions => tokenizer.count_chat_prompt(encoding, body),
        Endpoint::Completions => tokenizer.count_completion_prompt(encoding, &body["prompt"]),
        Endpoint::Embeddings => tokenizer.count_embedding_input(encoding, &body["input"]),
    };
    if inline {
        let tokens = count(tokenizer, &body);
        return Ok((body, tokens));
    }
    let tokenizer = *tokenizer;
    tokio::task::spawn_blocking(move || {
        let tokens = count(&tokenizer, &body);
        (body, tokens)
    })
    .await
    .map_err(|error| GatewayError::Internal(format!("token counting failed: {error}")))
}

/// The facts of one request, filled in phase by phase and turned into its usage record when
/// it ends. A request settles exactly once: `settled` guards it.
struct Exchange {
    app: Arc<App>,
    config: Arc<Config>,
    endpoint: Endpoint,
    request_id: HeaderValue,
    client_chose_id: bool,
    accepted: Instant,
    accepted_ms: i64,
    requested_model: String,
    streamed: bool,
    key: Option<Arc<KeyRecord>>,
    ticket: Option<Ticket>,
    rate_headers: RateLimitHeaders,
    model: Option<Arc<Model>>,
    route_rule: String,
    counted: TokenUsage,
    progress: upstream::Progress,
    settled: bool,
}

struct Ending {
    /// The upstream answered with a success status, so its tokens are billable.
    answered: bool,
    status: u16,
    outcome: Outcome,
    reported: Option<TokenUsage>,
    finish_reason: Option<String>,
    ttft: Option<Duration>,
}

impl Exchange {
    fn accept(
        app: Arc<App>,
        endpoint: Endpoint,
        request_id: HeaderValue,
        client_chose_id: bool,
    ) -> Exchange {
        let config = app.config();
        Exchange {
            app,
            config,
            endpoint,
            request_id,
            client_chose_id,
            accepted: Instant::now(),
            accepted_ms: crate::unix_ms(),
            requested_model: String::new(),
            streamed: false,
            key: None,
            ticket: None,
            rate_headers: RateLimitHeaders::default(),
            model: None,
            route_rule: String::new(),
            counted: TokenUsage::default(),
            progress: upstream::Progress::default(),
            settled: false,
        }
    }

    /// Moves the facts out (for a stream body to own), leaving a settled husk behind.
    fn take(&mut self) -> Exchange {
        let taken = Exchange {
            app: self.app.clone(),
            config: self.config.clone(),
            endpoint: self.endpoint,
            request_id: self.request_id.clone(),
            client_chose_id: self.client_chose_id,
            accepted: self.accepted,
            accepted_ms: self.accepted_ms,
            requested_model: std::mem::take(&mut self.requested_model),
            streamed: self.streamed,
            key: self.key.clone(),
            ticket: self.ticket.take(),
            rate_headers: self.rate_headers,
            model: self.model.clone(),
            route_rule: std::mem::take(&mut self.route_rule),
            counted: self.counted,
            progress: std::mem::take(&mut self.progress),
            settled: false,
        };
        self.settled = true;
        taken
    }

    /// Routing for the virtual model: the chosen model first, then its fallbacks.
    fn route(
        &mut self,
        config: &Config,
        key: &KeyRecord,
        body: &Value,
    ) -> Result<Vec<Arc<Model>>, GatewayError> {
        let Some(router) = &config.router else {
            return Err(GatewayError::UnknownModel(self.requested_model.clone()));
        };
        // A key allowed the routing model may be served by any model it picks.
        let allowed_models = key
            .models
            .clone()
            .filter(|list| !list.iter().any(|m| router.is_virtual(m)));
        let policy = KeyPolicy {
            allowed_models,
            ..KeyPolicy::default()
        };
        let decision = router
            .decide(body, self.counted.input, &policy, &mut rand::rng())
            .map_err(|error| GatewayError::ModelNotAllowed(error.to_string()))?;
        self.app
            .metrics
            .route_decisions
            .with_label_values(&[decision.rule.as_str(), decision.tier.as_str()])
            .inc();
        self.route_rule = decision.rule;
        let mut candidates = Vec::with_capacity(1 + decision.fallbacks.len());
        for name in std::iter::once(&decision.model).chain(&decision.fallbacks) {
            if let Some(model) = config.model(name) {
                candidates.push(model.clone());
            }
        }
        if candidates.is_empty() {
            return Err(GatewayError::Internal(
                "the router chose no model".to_owned(),
            ));
        }
        Ok(candidates)
    }

    /// Throttles and budget, before a cent is spent upstream. The budget reservation is the
    /// worst case over every model the request may be served by.
    fn admit(
        &mut self,
        key: &KeyRecord,
        candidates: &[Arc<Model>],
        body: &Value,
    ) -> Result<(), GatewayError> {
        // A body may carry both limits; which one a provider honours varies, so the larger
        // is reserved.
        let requested_output = [&body["max_completion_tokens"], &body["max_tokens"]]
            .into_iter()
            .filter_map(whole_number)
            .max();
        // Legacy completions generate `best_of` answers server-side and bill them all.
        let choices = whole_number(&body["n"])
            .unwrap_or(1)
            .max(whole_number(&body["best_of"]).unwrap_or(1))
            .clamp(1, 128);
        let plan = self.config.plan(key.plan.as_deref());
        let mut demand = Demand::default();
        for model in candidates {
            let output = match self.endpoint {
                Endpoint::Embeddings => 0,
                // Saturating: a wrapped product of a huge `max_tokens` and `n` would reserve
                // next to nothing and let the request past the budget.
                _ => requested_output
                    .unwrap_or(model.max_output_tokens)
                    .saturating_mul(choices),
            };
            let cost = plan.worst_case(
                &model.name,
                &model.tier,
                &model.prices,
                self.counted.input,
                output,
            );
            demand.tokens = demand.tokens.max(self.counted.input.saturating_add(output));
            demand.cost = demand.cost.max(cost);
        }
        let model_name = candidates.first().map_or("", |m| m.name.as_str());
        match self.app.limiter.admit(&key.id, model_name, demand) {
            Ok(ticket) => {
                self.rate_headers = ticket.headers();
                self.ticket = Some(ticket);
                Ok(())
            }
            Err(refusal) => {
                self.rate_headers = self.app.limiter.headers(&key.id, model_name);
                self.app
                    .metrics
                    .rejections
                    .with_label_values(&[refusal.reason()])
                    .inc();
                Err(refusal_error(&refusal, key))
            }
        }
    }

    fn reject(&mut self, error: &GatewayError) {
        if !matches!(
            error,
            GatewayError::RateLimited { .. } | GatewayError::InsufficientQuota { .. }
        ) {
            self.app
                .metrics
                .rejections
                .with_label_values(&[error.code()])
                .inc();
        }
        let outcome = match error {
            GatewayError::UpstreamTimeout | GatewayError::UpstreamUnreachable(_) => {
                Outcome::GatewayError
            }
            _ => Outcome::Rejected,
        };
        self.settle(Ending {
            answered: false,
            status: error.status().as_u16(),
            outcome,
            reported: None,
            finish_reason: None,
            ttft: None,
        });
    }

    /// An upstream error status: the client gets the upstream's status and body as they are,
    /// unless no client could read the body as an error (see [`unreadable_answer`]).
    async fn pass_through_error(&mut self, reply: upstream::Reply) -> Response {
        let status = reply.status();
        let content_type = reply.headers().get(header::CONTENT_TYPE).cloned();
        let retry_after = reply.headers().get(header::RETRY_AFTER).cloned();
        let idle = self.model.as_ref().map(|m| m.upstream.idle_timeout);
        let body = match tokio::time::timeout(
            idle.unwrap_or(Duration::from_secs(30)),
            reply.into_body().collect(),
        )
        .await
        {
            Ok(Ok(body)) => body.to_bytes(),
            _ => Bytes::new(),
        };
        let unreadable = unreadable_answer(status, content_type.as_ref(), &body);
        let mut response = match unreadable {
            Some(error) => error.into_response(),
            None => {
                let mut response = Response::new(Body::from(body));
                *response.status_mut() = status;
                if let Some(content_type) = content_type {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type);
                }
                response
            }
        };
        self.settle(Ending {
            answered: false,
            status: response.status().as_u16(),
            outcome: Outcome::UpstreamError,
            reported: None,
            finish_reason: None,
            ttft: None,
        });
        if let Some(retry_after) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        self.decorate(&mut response);
        response
    }

    /// A non-streamed answer: read whole, usage and output read from it, sent on unchanged.
    async fn buffered(&mut self, reply: upstream::Reply) -> Result<Response, GatewayError> {
        let model = self.served_model()?;
        let content_type = reply.headers().get(header::CONTENT_TYPE).cloned();
        let reading = reply.into_body().collect();
        let body = match tokio::time::timeout(model.upstream.idle_timeout, reading).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(_)) => {
                return Err(GatewayError::UpstreamUnreachable(
                    "the upstream closed the connection mid-answer".to_owned(),
                ))
            }
            Err(_) => return Err(GatewayError::UpstreamTimeout),
        };
        let ttft = self.accepted.elapsed();
        let inline_max = self.config.server.inline_count_max_bytes;
        let (reported, output, finish_reason) = meter_body(
            &self.app.tokenizer,
            &model,
            self.endpoint,
            body.clone(),
            inline_max,
        )
        .await;
        self.counted.output = output;
        let committed = self.settle(Ending {
            answered: true,
            status: 200,
            outcome: Outcome::Completed,
            reported,
            finish_reason,
            ttft: Some(ttft),
        });
        if let Some(committed) = committed {
            // Strict durability: the client sees the answer only once its record is committed.
            if committed.await.is_err() {
                return Err(GatewayError::UsageNotRecorded);
            }
        }
        let mut response = Response::new(Body::from(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            content_type.unwrap_or(HeaderValue::from_static("application/json")),
        );
        self.decorate(&mut response);
        Ok(response)
    }

    fn stream(self, reply: upstream::Reply, strip_usage_chunk: bool) -> Response {
        let idle_timeout = self
            .model
            .as_ref()
            .map_or(Duration::from_secs(120), |m| m.upstream.idle_timeout);
        let mut response_headers = HeaderMap::new();
        response_headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let mut shell = Response::new(Body::empty());
        self.decorate(&mut shell);
        response_headers.extend(shell.headers().clone());
        let body = MeteredStream {
            upstream: reply.into_body().into_data_stream(),
            tap: SseTap::new(strip_usage_chunk),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            first_byte: None,
            strict: self.config.durability == Durability::Strict,
            ended: false,
            failure: None,
            gathered: Gathered::default(),
            yielded: 0,
            held: None,
            exchange: Some(self),
        };
        let mut response = Response::new(Body::from_stream(body));
        *response.headers_mut() = response_headers;
        response
    }

    fn served_model(&self) -> Result<Arc<Model>, GatewayError> {
        self.model
            .clone()
            .ok_or_else(|| GatewayError::Internal("no model chosen".to_owned()))
    }

    /// The gateway's headers on every proxied response.
    fn decorate(&self, response: &mut Response) {
        let headers = response.headers_mut();
        if let Some(model) = &self.model {
            if let Ok(value) = HeaderValue::from_str(&model.name) {
                headers.insert(X_TOLLGATE_MODEL.clone(), value);
            }
        }
        headers.insert(
            X_TOLLGATE_ROUTE.clone(),
            HeaderValue::from_str(&self.route_rule)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
        );
        self.rate_headers.write_to(headers);
    }

    /// The per-key gauges, refreshed whenever one of the key's requests settles.
    fn export_key_gauges(&self) {
        let Some(key) = &self.key else {
            return;
        };
        let metrics = &self.app.metrics;
        let label = [key.name.as_str()];
        if let Some(budget) = self.app.limiter.budget(&key.id) {
            metrics
                .key_spend_usd
                .with_label_values(&label)
                .set(budget.spend_usd.as_f64_usd());
            if budget.budget_usd != crate::limits::UNCAPPED {
                metrics
                    .key_budget_remaining_usd
                    .with_label_values(&label)
                    .set(budget.remaining_usd.as_f64_usd());
                let used = budget.spend_usd.as_f64_usd() / budget.budget_usd.as_f64_usd().max(1e-9);
                metrics
                    .key_budget_used_ratio
                    .with_label_values(&label)
                    .set(used);
            }
        }
        if let Some(requests) = self.rate_headers.requests {
            metrics
                .key_remaining_requests
                .with_label_values(&label)
                .set(requests.remaining as f64);
        }
        if let Some(tokens) = self.rate_headers.tokens {
            metrics
                .key_remaining_tokens
                .with_label_values(&label)
                .set(tokens.remaining as f64);
        }
    }

    /// A budget threshold was crossed: log it, count it, and tell the webhook if configured.
    fn announce(&self, alert: AlertCrossing) {
        let Some(key) = &self.key else {
            return;
        };
        let threshold = alert.threshold_pct.to_string();
        self.app
            .metrics
            .budget_alerts
            .with_label_values(&[threshold.as_str()])
            .inc();
        tracing::warn!(
            key = %key.name,
            threshold_pct = alert.threshold_pct,
            used_pct = alert.used_pct,
            "budget alert"
        );
        let Some(url) = self.config.budget_alerts.webhook.clone() else {
            return;
        };
        let event = serde_json::json!({
            "event": "budget_threshold_crossed",
            "key_id": key.id,
            "key_name": key.name,
            "threshold_pct": alert.threshold_pct,
            "used_pct": alert.used_pct,
            "budget": self.app.budget_view(key),
        });
        let client = self.app.webhooks.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = client.post(url).json(&event).send().await {
                    tracing::error!(error = %error.without_url(), "budget webhook failed");
                }
            });
        }
    }

    /// Ends the request: metrics and its one usage record. Idempotent by construction.
    /// Returns, in strict durability, the receiver that answers once the record is committed.
    fn settle(&mut self, ending: Ending) -> Option<WrittenAck> {
        if self.settled {
            return None;
        }
        self.settled = true;
        let metrics = &self.app.metrics;
        let latency = self.accepted.elapsed();
        let model_label = self.model.as_ref().map_or("none", |m| m.name.as_str());
        let tier_label = self.model.as_ref().map_or("none", |m| m.tier.as_str());
        metrics
            .requests
            .with_label_values(&[
                model_label,
                tier_label,
                self.endpoint.as_str(),
                status_class(ending.status),
            ])
            .inc();
        metrics
            .request_duration
            .with_label_values(&[model_label, if self.streamed { "true" } else { "false" }])
            .observe(latency.as_secs_f64());
        if let (Some(ttft), true) = (ending.ttft, self.streamed) {
            metrics
                .time_to_first_token
                .with_label_values(&[model_label])
                .observe(ttft.as_secs_f64());
        }
        // Only an answered request is billed: providers do not charge for refusals and errors.
        let billed = match ending.answered {
            true => ending.reported.unwrap_or(self.counted),
            false => TokenUsage::default(),
        };
        let (rated, list_cost) = match (&self.key, &self.model) {
            (Some(key), Some(model)) => self.app.rater.rate(
                &key.id,
                self.config.plan(key.plan.as_deref()),
                model,
                billed,
                key.seats,
                self.accepted_ms,
            ),
            _ => (Rated::default(), Money::ZERO),
        };
        if let Some(ticket) = self.ticket.take() {
            let settlement = self
                .app
                .limiter
                .settle(ticket, billed.total(), rated.charge);
            if settlement.overshoot > Money::ZERO {
                metrics
                    .budget_overshoot_usd
                    .inc_by(settlement.overshoot.as_f64_usd());
            }
            for alert in settlement.alerts {
                self.announce(alert);
            }
            if self.config.server.per_key_metrics {
                self.export_key_gauges();
            }
        }
        if self.model.is_some() {
            metrics
                .input_tokens
                .with_label_values(&[model_label])
                .inc_by(billed.input);
            metrics
                .output_tokens
                .with_label_values(&[model_label])
                .inc_by(billed.output);
            metrics
                .cost_usd
                .with_label_values(&[model_label])
                .inc_by(rated.charge.as_f64_usd());
            if let Some(reported) = ending.reported {
                let drift = |ours: u64, theirs: u64, direction: &str| {
                    metrics
                        .token_count_drift
                        .with_label_values(&[model_label, direction])
                        .inc_by(ours.abs_diff(theirs));
                };
                drift(self.counted.input, reported.input, "input");
                drift(self.counted.output, reported.output, "output");
            }
        }
        let header_id = self.request_id.to_str().unwrap_or_default().to_owned();
        let (request_id, client_request_id) = if self.client_chose_id {
            (crate::server::new_request_id(), Some(header_id))
        } else {
            (header_id, None)
        };
        let record = UsageRecord {
            request_id,
            client_request_id,
            started_at_ms: self.accepted_ms,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            key_name: self.key.as_ref().map(|k| k.name.clone()),
            plan: self.key.as_ref().and_then(|k| k.plan.clone()),
            endpoint: self.endpoint,
            requested_model: std::mem::take(&mut self.requested_model),
            served_model: self.model.as_ref().map(|m| m.name.clone()),
            upstream: self.model.as_ref().map(|m| m.upstream.name.clone()),
            tier: self.model.as_ref().map(|m| m.tier.clone()),
            route_rule: Some(self.route_rule.clone()),
            streamed: self.streamed,
            status: ending.status,
            outcome: ending.outcome,
            finish_reason: ending.finish_reason,
            reported: ending.reported,
            counted: self.counted,
            attempts: self.progress.attempts,
            answered: ending.answered,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            ttft_ms: ending
                .ttft
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            charge: rated.charge,
            list_cost,
            micro_credits: rated.micro_credits,
        };
        tracing::info!(
            request_id = %record.request_id,
            key = record.key_name.as_deref().unwrap_or("-"),
            model = record.served_model.as_deref().unwrap_or("-"),
            status = record.status,
            outcome = record.outcome.as_str(),
            input_tokens = billed.input,
            output_tokens = billed.output,
            latency_ms = record.latency_ms,
            "request"
        );
        // A request that never authenticated is not anyone's usage: counting it would let
        // anonymous traffic fill the ledger.
        record.key_id.as_ref()?;
        let event = MeterEvent::Usage(record);
        match self.config.durability {
            Durability::Strict => Some(self.app.usage.submit_acked(event)),
            Durability::Batched => {
                self.app.usage.submit(event);
                None
            }
        }
    }
}

/// A throttle or budget refusal as the client sees it.
/// A count as a client may write it: `4` or `4.0` (a float never truncates a limit down).
fn whole_number(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(|n| n.ceil() as u64)
    })
}

fn refusal_error(refusal: &Refusal, key: &KeyRecord) -> GatewayError {
    match refusal {
        Refusal::RateLimited {
            limit_kind,
            scope,
            retry_after,
        } => {
            let what = match *scope {
                "concurrency" => "concurrent requests".to_owned(),
                "model" => format!("{limit_kind} per minute on this model"),
                _ => format!("{limit_kind} per minute"),
            };
            GatewayError::RateLimited {
                message: format!(
                    "Rate limit reached for {what} on key `{}`. Please try again in {}.",
                    key.name,
                    crate::limits::go_duration(*retry_after)
                ),
                retry_after: *retry_after,
                limit_kind,
            }
        }
        Refusal::InsufficientQuota { remaining, needed } => GatewayError::InsufficientQuota {
            message: format!(
                "Budget exhausted for key `{}`: ${} remaining this period, this request may cost up to ${}.",
                key.name,
                remaining.to_usd_string(),
                needed.to_usd_string()
            ),
        },
    }
}

/// Reads usage, output count and finish reason from a whole JSON answer; tokenizing an answer
/// over `inline_max` bytes runs on the blocking pool, a smaller one costs less than the hop.
async fn meter_body(
    tokenizer: &Tokenizer,
    model: &Model,
    endpoint: Endpoint,
    body: Bytes,
    inline_max: usize,
) -> (Option<TokenUsage>, u64, Option<String>) {
    let tokenizer = *tokenizer;
    let encoding = model.encoding;
    let inline = endpoint == Endpoint::Embeddings || body.len() <= inline_max;
    let work = move || {
        let Some(answer) = Answer::parse(&body) else {
            return (None, 0, None);
        };
        let reported = answer.usage();
        let mut output = OutputCounter::default();
        answer.read_output(&mut output);
        let tokens = match endpoint {
            Endpoint::Embeddings => 0,
            _ => output.finish(&tokenizer, encoding),
        };
        (reported, tokens, output.finish_reason().map(str::to_owned))
    };
    if inline {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or((None, 0, None))
}

/// Scheduler turns a stream waits for events already read upstream before it sends what it
/// has: handing one event over takes hyper's connection task about two turns.
const GATHER_TURNS: u8 = 2;

/// The client's body for a streamed answer. Bytes pass through the tap as they arrive; the
/// request settles exactly once — at the end of the stream, on an upstream error or timeout,
/// or (through `Drop`) when the client goes away, which also drops and so cancels the upstream
/// request.
struct MeteredStream {
    upstream: BodyDataStream<Incoming>,
    tap: SseTap,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    first_byte: Option<Duration>,
    exchange: Option<Exchange>,
    strict: bool,
    ended: bool,
    /// How the upstream failed, told to the client after the bytes gathered before it.
    failure: Option<std::io::Error>,
    gathered: Gathered,
    /// Scheduler turns given since the stream last gathered bytes.
    yielded: u8,
    /// The final bytes, held until the record is committed (strict durability).
    held: Option<(Bytes, oneshot::Receiver<()>)>,
}

impl MeteredStream {
    /// Settles the stream's request. In strict durability the receiver answers once its
    /// record is committed; `None` means there is nothing to wait for.
    fn settle(&mut self, outcome: Outcome, status: u16) -> Option<WrittenAck> {
        let mut exchange = self.exchange.take()?;
        let inline = self.tap.output.text_len() <= exchange.config.server.inline_count_max_bytes;
        let output = std::mem::take(&mut self.tap.output);
        let reported = self.tap.usage;
        let ttft = self.first_byte;
        let tokenizer = exchange.app.tokenizer;
        let settling = exchange.app.settling.clone();
        let mut finish = move || {
            if let Some(model) = &exchange.model {
                exchange.counted.output = output.finish(&tokenizer, model.encoding);
            }
            let finish_reason = output.finish_reason().map(str::to_owned);
            exchange.settle(Ending {
                answered: true,
                status,
                outcome,
                reported,
                finish_reason,
                ttft,
            })
        };
        // Counting a long answer can take milliseconds, which must not happen on an async
        // worker; a short one is counted here, saving two thread hops per request.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !inline => {
                let (durable, durable_rx) = oneshot::channel();
                let awaiting = runtime.clone();
                settling.spawn_blocking_on(
                    move || match finish() {
                        // The commit is awaited on the runtime: a ledger retrying a failed
                        // write for seconds must not hold a blocking thread per stream.
                        Some(committed) => {
                            awaiting.spawn(async move {
                                if committed.await.is_ok() {
                                    let _ = durable.send(());
                                }
                            });
                        }
                        None => {
                            let _ = durable.send(());
                        }
                    },
                    &runtime,
                );
                Some(durable_rx)
            }
            _ => finish(),
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some((bytes, durable)) = &mut this.held {
                // Strict durability: the last event waits for its record's commit, and is never
                // sent when the record could not be committed (the client sees a cut stream).
                let Poll::Ready(written) = Pin::new(durable).poll(cx) else {
                    return Poll::Pending;
                };
                let bytes = std::mem::take(bytes);
                this.held = None;
                if written.is_err() {
                    this.ended = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "the usage record could not be committed",
                    ))));
                }
                return Poll::Ready((!bytes.is_empty()).then_some(Ok(bytes)));
            }
            if this.ended {
                return Poll::Ready(this.failure.take().map(Err));
            }
            match Pin::new(&mut this.upstream).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    let out = this.tap.feed(chunk);
                    if out.is_empty() {
                        continue;
                    }
                    if this.first_byte.is_none() {
                        this.first_byte = this.exchange.as_ref().map(|e| e.accepted.elapsed());
                    }
                    this.gathered.push(out);
                    this.yielded = 0;
                    if this.tap.saw_done && this.strict {
                        let out = this.gathered.take();
                        if let Some(durable) = this.settle(Outcome::Completed, 200) {
                            this.held = Some((out, durable));
                            continue;
                        }
                        return Poll::Ready(Some(Ok(out)));
                    }
                    if this.gathered.len() >= Gathered::FLUSH_BYTES {
                        return Poll::Ready(Some(Ok(this.gathered.take())));
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    this.ended = true;
                    this.settle(Outcome::GatewayError, 502);
                    let failure = std::io::Error::other("the upstream stream was cut");
                    if this.gathered.is_empty() {
                        return Poll::Ready(Some(Err(failure)));
                    }
                    this.failure = Some(failure);
                    return Poll::Ready(Some(Ok(this.gathered.take())));
                }
                Poll::Ready(None) => {
                    // A provider may end without `[DONE]`: the body's end is then the end the
                    // client sees, and strict durability holds it back the same way.
                    this.ended = true;
                    let out = this.gathered.take();
                    let durable = this.settle(Outcome::Completed, 200);
                    if let (true, Some(durable)) = (this.strict, durable) {
                        this.held = Some((out, durable));
                        continue;
                    }
                    return Poll::Ready((!out.is_empty()).then_some(Ok(out)));
                }
                Poll::Pending if !this.gathered.is_empty() => {
                    if this.yielded < GATHER_TURNS {
                        // The upstream connection's task often holds more events it already
                        // read; a turn of the scheduler or two lets it hand them over, so they
                        // leave in the same write. When the turns bring nothing, send.
                        this.yielded += 1;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    this.yielded = 0;
                    return Poll::Ready(Some(Ok(this.gathered.take())));
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.ended = true;
                        this.settle(Outcome::GatewayError, 504);
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "the upstream stream went idle",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    /// The client went away before the end: what was sent is still metered.
    fn drop(&mut self) {
        let _ = self.settle(Outcome::ClientDisconnected, 499);
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, content_type: &'static str, body: &str) -> Option<(u16, Value)> {
        let status = StatusCode::from_u16(status).unwrap();
        let content_type = HeaderValue::from_static(content_type);
        unreadable_answer(status, Some(&content_type), body.as_bytes())
            .map(|error| (error.status().as_u16(), error.body()))
    }

    #[test]
    fn provider_json_errors_pass_and_the_rest_become_openai_errors() {
        let openai = r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#;
        assert_eq!(answer(400, "application/json", openai), None);
        assert_eq!(
            answer(500, "application/json", r#"{"object":"error"}"#),
            None
        );

        let (status, body) = answer(500, "text/plain", "\n oops: database down \nmore").unwrap();
        assert_eq!(status, 500);
        assert_eq!(
            body["error"]["message"],
            "the upstream answered 500 Internal Server Error without a JSON error: oops: database down"
        );
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "upstream_error");

        let (status, body) = answer(503, "text/html", "<html>busy</html>").unwrap();
        assert_eq!(status, 503);
        assert_eq!(
            body["error"]["message"],
            "the upstream answered 503 Service Unavailable without a JSON error"
        );
        let (status, body) = answer(404, "application/json", "").unwrap();
        assert_eq!(
            (status, body["error"]["type"].as_str()),
            (404, Some("invalid_request_error"))
        );

        let (status, body) = answer(302, "text/html", "").unwrap();
        assert_eq!(status, 502);
        assert_eq!(
            body["error"]["message"],
            "the upstream answered 302 Found, a redirect the gateway does not follow"
        );
    }
}
