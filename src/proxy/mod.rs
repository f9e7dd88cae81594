//! A proxied request's life, top to bottom: accept (request id, body limit, JSON) →
//! authenticate → admit → route → count input → forward → meter the answer → hand the usage
//! record to rating. Each phase is a call into its own module; this file only orders them and
//! carries the request's facts ([`Exchange`]) from one phase to the next.

mod body;
mod metered;
mod models;
pub(crate) mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::api::{
    ClientChoseRequestId, Endpoint, X_REQUEST_ID, X_TOLLGATE_MODEL, X_TOLLGATE_ROUTE,
};
use crate::app::App;
use crate::auth::group::{GroupRecord, Levels};
use crate::auth::KeyRecord;
use crate::config::{Config, Model};
use crate::error::GatewayError;
use crate::limits::{BudgetPeriod, Demand, Limit, RateLimitHeaders, Refusal};
use crate::meter::answer::Answer;
use crate::meter::prompt::ChatRequest;
use crate::meter::record::{Name, Outcome, TokenUsage};
use crate::meter::tokenizer::{Encoding, OutputCounter, Tokenizer};
use crate::money::Money;
use crate::route::{Decision, KeyPolicy, RouteError};
use crate::state::{FallbackGate, Pass, Refused};
use crate::upstream;
use body::{parse_chat_request, parse_request, read_body, within, RequestBody};
use metered::MeteredStream;
pub use models::{model, models};
use settle::Ending;

/// The route of a proxied endpoint: every one takes the same path through the gateway.
pub fn endpoint(endpoint: Endpoint) -> MethodRouter<Arc<App>> {
    post(
        move |State(app): State<Arc<App>>, request: axum::extract::Request| {
            serve(app, endpoint, request)
        },
    )
}

