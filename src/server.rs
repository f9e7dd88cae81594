//! Assembling and running the gateway: the HTTP routes, start-up (encoders, usage pipeline),
//! readiness, and graceful shutdown — stop accepting, let in-flight requests and streams finish
//! within the grace period, then flush the usage sink.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::admin;
use crate::app::{App, Services};
use crate::auth::store::{KeyStore, SqliteKeyStore};
use crate::config::Config;
use crate::error::GatewayError;
use crate::lanes::Lanes;
use crate::limits::BudgetPeriod;
use crate::limits::{Limiter, SystemClock};
use crate::meter::record::Endpoint;
use crate::meter::sink::UsagePipeline;
use crate::meter::tokenizer::Tokenizer;
use crate::metrics::Metrics;
use crate::money::Money;
use crate::proxy;
use crate::rating::ledger::{LedgerReader, LedgerWriter};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot build the tokenizers: {0}")]
    Tokenizer(String),
    #[error("cannot open the usage sink under {dir}: {source}")]
    Sink { dir: String, source: std::io::Error },
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started gateway: its state, its listener address and the pipeline to flush at the end.
pub struct Gateway {
    pub app: Arc<App>,
    pipeline: UsagePipeline,
}

impl Gateway {
    /// Builds everything a request needs before the first one is accepted: encoders are
    /// loaded here so `/readyz` only says ready once counting is possible.
    pub fn start(config: Config, admin_token: Option<String>) -> Result<Gateway, StartError> {
        let tokenizer = Tokenizer::new().map_err(|e| StartError::Tokenizer(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let data_dir = config.server.data_dir.clone();
        let writer = LedgerWriter::open(&data_dir, config.durability)
            .map_err(|e| StartError::Store(e.to_string()))?;
        let ledger = LedgerReader::new(&data_dir);
        let pipeline = UsagePipeline::start(
            Box::new(writer),
            config.server.usage_channel_capacity,
            metrics.clone(),
        )
        .map_err(|source| StartError::Sink {
            dir: config.server.data_dir.display().to_string(),
            source,
        })?;
        let key_store = SqliteKeyStore::open(&config.server.data_dir)
            .map_err(|e| StartError::Store(e.to_string()))?;
        let keys = key_store
            .list()
            .map_err(|e| StartError::Store(e.to_string()))?;
        let limiter = Limiter::new(
            Arc::new(SystemClock),
            config.budget_alerts.thresholds_pct.clone(),
        );
        let app = Arc::new(App::new(
            config,
            Services {
                tokenizer,
                metrics,
                usage: pipeline.sender(),
                key_store: Arc::new(key_store),
                ledger: ledger.clone(),
                limiter,
                admin_token,
            },
        ));
        restore(&app, &ledger, keys).map_err(|e| StartError::Store(e.to_string()))?;
        Ok(Gateway { app, pipeline })
    }

    pub fn router(&self) -> Router {
        let separate_admin = self.app.config().server.admin_listen.is_some();
        router(self.app.clone(), !separate_admin)
    }

    /// Serves until `shutdown` resolves, then drains within the configured grace period and
    /// flushes the usage sink.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let config = self.app.config();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let lanes = Lanes::start(
            listener,
            self.router(),
            stop_rx,
            config.server.shutdown_grace,
            config.server.workers,
        )?;
        // With `server.admin_listen`, the admin API (and the operational endpoints) get their
        // own listener, e.g. one that only the platform network reaches.
        let admin_server = match self.app.config().server.admin_listen {
            Some(addr) => {
                let admin_listener = TcpListener::bind(addr).await?;
                tracing::info!(addr = %admin_listener.local_addr()?, "admin API listening");
                let mut admin_stop = stop_tx.subscribe();
                Some(tokio::spawn(
                    axum::serve(no_delay(admin_listener), admin_router(self.app.clone()))
                        .with_graceful_shutdown(async move {
                            let _ = admin_stop.wait_for(|stop| *stop).await;
                        })
                        .into_future(),
                ))
            }
            None => None,
        };
        let watcher = tokio::spawn(crate::reload::watch(
            self.app.clone(),
            self.app.config().source.clone(),
        ));
        self.app.set_ready(true);
        shutdown.await;
        tracing::info!(
            grace_secs = config.server.shutdown_grace.as_secs(),
            "shutting down: draining in-flight requests"
        );
        self.app.set_ready(false);
        let _ = stop_tx.send(true);
        if lanes.drained().await {
            tracing::info!("all connections drained");
        }
        watcher.abort();
        if let Some(admin_server) = admin_server {
            admin_server.abort();
        }
        // Streams that ended (or were cut by the abort) settle on the blocking pool; their
        // records must reach the channel before it is flushed and closed.
        self.app.settling.close();
        self.app.settling.wait().await;
        self.pipeline.close().await;
        tracing::info!("usage sink flushed; bye");
        Ok(())
    }
}

