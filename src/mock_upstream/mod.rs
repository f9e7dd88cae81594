//! A deterministic OpenAI-compatible upstream, standing in for the paid provider in tests,
//! benches and the demo. Answers have OpenAI's exact shapes (ids, `object`, `created`,
//! `choices`, `usage`, chunk format, `[DONE]`); the answer is a fixed sequence of common words,
//! each exactly one token in both o200k_base and cl100k_base, so token counts are known.
//!
//! Behaviour can be steered per request with a `mock` object in the body, which a gateway
//! forwards like any unknown field: `reply_tokens`, `reply`, `prompt_tokens`, `cached_tokens`,
//! `fail` (`"500"`, `"503"`, `"429"`, `"401"` (quoting the key it was sent), `"hang"`, `"cut"`,
//! `"stall"` (a stream stops sending after `cut_after` chunks and stays open)), `cut_after`
//! (chunks), `retry_after`, `fail_first` (fail only the first N attempts with the same
//! `x-request-id`), `tool_call`, `no_done` (end a stream without `data: [DONE]`, as some
//! compatible servers do), `no_usage` (report no usage) and `malformed` (a stream event, or a
//! whole answer, that is not JSON). It speaks the Responses API too (see `responses`), and
//! Anthropic's Messages API (see `messages`).

mod messages;
mod responses;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

/// One-token words (with their leading space) in both encodings.
const WORDS: &[&str] = &[
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", " and", " then",
    " runs", " far", " away", " from", " home", " again",
];
const DEFAULT_REPLY_TOKENS: u64 = 16;

#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Delay before the first byte of every answer.
    pub latency: Duration,
    /// Streaming pace; `None` sends chunks as fast as possible.
    pub tokens_per_sec: Option<u32>,
    /// Share of requests (0 to 1) that fail with `fail_mode`.
    pub fail_rate: f64,
    pub fail_mode: FailMode,
    pub seed: u64,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            latency: Duration::ZERO,
            tokens_per_sec: None,
            fail_rate: 0.0,
            fail_mode: FailMode::Status(500),
            seed: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    Status(u16),
    RateLimited {
        retry_after_secs: u64,
    },
    Hang,
    /// Streams: some chunks, then the connection drops. Otherwise: the connection drops.
    Cut {
        after_chunks: u64,
    },
    /// Streams: some chunks, then nothing more, the connection left open.
    Stall {
        after_chunks: u64,
    },
}