/// One request to a proxied endpoint, whole: the client listener calls this directly for
/// them (see `server::Routes`), the router through [`endpoint`].
pub async fn serve(app: Arc<App>, endpoint: Endpoint, request: axum::extract::Request) -> Response {
    // The whole request, taken apart here: axum's `HeaderMap` extractor would copy the headers.
    let (parts, body) = request.into_parts();
    let client_chose_id = parts.extensions.get::<ClientChoseRequestId>().is_some();
    handle(app, endpoint, client_chose_id, parts.headers, body).await
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
    let response = match proxy(&mut exchange, &headers, body).await {
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
    };
    let served = exchange.model.as_deref();
    let native =
        served.is_some_and(|model| model.upstream.kind == crate::config::UpstreamKind::Anthropic);
    let model = served.map_or("", |model| model.name.as_str());
    match endpoint {
        Endpoint::Messages => {
            crate::anthropic::to_messages(response, model, exchange.counted.input, native).await
        }
        Endpoint::ChatCompletions if native => {
            crate::anthropic::to_chat_answer(response, model, exchange.asks_usage).await
        }
        _ => response,
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
    let secret = match exchange.endpoint {
        Endpoint::Messages => crate::anthropic::secret(headers),
        _ => crate::auth::bearer(headers),
    };
    let key = secret
        .and_then(|secret| exchange.app.keys.authenticate(secret))
        .ok_or(GatewayError::InvalidApiKey)?;
    exchange.key = Some(key.clone());
    let bytes = read_body(
        headers,
        body,
        config.server.max_body_bytes,
        config.server.body_idle_timeout,
    )
    .await?;
    // A Messages request takes chat's path as the chat completion it amounts to; a model whose
    // upstream speaks Messages is sent the client's own request.
    let (bytes, messages) = match exchange.endpoint {
        Endpoint::Messages => (crate::anthropic::to_chat(&bytes)?, Some(bytes)),
        _ => (bytes, None),
    };
    // A large body is parsed, counted, routed and spliced on the blocking pool: on the serving
    // lane its work would delay every other request there.
    let inline = bytes.len() <= config.server.inline_count_max_bytes;
    let endpoint = exchange.endpoint;
    let (request, previous_response) =
        if inline && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Messages) {
            (parse_chat_request(&bytes)?.map(RequestBody::Chat), None)
        } else {
            let parsing = bytes.clone();
            off_lane(inline, move || {
                let mut request = parse_request(&parsing)?;
                let mut previous = None;
                // Read once as the chat it amounts to: counting, routing and the reservation
                // read that.
                if endpoint == Endpoint::Responses {
                    crate::responses::check_request(&request.body)?;
                    previous = request.body["previous_response_id"]
                        .as_str()
                        .map(str::to_owned);
                    request.body = crate::responses::as_chat(&request.body);
                }
                Ok::<_, GatewayError>((request.map(RequestBody::Value), previous))
            })
            .await??
        };
    exchange.requested_model = request.model.clone();
    exchange.streamed = request.stream;
    exchange.asks_usage = request
        .body
        .member("stream_options")
        .is_some_and(|options| options["include_usage"] == true);

    if !config.knows_model(&request.model) {
        return Err(GatewayError::UnknownModel(request.model));
    }
    if !key.allows_model(&request.model) {
        return Err(GatewayError::ModelNotAllowed(request.model));
    }
    // A conversation continued from a stored response is this key's, and unless the client
    // names a model it stays with the model that stored it: routing must not move it to
    // another provider, which does not hold the response.
    let continued = match &previous_response {
        Some(previous) => {
            Some(crate::responses::continued(&exchange.app, previous, &key.id).await?)
        }
        None => None,
    };
    exchange.carried_input = continued.as_ref().map_or(0, |c| c.context_tokens);
    let continued = continued.and_then(|c| c.model);
    if let Some(model) = continued.as_ref().filter(|m| !key.allows_model(&m.name)) {
        return Err(GatewayError::ModelNotAllowed(model.name.clone()));
    }
    let named = config.model(&request.model).cloned();
    let direct_rule = if named.is_some() {
        "direct"
    } else {
        "previous_response"
    };
    let direct = named.or(continued);
    let routable = matches!(
        exchange.endpoint,
        Endpoint::ChatCompletions | Endpoint::Responses | Endpoint::Messages
    );
    if direct.is_none() && !routable {
        // The routing rules judge conversations, and the tiers are chat models: a completion
        // or embedding sent to one would be refused by the provider.
        return Err(GatewayError::BadRequest {
            message: format!(
                "`{}` routes chat completions only; name a model for this endpoint",
                request.model
            ),
            param: Some("model"),
        });
    }
    // The routing model's prompt is measured with o200k_base, the encoding of every current
    // OpenAI family; it is recounted below if the chosen model uses another.
    let encoding = direct.as_ref().map_or(Encoding::O200kBase, |m| m.encoding);
    let (mut body, input_tokens) = count_input(
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
            exchange.route_rule = direct_rule.to_owned();
            vec![model]
        }
        None => {
            let decided = match body {
                RequestBody::Chat(ref chat) => {
                    route_decision(&config, key.models.clone(), chat, input_tokens)
                }
                RequestBody::Value(value) => {
                    let (decided, value) =
                        decide_route(&config, key.models.clone(), value, input_tokens, inline)
                            .await?;
                    body = RequestBody::Value(value);
                    decided
                }
            };
            let decided = decided
                .ok_or_else(|| GatewayError::UnknownModel(exchange.requested_model.clone()))?;
            exchange.route(&config, decided)?
        }
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
    exchange.admit(&key, &candidates, &body).await?;

    let attempt = upstream::Attempt {
        endpoint: exchange.endpoint,
        body: &bytes,
        messages: messages.as_ref(),
        client_headers: headers,
        inline,
        stream: request.stream,
        unique_members_model: (!request.repeats_members).then_some(request.model.as_str()),
        request_id: &exchange.request_id,
        policy: &config.retry,
        metrics: &exchange.app.metrics,
    };
    let mut gate = FallbackGate {
        admission: &exchange.app.admission,
        pass: exchange.pass.as_mut(),
        metrics: &exchange.app.metrics,
    };
    let forwarded =
        upstream::forward(&candidates, &attempt, &mut exchange.progress, &mut gate).await?;
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
                response_id: None,
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

/// Counts the prompt with the served model's encoding. Large prompts are counted on the
/// blocking pool so a megabyte of text never stalls an async worker.
async fn count_input<'a>(
    tokenizer: &Tokenizer,
    endpoint: Endpoint,
    encoding: Encoding,
    body: RequestBody<'a>,
    inline: bool,
) -> Result<(RequestBody<'a>, u64), GatewayError> {
    let body = match body {
        RequestBody::Chat(chat) => {
            let tokens = tokenizer.count_chat_prompt(encoding, &chat);
            return Ok((RequestBody::Chat(chat), tokens));
        }
        RequestBody::Value(body) => body,
    };
    let count = move |tokenizer: &Tokenizer, body: &Value| match endpoint {
        // A Responses or Messages request is already the chat it amounts to.
        Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses => {
            tokenizer.count_chat_prompt(encoding, body)
        }
        Endpoint::Completions => tokenizer.count_completion_prompt(encoding, &body["prompt"]),
        Endpoint::Embeddings => tokenizer.count_embedding_input(encoding, &body["input"]),
    };
    if inline {
        let tokens = count(tokenizer, &body);
        return Ok((RequestBody::Value(body), tokens));
    }
    let tokenizer = *tokenizer;
    tokio::task::spawn_blocking(move || {
        let tokens = count(&tokenizer, &body);
        (RequestBody::Value(body), tokens)
    })
    .await
    .map_err(|error| GatewayError::Internal(format!("token counting failed: {error}")))
}