/// Brings live state back from the ledger: each key's spend in its current budget period and
/// its running totals for the month. Reservations are never stored, so those of requests that
/// a crash interrupted are simply gone.
fn restore(
    app: &App,
    ledger: &LedgerReader,
    keys: Vec<crate::auth::KeyRecord>,
) -> Result<(), crate::rating::ledger::LedgerError> {
    let now_ms = crate::unix_ms();
    let month = BudgetPeriod::Month.start_ms(now_ms);
    for (key_id, cursor) in ledger.cursors(month)? {
        app.rater.seed(&key_id, month, cursor);
    }
    let mut spend_by_period = std::collections::HashMap::new();
    for key in keys {
        let start = app.budget_period(&key).start_ms(now_ms);
        if let std::collections::hash_map::Entry::Vacant(slot) = spend_by_period.entry(start) {
            slot.insert(ledger.spend_since(start)?);
        }
        let spent = spend_by_period
            .get(&start)
            .and_then(|spend| spend.get(&key.id))
            .copied()
            .unwrap_or(Money::ZERO);
        app.key_activated(key, Some(spent));
    }
    Ok(())
}

/// The client API, with the admin API merged in unless it has its own listener.
pub fn router(app: Arc<App>, with_admin: bool) -> Router {
    let routes = Router::new()
        .route(
            "/v1/chat/completions",
            proxy::endpoint(Endpoint::ChatCompletions),
        )
        .route("/v1/completions", proxy::endpoint(Endpoint::Completions))
        .route("/v1/embeddings", proxy::endpoint(Endpoint::Embeddings))
        .route("/v1/models", get(proxy::models))
        .route("/v1/models/{id}", get(proxy::model))
        .route("/v1/outcomes", post(crate::outcomes::report))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let routes = if with_admin {
        routes.merge(admin::routes())
    } else {
        routes
    };
    finish(routes, app)
}

/// The admin listener's routes: the admin API and the operational endpoints.
fn admin_router(app: Arc<App>) -> Router {
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin::routes());
    finish(routes, app)
}

fn finish(routes: Router<Arc<App>>, app: Arc<App>) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(app)
}

/// A fresh request id: 48 bits of milliseconds then 80 random bits, in hex. Time first (as in
/// UUIDv7) so that the ledger's unique index on request ids grows at its end instead of
/// touching a random page per record.
pub fn new_request_id() -> String {
    let random: u128 = rand::random();
    let ms = crate::unix_ms() as u128 & ((1 << 48) - 1);
    format!("req_{:032x}", (ms << 80) | (random >> 48))
}

/// Marks a request whose `x-request-id` is the client's own rather than the gateway's.
#[derive(Clone, Copy)]
pub struct ClientChoseRequestId;

/// Every request carries a usable `x-request-id` from here on: the client's when it is a sane
/// token (1 to 128 visible ASCII characters), else a fresh one. It is sent upstream and echoed
/// on every response.
async fn request_id(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let usable = request.headers().get(&X_REQUEST_ID).is_some_and(|value| {
        let bytes = value.as_bytes();
        (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
    });
    if usable {
        request.extensions_mut().insert(ClientChoseRequestId);
    } else if let Ok(value) = HeaderValue::from_str(&new_request_id()) {
        request.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    let id = request.headers().get(&X_REQUEST_ID).cloned();
    let mut response = next.run(request).await;
    if let Some(id) = id {
        response.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    response
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Ready when the config is loaded, encoders are built, and there is somewhere to send
/// requests; not ready while draining for shutdown.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let config = app.config();
    let checks = serde_json::json!({
        "config": config.source.display().to_string(),
        "models": config.models.len(),
        "upstreams": config.upstreams.len(),
        "accepting": app.is_ready(),
        "usage_recording": if app.usage.failing() { "failing" } else { "ok" },
    });
    let ready = app.is_ready() && !config.models.is_empty() && !app.usage.failing();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    GatewayError::NotFound(uri.path().to_owned()).into_response()
}

async fn method_not_allowed() -> Response {
    let error = GatewayError::BadRequest {
        message: "method not allowed on this path".to_owned(),
        param: None,
    };
    let mut response = error.into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Accepted connections with Nagle's algorithm off (see [`set_no_delay`]).
pub fn no_delay(listener: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| set_no_delay(stream))
}

/// A streamed answer's small SSE events must leave as they are written, not wait for the
/// client's delayed ACK (up to 40 ms).
pub fn set_no_delay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}
