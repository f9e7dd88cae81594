//! Per-request work that issue 20 made cheaper, each beside the way it was done before:
//! the six `x-ratelimit-*` values (one shared buffer against a string per value), a chat
//! prompt's count when its short texts hit the prompt cache (the system prompt and the roles,
//! once counted text by text), a chat request read and counted (its messages borrowed against
//! a `Value` tree), a request's metric updates from two lanes at once (one copy of the
//! families against a copy per lane), the dispatch of a proxied POST (straight
//! to its endpoint against axum's router), and the metering of a whole chat answer (parse, read
//! the output, count it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::limits::gcra::Snapshot;
use tollgate::limits::{go_duration, RateLimitHeaders};
use tollgate::meter::prompt::ChatBody;
use tollgate::meter::tokenizer::{Encoding, Tokenizer};
use tollgate::metrics::{use_lane_shard, Metrics};

fn bench_rate_limit_headers(c: &mut Criterion) {
    let snapshot = |limit, remaining, reset_ms| Snapshot {
        limit,
        remaining,
        reset: Duration::from_millis(reset_ms),
    };
    let headers = RateLimitHeaders {
        requests: Some(snapshot(10_000, 9_999, 6)),
        tokens: Some(snapshot(2_000_000, 1_999_612, 11_640)),
    };
    let mut group = c.benchmark_group("rate_limit_headers");
    group.bench_function("shared_buffer", |b| {
        b.iter(|| {
            let mut map = HeaderMap::with_capacity(12);
            headers.write_to(&mut map);
            map
        })
    });
    // What `write_to` did before: a string, then a header value copied from it, per figure.
    let names = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ]
    .map(HeaderName::from_static);
    group.bench_function("value_per_figure", |b| {
        b.iter(|| {
            let mut map = HeaderMap::with_capacity(12);
            for (snapshot, names) in [headers.requests, headers.tokens]
                .iter()
                .zip(names.chunks(3))
            {
                let snapshot = snapshot.unwrap();
                map.insert(names[0].clone(), HeaderValue::from(snapshot.limit));
                map.insert(names[1].clone(), HeaderValue::from(snapshot.remaining));
                map.insert(
                    names[2].clone(),
                    HeaderValue::try_from(go_duration(snapshot.reset)).unwrap(),
                );
            }
            map
        })
    });
    group.finish();
}

fn bench_chat_prompt(c: &mut Criterion) {
    let tokenizer = Tokenizer::new().unwrap();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(22);
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt.trim()},
        ],
    });
    let mut group = c.benchmark_group("chat_prompt");
    group.bench_function("cached", |b| {
        b.iter(|| tokenizer.count_chat_prompt(Encoding::O200kBase, &body))
    });
    // The short texts counted each time, as before they were cached (the long one was).
    group.bench_function("short_texts_counted", |b| {
        b.iter(|| {
            ["system", "You are a helpful assistant.", "user"]
                .iter()
                .map(|text| tokenizer.count_text(Encoding::O200kBase, text))
                .sum::<u64>()
        })
    });
    // The whole request read and its prompt counted: with its messages borrowed, and as the
    // `Value` tree every request was parsed into before.
    let bytes = serde_json::to_vec(&body).unwrap();
    group.bench_function("read_borrowed_and_count", |b| {
        b.iter(|| {
            let chat: ChatBody = tollgate::json::from_slice(&bytes).unwrap();
            tokenizer.count_chat_prompt(Encoding::O200kBase, &chat)
        })
    });
    group.bench_function("read_value_and_count", |b| {
        b.iter(|| {
            let value: serde_json::Value = tollgate::json::from_slice(&bytes).unwrap();
            tokenizer.count_chat_prompt(Encoding::O200kBase, &value)
        })
    });
    group.finish();
}

/// The metric updates of one settled chat request.
fn settle_metrics(metrics: &Metrics) {
    let hot = metrics.hot();
    hot.route_decisions
        .with_label_values(&["direct", "cheap"])
        .inc();
    hot.upstream_duration
        .with_label_values(&["openai"])
        .observe(0.002);
    hot.upstream_attempts
        .with_label_values(&["openai", "2xx"])
        .inc();
    hot.requests
        .with_label_values(&["gpt-4o-mini", "cheap", "chat_completions", "2xx"])
        .inc();
    model_series_updates(metrics);
    hot.usage_pending.inc();
    hot.usage_queued.inc();
}

/// A settled request's updates of its model's series.
fn model_series_updates(metrics: &Metrics) {
    let series = metrics.model("gpt-4o-mini");
    series.request_duration[0].get().observe(0.002);
    series.input_tokens.get().inc_by(250);
    series.output_tokens.get().inc_by(16);
    series.cost_usd.get().inc_by(0.0000471);
    series.drift_input.get().inc_by(0);
    series.drift_output.get().inc_by(0);
}