/// Runs `work` here, or on the blocking pool when it is not `inline`.
async fn off_lane<T: Send + 'static>(
    inline: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, GatewayError> {
    if inline {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| GatewayError::Internal(format!("request work failed: {error}")))
}

/// The router's decision for a request to the virtual model (`None` without a router).
fn route_decision(
    config: &Config,
    key_models: Option<Vec<String>>,
    body: &impl ChatRequest,
    prompt_tokens: u64,
) -> Option<Result<Decision, RouteError>> {
    config.router.as_ref().map(|router| {
        // A key allowed the routing model may be served by any model it picks.
        let policy = KeyPolicy {
            allowed_models: key_models.filter(|list| !list.iter().any(|m| router.is_virtual(m))),
            ..KeyPolicy::default()
        };
        router.decide(body, prompt_tokens, &policy, &mut rand::rng())
    })
}

/// [`route_decision`], made off the lane for a large body (its text detectors read up to
/// 64 KiB); the body comes back with it.
async fn decide_route(
    config: &Arc<Config>,
    key_models: Option<Vec<String>>,
    body: Value,
    prompt_tokens: u64,
    inline: bool,
) -> Result<(Option<Result<Decision, RouteError>>, Value), GatewayError> {
    let config = config.clone();
    off_lane(inline, move || {
        let decided = route_decision(&config, key_models, &body, prompt_tokens);
        (decided, body)
    })
    .await
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
    /// The client asked for a stream's usage chunk (`stream_options.include_usage`).
    asks_usage: bool,
    key: Option<Arc<KeyRecord>>,
    pass: Option<Pass>,
    rate_headers: RateLimitHeaders,
    model: Option<Arc<Model>>,
    route_rule: String,
    counted: TokenUsage,
    /// Tokens of the conversation a Responses request continues, which the provider reads
    /// again besides the request's own input.
    carried_input: u64,
    progress: upstream::Progress,
    settled: bool,
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
            asks_usage: false,
            key: None,
            pass: None,
            rate_headers: RateLimitHeaders::default(),
            model: None,
            route_rule: String::new(),
            counted: TokenUsage::default(),
            carried_input: 0,
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
            asks_usage: self.asks_usage,
            key: self.key.clone(),
            pass: self.pass.take(),
            rate_headers: self.rate_headers,
            model: self.model.clone(),
            route_rule: std::mem::take(&mut self.route_rule),
            counted: self.counted,
            carried_input: self.carried_input,
            progress: std::mem::take(&mut self.progress),
            settled: false,
        };
        self.settled = true;
        taken
    }

    /// Routing for the virtual model: the chosen model first, then its fallbacks.
    /// Takes the router's decision: the metrics, the rule, the models to try in order.
    fn route(
        &mut self,
        config: &Config,
        decided: Result<Decision, RouteError>,
    ) -> Result<Vec<Arc<Model>>, GatewayError> {
        let decision = decided.map_err(|error| GatewayError::ModelNotAllowed(error.to_string()))?;
        self.app
            .metrics
            .hot()
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
    async fn admit(
        &mut self,
        key: &KeyRecord,
        candidates: &[Arc<Model>],
        body: &RequestBody<'_>,
    ) -> Result<(), GatewayError> {
        let count = |name: &str| body.member(name).and_then(whole_number);
        // A body may carry both limits; which one a provider honours varies, so the larger
        // is reserved.
        let requested_output = count("max_completion_tokens").max(count("max_tokens"));
        // Legacy completions generate `best_of` answers server-side and bill them all.
        let choices = count("n")
            .unwrap_or(1)
            .max(count("best_of").unwrap_or(1))
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
            // A continued conversation's earlier turns are read (and billed) again.
            let input = self.counted.input.saturating_add(self.carried_input);
            let cost = plan.worst_case(model.rated(), input, output);
            demand.tokens = demand.tokens.max(input.saturating_add(output));
            demand.cost = demand.cost.max(cost);
        }
        let Some(first) = candidates.first() else {
            return Err(GatewayError::Internal("no model to admit".to_owned()));
        };
        let limits = self.app.key_limits(key);
        let levels = self.app.levels(key);
        match self
            .app
            .admission
            .admit(&key.id, &limits, levels.above(), first, demand)
            .await
        {
            Ok(pass) => {
                self.rate_headers = pass.headers();
                self.pass = Some(pass);
                Ok(())
            }
            Err(Refused { refusal, headers }) => {
                self.rate_headers = headers;
                self.app
                    .metrics
                    .rejections
                    .with_label_values(&[refusal.reason()])
                    .inc();
                Err(refusal_error(&refusal, key, &levels))
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
            GatewayError::UpstreamTimeout
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamAnswer { .. }
            | GatewayError::UpstreamCredentials { .. } => Outcome::GatewayError,
            _ => Outcome::Rejected,
        };
        self.settle(Ending {
            answered: false,
            status: error.status().as_u16(),
            outcome,
            reported: None,
            finish_reason: None,
            ttft: None,
            response_id: None,
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
        let unreadable = if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let mut text = String::from_utf8_lossy(&body[..body.len().min(1_000)]).into_owned();
            // Providers quote the key they were sent; the log must not hold it.
            if let Some(key) = self.model.as_ref().and_then(|m| m.upstream.api_key()) {
                text = text.replace(key, "[provider key]");
            }
            tracing::error!(
                upstream = self.model.as_ref().map_or("-", |m| m.upstream.name.as_str()),
                status = status.as_u16(),
                body = %text,
                "the provider refused the gateway's credentials"
            );
            Some(GatewayError::UpstreamCredentials { status })
        } else {
            unreadable_answer(status, content_type.as_ref(), &body)
        };
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
            response_id: None,
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
        let body = match within(model.upstream.idle_timeout, reading).await {
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
        let Some(Metered {
            reported,
            output,
            finish_reason,
            response_id,
        }) = meter_body(
            &self.app.tokenizer,
            &self.app.metrics,
            &model,
            self.endpoint,
            body.clone(),
            inline_max,
        )
        .await
        else {
            return Err(GatewayError::UpstreamAnswer {
                status: StatusCode::BAD_GATEWAY,
                message: "the upstream answered with a success status and a body that is not JSON"
                    .to_owned(),
            });
        };
        self.counted.output = output;
        let committed = self.settle(Ending {
            answered: true,
            status: 200,
            outcome: Outcome::Completed,
            reported,
            finish_reason,
            ttft: Some(ttft),
            response_id,
        });
        if let Some(committed) = committed {
            // Strict durability: the client sees the answer only once its record is committed.
            if committed.await.is_err() {
                return Err(GatewayError::UsageNotRecorded);
            }
        }
        let mut response = Response::new(Body::from(body));
        // Sized once for the type and the gateway's headers (see `decorate`).
        *response.headers_mut() = HeaderMap::with_capacity(12);
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
        let body = MeteredStream::new(self, reply, strip_usage_chunk, idle_timeout);
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
        // Room for the headers below at once, not a regrowth of the map partway.
        headers.reserve(9);
        if let Some(value) = self
            .model
            .as_ref()
            .and_then(|model| model.name_header.clone())
        {
            headers.insert(X_TOLLGATE_MODEL.clone(), value);
        }
        let route = match self.route_rule.as_str() {
            "direct" => HeaderValue::from_static("direct"),
            rule => {
                HeaderValue::from_str(rule).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
            }
        };
        headers.insert(X_TOLLGATE_ROUTE.clone(), route);
        self.rate_headers.write_to(headers);
    }
}

/// A count as a client may write it: `4` or `4.0` (a float never truncates a limit down).
fn whole_number(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(|n| n.ceil() as u64)
    })
}