impl FromStr for FailMode {
    type Err = String;
    fn from_str(text: &str) -> Result<FailMode, String> {
        match text {
            "429" => Ok(FailMode::RateLimited {
                retry_after_secs: 1,
            }),
            "hang" => Ok(FailMode::Hang),
            "cut" => Ok(FailMode::Cut { after_chunks: 3 }),
            "stall" => Ok(FailMode::Stall { after_chunks: 3 }),
            code => match code.parse::<u16>() {
                Ok(status) if (400..600).contains(&status) => Ok(FailMode::Status(status)),
                _ => Err(format!("unknown failure mode `{text}`")),
            },
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MockStats {
    pub requests: u64,
    pub by_path: BTreeMap<String, u64>,
    pub streams_completed: u64,
    pub streams_cancelled: u64,
    pub last_headers: BTreeMap<String, String>,
    pub last_body: Value,
}

struct Shared {
    options: MockOptions,
    stats: Mutex<MockStats>,
    rng: Mutex<SmallRng>,
    attempts: Mutex<HashMap<String, u64>>,
    next_id: AtomicU64,
    /// Responses API responses, for retrieval and continuation.
    responses: Mutex<responses::Store>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, MockStats> {
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn responses(&self) -> std::sync::MutexGuard<'_, responses::Store> {
        self.responses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running mock upstream.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    pub async fn start(
        listener: tokio::net::TcpListener,
        options: MockOptions,
    ) -> std::io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let shared = new_shared(options).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(crate::lanes::no_delay(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(MockUpstream {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> MockStats {
        self.shared.stats().clone()
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Serves until `shutdown` resolves (the `tollgate mock-upstream` command).
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: MockOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        crate::lanes::no_delay(listener),
        router(new_shared(options).await),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Builds the token encoders before the first request: that takes ~0.2 s, which the first
/// request would otherwise wait for, and a test or bench timing it would blame the gateway.
async fn new_shared(options: MockOptions) -> Arc<Shared> {
    let _ = tokio::task::spawn_blocking(crate::meter::tokenizer::Tokenizer::new).await;
    Arc::new(Shared {
        rng: Mutex::new(SmallRng::seed_from_u64(options.seed)),
        options,
        stats: Mutex::new(MockStats::default()),
        attempts: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        responses: Mutex::new(responses::Store::default()),
    })
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses::create))
        .route("/v1/messages", post(messages::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/v1/models", get(models))
        .route("/mock/stats", get(stats))
        .with_state(shared)
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.stats().clone()).into_response()
}

async fn models() -> Response {
    let data: Vec<Value> = [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.1-nano",
        "text-embedding-3-small",
    ]
    .iter()
    .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
    .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(shared, headers, body, Kind::Chat, "/v1/chat/completions").await
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(shared, headers, body, Kind::Completion, "/v1/completions").await
}

/// Records the request and parses it; answers 400 in OpenAI's shape for bad JSON.
#[allow(clippy::result_large_err)]
fn intake(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    path: &str,
) -> Result<Value, Response> {
    let parsed = serde_json::from_slice::<Value>(body);
    let mut stats = shared.stats();
    stats.requests += 1;
    *stats.by_path.entry(path.to_owned()).or_default() += 1;
    stats.last_headers = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    match parsed {
        Ok(value) if value.is_object() => {
            stats.last_body = value.clone();
            Ok(value)
        }
        _ => Err(error_response(
            400,
            "invalid_request_error",
            "invalid_json",
            "We could not parse the JSON body of your request.",
        )),
    }
}

fn error_response(status: u16, kind: &str, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

/// The failure this request should suffer, if any.
fn failure(shared: &Shared, headers: &HeaderMap, body: &Value) -> Option<FailMode> {
    let steer = &body["mock"];
    let requested = match &steer["fail"] {
        Value::String(mode) => mode.parse::<FailMode>().ok().map(|mode| match mode {
            FailMode::RateLimited { .. } => FailMode::RateLimited {
                retry_after_secs: steer["retry_after"].as_u64().unwrap_or(1),
            },
            FailMode::Cut { .. } => FailMode::Cut {
                after_chunks: steer["cut_after"].as_u64().unwrap_or(3),
            },
            FailMode::Stall { .. } => FailMode::Stall {
                after_chunks: steer["cut_after"].as_u64().unwrap_or(3),
            },
            other => other,
        }),
        _ => None,
    };
    if let Some(mode) = requested {
        if let Some(first) = steer["fail_first"].as_u64() {
            let id = headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let mut attempts = shared
                .attempts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let seen = attempts.entry(id).or_insert(0);
            *seen += 1;
            return (*seen <= first).then_some(mode);
        }
        return Some(mode);
    }
    if shared.options.fail_rate > 0.0 {
        let roll: f64 = shared
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .random();
        if roll < shared.options.fail_rate {
            return Some(shared.options.fail_mode);
        }
    }
    None
}

/// Answers a failure that happens before any byte of a body. A 401 quotes the key it was
/// sent, as providers do (in part): a gateway must not pass that on.
async fn fail_early(mode: FailMode, headers: &HeaderMap) -> Option<Response> {
    match mode {
        FailMode::Status(401) => {
            let key = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .map_or("", |value| value.trim_start_matches("Bearer "));
            Some(error_response(
                401,
                "invalid_request_error",
                "invalid_api_key",
                &format!("Incorrect API key provided: {key}."),
            ))
        }
        FailMode::Status(status) => Some(error_response(
            status,
            "server_error",
            "server_error",
            "The server had an error while processing your request.",
        )),
        FailMode::RateLimited { retry_after_secs } => {
            let mut response = error_response(
                429,
                "requests",
                "rate_limit_exceeded",
                "Rate limit reached for requests.",
            );
            if let Ok(value) = retry_after_secs.to_string().parse() {
                response.headers_mut().insert("retry-after", value);
            }
            Some(response)
        }
        FailMode::Hang => {
            std::future::pending::<()>().await;
            None
        }
        FailMode::Cut { .. } | FailMode::Stall { .. } => None,
    }
}

fn encoding_for(model: &str) -> crate::meter::tokenizer::Encoding {
    crate::meter::tokenizer::Encoding::for_model(model)
        .unwrap_or(crate::meter::tokenizer::Encoding::O200kBase)
}

/// Prompt tokens as the provider reports them: the cookbook formula with tiktoken, overridable.
fn prompt_tokens(body: &Value, kind: Kind, model: &str) -> u64 {
    if let Some(tokens) = body["mock"]["prompt_tokens"].as_u64() {
        return tokens;
    }
    let tokenizer = match crate::meter::tokenizer::Tokenizer::new() {
        Ok(tokenizer) => tokenizer,
        Err(_) => return 0,
    };
    let encoding = encoding_for(model);
    match kind {
        Kind::Chat => tokenizer.count_chat_prompt(encoding, body),
        Kind::Completion => tokenizer.count_completion_prompt(encoding, &body["prompt"]),
    }
}

/// The answer's words: `mock.reply` split into words, or `reply_tokens` of the fixed
/// sequence, cut at `max_tokens`. Returns the pieces and whether the cut happened.
fn answer(body: &Value) -> (Vec<String>, bool) {
    let limit = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .or_else(|| body["max_output_tokens"].as_u64());
    let mut pieces: Vec<String> = match body["mock"]["reply"].as_str() {
        Some(text) => text.split_inclusive(' ').map(str::to_owned).collect(),
        None => {
            let count = body["mock"]["reply_tokens"]
                .as_u64()
                .unwrap_or(DEFAULT_REPLY_TOKENS);
            (0..count)
                .map(|i| WORDS[(i as usize) % WORDS.len()].to_owned())
                .collect()
        }
    };
    let cut = limit.is_some_and(|limit| (pieces.len() as u64) > limit);
    if let Some(limit) = limit {
        pieces.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    (pieces, cut)
}

fn usage_json(prompt: u64, completion: u64, cached: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

async fn generate(
    shared: Arc<Shared>,
    headers: HeaderMap,
    raw: Bytes,
    kind: Kind,
    path: &str,
) -> Response {
    let body = match intake(&shared, &headers, &raw, path) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let failing = failure(&shared, &headers, &body);
    if !shared.options.latency.is_zero() {
        tokio::time::sleep(shared.options.latency).await;
    }
    if let Some(mode) = failing {
        if let Some(response) = fail_early(mode, &headers).await {
            return response;
        }
    }
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let id_number = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-mock{id_number:016}"),
        Kind::Completion => format!("cmpl-mock{id_number:016}"),
    };
    let created = crate::unix_ms() / 1000;
    let (pieces, cut) = answer(&body);
    let choices = body["n"].as_u64().unwrap_or(1).clamp(1, 16);
    let tool_call =
        kind == Kind::Chat && body["mock"]["tool_call"] == json!(true) && body["tools"].is_array();
    let finish = if tool_call {
        "tool_calls"
    } else if cut {
        "length"
    } else {
        "stop"
    };
    let prompt = prompt_tokens(&body, kind, &model);
    let cached = body["mock"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
        .min(prompt);
    let text: String = pieces.concat();
    let tool_name = body["tools"][0]["function"]["name"]
        .as_str()
        .unwrap_or("tool")
        .to_owned();
    let completion_per_choice = if tool_call {
        crate::meter::tokenizer::Tokenizer::new()
            .map(|t| t.count_text(encoding_for(&model), &text))
            .unwrap_or(0)
    } else {
        pieces.len() as u64
    };
    let usage = (body["mock"]["no_usage"] != json!(true))
        .then(|| usage_json(prompt, completion_per_choice * choices, cached));
    let malformed = body["mock"]["malformed"] == json!(true);
    let interrupt = match failing {
        Some(FailMode::Cut { after_chunks }) => Some(Interrupt::Cut(after_chunks)),
        Some(FailMode::Stall { after_chunks }) => Some(Interrupt::Stall(after_chunks)),
        _ => None,
    };
    if body["stream"] == json!(true) {
        let include_usage = body["stream_options"]["include_usage"] == json!(true);
        let mut frames = stream_frames(&StreamPlan {
            kind,
            id: &id,
            model: &model,
            created,
            pieces: &pieces,
            choices,
            finish,
            tool_call: tool_call.then_some(tool_name.as_str()),
            usage: usage.filter(|_| include_usage),
        });
        if body["mock"]["no_done"] == json!(true) {
            frames.pop();
        }
        if malformed {
            frames.insert(
                1.min(frames.len()),
                Bytes::from_static(b"data: {not json\n\n"),
            );
        }
        return stream_response(shared, frames, interrupt);
    }
    if malformed {
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from("{not json"))
            .unwrap_or_default();
    }
    if let Some(Interrupt::Stall(_)) = interrupt {
        std::future::pending::<()>().await;
    }
    if interrupt.is_some() {
        // A non-streamed cut: the connection drops before any byte of the answer.
        return Response::builder()
            .status(200)
            .body(Body::from_stream(futures_util::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("cut"))
            })))
            .unwrap_or_default();
    }
    let choices: Vec<Value> = (0..choices)
        .map(|index| match kind {
            Kind::Chat => {
                let message = if tool_call {
                    json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                        {"id": format!("call_mock{index}"), "type": "function", "function": {"name": tool_name, "arguments": text}}
                    ]})
                } else {
                    json!({"role": "assistant", "content": text, "refusal": null, "annotations": []})
                };
                json!({"index": index, "message": message, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish}),
        })
        .collect();
    let object = match kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    let mut answer = json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": choices, "system_fingerprint": "fp_mock", "service_tier": "default"
    });
    if let Some(usage) = usage {
        answer["usage"] = usage;
    }
    axum::Json(answer).into_response()
}

struct StreamPlan<'a> {
    kind: Kind,
    id: &'a str,
    model: &'a str,
    created: i64,
    pieces: &'a [String],
    choices: u64,
    finish: &'a str,
    tool_call: Option<&'a str>,
    usage: Option<Value>,
}

/// Every SSE event of a streamed answer, in order.
fn stream_frames(plan: &StreamPlan<'_>) -> Vec<Bytes> {
    let include_usage = plan.usage.is_some();
    let chunk = |choices: Value, usage: Option<&Value>| -> Bytes {
        let mut object = match plan.kind {
            Kind::Chat => {
                json!({"id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model, "system_fingerprint": "fp_mock", "choices": choices})
            }
            Kind::Completion => {
                json!({"id": plan.id, "object": "text_completion", "created": plan.created,
                "model": plan.model, "choices": choices})
            }
        };
        if include_usage {
            object["usage"] = usage.cloned().unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {object}\n\n"))
    };
    let mut frames = Vec::with_capacity(plan.pieces.len() * plan.choices as usize + 4);
    for index in 0..plan.choices {
        if plan.kind == Kind::Chat {
            let delta = match plan.tool_call {
                Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [
                    {"index": 0, "id": format!("call_mock{index}"), "type": "function", "function": {"name": name, "arguments": ""}}]}),
                None => json!({"role": "assistant", "content": "", "refusal": null}),
            };
            frames.push(chunk(
                json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
                None,
            ));
        }
        for piece in plan.pieces {
            let choice = match (plan.kind, plan.tool_call) {
                (Kind::Chat, Some(_)) => {
                    json!({"index": index, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "logprobs": null, "finish_reason": null})
                }
                (Kind::Chat, None) => {
                    json!({"index": index, "delta": {"content": piece}, "logprobs": null, "finish_reason": null})
                }
                (Kind::Completion, _) => {
                    json!({"index": index, "text": piece, "logprobs": null, "finish_reason": null})
                }
            };
            frames.push(chunk(json!([choice]), None));
        }
        let last = match plan.kind {
            Kind::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": plan.finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": "", "logprobs": null, "finish_reason": plan.finish})
            }
        };
        frames.push(chunk(json!([last]), None));
    }
    if let Some(usage) = &plan.usage {
        frames.push(chunk(json!([]), Some(usage)));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// Counts a stream as cancelled if its body is dropped before the last frame went out.
struct StreamGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut stats = self.shared.stats();
        if self.finished {
            stats.streams_completed += 1;
        } else {
            stats.streams_cancelled += 1;
        }
    }
}

/// How a stream is broken off: the connection dropped, or left open and silent, after so
/// many chunks.
#[derive(Clone, Copy)]
enum Interrupt {
    Cut(u64),
    Stall(u64),
}

fn stream_response(
    shared: Arc<Shared>,
    frames: Vec<Bytes>,
    interrupt: Option<Interrupt>,
) -> Response {
    let pace = shared
        .options
        .tokens_per_sec
        .filter(|rate| *rate > 0)
        .map(|rate| Duration::from_secs_f64(1.0 / f64::from(rate)));
    let total = frames.len();
    let guard = StreamGuard {
        shared,
        finished: false,
    };
    let state = (
        frames.into_iter().enumerate(),
        guard,
        pace,
        interrupt,
        total,
    );
    let stream = futures_util::stream::unfold(
        state,
        |(mut frames, mut guard, pace, interrupt, total)| async move {
            let (index, frame) = frames.next()?;
            match interrupt {
                Some(Interrupt::Cut(after)) if index as u64 >= after => {
                    guard.finished = true;
                    // Let the chunks already written reach the peer before the connection drops.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Some((
                        Err(std::io::Error::other("mock cut the stream")),
                        (frames, guard, pace, interrupt, total),
                    ));
                }
                Some(Interrupt::Stall(after)) if index as u64 >= after => {
                    std::future::pending::<()>().await;
                }
                _ => {}
            }
            if let (Some(pace), true) = (pace, index > 0) {
                tokio::time::sleep(pace).await;
            }
            if index + 1 == total {
                guard.finished = true;
            }
            Some((
                Ok::<Bytes, std::io::Error>(frame),
                (frames, guard, pace, interrupt, total),
            ))
        },
    );
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