fn bench_metric_series(c: &mut Criterion) {
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("metric_series");
    group.bench_function("found_once", |b| b.iter(|| model_series_updates(&metrics)));
    // What one request's metrics cost when two lanes on two cores settle requests at once:
    // every thread on one copy of the families (each update takes its cache line from the
    // other core), against a copy per lane, as the gateway runs.
    for (name, own_copies) in [
        ("two_lanes_one_copy", false),
        ("two_lanes_own_copies", true),
    ] {
        let metrics = Arc::new(Metrics::new());
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let start = std::sync::Barrier::new(2);
                std::thread::scope(|scope| {
                    let lanes: Vec<_> = (0..2)
                        .map(|lane| {
                            let (metrics, start) = (&metrics, &start);
                            scope.spawn(move || {
                                if own_copies {
                                    use_lane_shard(lane);
                                }
                                start.wait();
                                let began = Instant::now();
                                for _ in 0..iterations {
                                    settle_metrics(metrics);
                                }
                                began.elapsed()
                            })
                        })
                        .collect();
                    lanes
                        .into_iter()
                        .map(|lane| lane.join().unwrap_or_default())
                        .max()
                        .unwrap_or_default()
                })
            })
        });
    }
    group.finish();
}

/// What the client listener does with a POST to `/v1/chat/completions` before the proxy runs:
/// find the endpoint by its path (`server::Routes`), against axum's router with the same
/// routes (its matching, per-route boxed service and response mapping). Both call the same
/// trivial handler.
fn bench_dispatch(c: &mut Criterion) {
    use axum::body::Body;
    use axum::response::Response;
    use futures_util::FutureExt;
    use tollgate::api::Endpoint;
    use tower::Service;

    async fn answer(endpoint: Endpoint) -> Response {
        Response::new(Body::from(endpoint.as_str()))
    }
    let mut router: axum::Router = Endpoint::ALL
        .into_iter()
        .fold(axum::Router::new(), |router, endpoint| {
            router.route(
                endpoint.client_path(),
                axum::routing::post(move || answer(endpoint)),
            )
        })
        .route(
            "/v1/models",
            axum::routing::get(|| answer(Endpoint::Completions)),
        )
        .route(
            "/healthz",
            axum::routing::get(|| answer(Endpoint::Completions)),
        )
        .route(
            "/metrics",
            axum::routing::get(|| answer(Endpoint::Completions)),
        );
    let request = || {
        axum::http::Request::post("/v1/chat/completions")
            .body(Body::empty())
            .unwrap()
    };
    let mut group = c.benchmark_group("dispatch");
    group.bench_function("endpoint_by_path", |b| {
        b.iter(|| {
            let request = request();
            let endpoint = (request.method() == axum::http::Method::POST)
                .then(|| Endpoint::at(request.uri().path()))
                .flatten()
                .unwrap();
            let future: std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> =
                Box::pin(async move {
                    drop(request);
                    answer(endpoint).await
                });
            future.now_or_never().unwrap()
        })
    });
    group.bench_function("axum_router", |b| {
        b.iter(|| router.call(request()).now_or_never().unwrap().unwrap())
    });
    group.finish();
}

/// A whole non-streamed chat answer as the gateway meters it: parsed (strings borrowed), its
/// usage and output read, the output counted.
fn bench_answer(c: &mut Criterion) {
    use tollgate::meter::answer::Answer;
    use tollgate::meter::tokenizer::OutputCounter;

    let tokenizer = Tokenizer::new().unwrap();
    let body = br#"{"id":"chatcmpl-mock0000000000000001","object":"chat.completion","created":1796295711,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":" the quick brown fox jumps over lazy dog and then runs far away from home again","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"system_fingerprint":"fp_mock","service_tier":"default","usage":{"prompt_tokens":21,"completion_tokens":16,"total_tokens":37,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
    let mut group = c.benchmark_group("chat_answer");
    group.bench_function("parse", |b| b.iter(|| Answer::parse(body).unwrap().usage()));
    group.bench_function("parse_read_count", |b| {
        b.iter(|| {
            let answer = Answer::parse(body).unwrap();
            let usage = answer.usage();
            let mut output = OutputCounter::default();
            answer.read_output(&mut output);
            (usage, output.finish(&tokenizer, Encoding::O200kBase))
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_rate_limit_headers,
    bench_chat_prompt,
    bench_metric_series,
    bench_dispatch,
    bench_answer
);
criterion_main!(benches);