/// A throttle or budget refusal as the client sees it, naming the level that refused.
pub(crate) fn refusal_error(refusal: &Refusal, key: &KeyRecord, levels: &Levels) -> GatewayError {
    let level = match refusal {
        Refusal::Unavailable => return GatewayError::StateUnavailable,
        Refusal::RateLimited { level, .. } | Refusal::InsufficientQuota { level, .. } => *level,
    };
    let group = levels.get(level);
    let name = group.map_or(key.name.as_str(), |group| group.name.as_str());
    let whose = format!("{} `{name}`", level.as_str());
    match refusal {
        Refusal::RateLimited {
            limit, retry_after, ..
        } => {
            let spend_cap =
                |key_cap: Option<Money>, group_cap: fn(&GroupRecord) -> Option<Money>| {
                    group
                        .map_or(key_cap, group_cap)
                        .map_or_else(String::new, |cap| cap.to_usd_string())
                };
            let what = match limit {
                Limit::Concurrency => "concurrent requests".to_owned(),
                Limit::ModelRequests | Limit::ModelTokens => {
                    format!("{} per minute on this model", limit.kind())
                }
                Limit::SpendPerMinute => format!(
                    "spend (at most ${} per minute)",
                    spend_cap(key.max_usd_per_minute, |g| g.max_usd_per_minute)
                ),
                Limit::SpendPerHour => format!(
                    "spend (at most ${} per hour)",
                    spend_cap(key.max_usd_per_hour, |g| g.max_usd_per_hour)
                ),
                Limit::Requests | Limit::Tokens => format!("{} per minute", limit.kind()),
            };
            let on = match limit {
                Limit::ModelRequests | Limit::ModelTokens => format!("key `{}`", key.name),
                _ => whose,
            };
            GatewayError::RateLimited {
                message: format!(
                    "Rate limit reached for {what} on {on}. Please try again in {}.",
                    crate::limits::go_duration(*retry_after)
                ),
                retry_after: *retry_after,
                limit_kind: limit.kind(),
            }
        }
        Refusal::InsufficientQuota {
            remaining, needed, ..
        } => {
            let period = group.map_or(key.budget_period, |group| group.budget_period);
            let resets = match period.reset_ms(crate::unix_ms()) {
                Some(ms) => format!("it resets at {}", crate::rfc3339(ms)),
                None => "it never resets".to_owned(),
            };
            let of_key = match group {
                Some(_) => format!(" (key `{}`)", key.name),
                None => String::new(),
            };
            let left = match period {
                BudgetPeriod::Total => "in total".to_owned(),
                period => format!("this {}", period.as_str()),
            };
            GatewayError::InsufficientQuota {
                message: format!(
                    "Budget exhausted for {whose}{of_key}: ${} remaining {left}, this request may cost up to ${}; {resets}.",
                    remaining.to_usd_string(),
                    needed.to_usd_string()
                ),
            }
        }
        Refusal::Unavailable => GatewayError::StateUnavailable,
    }
}