async fn embeddings(State(shared): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    let body = match intake(&shared, &headers, &raw, "/v1/embeddings") {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Some(mode) = failure(&shared, &headers, &body) {
        if let Some(response) = fail_early(mode, &headers).await {
            return response;
        }
    }
    let model = body["model"]
        .as_str()
        .unwrap_or("text-embedding-3-small")
        .to_owned();
    let inputs: Vec<Value> = match &body["input"] {
        Value::Array(items) if !items.iter().all(Value::is_number) => items.clone(),
        Value::Null => {
            return error_response(
                400,
                "invalid_request_error",
                "missing_input",
                "'input' is a required property",
            )
        }
        other => vec![other.clone()],
    };
    let dimensions = body["dimensions"].as_u64().unwrap_or(8).clamp(1, 4096) as usize;
    let base64 = body["encoding_format"] == json!("base64");
    let tokenizer = crate::meter::tokenizer::Tokenizer::new().ok();
    let prompt = body["mock"]["prompt_tokens"].as_u64().unwrap_or_else(|| {
        tokenizer.map_or(0, |t| {
            t.count_embedding_input(encoding_for(&model), &body["input"])
        })
    });
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let seed = input.to_string().bytes().fold(index as u32 + 7, |acc, b| {
                acc.wrapping_mul(31).wrapping_add(u32::from(b))
            });
            let vector: Vec<f32> = (0..dimensions)
                .map(|i| {
                    ((seed.wrapping_add((i as u32).wrapping_mul(2_654_435_761)) % 2000) as f32
                        / 1000.0)
                        - 1.0
                })
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    axum::Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}
    }))
    .into_response()
}

/// Standard base64 with padding; the mock's only use of it does not justify a dependency.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = (u32::from(group[0]) << 16)
            | (u32::from(*group.get(1).unwrap_or(&0)) << 8)
            | u32::from(*group.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_words_are_one_token_each() {
        let tokenizer = crate::meter::tokenizer::Tokenizer::new().unwrap();
        for encoding in [
            crate::meter::tokenizer::Encoding::O200kBase,
            crate::meter::tokenizer::Encoding::Cl100kBase,
        ] {
            let text: String = WORDS.concat();
            assert_eq!(tokenizer.count_text(encoding, &text), WORDS.len() as u64);
        }
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
    }
}