/// What metering read of a whole answer.
struct Metered {
    reported: Option<TokenUsage>,
    output: u64,
    finish_reason: Option<Name>,
    /// A Responses API answer's id.
    response_id: Option<String>,
}

/// Reads usage, output count and finish reason from a whole JSON answer (`None` when it is not
/// JSON); tokenizing an answer over `inline_max` bytes runs on the blocking pool, a smaller one
/// costs less than the hop.
async fn meter_body(
    tokenizer: &Tokenizer,
    metrics: &crate::metrics::Metrics,
    model: &Model,
    endpoint: Endpoint,
    body: Bytes,
    inline_max: usize,
) -> Option<Metered> {
    let tokenizer = *tokenizer;
    let encoding = model.encoding;
    let inline = endpoint == Endpoint::Embeddings || body.len() <= inline_max;
    let work = move |body: Bytes| {
        let answer = Answer::parse(&body)?;
        let reported = answer.usage();
        let response_id = answer.response_id().map(str::to_owned);
        let mut output = OutputCounter::default();
        answer.read_output(&mut output);
        let tokens = match endpoint {
            Endpoint::Embeddings => 0,
            _ => output.finish(&tokenizer, encoding),
        };
        Some(Metered {
            reported,
            output: tokens,
            finish_reason: output.finish_reason().map(Name::from),
            response_id,
        })
    };
    if inline {
        return work(body);
    }
    let kept = body.clone();
    match tokio::task::spawn_blocking(move || work(body)).await {
        Ok(metered) => metered,
        Err(error) => {
            // The provider's own figures are still billed, when it gave them.
            tracing::error!(%error, "output tokens not counted");
            metrics.output_count_failures.inc();
            let answer = Answer::parse(&kept)?;
            Some(Metered {
                reported: answer.usage(),
                output: 0,
                finish_reason: None,
                response_id: answer.response_id().map(str::to_owned),
            })
        }
    }
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
